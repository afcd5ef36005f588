"""Entry point: `deepspeed launch/train.py --ds_config ds_configs/zero2.json [--key=value ...]`.

Also runs under `torchrun --nproc_per_node N launch/train.py ...` and as a single `python launch/train.py ...`.
"""

import os
import sys
from pathlib import Path

# Before torch allocates: packed rows change shape every step, and fixed-size cached blocks fragment. Measured on one
# H200 at d20 stage 2 (2 x 8192 tokens, 48 images): the same 50.4 GiB allocated peak held 69.5 GiB reserved without
# expandable segments, 54.8 GiB with them (README #gpu). A user's own setting wins.
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ocr_vlm.train import main  # noqa: E402

if __name__ == "__main__":
    main(sys.argv[1:])
