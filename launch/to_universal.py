"""Convert a checkpoint for a resume on another world size, loading it weights-only (no code in it runs):
`python launch/to_universal.py --input_folder runs/x/checkpoints/step001000 --output_folder runs/x/step001000_universal`
(the arguments of DeepSpeed's ds_to_universal).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout without installing

from ocr_vlm.train import to_universal  # noqa: E402

if __name__ == "__main__":
    to_universal(sys.argv[1:])
