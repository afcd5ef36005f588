"""Image preprocessing at Base mode (1024 px, pad) on one core: DeepSeek-OCR's PIL path (A) against the loader's (B).

    python bench/image_preprocessing.py [--pages 50] [--side 1400] [--repeats 5]

Both paths take a page's encoded bytes to the (3, 1024, 1024) uint8 tensor the loader batches: A is
`load_pixels(..., reference=True)` (Pillow's decode, ImageOps.pad bicubic, tensor), B the default `load_pixels`.
Decoding alone (`load_array`: pyspng for plain PNGs, else Pillow) is timed beside them: B's ceiling. Each round runs
the three on every page, in turns, so a shared machine's slow spells hit all of them; the order rotates every round.

Rates are pages per CPU-second of this one-thread process, i.e. per core; the wall-clock rate beside them is lower
when other processes share the cores. Pixels: |B - A| in uint8 levels over every page of the first round. Goal:
>= 50 pages/s per core for PNG and JPEG pages of ~1400 px.
"""

from __future__ import annotations

import argparse
import io
import random
import statistics
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ocr_vlm.data import render
from ocr_vlm.image import load_array, load_pixels

SIZE = 1024
GOAL = 50.0


def encoded_pages(n: int, side: int) -> dict[str, list[bytes]]:
    """The same synthetic pages, scaled to a scan's size (long side `side`), as PNG and as JPEG (quality 90)."""
    rng = random.Random(0)
    out: dict[str, list[bytes]] = {"PNG": [], "JPEG": []}
    for _ in range(n):
        image = render.random_page(rng).image
        scale = side / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)))
        for fmt, pages in out.items():
            buf = io.BytesIO()
            image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
            pages.append(buf.getvalue())
    return out


PATHS = {"A": lambda data: load_pixels(data, SIZE, "pad", reference=True),
         "B": lambda data: load_pixels(data, SIZE, "pad"),
         "decode": load_array}


@dataclass
class Run:
    """CPU and wall seconds of each path in each round, and a histogram of |B - A| in levels."""
    cpu: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PATHS})
    wall: dict[str, list[float]] = field(default_factory=lambda: {name: [] for name in PATHS})
    diff: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))


def measure(pages: list[bytes], repeats: int) -> Run:
    run, names = Run(), list(PATHS)
    for r in range(repeats):
        cpu, wall = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
        for data in pages:
            out = {}
            for name in names[r % len(names):] + names[:r % len(names)]:
                start_cpu, start_wall = time.process_time(), time.perf_counter()
                out[name] = PATHS[name](data)
                cpu[name] += time.process_time() - start_cpu
                wall[name] += time.perf_counter() - start_wall
            if r == 0:
                delta = (out["B"].to(torch.int16) - out["A"].to(torch.int16)).abs()
                run.diff += np.bincount(delta.flatten().numpy(), minlength=256)
        for name in names:
            run.cpu[name].append(cpu[name])
            run.wall[name].append(wall[name])
    return run


def diff_stats(hist: np.ndarray) -> dict[str, float]:
    """Mean, 99.9th percentile and max of |B - A|, and the share of values that differ at all."""
    levels = np.arange(len(hist))
    cumulative = np.cumsum(hist) / hist.sum()
    return {"mean": float((levels * hist).sum() / hist.sum()),
            "p999": int(np.searchsorted(cumulative, 0.999)),
            "max": int(levels[hist > 0].max()),
            "differ": float(1 - cumulative[0])}


def rate(pages: int, seconds: list[float]) -> float:
    """Pages per second of the median round."""
    return pages / statistics.median(seconds)


def row(fmt: str, pages: int, run: Run) -> str:
    ratios = [a / b for a, b in zip(run.cpu["A"], run.cpu["B"])]   # B's rate over A's, round by round
    diff = diff_stats(run.diff)
    return (f"{fmt:<6}{rate(pages, run.cpu['A']):>8.1f}{rate(pages, run.cpu['B']):>8.1f}"
            f"{statistics.median(ratios):>9.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
            f"{rate(pages, run.cpu['decode']):>10.1f}"
            f"{rate(pages, run.wall['A']):>8.1f}{rate(pages, run.wall['B']):>8.1f}"
            f"{diff['mean']:>9.4f}{diff['p999']:>6}{diff['max']:>5}{diff['differ']:>9.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=50,
                        help="pages per format; the default takes ~1.5 min on a busy 2-core machine, 100 ~3 min")
    parser.add_argument("--side", type=int, default=1400, help="long side of the stored pages in pixels")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all pages")
    args = parser.parse_args()
    torch.set_num_threads(1)   # "per core": one thread, one process
    sources = encoded_pages(args.pages, args.side)
    print(f"{args.pages} pages per format, long side {args.side} px -> {SIZE} px pad, {args.repeats} rounds; "
          f"pages/s per core (CPU time) unless marked wall")
    print(f"{'format':<6}{'A ref':>8}{'B fast':>8}{'B/A median [min-max]':>23}{'decode':>8}{'A wall':>8}"
          f"{'B wall':>8}{'mean|d|':>9}{'p99.9':>6}{'max':>5}{'differ':>9}")
    runs = {fmt: measure(pages, args.repeats) for fmt, pages in sources.items()}
    for fmt, run in runs.items():
        print(row(fmt, args.pages, run))
    diff = diff_stats(sum(run.diff for run in runs.values()))
    print(f"image preprocessing at {SIZE} px Base mode, 1 core: PNG {rate(args.pages, runs['PNG'].cpu['B']):.1f} "
          f"pages/s, JPEG {rate(args.pages, runs['JPEG'].cpu['B']):.1f} pages/s (goal {GOAL:.0f}), "
          f"mean |Δ| {diff['mean']:.4f} levels (max {diff['max']}) vs ImageOps.pad")


if __name__ == "__main__":
    main()
