"""`python -m ocr_vlm.model --preset d20 --summary`: per-component parameter table, built on the meta device."""

from __future__ import annotations

import argparse

from ocr_vlm import config
from ocr_vlm.model.vlm import COMPONENTS, build_model


def summary_rows(cfg: config.VLMConfig) -> list[tuple[str, int]]:
    model = build_model(cfg, device="meta")
    rows = [(name, sum(p.numel() for p in model.component_parameters(name))) for name in COMPONENTS]
    return rows + [("total", sum(n for _, n in rows))]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="d20", choices=sorted(config.PRESETS))
    parser.add_argument("--summary", action="store_true", help="print the parameter table")
    args, overrides = parser.parse_known_args(argv)
    cfg = config.strict_overrides(config.preset(args.preset), overrides)
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    print(f"{'component':<12}{'parameters':>16}")
    for name, count in summary_rows(cfg):
        print(f"{name:<12}{count:>16,}  ({count / 1e6:,.2f}M)")
    print(f"image: {cfg.image_size}px -> {cfg.vision_grid}x{cfg.vision_grid} tokens -> {cfg.image_tokens} embeddings")


if __name__ == "__main__":
    main()
