"""Shards -> packed, resumable batches: mix, decode, process the image, render tokens, pack rows of seq_len.

Each DataLoader worker of each rank owns one slot of the sample streams (see stream.py) and builds whole batches.
Rows hold several samples: each starts at <|bos|> with rotary positions restarting at 0, and `doc_ids` tells the
model which tokens may attend to which (causal within a sample, never across). A batch carries the position of the
first sample it did *not* take, so `Loader.state_dict()` resumes at exactly the next sample on every rank, and
`Loader.start_after()` continues on another world size with no sample of an epoch repeated or skipped.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ocr_vlm import flops
from ocr_vlm.config import DataConfig, VLMConfig
from ocr_vlm.data.sample import Example, decode
from ocr_vlm.data.stream import Origin, SampleStream, ShardSet
from ocr_vlm.image import stack_views
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import Reading, places
from ocr_vlm.rejected import Rejected
from ocr_vlm.tokenizer import Tokenizer

# A batch's keys for its `Reading`'s fields, in order.
READING_KEYS = ("reading_targets", "reading_gaps", "reading_lengths", "reading_cells", "reading_predecessors",
                "pointer")

log = logging.getLogger(__name__)
STREAMS = ("vision", "text")
FRESH = {"mixed": 0, "vision": (0, 0), "text": (0, 0)}     # a worker's stream state before its first sample


class PackedBatches(IterableDataset):
    """Runs inside each DataLoader worker: one slot's examples packed into (batch_rows, seq_len) batches."""

    def __init__(self, data: DataConfig, vlm: VLMConfig, tokenizer_path: str, batch_rows: int, rank: int, world: int,
                 worker_states: dict[int, dict], worker_offset: int, finite: bool, origins: dict[str, Origin | None]):
        self.data, self.vlm, self.tokenizer_path, self.batch_rows = data, vlm, tokenizer_path, batch_rows
        self.rank, self.world, self.states, self.offset, self.finite = rank, world, worker_states, worker_offset, finite
        self.origins = origins

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        logical = ((info.id if info else 0) + self.offset) % workers
        tokenizer = Tokenizer.load(self.tokenizer_path)
        examples = self._examples(tokenizer, self.rank * workers + logical, self.world * workers, logical)
        yield from self._pack(examples, tokenizer, logical)

    def _examples(self, tokenizer: Tokenizer, slot: int, slots: int,
                  logical: int) -> Iterator[tuple[Example | Rejected, dict]]:
        """(example or rejection to count, stream positions before it), in stream order."""
        d = self.data
        state = self.states.get(logical, FRESH)
        buffer = 0 if self.finite else d.shuffle_buffer
        streams = {"vision": SampleStream(ShardSet.from_spec(d.shards), slot, slots, d.seed, buffer, state["vision"],
                                          self.origins["vision"])}
        if d.text_ratio > 0:
            streams["text"] = SampleStream(ShardSet.from_spec(d.text_shards), slot, slots, d.seed + 1, buffer,
                                           state["text"], self.origins["text"])
        iters = {name: iter(s) for name, s in streams.items()}
        positions = {"vision": tuple(state["vision"]), "text": tuple(state["text"])}
        mixed = state["mixed"]
        passes = {name: Pass.at(streams[name], *positions[name]) for name in streams}
        warned: set[str] = set()
        while True:
            source = "text" if "text" in iters and _draw(d.seed, slot, mixed) < d.text_ratio else "vision"
            before = {"mixed": mixed, **positions}
            item, (epoch, k) = next(iters[source])
            if self.finite and epoch > 0:
                return
            if epoch != passes[source].epoch:
                passes[source].check(f"{source} shards {streams[source].shards.urls}", slot, slots)
                passes[source] = Pass.at(streams[source], epoch, k)
            positions[source], mixed = (epoch, k + 1), mixed + 1
            if isinstance(item, Rejected):
                passes[source].skipped[item.reason] += item.count
                yield item, before
                continue
            where = f"{item.get('__url__')}:{item.get('__key__')}"
            try:
                example = decode(item, tokenizer, self.vlm)
            except Rejected as e:
                if where not in warned:                # once per run, not once per pass over the data
                    warned.add(where)
                    log.warning("skipping sample %s: %s", where, e)
                passes[source].skipped[e.reason] += 1
                yield e, before
                continue
            passes[source].readable += 1
            if len(example.inputs) > d.seq_len:
                yield Rejected("too_long", f"{len(example.inputs)} tokens > data.seq_len={d.seq_len}", where), before
                continue
            yield example, before

    def _pack(self, examples, tokenizer: Tokenizer, logical: int) -> Iterator[dict]:
        rows: list[list[Example]] = [[]]
        counters: Counter = Counter()
        for ex, state in examples:
            if isinstance(ex, Rejected):
                counters[f"skipped/{ex.reason}"] += ex.count
                continue
            row_full = sum(len(e.inputs) for e in rows[-1]) + len(ex.inputs) > self.data.seq_len
            # Every view of a micro-batch goes through the vision towers at once: the cap bounds their memory.
            images_full = ex.views is not None and self.data.max_images > 0 and \
                sum(view_count(e) for row in rows for e in row) + view_count(ex) > self.data.max_images
            if images_full or (row_full and len(rows) == self.batch_rows):
                yield self._collate(rows, counters, tokenizer, state, logical)
                rows, counters = [[]], Counter()
            elif row_full:
                rows.append([])
            rows[-1].append(ex)
        if self.finite and (rows[0] or counters):      # the last skip counts travel even without a sample
            yield self._collate(rows, counters, tokenizer, None, logical)

    def _collate(self, rows, counters: Counter, tokenizer: Tokenizer, state, logical: int) -> dict:
        T, B = self.data.seq_len, self.batch_rows
        batch = {
            "input_ids": torch.full((B, T), tokenizer.bos_id, dtype=torch.long),
            "targets": torch.full((B, T), IGNORE_INDEX, dtype=torch.long),
            "position_ids": torch.arange(T).repeat(B, 1),
            "doc_ids": torch.full((B, T), -1, dtype=torch.long),   # padding: its own block, supervises nothing
        }
        images, placed = [], []
        for r, row in enumerate(rows):
            at = 0
            for doc, ex in enumerate(row):
                n = len(ex.inputs)
                batch["input_ids"][r, at:at + n] = torch.tensor(ex.inputs)
                batch["targets"][r, at:at + n] = torch.tensor(ex.targets)
                batch["position_ids"][r, at:at + n] = torch.arange(n)
                batch["doc_ids"][r, at:at + n] = doc
                if ex.views is not None:
                    images.append(ex.views)
                    placed.append((r, at, ex))
                counters["vision_samples" if ex.views is not None else "text_samples"] += 1
                at += n
        batch["pixel_values"], batch["tile_values"], batch["tile_grids"] = stack_views(images, self.vlm)
        batch.update(zip(READING_KEYS, packed_reading(placed)))
        counters["samples"] = counters["vision_samples"] + counters["text_samples"]
        counters["tiles"] = len(batch["tile_values"])
        counters["tokens"] = int((batch["doc_ids"] >= 0).sum())
        counters["squared_lengths"] = flops.squared_document_lengths(batch["doc_ids"])   # attention's FLOPs, off the step
        counters["target_tokens"] = int((batch["targets"] != IGNORE_INDEX).sum())
        batch["counters"] = dict(counters)
        batch["state"] = {"worker": logical, "stream": state}
        return batch


def packed_reading(placed: list[tuple[int, int, Example]]) -> Reading:
    """What pages packed into rows say about their characters: the reading head's targets and their places, and
    the pointer's pairs (row, position, vision position, page). `placed`: each page as (row, where it starts there,
    its example), in row order."""
    pointer = [(r, at + query, at + key, page) for page, (r, at, ex) in enumerate(placed) for query, key in ex.pointer]
    return places([(ex.response, ex.cells) for _, _, ex in placed])._replace(
        pointer=torch.tensor(pointer, dtype=torch.long).view(-1, 4))


def batch_reading(batch: dict, device: torch.device) -> Reading:
    """What a collated batch says about its pages' characters (its reading_* tensors and the pointer's pairs), on
    `device`."""
    return Reading(*(batch[k].to(device) for k in READING_KEYS))


def view_count(ex: Example) -> int:
    """Views an example puts through the towers: its global view and any tiles; 0 for text."""
    return 0 if ex.views is None else 1 + len(ex.views.tiles)


class UnreadableData(RuntimeError):
    """A slot read its whole share of the data without finding one usable sample: waiting would be forever."""


@dataclass
class Pass:
    """One slot's progress through one epoch of a stream: a whole share read with nothing readable is an error."""
    epoch: int
    whole: bool                       # reads the slot's whole share of a fresh epoch (not resumed mid-way, nor the
                                      # few samples a resume on other slots left of an epoch: those may all be bad)
    readable: int = 0
    skipped: Counter = field(default_factory=Counter)

    @classmethod
    def at(cls, stream: SampleStream, epoch: int, k: int) -> "Pass":
        return cls(epoch, whole=k == 0 and stream.fresh(epoch))

    def check(self, what: str, slot: int, slots: int) -> None:
        if self.whole and self.readable == 0:
            raise UnreadableData(f"slot {slot} of {slots} (rank x worker) read its whole share of epoch {self.epoch} of "
                                 f"{what} and found no usable sample; skipped by reason: {dict(self.skipped)}")


def _draw(seed: int, slot: int, k: int) -> float:
    """The k-th mixing draw of a slot: a pure function, so resume needs only the count."""
    return random.Random(f"mix/{seed}/{slot}/{k}").random()


class Loader:
    """A rank's batches: an endless stream for training (`finite=False`), or one pass over the data for eval."""

    def __init__(self, data: DataConfig, vlm: VLMConfig, tokenizer_path: str, rank: int = 0, world: int = 1,
                 finite: bool = False, batch_rows: int = 1):
        self.data, self.vlm, self.tokenizer_path = data.validate(), vlm, str(tokenizer_path)
        self.batch_rows = batch_rows          # the recipe's micro_batch: DeepSpeed's train_micro_batch_size_per_gpu
        self.rank, self.world, self.finite = rank, world, finite
        self.batches = 0
        self.worker_states: dict[int, dict] = {}
        self.origins: dict[str, Origin | None] = dict.fromkeys(STREAMS)   # set by a resume on another world size

    def __iter__(self) -> Iterator[dict]:
        workers = max(1, self.data.num_workers)
        dataset = PackedBatches(self.data, self.vlm, self.tokenizer_path, self.batch_rows, self.rank, self.world,
                                dict(self.worker_states), self.batches % workers, self.finite, self.origins)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.data.num_workers, worker_init_fn=_single_thread,
                            prefetch_factor=2 if self.data.num_workers else None, pin_memory=torch.cuda.is_available())
        for batch in loader:
            state = batch.pop("state")
            if state["stream"] is not None:
                self.worker_states[state["worker"]] = state["stream"]
            self.batches += 1
            yield batch

    def state_dict(self) -> dict:
        return {"batches": self.batches, "workers": {str(k): v for k, v in self.worker_states.items()},
                "rank": self.rank, "world": self.world, "num_workers": self._slots_per_rank,
                "origins": {name: o.to_dict() if o else None for name, o in self.origins.items()}}

    def resume(self, states: list[dict]) -> bool:
        """Continue from every rank's `state_dict()`: exactly where this rank was when the ranks and workers are the
        same (True), else by sharing out what the old ones had not read (False)."""
        # A checkpoint from before the worker count was recorded had the one it resumes with, or no exact resume.
        if len(states) == self.world and states[0].get("num_workers", self._slots_per_rank) == self._slots_per_rank:
            self.load_state_dict(states[self.rank])
            return True
        self.start_after(states)
        return False

    @property
    def _slots_per_rank(self) -> int:
        return max(1, self.data.num_workers)

    def start_after(self, states: list[dict]) -> None:
        """Resume from every rank's `state_dict()` of a run on another world size (or worker count): each stream
        continues from the old slots' positions (stream.py's Origin), so no sample of an epoch is repeated or skipped."""
        workers = states[0]["num_workers"]
        old = [states[r]["workers"].get(str(w), FRESH) for r in range(len(states)) for w in range(workers)]
        self.origins = {name: Origin(len(old), tuple(tuple(w[name]) for w in old),
                                     Origin.from_dict(states[0]["origins"][name])) for name in STREAMS}
        self.batches = 0
        self.worker_states = {k: {"mixed": 0, **{name: (o.first_epoch, 0) for name, o in self.origins.items()}}
                              for k in range(self._slots_per_rank)}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ValueError(f"loader state is for rank {state['rank']} of {state['world']}, "
                             f"this is rank {self.rank} of {self.world}")
        self.batches = state["batches"]
        self.worker_states = {int(k): {"mixed": v["mixed"], "vision": tuple(v["vision"]), "text": tuple(v["text"])}
                              for k, v in state["workers"].items()}
        # A checkpoint from before world-size changes were tracked never had one: its streams have no origin.
        self.origins = {name: Origin.from_dict(state.get("origins", {}).get(name)) for name in STREAMS}


def _single_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)   # workers decode and tokenize; intra-op threads would fight the trainer for cores
