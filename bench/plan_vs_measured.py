"""The memory planner (`ocr_vlm/plan.py`) against measured peaks, side by side.

    python bench/plan_vs_measured.py [--cases NAME ...] [--threads 2]

d20 widths everywhere (SAM ViT-B, CLIP-L, a 1280-wide GPT with the full 65537 vocabulary), depth cut to 2 GPT layers
(4 in the GPT-heavy cases), 2 SAM blocks (one windowed, one global) and 2 CLIP layers: 1-3 minutes a case on 2
cores. fp32, no DeepSpeed: the planner's plain-PyTorch engine (ZeRO-0, no buckets, no CUDA overhead). Each case runs
in a fresh process: build the model, freeze per the stage, take two AdamW steps (the second with the optimizer state
and the gradients already allocated, as a ZeRO engine keeps them), and report the peak resident memory above what
the process held before the model was built. The activation columns subtract the planned weights, gradients and Adam
state (exact counts x 4 bytes) from the measured peak, so what is left is activations plus what the CPU runtime
holds besides tensors (~0.15 GiB here). MALLOC_MMAP_THRESHOLD_ makes freed tensors go back to the OS at once, so the
resident peak is the live-tensor peak rather than the heap's high-water mark. The planner runs with
`math_attention`: torch's CPU kernel for SAM's biased attention keeps the softmax weights when the bias needs a
gradient and holds the scores next to the bias in a frozen SAM's forward; CUDA's memory-efficient kernel does neither.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from harness import fix_threads, parser
from ocr_vlm import cli
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.vlm import build_model
from ocr_vlm.plan import DeepSpeedSettings, GiB, plan

REDUCED = ["--preset=d20", "--model.gpt.n_layer=2", "--model.sam.depth=2", "--model.sam.global_attn_indexes=1",
           "--model.clip.depth=2", "--data.text_shards=unread", "--micro_batch=1"]
TEXT_PER_IMAGE = 64          # tokens after each image; the rest of the row is one text sample
SUPERVISED_EVERY = 10        # one position in ten has a target, as in packed OCR rows (images and prompts have none)
CASES = {   # name: (recipe overrides, images). The SAM-heavy cases first, then GPT-heavy ones (512 px pages).
    "stage1 640px ckpt": (["--stage=1", "--mode=small", "--data.seq_len=2048"], 3),
    "stage1 640px no-ckpt": (["--stage=1", "--mode=small", "--data.seq_len=2048", "--checkpointing="], 3),
    "stage2 640px ckpt": (["--stage=2", "--mode=small", "--data.seq_len=2048"], 6),
    "stage2 1024px ckpt": (["--stage=2", "--mode=base", "--data.seq_len=4096"], 3),
    "stage1 1024px ckpt": (["--stage=1", "--mode=base", "--data.seq_len=2048"], 1),
    "stage2 gpt4 ckpt": (["--stage=2", "--mode=tiny", "--data.seq_len=4096", "--model.gpt.n_layer=4"], 1),
    "stage2 gpt4 no-ckpt": (["--stage=2", "--mode=tiny", "--data.seq_len=4096", "--model.gpt.n_layer=4",
                             "--checkpointing=sam,clip"], 1),
}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def packed_row(cfg, images: int) -> dict:
    """One row: `images` samples of image + TEXT_PER_IMAGE tokens, then one text sample filling the row."""
    m, T = cfg.model, cfg.data.seq_len
    ids = torch.randint(0, m.image_token_id, (1, T))
    doc_ids, position_ids = torch.zeros(1, T, dtype=torch.long), torch.zeros(1, T, dtype=torch.long)
    at = 0
    for i in range(images + 1):
        n = m.image_tokens + TEXT_PER_IMAGE if i < images else T - at
        if i < images:
            ids[0, at + 1:at + 1 + m.image_tokens] = m.image_token_id
        doc_ids[0, at:at + n], position_ids[0, at:at + n] = i, torch.arange(n)
        at += n
    targets = ids.roll(-1, 1).masked_fill(ids == m.image_token_id, IGNORE_INDEX)
    targets[:, torch.arange(T) % SUPERVISED_EVERY != 0] = IGNORE_INDEX
    return {"input_ids": ids, "targets": targets, "doc_ids": doc_ids, "position_ids": position_ids,
            "pixel_values": torch.randn(images, 3, m.image_size, m.image_size)}


def measure(name: str) -> float:
    """Peak bytes of the case's training step above the process's memory before the model existed."""
    overrides, images = CASES[name]
    cfg = cli.train_config(REDUCED + overrides)
    torch.manual_seed(0)
    before = rss_bytes()
    model = build_model(cfg.model)
    model.freeze(cfg.freeze)
    model.set_activation_checkpointing(cfg.checkpointing)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5, foreach=False)
    batch = packed_row(cfg, images)
    for _ in range(2):
        model(**batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before


def planned(name: str) -> dict:
    overrides, images = CASES[name]
    cfg = cli.train_config(REDUCED + overrides)
    return plan(cfg, DeepSpeedSettings(bf16=False), gpus=1, images=images, math_attention=True, overhead=False)


def main() -> None:
    args_parser = parser(__doc__, repeats=1)
    args_parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args_parser.add_argument("--child", help=argparse.SUPPRESS)
    args = args_parser.parse_args()
    fix_threads(args.threads)
    if args.child:
        print(json.dumps({"peak": measure(args.child)}))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    print(f"{'case (d20 widths, 2/2/2 blocks, fp32)':<26}{'images':>7}{'planned GiB':>12}{'measured GiB':>13}"
          f"{'ratio':>7}{'activations: planned':>22}{'measured':>10}{'ratio':>7}")
    for name in args.cases:
        out = subprocess.run([sys.executable, __file__, f"--child={name}", f"--threads={args.threads}"], env=env,
                             capture_output=True, text=True, check=True)
        measured = json.loads(out.stdout.strip().splitlines()[-1])["peak"]
        p = planned(name)
        static = p["total"] - p["activation_peak"]      # weights, gradients, Adam: exact counts x bytes
        print(f"{name:<26}{CASES[name][1]:>7}{p['total'] / GiB:>12.2f}{measured / GiB:>13.2f}"
              f"{p['total'] / measured:>7.2f}{p['activation_peak'] / GiB:>22.2f}{(measured - static) / GiB:>10.2f}"
              f"{p['activation_peak'] / (measured - static):>7.2f}", flush=True)


if __name__ == "__main__":
    main()
