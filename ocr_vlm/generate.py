"""Read pages with an exported model.

    python -m ocr_vlm.generate --checkpoint runs/demo/export --image page.png [more.png ...] --prompt "Free OCR."
        [--mode=gundam --max_crops=9]   (default: the mode the model was trained in)
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ocr_vlm.generation import Generator
from ocr_vlm.image import add_mode_arguments, apply_mode, load_views, stack_views
from ocr_vlm.rejected import Rejected
from ocr_vlm.weights import load_export


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an export directory (weights, config, tokenizer)")
    parser.add_argument("--image", nargs="+", required=True)
    parser.add_argument("--prompt", default="<image>\nFree OCR.", help="'<image>' marks the image; prepended if absent")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    add_mode_arguments(parser, default=None)
    args = parser.parse_args(argv)
    model, tokenizer = load_export(args.checkpoint)
    model.cfg = apply_mode(model.cfg, args, parser)
    try:
        pixels, tiles, grids = stack_views([load_views(Path(p), model.cfg) for p in args.image], model.cfg)
    except (Rejected, FileNotFoundError) as e:
        parser.error(str(e))
    texts = Generator(model, tokenizer).generate([args.prompt] * len(args.image), pixels, args.max_new_tokens,
                                                 args.temperature, args.top_k, args.seed, tiles=tiles, grids=grids)
    for path, text in zip(args.image, texts):
        if len(args.image) > 1:
            print(f"== {path}")
        print(text)


if __name__ == "__main__":
    main()
