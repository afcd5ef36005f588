"""Streaming loader: split across ranks x workers, packing, mixing, exact resume, and skipped-sample counters."""

import io
import json
import struct
import zlib
from collections import Counter, defaultdict

import pytest
import torch
from PIL import Image

from ocr_vlm import config
from ocr_vlm.config import DataConfig
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.shards import Record, write_shards
from ocr_vlm.data.stream import Origin, SampleStream, ShardSet, slot_ranges
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

VLM = config.mini()
TOK = Tokenizer.load(MINI_TOKENIZER)


def png(size=(24, 16), color=(255, 255, 255)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def page(key: str, response: str) -> Record:
    meta = {"id": key, "prompt": "<image>\nFree OCR.", "response": response}
    return Record(key, meta, png(color=(len(response) % 255, 100, 200)), "png")


def chat(key: str, answer: str) -> Record:
    return Record(key, {"id": key, "messages": [{"role": "user", "content": "say it"},
                                                {"role": "assistant", "content": answer}]})


def responses_in(batch) -> list[str]:
    """Decode each packed sample's supervised targets back to text (without the end token)."""
    out = []
    for row_targets, row_docs in zip(batch["targets"], batch["doc_ids"]):
        for doc in row_docs.unique().tolist():
            if doc >= 0:
                t = row_targets[row_docs == doc]
                out.append(TOK.decode(t[t != IGNORE_INDEX].tolist()).removesuffix("<|assistant_end|>"))
    return out


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 pages in 3 shards (fewer shards than the 4 rank x worker slots) and 40 chats in 2 shards."""
    root = tmp_path_factory.mktemp("corpus")
    texts = [f"PAGE {i} TOTAL {i * 3}.{i:02d}" for i in range(30)]
    write_shards([page(f"p{i:03d}", t) for i, t in enumerate(texts)], root / "pages", max_count=10)
    write_shards([chat(f"c{i:03d}", f"answer {i}") for i in range(40)], root / "chats", max_count=20)
    return root, texts


def data(root, **kw) -> DataConfig:
    base = dict(shards=str(root / "pages"), seq_len=400, num_workers=2, shuffle_buffer=8, seed=7)
    return DataConfig(**(base | kw))


def test_slot_ranges_are_balanced_and_cover_the_epoch(corpus):
    shards = ShardSet.from_spec(str(corpus[0] / "pages"))
    sizes = [sum(b - a for _, a, b in slot_ranges(shards, s, 4, epoch=0, seed=7)) for s in range(4)]
    assert sorted(sizes) == [7, 7, 8, 8]


def test_every_sample_once_per_epoch_across_2_ranks_x_2_workers(corpus):
    root, texts = corpus
    seen = []
    for rank in range(2):
        seen += [r for b in Loader(data(root), VLM, MINI_TOKENIZER, rank, 2, finite=True, batch_rows=2) for r in responses_in(b)]
    assert sorted(seen) == sorted(texts)


def test_endless_stream_gives_every_rank_batches_and_image_counts_match(corpus):
    root, _ = corpus
    for rank in range(2):
        batches = iter(Loader(data(root), VLM, MINI_TOKENIZER, rank, 2, batch_rows=2))
        for _ in range(12):                         # several epochs of this rank's 15 samples
            b = next(batches)
            n_images = int((b["input_ids"] == VLM.image_token_id).sum()) // VLM.image_tokens
            assert b["pixel_values"].shape == (n_images, 3, VLM.image_size, VLM.image_size)
            assert n_images == b["counters"]["vision_samples"]


def test_rows_are_packed_full_and_positions_restart(corpus):
    root, _ = corpus
    batch = next(iter(Loader(data(root, shuffle_buffer=0, num_workers=0), VLM, MINI_TOKENIZER, batch_rows=2)))
    sample_len = int((batch["doc_ids"][0] == 0).sum())
    for docs, positions, ids in zip(batch["doc_ids"], batch["position_ids"], batch["input_ids"]):
        used = int((docs >= 0).sum())
        assert used > 400 - sample_len - 2            # the next sample would not have fit
        for doc in range(int(docs.max()) + 1):
            span = docs == doc
            assert positions[span].tolist() == list(range(int(span.sum())))
            assert ids[span][0] == TOK.bos_id


def test_resume_continues_at_the_exact_next_batch(corpus):
    root, _ = corpus
    cfg = data(root, text_shards=str(root / "chats"), text_ratio=0.3)
    first = Loader(cfg, VLM, MINI_TOKENIZER, rank=1, world=2, batch_rows=2)
    stream = iter(first)
    for _ in range(5):
        next(stream)
    state = json.loads(json.dumps(first.state_dict()))          # as it travels through a checkpoint
    expected = [next(stream) for _ in range(6)]
    resumed = Loader(cfg, VLM, MINI_TOKENIZER, rank=1, world=2, batch_rows=2)
    resumed.load_state_dict(state)
    for want, got in zip(expected, iter(resumed)):
        for key in ("input_ids", "targets", "position_ids", "doc_ids", "pixel_values"):
            assert torch.equal(want[key], got[key]), key
        assert want["counters"] == got["counters"]


@pytest.mark.parametrize("chain", [(2, 1), (1, 2), (4, 2), (2, 1, 2)])
def test_resume_on_another_slot_count_reads_every_epoch_exactly_once(corpus, chain):
    """Slots at different epochs (as the issue saw: 4, 7, 4, 4) stop; the run resumes on another slot count (and
    again on another): every epoch any slot had begun is read exactly once over all the legs, shuffle included."""
    root, texts = corpus
    shards = ShardSet.from_spec(str(root / "pages"))
    seen: dict[int, Counter] = defaultdict(Counter)
    origin = None
    for leg, slots in enumerate(chain):
        last = leg == len(chain) - 1
        start = (origin.first_epoch, 0) if origin else (0, 0)
        positions = []
        for slot in range(slots):
            taken, position = 0, start
            for item, (epoch, k) in SampleStream(shards, slot, slots, 7, 8, start, origin):
                if (last and epoch >= origin.fresh_epoch) or (not last and taken == 37 - 10 * slot - 4 * leg):
                    break                                   # uneven paces: the slots stop at different epochs
                seen[epoch][item["__key__"]] += 1
                taken, position = taken + 1, (epoch, k + 1)
            positions.append(position)
        if leg == 0 and slots > 1:
            assert len({epoch for epoch, _ in positions}) > 1          # the slots stopped in different epochs
        origin = origin if last else Origin(slots, tuple(positions), origin)
    keys = Counter(f"p{i:03d}" for i in range(len(texts)))
    assert [seen[e] for e in range(origin.fresh_epoch)] == [keys] * origin.fresh_epoch


@pytest.mark.parametrize("old, new", [((2, 0), (1, 0)), ((1, 0), (2, 0)), ((1, 2), (1, 0))])
def test_loader_resumed_on_other_ranks_or_workers_reads_the_rest_of_the_epoch(corpus, old, new):
    """Through the loader's checkpointed state, (ranks, workers) -> (ranks, workers): the new ranks' batches, up to the
    end of the epoch, hold exactly the pages the old ones had not taken (one page per batch, so the epoch's end is a
    batch boundary)."""
    root, texts = corpus
    (old_world, old_workers), (new_world, new_workers) = old, new
    cfg = data(root, seq_len=150, num_workers=old_workers)
    loaders = [Loader(cfg, VLM, MINI_TOKENIZER, rank, old_world) for rank in range(old_world)]
    taken = [r for loader in loaders for _, b in zip(range(4 + loader.rank), loader) for r in responses_in(b)]
    states = [json.loads(json.dumps(loader.state_dict())) for loader in loaders]   # as they travel in a checkpoint
    assert all(w["vision"][0] == 0 for s in states for w in s["workers"].values())
    rest = []
    for rank in range(new_world):
        loader = Loader(data(root, seq_len=150, num_workers=new_workers), VLM, MINI_TOKENIZER, rank,
                        new_world)
        assert not loader.resume(states)
        for batch in loader:
            if loader.worker_states[0]["vision"][0] > 0:
                break                                       # this batch's page is the next epoch's first
            rest += responses_in(batch)
    assert len(taken) == 4 * old_world + old_world * (old_world - 1) // 2
    assert sorted(taken + rest) == sorted(texts)


def test_mixing_ratio_within_two_percent(corpus):
    root, _ = corpus
    cfg = data(root, text_shards=str(root / "chats"), text_ratio=0.1, num_workers=0, seq_len=4000)
    counts = Counter()
    for batch in Loader(cfg, VLM, MINI_TOKENIZER):
        counts.update(batch["counters"])
        if counts["samples"] >= 2000:
            break
    assert abs(counts["text_samples"] / counts["samples"] - 0.1) <= 0.02


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing a huge image: Pillow must refuse it before allocating anything."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_corrupt_samples_are_skipped_and_counted_by_reason(tmp_path):
    good = png()
    bad = [
        Record("truncated", {"prompt": "p", "response": "r"}, good[: len(good) // 2], "png"),
        Record("notimage", {"prompt": "p", "response": "r"}, b"GIF89a but not really", "png"),
        Record("bomb", {"prompt": "p", "response": "r"}, png_claiming(30000, 30000), "png"),
        Record("nofield", {"prompt": "p"}, good, "png"),
        Record("wrongtype", {"prompt": "p", "response": 3}, good, "png"),
        Record("nomessages", {"text": "hello"}),
        page("toolong", "word " * 2000),                           # > seq_len tokens: cannot be packed
    ]
    samples = bad + [page(f"ok{i}", f"fine {i}") for i in range(4)]
    write_shards(samples, tmp_path / "d", max_count=20)
    with open(tmp_path / "d" / "shard-000000.tar", "r+b") as f:     # non-UTF-8 JSON, same length
        raw = f.read()
        at = raw.index(b'{"prompt": "p", "response": 3}')
        f.seek(at + 12)
        f.write(b"\xff")
    # A second shard cut inside its first image: that sample lacks its image, the rest are lost; the stream goes on.
    write_shards([page(f"t{i}", f"tail {i}") for i in range(3)], tmp_path / "t", max_count=10)
    tar = (tmp_path / "t" / "shard-000000.tar").read_bytes()
    (tmp_path / "d" / "shard-000001.tar").write_bytes(tar[:1536])
    index = json.loads((tmp_path / "d" / "index.json").read_text())
    index["shards"]["shard-000001.tar"] = 3
    (tmp_path / "d" / "index.json").write_text(json.dumps(index))

    cfg = DataConfig(shards=str(tmp_path / "d"), seq_len=2000, num_workers=0, shuffle_buffer=0)
    counts = Counter()
    for batch in Loader(cfg, VLM, MINI_TOKENIZER, finite=True):
        counts.update(batch["counters"])
    assert counts["samples"] == 4
    assert {k: v for k, v in counts.items() if k.startswith("skipped/")} == {
        "skipped/bad_image": 2, "skipped/image_too_large": 1, "skipped/bad_fields": 2, "skipped/bad_text": 1,
        "skipped/missing_image": 1, "skipped/truncated_tar": 2, "skipped/too_long": 1}


def test_answer_is_read_as_response_by_writer_and_loader_alike(tmp_path):
    """One schema: a foreign shard whose JSON says `answer` trains the same as one the writer normalised."""
    foreign = Record("a0", {"prompt": "<image>\nFree OCR.", "answer": "TOTAL 7.07"}, png(), "png")
    write_shards([foreign], tmp_path / "foreign")
    cfg = DataConfig(shards=str(tmp_path / "foreign"), seq_len=200, num_workers=0, shuffle_buffer=0)
    (batch,) = Loader(cfg, VLM, MINI_TOKENIZER, finite=True)
    assert responses_in(batch) == ["TOTAL 7.07"] and batch["reading_targets"].tolist() == list(b"TOTAL7.07")


def test_skip_counts_survive_a_one_pass_share_without_samples(tmp_path):
    good = [page(f"g{i}", f"fine {i}") for i in range(3)]
    bad = [Record(f"z{i}", {"prompt": "p"}, png(), "png") for i in range(3)]     # rank 1's whole share
    write_shards(good + bad, tmp_path / "d")
    cfg = DataConfig(shards=str(tmp_path / "d"), seq_len=200, num_workers=0, shuffle_buffer=0)
    counts = [Counter(), Counter()]
    for rank in (0, 1):
        for batch in Loader(cfg, VLM, MINI_TOKENIZER, rank=rank, world=2, finite=True):
            counts[rank].update(batch["counters"])
    assert counts[0]["samples"] == 3 and (counts[1]["samples"], counts[1]["skipped/bad_fields"]) == (0, 3)
