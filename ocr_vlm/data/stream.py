"""Endless, resumable streams of raw (undecoded) samples from WebDataset shards, split across ranks and workers.

Every epoch the shard order is permuted by (seed, epoch), the epoch's samples are laid end to end, and each of the
ranks × workers "slots" takes one contiguous, equal-sized range of them (±1 sample). So every sample appears exactly
once per epoch, a slot's share never depends on how samples fall into shards (fewer shards than slots is fine), and
no rank runs dry while another still has data: at the end of its range a slot rolls into its next epoch.

A slot's position is (epoch, samples consumed in that epoch). Everything downstream is a pure function of the seed,
so resuming replays the slot's range from its start (reading tar bytes, decoding nothing) and drops what was consumed.

Slots move through epochs at their own pace, so a resume on another number of slots starts from an `Origin`: the old
slot count and every old slot's position, which say exactly which samples of each epoch were consumed. Until the
first epoch no old slot had begun, each epoch's *remaining* samples are split over the new slots as a fresh epoch is;
after that, epochs split as usual. No sample of an epoch is repeated or skipped across the change.
"""

from __future__ import annotations

import itertools
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import webdataset as wds
from braceexpand import braceexpand

from ocr_vlm.rejected import Rejected

log = logging.getLogger(__name__)


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int]          # samples per shard, from the writer's index.json

    @property
    def total(self) -> int:
        return sum(self.counts)

    @classmethod
    def from_spec(cls, spec: str) -> "ShardSet":
        """Shards from `::`-joined parts, each a directory, a brace pattern (`dir/x-{000000..000009}.tar`) or an
        index.json (the shards it lists, with their counts). A part may be a URL webdataset opens (`pipe:CMD`,
        `http(s)://...`): a shard's count then comes from the index.json beside it, fetched the same way."""
        listed: dict[str, int] = {}          # url -> samples, from the indexes read so far
        urls = []
        for part in spec.split("::"):
            if file_name(part) == INDEX:
                counts = read_index(part)
                named = [name if REMOTE.match(name) else beside(part, name) for name in counts]
                listed.update(zip(named, counts.values()))
                urls += named
            elif Path(part).is_dir():
                urls += [str(p) for p in sorted(Path(part).glob("*.tar"))]
            else:
                urls += list(braceexpand(part))
        urls = [url if REMOTE.match(url) else str(Path(url)) for url in urls]   # local: one spelling per file
        for url in urls:
            if not REMOTE.match(url) and not Path(url).exists():
                raise ValueError(f"shards: {url} does not exist")
            if url not in listed:
                index = beside(url, INDEX)
                counts = read_index(index)
                listed.update({beside(index, name): count for name, count in counts.items()})
                if url not in listed:
                    raise ValueError(f"shards: {file_name(url)} is not listed in {index}")
        if not urls:
            raise ValueError(f"shards: {spec!r} names no .tar files")
        return cls(urls, [listed[url] for url in urls])


INDEX = "index.json"
REMOTE = re.compile(r"[a-z][a-z0-9+.-]+:")         # pipe:, http://, s3:// ...; a local path has no scheme
NAME = re.compile(r"[^/\s'\"]+$")                    # a URL's (or a pipe command's) last file name


def file_name(url: str) -> str:
    match = NAME.search(url.rstrip(" -"))           # `pipe:aws s3 cp s3://b/x.tar -` ends in its output, "-"
    return match.group() if match else ""


def beside(url: str, name: str) -> str:
    """The file `name` in the same place as `url`, reached the same way (the same pipe command, the same host)."""
    if not REMOTE.match(url):
        return str(Path(url).parent / name)          # an absolute `name` stays itself
    old = file_name(url)
    at = url.rindex(old)
    return url[:at] + name + url[at + len(old):]


def read_index(url: str) -> dict[str, int]:
    """An index.json's samples per shard. A fetched index may only name shards beside it (a name with a scheme
    would be a command or a host it chose); a local one, which you wrote, may list any URLs with their counts."""
    try:
        with wds.gopen(url) as f:
            index = json.loads(f.read())
        shards = {str(name): int(count) for name, count in index["shards"].items()}
    except FileNotFoundError:
        raise ValueError(f"shards: {url} is missing; write shards with `python -m ocr_vlm.data.shards` or count "
                         f"existing ones with `python -m ocr_vlm.data.shards index {Path(url).parent}`") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"shards: {url}: cannot read a shard index ({type(e).__name__}: {e})") from None
    if REMOTE.match(url) and any(REMOTE.match(name) or "/" in name for name in shards):
        raise ValueError(f"shards: {url} lists a shard that is not a file name beside it")
    return shards


def slot_ranges(shards: ShardSet, slot: int, slots: int, epoch: int, seed: int) -> list[tuple[str, int, int]]:
    """The (shard, start, stop) pieces of this slot's contiguous share of the epoch's permuted sample sequence."""
    order = list(range(len(shards.urls)))
    random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return _share([(shards.urls[i], 0, shards.counts[i]) for i in order], slot, slots)


def _share(pieces: list[tuple[str, int, int]], slot: int, slots: int) -> list[tuple[str, int, int]]:
    """This slot's contiguous, equal-sized (±1) range of the samples the pieces hold, laid end to end."""
    total = sum(stop - start for _, start, stop in pieces)
    lo, hi = slot * total // slots, (slot + 1) * total // slots
    share, offset = [], 0
    for url, start, stop in pieces:
        a, b = max(lo, offset), min(hi, offset + stop - start)
        if a < b:
            share.append((url, start + a - offset, start + b - offset))
        offset += stop - start
    return share


@dataclass(frozen=True)
class Origin:
    """Where a run on another number of slots stopped: one (epoch, consumed) position per old slot, and the origin
    that run itself resumed from (None for a run that started fresh)."""
    slots: int
    positions: tuple[tuple[int, int], ...]
    before: "Origin | None" = None

    @property
    def first_epoch(self) -> int:
        """The earliest epoch some sample of which was not consumed: where the new slots start."""
        return min(epoch for epoch, _ in self.positions)

    @property
    def fresh_epoch(self) -> int:
        """The first epoch no old slot (nor any slot before them) had begun: from here on epochs split as usual."""
        fresh = max(epoch + (consumed > 0) for epoch, consumed in self.positions)
        return max(fresh, self.before.fresh_epoch) if self.before else fresh

    def remaining(self, shards: ShardSet, epoch: int, seed: int, buffer: int) -> list[tuple[str, int, int]]:
        """The samples of `epoch` no old slot consumed, as pieces in the old slots' order."""
        pieces = []
        for slot, (at, consumed) in enumerate(self.positions):
            if epoch < at:
                continue                     # this slot finished its share of the epoch
            share = epoch_pieces(shards, slot, self.slots, epoch, seed, buffer, self.before)
            if epoch == at and consumed:
                # Which samples the first `consumed` were depends on the slot's shuffle: replay it (reading tar bytes).
                stream = SampleStream(shards, slot, self.slots, seed, buffer, (epoch, 0), self.before)
                taken = {m for item, _ in itertools.islice(stream, consumed) for m in _members(item)}
                share = _runs([(url, i) for url, start, stop in share for i in range(start, stop)
                               if (url, i) not in taken])
            pieces += share
        return pieces

    def to_dict(self) -> dict:
        return {"slots": self.slots, "positions": [list(p) for p in self.positions],
                "before": self.before.to_dict() if self.before else None}

    @classmethod
    def from_dict(cls, state: dict | None) -> "Origin | None":
        if state is None:
            return None
        return cls(state["slots"], tuple(tuple(p) for p in state["positions"]), cls.from_dict(state["before"]))


def epoch_pieces(shards: ShardSet, slot: int, slots: int, epoch: int, seed: int, buffer: int,
                 origin: Origin | None) -> list[tuple[str, int, int]]:
    """The (shard, start, stop) pieces a slot reads in an epoch (before its shuffle buffer)."""
    if fresh(origin, epoch):
        return slot_ranges(shards, slot, slots, epoch, seed)
    return _share(origin.remaining(shards, epoch, seed, buffer), slot, slots)


def fresh(origin: Origin | None, epoch: int) -> bool:
    """Whether the slots split all of `epoch` (not the remainder a run on other slots left of it)."""
    return origin is None or epoch >= origin.fresh_epoch


def _members(item: dict | Rejected) -> list[tuple[str, int]]:
    """The (shard, index) of the samples a stream item stands for."""
    if isinstance(item, Rejected):
        return [(item.where, i) for i in range(item.first, item.first + item.count)]
    return [(item["__url__"], item["__index__"])]


def _runs(members: list[tuple[str, int]]) -> list[tuple[str, int, int]]:
    """(shard, index) pairs as (shard, start, stop) pieces, consecutive indices of a shard merged into one."""
    pieces: list[tuple[str, int, int]] = []
    for url, i in members:
        if pieces and pieces[-1][0] == url and pieces[-1][2] == i:
            pieces[-1] = (url, pieces[-1][1], i + 1)
        else:
            pieces.append((url, i, i + 1))
    return pieces


class SampleStream:
    """One slot's samples, epoch after epoch; yields (item, position before the item) forever."""

    def __init__(self, shards: ShardSet, slot: int, slots: int, seed: int, shuffle_buffer: int,
                 position: tuple[int, int] = (0, 0), origin: Origin | None = None):
        if shards.total < slots:
            raise ValueError(f"shards: {shards.total} samples cannot feed {slots} rank x worker slots")
        self.shards, self.slot, self.slots, self.seed, self.buffer = shards, slot, slots, seed, shuffle_buffer
        self.position, self.origin = tuple(position), origin

    def fresh(self, epoch: int) -> bool:
        return fresh(self.origin, epoch)

    def __iter__(self) -> Iterator[tuple[dict | Rejected, tuple[int, int]]]:
        epoch, consumed = self.position
        while True:
            items = self._epoch_items(epoch)
            for k, item in enumerate(items):
                if k >= consumed:
                    yield item, (epoch, k)
            epoch, consumed = epoch + 1, 0

    def _epoch_items(self, epoch: int) -> Iterator[dict | Rejected]:
        rng = random.Random(f"samples/{self.seed}/{epoch}/{self.slot}")
        pieces = epoch_pieces(self.shards, self.slot, self.slots, epoch, self.seed, self.buffer, self.origin)
        raw = (item for url, start, stop in pieces for item in read_range(url, start, stop))
        # Shuffle raw bytes, not decoded images: the buffer stays small, and resume replays it without decoding.
        return wds.shuffle(self.buffer, initial=self.buffer, rng=rng)(raw) if self.buffer > 1 else raw


def read_range(url: str, start: int, stop: int) -> Iterator[dict | Rejected]:
    """Samples [start, stop) of one tar; samples a damaged tar cannot deliver come out as one Rejected item, kept in
    order so stream positions stay exact."""
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
            sample["__index__"] = k          # which sample it is, should a resume on other slots ask
            yield sample
    samples.close()
    if delivered < stop - start:
        why = errors[0] if errors else "tar ends early"
        log.warning("shard %s: %d of its samples unreadable (%s)", url, stop - start - delivered, why)
        yield Rejected("truncated_tar", f"{url}: {why}", url, stop - start - delivered, first=start + delivered)
