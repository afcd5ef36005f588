"""Peak memory of one training forward/backward with activation checkpointing off vs on, side by side.

    python bench/activation_memory.py [--seq_len 2048] [--images 4] [--repeats 3] [--key=value model overrides]

Each setting runs in a fresh process and reports its peak resident memory (CPU) or peak allocated memory (CUDA),
minus what the process held before the step, so the figure is the step's activations and gradients. The two
settings alternate over the repeats; 2048 tokens by default keep the six steps near 2 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys

import torch

from harness import alternate, fix_threads, parser, ratios, summary
from ocr_vlm import cli, config
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.vlm import build_model

BENCH_MODEL = ["--gpt.n_embd=512", "--gpt.n_layer=8", "--gpt.n_head=4", "--gpt.n_kv_head=4",
               "--gpt.sequence_len=8192"]


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_step(args: argparse.Namespace, overrides: list[str], checkpointing: bool) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    cfg = cli.with_args(config.mini(), BENCH_MODEL + overrides)
    model = build_model(cfg, device)
    model.set_activation_checkpointing(config.TOWERS if checkpointing else ())
    ids = torch.randint(0, cfg.image_token_id, (1, args.seq_len), device=device)
    for i in range(args.images):
        ids[0, 1 + i * (cfg.image_tokens + 8): 1 + i * (cfg.image_tokens + 8) + cfg.image_tokens] = cfg.image_token_id
    targets = ids.roll(-1, 1).masked_fill(ids == cfg.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(args.images, 3, cfg.image_size, cfg.image_size, device=device)
    before = peak_bytes(device)
    model(ids, targets=targets, pixel_values=pixels).backward()
    return {"peak_mb": (peak_bytes(device) - before) / 2 ** 20}


def child(setting: str, args: argparse.Namespace, overrides: list[str]) -> float:
    """Peak MB of one step with checkpointing `setting`, in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", setting, f"--seq_len={args.seq_len}",
                          f"--images={args.images}", f"--threads={args.threads}", *overrides],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--seq_len", type=int, default=2048)
    args_parser.add_argument("--images", type=int, default=4)
    args_parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args, overrides = args_parser.parse_known_args()
    fix_threads(args.threads)
    if args.child:
        print(json.dumps(one_step(args, overrides, args.child == "on")))
        return
    peaks = alternate({setting: lambda setting=setting: child(setting, args, overrides) for setting in ("off", "on")},
                      args.repeats)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"one step, {args.seq_len} tokens, {args.images} images, on {device}, {args.threads} threads")
    print(f"{'checkpointing':<16}{'step peak MB':>14}   (medians of {args.repeats})")
    for setting, values in peaks.items():
        print(f"{setting:<16}{statistics.median(values):>14.0f}")
    less = ratios(peaks["off"], peaks["on"])
    print(f"off / on: {summary(less, '.2f', 'x')}")
    print(f"headline: checkpointing saves {1 - 1 / statistics.median(less):.0%} of the step's peak "
          f"({statistics.median(less):.1f}x less)")


if __name__ == "__main__":
    main()
