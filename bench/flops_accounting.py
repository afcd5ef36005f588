"""How much counting attention per row would overstate a packed d20 step's FLOPs (and so its MFU).

    python bench/flops_accounting.py [--seq_len 8192] [--response_tokens 1200] [--rows 64] [--stage 2]

Packed rows attend document by document (model/gpt.py `Documents`), so a row's attention costs Σ length² over its
documents; counting seq_len² per row, as a plain causal model would, overstates it. Documents here are vision
samples of Base mode (273 embeddings) + a 20-token prompt + a response of uniformly 0.2x-1.8x `--response_tokens`,
packed first-fit into `--rows` rows (seeded). The step's FLOPs use ocr_vlm/flops.py for the GPT and the towers,
with the stage's frozen towers. No timing: the figures are exact counts, so nothing alternates.
"""

from __future__ import annotations

import argparse
import random

from ocr_vlm import config, flops

PROMPT_TOKENS = 20


def pack(seq_len: int, rows: int, response_tokens: int, image_tokens: int, seed: int = 0) -> list[list[int]]:
    """First-fit rows of document lengths, each document at most one row long."""
    rng, packed, row = random.Random(seed), [], []
    while len(packed) < rows:
        length = min(seq_len, image_tokens + PROMPT_TOKENS + round(response_tokens * rng.uniform(0.2, 1.8)))
        if sum(row) + length > seq_len:
            packed.append(row)
            row = []
        row.append(length)
    return packed


def main() -> None:
    args = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args.add_argument("--seq_len", type=int, default=8192)
    args.add_argument("--response_tokens", type=int, default=1200)
    args.add_argument("--rows", type=int, default=64)
    args.add_argument("--stage", type=int, default=2)
    a = args.parse_args()

    cfg = config.d20()
    frozen = config.STAGES[a.stage](config.TrainConfig()).freeze
    rows = pack(a.seq_len, a.rows, a.response_tokens, cfg.image_tokens)
    tokens = sum(sum(row) for row in rows)
    images = sum(len(row) for row in rows)
    per_document = sum(length ** 2 for row in rows for length in row)
    per_row = len(rows) * a.seq_len ** 2
    base = tokens * flops.gpt_train_flops_per_token(cfg) + images * flops.image_train_flops(cfg, frozen)
    step_doc = base + flops.gpt_attention_train_flops(cfg, per_document)
    step_row = base + flops.gpt_attention_train_flops(cfg, per_row)
    print(f"d20 stage {a.stage}, {len(rows)} rows of {a.seq_len} tokens, {images / len(rows):.1f} documents per row "
          f"(mean {tokens / images:.0f} tokens), frozen: {', '.join(frozen) or 'none'}")
    print(f"attention FLOPs per row / per document: {per_row / per_document:.2f}x")
    print(f"headline: step FLOPs counted per row / per document = {step_row / step_doc:.2f}x "
          f"(MFU overstated by that factor when attention is counted per row)")


if __name__ == "__main__":
    main()
