"""`make read`'s training step on one CPU core in fp32 and in bf16 (the weights bf16, as DeepSpeed's bf16 runs them).

    python bench/cpu_bf16.py [--threads 1] [--repeats 5] [--images 4]

The mini16 reading model (vision norm, reading head and code, `make read`'s model flags) on one 1536-token row of
`--images` 256 px pages (each with 64 text tokens), as one rank of `make read` takes it (one thread per rank):
forward and backward, alternated between the fp32 and the bf16 copy of the same weights. bf16 is native only on CPUs
with AVX512-BF16 or AMX (this prints which flags the CPU has); elsewhere torch emulates it, several times slower
than fp32, which is why the trainer keeps CPUs in fp32 unless the ds_config enables bf16. The optimizer step (fp32
master weights and AdamW, ~1.8M parameters) is left out: it is the same work either way.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch

from harness import alternate, fix_threads, parser, ratios, seconds, summary
from plan_vs_measured import packed_row
from ocr_vlm import cli
from ocr_vlm.model.vlm import build_model

FLAGS = ("avx512_bf16", "amx_bf16")
MODEL = ["--preset=mini16", "--data.seq_len=1536", "--checkpointing=", "--model.vision_norm=true",
         "--model.reading_head=true", "--model.reading_code=true", "--data.shards=unread"]


def main() -> None:
    args_parser = parser(__doc__, threads=1, repeats=5)
    args_parser.add_argument("--images", type=int, default=4, help="pages in the row (make read packs 4-5)")
    args = args_parser.parse_args()
    fix_threads(args.threads)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = [flag for flag in FLAGS if flag in cpuinfo.split()]
    cfg = cli.train_config(MODEL)
    torch.manual_seed(0)
    fp32 = build_model(cfg.model).train()
    bf16 = copy.deepcopy(fp32).bfloat16()
    batch = packed_row(cfg, args.images)
    batch["pixel_values"] = batch["pixel_values"].clamp(-1, 1)

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(**batch).backward()

    for model in (fp32, bf16):   # warm-up: oneDNN picks and caches its kernels on the first call
        step(model)
    runs = alternate({"fp32": lambda: seconds(lambda: step(fp32)), "bf16": lambda: seconds(lambda: step(bf16))},
                     args.repeats)
    speedup = ratios(runs["fp32"], runs["bf16"])
    print(f"mini16 reading model, one 1536-token row of {args.images} pages, {args.threads} thread(s); native bf16 "
          f"flags: {', '.join(native) or 'none (bf16 is emulated here)'}")
    print(f"step (forward + backward): fp32 {statistics.median(runs['fp32']):.3f} s, bf16 "
          f"{statistics.median(runs['bf16']):.3f} s (medians); fp32 / bf16 {summary(speedup, '.2f', 'x')}")
    print(f"headline: a make read step is {statistics.median(speedup):.2f}x faster in bf16 than in fp32 on this CPU "
          f"({', '.join(native) or 'no native bf16'})")


if __name__ == "__main__":
    main()
