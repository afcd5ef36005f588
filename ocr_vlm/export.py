"""Export a saved training checkpoint as safetensors + config.json + tokenizer.json (what generate/evaluate load).

    python -m ocr_vlm.export --checkpoint runs/stage1/checkpoints/step001000 --out runs/stage1/export_step001000

Runs on one process without a GPU, for any ZeRO stage; every checkpoint file is loaded weights-only unless
--trust_checkpoint (for a checkpoint you made that holds other types).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ocr_vlm.train import _one_line_errors, export_checkpoint


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, type=Path, help="a step directory, e.g. .../checkpoints/step001000")
    parser.add_argument("--out", required=True, type=Path, help="the export directory to write")
    parser.add_argument("--trust_checkpoint", action="store_true", help="load without the weights-only restriction")
    args = parser.parse_args(argv)
    with _one_line_errors():
        export_checkpoint(args.checkpoint, args.out, trusted=args.trust_checkpoint)


if __name__ == "__main__":
    main()
