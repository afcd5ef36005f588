"""d20 stage 2 on this machine's GPU(s) through the real trainer: peak memory against the planner, tokens/s, MFU, and
which attention kernels run.

    python bench/d20_gpu.py [--steps 20] [--seq_len 8192] [--micro_batch 2] [--max_images 48] [--work /tmp/d20_gpu]

No pretrained weights or nanochat tokenizer are needed: the GPT's cost is its shape, so the pages are tokenized by
the shipped mini tokenizer padded to nanochat's 65,527 BPE ranks with tokens no text reaches (0xFF never occurs in
UTF-8), which gives d20's 65,537-row embedding and lm_head. The pages are `render synth`'s receipts, charts and signs
(short answers, so rows fill up to `--max_images` images), the text-only conversations its chats. Training runs as a
user runs it (`deepspeed --num_gpus N launch/train.py --ds_config ds_configs/zero2.json --preset=d20 --stage=2`,
bf16, SAM + compressor frozen); the step lines come from its metrics.jsonl, the first `--warmup` steps left out of
the medians. The planner's figure is `python -m ocr_vlm.plan` for the same recipe and ds_config. The attention
kernels are read off torch's profiler over one forward and backward of the same model in a separate process.
Extra arguments go to the trainer (`-- --model.gpt.n_layer=2` to try it small, on a CPU too).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from collections import Counter
from pathlib import Path

import torch

from plan_vs_measured import packed_row
from ocr_vlm import cli
from ocr_vlm.model.vlm import build_model
from ocr_vlm.plan import CUDA_OVERHEAD, DeepSpeedSettings, GiB, plan
from ocr_vlm.tokenizer import MINI_TOKENIZER, SPECIAL_TOKENS, IMAGE_TOKEN, Tokenizer

ROOT = Path(__file__).resolve().parent.parent
NANOCHAT_RANKS = 65527      # nanochat d20's BPE ranks; its 9 specials and <|image|> follow


def d20_tokenizer(out: Path) -> None:
    """The mini tokenizer's merges, padded to nanochat's vocabulary with 3-byte tokens BPE never forms."""
    mini = Tokenizer.load(MINI_TOKENIZER)
    ranks = dict(mini.ranks)
    for i in range(NANOCHAT_RANKS - len(ranks)):
        ranks[b"\xff" + i.to_bytes(2, "big")] = len(ranks)
    names = SPECIAL_TOKENS + (IMAGE_TOKEN,)
    Tokenizer(ranks, mini.pattern, {name: NANOCHAT_RANKS + i for i, name in enumerate(names)}).save(out)


def prepare(work: Path, pages: int) -> None:
    if (work / "ready").exists():
        return
    work.mkdir(parents=True, exist_ok=True)
    d20_tokenizer(work / "tokenizer.json")
    python = [sys.executable, "-m"]
    subprocess.run(python + ["ocr_vlm.data.render", "synth", "--n", str(pages), "--seed", "1", "--out",
                             str(work / "synth")], check=True, stdout=subprocess.DEVNULL)
    write = python + ["ocr_vlm.data.shards", "write", "--images_root", str(work / "synth")]
    subprocess.run(write + ["--manifest", str(work / "synth/manifest.jsonl"), "--out", str(work / "train")],
                   check=True, stdout=subprocess.DEVNULL)
    subprocess.run(write + ["--conversations", str(work / "synth/conversations.jsonl"), "--out", str(work / "text")],
                   check=True, stdout=subprocess.DEVNULL)
    (work / "ready").touch()


def recipe(args, work: Path) -> list[str]:
    return ["--preset=d20", "--stage=2", f"--tokenizer={work / 'tokenizer.json'}", f"--data.shards={work / 'train'}",
            f"--data.text_shards={work / 'text'}", f"--data.seq_len={args.seq_len}",
            f"--data.max_images={args.max_images}", f"--micro_batch={args.micro_batch}",
            f"--global_batch={args.micro_batch * args.gpus}", f"--steps={args.steps}", "--log_every=1",
            "--data.num_workers=4", "--val_every=0", "--save_every=0", f"--output_dir={work / 'run'}", *args.extra]


def train(args, work: Path) -> list[dict]:
    launcher = [sys.executable, "-m", "deepspeed.launcher.runner"]    # what the `deepspeed` command runs
    subprocess.run(launcher + ["--num_gpus", str(args.gpus), str(ROOT / "launch/train.py"),
                               "--ds_config", str(ROOT / args.ds_config), *recipe(args, work)], check=True, cwd=ROOT)
    with open(work / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    return [r for r in rows if "tokens_per_s" in r]


def attention_kernels(args, work: Path) -> Counter:
    """Kernel names (attention's only) over one forward and backward of the recipe's model on one packed row."""
    cfg = cli.train_config(recipe(args, work))
    model = build_model(cfg.model).cuda().bfloat16()
    model.freeze(cfg.freeze)
    model.set_activation_checkpointing(cfg.checkpointing)
    batch = {k: v.cuda() for k, v in packed_row(cfg, min(args.max_images, 8)).items()}
    batch["pixel_values"] = batch["pixel_values"].bfloat16()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        model(**batch).backward()
        torch.cuda.synchronize()
    words = ("flash", "fmha", "attention", "attn", "sdpa")   # model/layers.py refuses the math kernel outright
    return Counter({e.key[:90]: e.count for e in prof.key_averages() if any(w in e.key.lower() for w in words)})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5, help="first steps left out of the medians")
    p.add_argument("--seq_len", type=int, default=8192)
    p.add_argument("--micro_batch", type=int, default=2)
    p.add_argument("--max_images", type=int, default=48)
    p.add_argument("--gpus", type=int, default=max(torch.cuda.device_count(), 1))
    p.add_argument("--ds_config", default="ds_configs/zero2.json")
    p.add_argument("--pages", type=int, default=600)
    p.add_argument("--work", type=Path, default=Path("/tmp/d20_gpu"))
    p.add_argument("--kernels_only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("extra", nargs="*", help="trainer arguments after --")
    args = p.parse_args()
    if args.kernels_only:
        print(json.dumps(attention_kernels(args, args.work)))
        return
    prepare(args.work, args.pages)
    rows = train(args, args.work)
    steady = rows[args.warmup:] or rows
    cfg = cli.train_config(recipe(args, args.work))
    settings = DeepSpeedSettings.from_json(str(ROOT / args.ds_config), bf16=torch.cuda.is_available())
    planned = plan(cfg, settings, gpus=args.gpus)       # the packer's worst case under --max_images
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    median = lambda key: statistics.median(r[key] for r in steady) if key in steady[0] else float("nan")
    print(f"\n{device} x {args.gpus}, {args.ds_config}: d20 stage 2, {args.micro_batch} x {args.seq_len} tokens, "
          f"up to {args.max_images} images a row; medians of steps {args.warmup + 1}-{len(rows)}")
    print(f"  step {median('dt_ms'):.0f} ms | tokens/s {median('tokens_per_s'):,.0f} | samples/s "
          f"{median('samples_per_s'):.1f} | model TFLOP/s {median('tflops_per_s'):.0f} | "
          f"mfu {median('mfu') * 100:.1f}%")
    measured = max(r.get("peak_reserved_gib", float("nan")) for r in rows)
    allocated = max(r.get("peak_allocated_gib", float("nan")) for r in rows)
    in_torch = (planned["total"] - CUDA_OVERHEAD) / GiB      # the CUDA context and NCCL are outside torch's count
    print(f"  peak memory: planned {planned['total'] / GiB:.2f} GiB, {in_torch:.2f} without the CUDA context "
          f"(activations {planned['activation_peak'] / GiB:.2f}) | measured by torch: {measured:.2f} GiB reserved, "
          f"{allocated:.2f} allocated ({measured / in_torch:.2f}x the plan)")
    if torch.cuda.is_available():
        out = subprocess.run([sys.executable, __file__, "--kernels_only", f"--work={args.work}", "--",
                              *args.extra], capture_output=True, text=True, check=True, cwd=ROOT)
        for name, count in json.loads(out.stdout.strip().splitlines()[-1]).items():
            print(f"  attention kernel x{count}: {name}")
    print(f"headline: {median('tokens_per_s'):,.0f} tokens/s, mfu {median('mfu') * 100:.1f}%, peak "
          f"{measured:.1f} GiB reserved against {in_torch:.1f} planned")


if __name__ == "__main__":
    main()
