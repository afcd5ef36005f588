"""`python -m ocr_vlm.model --preset=d20 --summary [--key=value ...]`: per-component parameter table, built on the meta
device."""

from __future__ import annotations

import argparse

from ocr_vlm import cli, config
from ocr_vlm.config import ConfigError
from ocr_vlm.model.vlm import build_model, parameter_table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--preset", default="d20", choices=sorted(config.PRESETS))
    parser.add_argument("--summary", action="store_true", help="print the parameter table")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = cli.with_args(config.preset(args.preset), overrides)
    except ConfigError as e:
        parser.error(str(e))
    if not args.summary:
        parser.error("nothing to do: pass --summary")
    print(parameter_table(build_model(cfg, device="meta")))
    print(f"image: {cfg.image_size}px -> {cfg.vision_grid}x{cfg.vision_grid} tokens -> {cfg.image_tokens} embeddings")


if __name__ == "__main__":
    main()
