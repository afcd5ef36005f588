"""`make read`'s training step on one CPU core with AdamW and with Muon (`--optimizer=muon`).

    python bench/optimizer_step.py [--threads 1] [--repeats 5] [--images 4]

The mini16 reading model (`make read`'s model flags) on one 1536-token row of `--images` 256 px pages, as one rank
of `make read` takes it: forward, backward and the optimizer step, alternated between two copies of the same weights,
one stepped by torch's AdamW, the other by DeepSpeed's Muon over the trainer's own parameter groups
(`ocr_vlm.train.param_groups`: Muon on the hidden matrices, AdamW on the rest). Outside ZeRO, Muon orthogonalises
each matrix's update in its own step; under ZeRO-1/2 the same work moves into the gradient partitioning. The first
step of each is left out (DeepSpeed compiles Muon's update with torch.compile on its first call).
"""

from __future__ import annotations

import copy
import statistics

import torch

from harness import alternate, fix_threads, parser, ratios, seconds, summary
from plan_vs_measured import packed_row
from ocr_vlm import cli
from ocr_vlm.model.vlm import build_model
from ocr_vlm.train import _optimizer, param_groups

MODEL = ["--preset=mini16", "--data.seq_len=1536", "--checkpointing=", "--model.vision_norm=true",
         "--model.reading_head=true", "--model.reading_code=true", "--data.shards=unread", "--lr=3e-3"]


def main() -> None:
    args_parser = parser(__doc__, threads=1, repeats=5)
    args_parser.add_argument("--images", type=int, default=4, help="pages in the row (make read packs 4-5)")
    args = args_parser.parse_args()
    fix_threads(args.threads)
    adamw_cfg, muon_cfg = (cli.train_config(MODEL + [f"--optimizer={name}"]) for name in ("adamw", "muon"))
    torch.manual_seed(0)
    adamw_model = build_model(adamw_cfg.model).train()
    muon_model = copy.deepcopy(adamw_model)
    optimizers = {"adamw": _optimizer(param_groups(adamw_model, adamw_cfg), adamw_cfg, offload=False),
                  "muon": _optimizer(param_groups(muon_model, muon_cfg), muon_cfg, offload=False)}
    models = {"adamw": adamw_model, "muon": muon_model}
    batch = packed_row(adamw_cfg, args.images)
    batch["pixel_values"] = batch["pixel_values"].clamp(-1, 1)

    def step(name: str) -> None:
        models[name].zero_grad(set_to_none=True)
        models[name](**batch).backward()
        optimizers[name].step()

    for name in models:          # warm-up: oneDNN's kernel choice, Muon's torch.compile
        step(name)
    runs = alternate({name: (lambda name=name: seconds(lambda: step(name))) for name in models}, args.repeats)
    cost = ratios(runs["muon"], runs["adamw"])
    print(f"mini16 reading model, one 1536-token row of {args.images} pages, {args.threads} thread(s)")
    print(f"step (forward + backward + optimizer): AdamW {statistics.median(runs['adamw']):.3f} s, Muon "
          f"{statistics.median(runs['muon']):.3f} s (medians); Muon / AdamW {summary(cost, '.2f', 'x')}")
    print(f"headline: a make read step costs {statistics.median(cost):.2f}x with Muon what it costs with AdamW")


if __name__ == "__main__":
    main()
