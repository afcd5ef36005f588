"""What every bench here shares: a fixed thread count, A and B alternated over repeats, median ratio and spread.

torch otherwise picks its thread count from the machine, so the same bench measures different things on different
hosts. Alternating A, B, A, B... spreads slow drift (another process starting, a warming CPU) over both sides
instead of loading it onto one, and the spread of the per-repeat ratios says how far the median can be trusted.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def parser(doc: str, threads: int = 2, repeats: int = 3) -> argparse.ArgumentParser:
    """An argument parser with the shared `--threads` and `--repeats`; `fix_threads` must follow parsing."""
    out = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    out.add_argument("--threads", type=int, default=threads, help="torch intra-op threads (default %(default)s)")
    out.add_argument("--repeats", type=int, default=repeats, help="runs of each side, alternated (default %(default)s)")
    return out


def fix_threads(threads: int) -> None:
    torch.set_num_threads(threads)


def seconds(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(runs: dict[str, Callable[[], T]], repeats: int) -> dict[str, list[T]]:
    """Each run `repeats` times, interleaved: a, b, a, b, ..."""
    results: dict[str, list[T]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            results[name].append(run())
    return results


def ratios(numerators: list[float], denominators: list[float]) -> list[float]:
    """Per-repeat ratios: a pair of runs shares the conditions of its moment."""
    return [a / b for a, b in zip(numerators, denominators)]


def summary(values: list[float], fmt: str = ".2f", unit: str = "") -> str:
    """'median (spread min-max, n repeats)'."""
    low, high = min(values), max(values)
    return f"{statistics.median(values):{fmt}}{unit} (spread {low:{fmt}}-{high:{fmt}}{unit}, {len(values)} repeats)"
