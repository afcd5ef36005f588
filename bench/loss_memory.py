"""Peak memory and time of the training loss (forward + backward) on a packed row, three ways, side by side:

  full      fp32 logits for every position, softcapped, then cross-entropy: the reference of the memory ratio
  previous  the loss this project had before: every position through lm_head in checkpointed 2048-row chunks
  current   `chunked_cross_entropy`: lm_head on the supervised positions only, 256 rows at a time

    python bench/loss_memory.py [--rows 8192] [--vocab 16384] [--width 256] [--supervised 0.1]
    python bench/loss_memory.py --vocab 65537 --width 1280 --repeats 1      # d20's exact shapes, ~5 min on 2 cores

Memory is the peak of live tensor bytes during the step above what its inputs hold, the gradients of h and lm_head
included: on CPU counted by torch's MemTracker (each tensor storage, while it is alive, so the allocator's caching
and fragmentation stay out of it), on CUDA by the caching allocator's peak. `full` runs once, as the reference;
`previous` and `current` alternate over the repeats. The defaults (a quarter of d20's vocabulary, a fifth of its
width) keep the run under 2 minutes on 2 cores; `current`'s ratio to `full` is lower there than at d20's shapes,
where lm_head's weight gradient (vocab x width) weighs more: run the second command for d20's figure.
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils.checkpoint import checkpoint

from harness import alternate, fix_threads, parser, ratios, seconds, summary
from ocr_vlm.model.gpt import IGNORE_INDEX, chunked_cross_entropy, softcap

CAP = 15.0                 # d20's logit softcap


def full_logits_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                     reduction: str = "mean") -> torch.Tensor:
    logits = softcap(F.linear(h, weight).float(), cap)
    return F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=reduction)


def previous_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float) -> torch.Tensor:
    """gpt.py's chunked_cross_entropy as of e35db1c: every position through lm_head, 2048 at a time, each chunk's
    logits recomputed in backward."""
    total = h.sum() * 0.0
    for rows, rows_targets in zip(h.split(2048), targets.split(2048)):
        total = total + checkpoint(full_logits_loss, rows, weight, rows_targets, cap, "sum", use_reentrant=False)
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def step(loss, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> None:
    torch.autograd.grad(loss(h, weight, targets, CAP), (h, weight))   # fresh gradients: nothing accumulates


def measure(loss, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(seconds, peak MiB) of one forward + backward."""
    if h.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        took = seconds(lambda: (step(loss, h, weight, targets), torch.cuda.synchronize()))
        return took, (torch.cuda.max_memory_allocated() - before) / 2 ** 20
    tracker = MemTracker()
    tracker.track_external(h, weight, targets)            # held before the step: subtracted from its peak
    with tracker:
        before = tracker.get_tracker_snapshot("current")[h.device]["Total"]
        took = seconds(lambda: step(loss, h, weight, targets))
    return took, (tracker.get_tracker_snapshot("peak")[h.device]["Total"] - before) / 2 ** 20


def packed_row(rows: int, vocab: int, width: int, supervised: float, device: torch.device):
    """Final hidden states, lm_head weight and targets of a packed row; `supervised` of its positions have a target."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(rows, width, generator=g)
    weight = torch.randn(vocab, width, generator=g).mul_(width ** -0.5)
    targets = torch.full((rows,), IGNORE_INDEX)
    chosen = torch.randperm(rows, generator=g)[: round(rows * supervised)]
    targets[chosen] = torch.randint(0, vocab, (len(chosen),), generator=g)
    return h.to(device).requires_grad_(), weight.to(device).requires_grad_(), targets.to(device)


def main() -> None:
    args_parser = parser(__doc__)
    args_parser.add_argument("--rows", type=int, default=8192, help="positions in the packed row")
    args_parser.add_argument("--vocab", type=int, default=16384)
    args_parser.add_argument("--width", type=int, default=256, help="hidden size (d20: 1280)")
    args_parser.add_argument("--supervised", type=float, default=0.1, help="fraction of positions with a target")
    args = args_parser.parse_args()
    fix_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    inputs = packed_row(args.rows, args.vocab, args.width, args.supervised, device)
    print(f"loss forward + backward: {args.rows} positions ({int((inputs[2] != IGNORE_INDEX).sum())} supervised), "
          f"vocab {args.vocab}, width {args.width}, fp32, {device}, {args.threads} threads")
    full_seconds, full_mib = measure(full_logits_loss, *inputs)
    runs = alternate({"previous": lambda: measure(previous_loss, *inputs),
                      "current": lambda: measure(chunked_cross_entropy, *inputs)}, args.repeats)
    print(f"{'loss':<10}{'peak MiB':>10}{'seconds':>10}")
    print(f"{'full':<10}{full_mib:>10.0f}{full_seconds:>10.2f}   (one run: the reference)")
    for name, results in runs.items():
        print(f"{name:<10}{statistics.median(m for _, m in results):>10.0f}"
              f"{statistics.median(s for s, _ in results):>10.2f}   (median of {args.repeats})")
    seconds_of = {name: [s for s, _ in results] for name, results in runs.items()}
    mib_of = {name: [m for _, m in results] for name, results in runs.items()}
    print(f"current / full peak:     {summary([m / full_mib for m in mib_of['current']], '.3f', 'x')}")
    print(f"current / previous peak: {summary(ratios(mib_of['current'], mib_of['previous']), '.3f', 'x')}")
    print(f"previous / current time: {summary(ratios(seconds_of['previous'], seconds_of['current']), '.1f', 'x')}")
    print(f"headline: the loss now peaks at {statistics.median(mib_of['current']) / full_mib:.3f}x the full-logits "
          f"loss and {statistics.median(ratios(mib_of['current'], mib_of['previous'])):.3f}x the previous one, and "
          f"runs {statistics.median(ratios(seconds_of['previous'], seconds_of['current'])):.1f}x faster than the "
          f"previous one ({args.rows} x {args.vocab} x {args.width}, {args.supervised:.0%} supervised)")


if __name__ == "__main__":
    main()
