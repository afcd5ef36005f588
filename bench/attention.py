"""Packed rows: per-document attention against the dense (B, 1, T, T) document mask it replaced, and a whole packed
GPT step against a plain causal step of the same row.

    python bench/attention.py [--seq_len 4096] [--doc_len 256] [--layers 1] [--vocab 4096]

(a) attention alone, forward + backward, at d20's head shape (10 heads x 128), fp32: SDPA under the dense mask,
    which computes every pair of tokens, vs `Documents.attend`. The mask and the documents' lengths are found once
    per forward and shared by all layers, so neither is in the timing. Goal: >= 5x.
(b) one GPT training step (forward + backward) at d20's width, `--layers` deep (1 by default, to stay under
    2 minutes on 2 cores), on one row of `seq-len` tokens: packed into documents of `doc-len` tokens vs one plain
    causal sequence. Both have the same tokens and targets (10% supervised, as packed d20 rows are), so the loss
    costs both the same. In d20 lm_head is ~3% of a step's FLOPs; one layer with d20's vocabulary would make it
    ~35%, so the default vocabulary shrinks with the depth (4096 for one layer: ~4%). Goal: packed / plain <= 0.8.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from harness import alternate, fix_threads, parser, ratios, seconds, summary
from ocr_vlm.config import GPTConfig
from ocr_vlm.model.gpt import GPT, IGNORE_INDEX, Documents

HEADS, HEAD_DIM = 10, 128                  # d20


def dense_document_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """The mask packed rows used before: causal pairs of one document, for every pair of tokens in the row."""
    T = doc_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (causal & (doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1))).unsqueeze(1)


def attention_only(doc_ids: torch.Tensor, repeats: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, HEADS, doc_ids.shape[1], HEAD_DIM, requires_grad=True) for _ in range(3))
    upstream = torch.randn_like(q)
    mask, documents = dense_document_mask(doc_ids), Documents(doc_ids)

    def dense():
        torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), (q, k, v), upstream)

    def per_document():
        torch.autograd.grad(documents.attend(q, k, v, gqa=False), (q, k, v), upstream)

    return alternate({"dense mask": lambda: seconds(dense), "per document": lambda: seconds(per_document)}, repeats)


def gpt_steps(doc_ids: torch.Tensor, doc_len: int, layers: int, vocab: int, repeats: int) -> dict[str, list[float]]:
    T = doc_ids.shape[1]
    torch.manual_seed(0)
    model = GPT(GPTConfig(sequence_len=T, vocab_size=vocab, n_layer=layers, n_head=HEADS, n_kv_head=HEADS,
                          n_embd=HEADS * HEAD_DIM))
    ids = torch.randint(0, vocab, (1, T))
    targets = ids.roll(-1, 1).masked_fill(torch.rand(1, T) > 0.1, IGNORE_INDEX)
    positions = torch.arange(T).remainder(doc_len).unsqueeze(0)      # rotary positions restart in each document

    def step(**packing):
        model.zero_grad(set_to_none=True)
        model(ids, targets, **packing).backward()

    return alternate({"plain causal": lambda: seconds(step),
                      "packed": lambda: seconds(lambda: step(position_ids=positions, doc_ids=doc_ids))}, repeats)


def report(title: str, runs: dict[str, list[float]]) -> list[float]:
    """Prints the median seconds of both sides and their ratio; returns the per-repeat ratios first / second."""
    (a_name, a), (b_name, b) = runs.items()
    print(f"{title}: {a_name} {statistics.median(a):.3f} s, {b_name} {statistics.median(b):.3f} s (medians)")
    return ratios(a, b)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--seq_len", type=int, default=4096)
    args_parser.add_argument("--doc_len", type=int, default=256)
    args_parser.add_argument("--layers", type=int, default=1)
    args_parser.add_argument("--vocab", type=int, default=4096)
    args = args_parser.parse_args()
    fix_threads(args.threads)
    doc_ids = (torch.arange(args.seq_len) // args.doc_len).unsqueeze(0)
    print(f"one row of {args.seq_len} tokens in documents of {args.doc_len}, {HEADS} heads x {HEAD_DIM}, fp32, cpu, "
          f"{args.threads} threads")
    speedup = report("(a) attention fwd+bwd", attention_only(doc_ids, args.repeats))
    print(f"    dense / per-document: {summary(speedup, '.1f', 'x')}   (goal >= 5x)")
    packed = [1 / r for r in report(f"(b) GPT step, {args.layers} layer(s), vocab {args.vocab}",
                                    gpt_steps(doc_ids, args.doc_len, args.layers, args.vocab, args.repeats))]
    print(f"    packed / plain: {summary(packed, '.2f', 'x')}   (goal <= 0.8)")
    print(f"headline: per-document attention is {statistics.median(speedup):.1f}x faster than the dense mask, and a "
          f"packed step takes {statistics.median(packed):.2f}x a plain causal one ({args.seq_len} tokens, "
          f"{args.doc_len}-token documents)")


if __name__ == "__main__":
    main()
