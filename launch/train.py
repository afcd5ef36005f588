"""Entry point: `deepspeed launch/train.py --ds_config ds_configs/zero2.json [--key=value ...]`.

Also runs under `torchrun --nproc_per_node N launch/train.py ...` and as a single `python launch/train.py ...`.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ocr_vlm.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
