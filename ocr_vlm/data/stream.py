"""Endless, resumable streams of raw (undecoded) samples from WebDataset shards, split across ranks and workers.

Every epoch the shard order is permuted by (seed, epoch), the epoch's samples are laid end to end, and each of the
ranks × workers "slots" takes one contiguous, equal-sized range of them (±1 sample). So every sample appears exactly
once per epoch, a slot's share never depends on how samples fall into shards (fewer shards than slots is fine), and
no rank runs dry while another still has data: at the end of its range a slot rolls into its next epoch.

A slot's position is (epoch, samples consumed in that epoch). Everything downstream is a pure function of the seed,
so resuming replays the slot's range from its start (reading tar bytes, decoding nothing) and drops what was consumed.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds
from braceexpand import braceexpand

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Skipped:
    """A stream item standing for samples that could not be read, kept in order so positions stay exact."""
    reason: str
    where: str
    count: int = 1


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int]          # samples per shard, from the writer's index.json

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_spec(cls, spec: str) -> "ShardSet":
        """Shard paths from a directory, a brace pattern (`dir/x-{000000..000009}.tar`) or `::`-joined specs."""
        paths = []
        for part in spec.split("::"):
            part_path = Path(part)
            if part_path.is_dir():
                paths += sorted(part_path.glob("*.tar"))
                continue
            expanded = [Path(p) for p in braceexpand(part)]
            missing = [p for p in expanded if not p.exists()]
            if missing:
                raise ValueError(f"shards: {missing[0]} does not exist")
            paths += expanded
        if not paths:
            raise ValueError(f"shards: {spec!r} names no .tar files")
        indexes: dict[Path, dict] = {}
        counts = []
        for path in paths:
            index_file = path.parent / "index.json"
            if index_file not in indexes:
                if not index_file.exists():
                    raise ValueError(f"shards: {index_file} is missing; write shards with `python -m ocr_vlm.data.shards` "
                                     f"or count existing ones with `python -m ocr_vlm.data.shards index {path.parent}`")
                indexes[index_file] = json.loads(index_file.read_text())["shards"]
            if path.name not in indexes[index_file]:
                raise ValueError(f"shards: {path.name} is not listed in {index_file}")
            counts.append(int(indexes[index_file][path.name]))
        return cls([str(p) for p in paths], counts)


def slot_ranges(shards: ShardSet, slot: int, slots: int, epoch: int, seed: int) -> list[tuple[str, int, int]]:
    """The (shard, start, stop) pieces of this slot's contiguous share of the epoch's permuted sample sequence."""
    order = list(range(len(shards.urls)))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    lo, hi = slot * shards.total // slots, (slot + 1) * shards.total // slots
    pieces, offset = [], 0
    for i in order:
        start, stop = max(lo, offset), min(hi, offset + shards.counts[i])
        if start < stop:
            pieces.append((shards.urls[i], start - offset, stop - offset))
        offset += shards.counts[i]
    return pieces


class SampleStream:
    """One slot's samples, epoch after epoch; yields (item, position before the item) forever."""

    def __init__(self, shards: ShardSet, slot: int, slots: int, seed: int, shuffle_buffer: int,
                 position: tuple[int, int] = (0, 0)):
        if shards.total < slots:
            raise ValueError(f"shards: {shards.total} samples cannot feed {slots} rank x worker slots")
        self.shards, self.slot, self.slots, self.seed, self.buffer = shards, slot, slots, seed, shuffle_buffer
        self.position = tuple(position)

    def __iter__(self) -> Iterator[tuple[dict | Skipped, tuple[int, int]]]:
        epoch, consumed = self.position
        while True:
            items = self._epoch_items(epoch)
            for k, item in enumerate(items):
                if k >= consumed:
                    yield item, (epoch, k)
            epoch, consumed = epoch + 1, 0

    def _epoch_items(self, epoch: int) -> Iterator[dict | Skipped]:
        rng = random.Random(f"samples/{self.seed}/{epoch}/{self.slot}")
        pieces = slot_ranges(self.shards, self.slot, self.slots, epoch, self.seed)
        raw = (item for url, start, stop in pieces for item in _read_range(url, start, stop))
        # Shuffle raw bytes, not decoded images: the buffer stays small, and resume replays it without decoding.
        return wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(raw) if self.buffer > 1 else raw


def _read_range(url: str, start: int, stop: int) -> Iterator[dict | Skipped]:
    """Samples [start, stop) of one tar; samples a damaged tar cannot deliver come out as one Skipped item."""
    errors: list[Exception] = []

    def keep_going(exn: Exception) -> bool:
        errors.append(exn)
        return True

    delivered = 0
    samples = wds.tarfile_samples([{"url": url}], handler=keep_going)
    for k, sample in enumerate(samples):
        if k >= stop:
            break
        if k >= start:
            delivered += 1
            yield sample
    samples.close()
    if delivered < stop - start:
        log.warning("shard %s: %d of its samples unreadable (%s)", url, stop - start - delivered,
                    errors[0] if errors else "tar ends early")
        yield Skipped("truncated_tar", url, stop - start - delivered)
