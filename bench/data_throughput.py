"""Shard -> packed batch throughput of one loader worker at Base mode (1024 px), for PNG and JPEG pages.

    python bench/data_throughput.py [--pages 200] [--side 1400] [--seconds 5] [--repeats 3]

Prints samples/s per worker (one core) next to what one A100 consumes at the seed prototype's training rate
(4.9 samples/s), i.e. how many cores' worth of workers keep one GPU fed. Goal: >= 50 samples/s per core.
PNG and JPEG windows alternate over the repeats; each starts a fresh loader (warm-up untimed). Unlike the other
benches this one runs on 1 torch thread by default: its figure is per core, as a loader worker gets one.
"""

from __future__ import annotations

import io
import random
import statistics
import tempfile
import time
from pathlib import Path

from harness import alternate, fix_threads, parser, ratios, summary
from ocr_vlm import config
from ocr_vlm.config import DataConfig
from ocr_vlm.data import render
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.shards import Record, write_shards
from ocr_vlm.tokenizer import MINI_TOKENIZER

A100_SAMPLES_PER_S = 4.9   # the prototype's measured stage-2 rate on one A100
FORMATS = ("png", "jpg")


def pages(n: int, side: int, fmt: str) -> list[Record]:
    """Synthetic pages scaled to a scanned page's size (long side `side`), encoded as `fmt`."""
    rng = random.Random(0)
    out = []
    for i in range(n):
        page = render.random_page(rng)
        scale = side / max(page.image.size)
        image = page.image.resize((round(page.image.width * scale), round(page.image.height * scale)))
        buf = io.BytesIO()
        image.save(buf, format="PNG" if fmt == "png" else "JPEG", **({} if fmt == "png" else {"quality": 90}))
        meta = {"id": f"b{i:05d}", "prompt": page.prompt, "response": page.text}
        out.append(Record(f"b{i:05d}", meta, buf.getvalue(), fmt))
    return out


def measure(directory: Path, vlm: config.VLMConfig, window: float) -> float:
    data = DataConfig(shards=str(directory), seq_len=8192, num_workers=0, shuffle_buffer=100)
    batches = iter(Loader(data, vlm, MINI_TOKENIZER))
    next(batches)                                     # warm up: open shards, fill the shuffle buffer
    samples, start = 0, time.perf_counter()
    while time.perf_counter() - start < window:
        samples += next(batches)["counters"]["samples"]
    return samples / (time.perf_counter() - start)


def main() -> None:
    args_parser = parser(__doc__, threads=1)
    args_parser.add_argument("--pages", type=int, default=200)
    args_parser.add_argument("--side", type=int, default=1400, help="long side of the stored pages in pixels")
    args_parser.add_argument("--seconds", type=float, default=5, help="timed window per measurement")
    args = args_parser.parse_args()
    fix_threads(args.threads)
    vlm = config.d20()                                # Base mode: 1024 px, 273 embeddings per page
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in FORMATS:
            write_shards(pages(args.pages, args.side, fmt), Path(tmp) / fmt, max_count=100)
        rates = alternate({fmt: lambda fmt=fmt: measure(Path(tmp) / fmt, vlm, args.seconds) for fmt in FORMATS},
                          args.repeats)
    print(f"{'format':<8}{'samples/s/core':>16}{'A100 needs':>12}{'cores per A100':>16}{'vs goal 50':>12}"
          f"   (medians of {args.repeats}, {args.threads} thread(s))")
    for fmt, rate in ((fmt, statistics.median(r)) for fmt, r in rates.items()):
        print(f"{fmt:<8}{rate:>16.1f}{A100_SAMPLES_PER_S:>12.1f}{A100_SAMPLES_PER_S / rate:>16.2f}"
              f"{rate / 50:>11.2f}x   spread {min(rates[fmt]):.1f}-{max(rates[fmt]):.1f}")
    print(f"jpg / png: {summary(ratios(rates['jpg'], rates['png']), '.2f', 'x')}")
    print(f"headline: one loader worker packs {statistics.median(rates['png']):.1f} PNG / "
          f"{statistics.median(rates['jpg']):.1f} JPEG samples/s per core (goal 50)")


if __name__ == "__main__":
    main()
