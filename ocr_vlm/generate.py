"""Read pages with an exported model: image files, directories of them, or globs; printed and written as JSONL.

    python -m ocr_vlm.generate --checkpoint runs/demo/export --image page.png scans/ 'batch/*.jpg' \
        [--prompt "<image>\nFree OCR."] [--batch_size 8] [--out pages.jsonl] [--mode=gundam --max_crops=9]

Each line of --out is {"image": path, "text": generated text}, written as each batch finishes. The mode defaults to
the one the model was trained in.
"""

from __future__ import annotations

import argparse
import glob
import json
import sys
from pathlib import Path

from ocr_vlm.generation import Generator
from ocr_vlm.image import IMAGE_MEMBERS, add_mode_arguments, apply_mode, load_views, stack_views
from ocr_vlm.rejected import Rejected
from ocr_vlm.weights import load_export


def image_paths(specs: list[str]) -> list[Path]:
    """Files as given, a directory's images (sorted), a glob's matches (sorted); a spec matching nothing is an error."""
    paths = []
    for spec in specs:
        path = Path(spec)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower().lstrip(".") in IMAGE_MEMBERS)
        elif path.exists():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        if not found:
            raise FileNotFoundError(f"--image {spec}: no such file, and no image matches it")
        paths += found
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an export directory (weights, config, tokenizer)")
    parser.add_argument("--image", nargs="+", required=True, help="image files, directories or globs")
    parser.add_argument("--prompt", default="<image>\nFree OCR.", help="'<image>' marks the image; prepended if absent")
    parser.add_argument("--batch_size", type=int, default=8, help="pages generated together")
    parser.add_argument("--out", type=Path, help="write one JSON line per page here")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top_k", type=int)
    parser.add_argument("--seed", type=int, default=0)
    add_mode_arguments(parser, default=None)
    args = parser.parse_args(argv)
    try:
        paths = image_paths(args.image)
    except FileNotFoundError as e:
        parser.error(str(e))
    model, tokenizer = load_export(args.checkpoint)
    model.cfg = apply_mode(model.cfg, args, parser)
    generator = Generator(model, tokenizer)
    out = open(args.out, "w", encoding="utf-8") if args.out else None
    for start in range(0, len(paths), args.batch_size):
        batch = paths[start:start + args.batch_size]
        try:
            pixels, tiles, grids = stack_views([load_views(p, model.cfg) for p in batch], model.cfg)
        except Rejected as e:
            parser.error(str(e))
        texts = generator.generate([args.prompt] * len(batch), pixels, args.max_new_tokens, args.temperature,
                                   args.top_k, args.seed, tiles=tiles, grids=grids)
        for path, text in zip(batch, texts):
            if len(paths) > 1:
                print(f"== {path}")
            print(text, flush=True)
            if out:
                out.write(json.dumps({"image": str(path), "text": text}, ensure_ascii=False) + "\n")
                out.flush()
    if out:
        out.close()
        print(f"wrote {len(paths)} lines to {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
