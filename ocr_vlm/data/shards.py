"""Write WebDataset shards from manifests; count existing shards. Format: shards/README.md.

    python -m ocr_vlm.data.shards write --manifest pages.jsonl --images-root pages/ \\
        [--conversations chats.jsonl] --out shards/train [--max-count 10000] [--max-bytes 1e9] [--skip-bad]
    python -m ocr_vlm.data.shards index shards/foreign     # write index.json for shards made elsewhere

Every record is validated as it is read: a bad one stops the run with an error naming the file and line, or with
--skip-bad it is left out and counted by reason (in index.json too). The same input gives byte-identical shards.
A directory holds one shard set, described by its index.json.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ocr_vlm.tokenizer import IMAGE_PLACEHOLDER

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
# webdataset splits member names at the first dot; ustar tars hold member names of at most 100 bytes
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,90}")
KEY_RULE = "1-90 letters, digits, '_' or '-'"
TAR_BLOCK, TAR_RECORD = 512, 10240             # a member is a header block plus padded data; files pad to records


class BadRecord(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class Record:
    key: str
    meta: dict                      # becomes KEY.json
    image: bytes | None = None      # becomes KEY.png|jpg|webp
    image_ext: str = ""

    def members(self) -> dict:
        sample = {"__key__": self.key, "json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode()}
        if self.image is not None:
            sample[self.image_ext] = self.image
        return sample


def tar_bytes(sample: dict) -> int:
    """Bytes the sample's members take inside a tar."""
    return sum(TAR_BLOCK + math.ceil(len(v) / TAR_BLOCK) * TAR_BLOCK for k, v in sample.items() if k != "__key__")


def tar_file_bytes(member_bytes: int) -> int:
    """Size on disk of a tar holding `member_bytes`: two zero blocks close it, then it pads to whole records."""
    return math.ceil((member_bytes + 2 * TAR_BLOCK) / TAR_RECORD) * TAR_RECORD


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) per line of a JSONL file, or per element of a JSON list; `where` is file:line."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise BadRecord("bad_file", f"{path}: cannot read ({e})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord("bad_file", f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise BadRecord("bad_json", f"{path}: expected a JSON list of records")
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", BadRecord("bad_json", f"{path}:{number}: not valid JSON ({e.msg})")


def with_response(fields: dict) -> dict:
    """The fields with `answer` (the prototype's and many manifests' name) renamed to `response`: one schema,
    accepted the same by the writer and the loader."""
    if "response" not in fields and "answer" in fields:
        fields = dict(fields)
        fields["response"] = fields.pop("answer")
    return fields


def vision_record(where: str, item: object, images_root: Path) -> Record:
    """A manifest line {id, image, prompt, answer|response, ...free metadata} -> Record (image bytes copied as is)."""
    if not isinstance(item, dict):
        raise BadRecord("bad_json", f"{where}: expected a JSON object")
    fields = dict(with_response(item))
    for name in ("id", "image", "prompt", "response"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            raise BadRecord("bad_fields", f"{where}: field '{name}' missing or not a non-empty string")
    key = fields["id"]
    if not KEY_PATTERN.fullmatch(key):
        raise BadRecord("bad_fields", f"{where}: field 'id' {key!r} must be {KEY_RULE} (it names the tar members)")
    if fields["prompt"].count(IMAGE_PLACEHOLDER) > 1:
        raise BadRecord("bad_fields", f"{where}: field 'prompt' holds {IMAGE_PLACEHOLDER} more than once; "
                                      "a sample has one image")
    path = images_root / fields.pop("image")
    ext = IMAGE_SUFFIXES.get(path.suffix.lower())
    if ext is None:
        raise BadRecord("bad_image", f"{where}: image {path.name} is not one of {sorted(IMAGE_SUFFIXES)}")
    try:
        data = path.read_bytes()
        with Image.open(path) as image:
            image.verify()
    except FileNotFoundError:
        raise BadRecord("missing_image", f"{where}: image {path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BadRecord("bad_image", f"{where}: image {path} is unreadable ({e})") from None
    return Record(key, fields, data, ext)


def text_record(where: str, item: object) -> Record:
    """A conversation line {id, messages: [{role, content}, ...]} -> Record (KEY.json only)."""
    if not isinstance(item, dict):
        raise BadRecord("bad_json", f"{where}: expected a JSON object")
    key, messages = item.get("id"), item.get("messages")
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise BadRecord("bad_fields", f"{where}: field 'id' missing or not {KEY_RULE}")
    if "prompt" in item or "response" in item:     # the loader reads those as a vision sample missing its image
        raise BadRecord("bad_fields", f"{where}: a conversation carries 'messages', not 'prompt'/'response'")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad_fields", f"{where}: field 'messages' missing or empty")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)) or "assistant" not in roles:
        raise BadRecord("bad_fields", f"{where}: roles {roles} must alternate user, assistant, ... "
                                      "(after an optional system message) and include an assistant turn")
    if any(not isinstance(m.get("content"), str) for m in messages):
        raise BadRecord("bad_fields", f"{where}: every message needs a string 'content'")
    return Record(key, dict(item))


def records(manifest: Path | None, images_root: Path | None, conversations: Path | None, skip_bad: bool,
            skipped: Counter) -> Iterator[Record]:
    sources = []
    if manifest is not None:
        sources.append((manifest, lambda where, item: vision_record(where, item, images_root or manifest.parent)))
    if conversations is not None:
        sources.append((conversations, text_record))
    seen: set[str] = set()
    for path, make in sources:
        for where, item in read_jsonl(path):
            try:
                if isinstance(item, BadRecord):
                    raise item
                record = make(where, item)
                if record.key in seen:
                    raise BadRecord("duplicate_id", f"{where}: id {record.key!r} appears twice")
                seen.add(record.key)
                yield record
            except BadRecord as e:
                if not skip_bad:
                    raise
                skipped[e.reason] += 1
                print(f"skipping {e}")


def write_shards(items: Iterable[Record], out_dir: str | Path, prefix: str = "shard", max_count: int = 10_000,
                 max_bytes: float = 1e9, skipped: Counter | None = None) -> dict:
    """Write records into `out_dir/prefix-000000.tar, ...` plus index.json; returns the index.

    A shard holds at most `max_count` samples and `max_bytes` bytes on disk (a single larger sample gets a shard of
    its own). The set is written into a sibling directory and swapped in only once complete: a run that fails
    midway (a bad record, a full disk) leaves the previous set in `out_dir` untouched, never a mixture."""
    if max_count < 1 or max_bytes <= 0:
        raise ValueError(f"max_count ({max_count}) and max_bytes ({max_bytes}) must be positive")
    if not KEY_PATTERN.fullmatch(prefix):
        raise ValueError(f"prefix {prefix!r} must be {KEY_RULE}")
    out_dir = Path(out_dir)
    ours = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    foreign = sorted(p.name for p in out_dir.glob("*.tar") if not ours.fullmatch(p.name))
    if foreign:
        listed = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise ValueError(f"{out_dir} already holds other shards ({listed}); give each shard set its own directory, "
                         "since index.json describes the whole directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.writing-", dir=out_dir.parent))
    try:
        index = _write_set(items, staging, prefix, max_count, max_bytes, skipped)
        _swap_in(staging, out_dir, ours)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return index


def _write_set(items: Iterable[Record], out_dir: Path, prefix: str, max_count: int, max_bytes: float,
               skipped: Counter | None) -> dict:
    counts: dict[str, int] = {}
    kinds = Counter()
    # mtime fixed and members in key order: the same input gives byte-identical tars.
    with wds.ShardWriter(str(out_dir / f"{prefix}-%06d.tar"), maxcount=max_count, maxsize=math.inf, verbose=0,
                         mtime=0, encoder=False) as sink:
        shard_bytes = 0
        for record in tqdm(items, desc=f"writing {out_dir}", unit="sample", disable=None):
            sample = record.members()
            size = tar_bytes(sample)
            if sink.count >= max_count or (sink.count and tar_file_bytes(shard_bytes + size) > max_bytes):
                sink.next_stream()
                shard_bytes = 0
            sink.write(sample)
            shard_bytes += size
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
            kinds["vision" if record.image is not None else "text"] += 1
    for empty in out_dir.glob("*.tar"):                  # the empty tar of a run with no samples
        if empty.name not in counts:
            empty.unlink()
    index = {"shards": counts, "total": sum(counts.values()), "vision": kinds["vision"], "text": kinds["text"],
             "skipped": dict(sorted((skipped or Counter()).items()))}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def _swap_in(staging: Path, out_dir: Path, ours: re.Pattern) -> None:
    """Replace the shard set in `out_dir` by the complete one in `staging`; other files in `out_dir` stay."""
    if out_dir.exists():
        for other in out_dir.iterdir():
            if other.name != "index.json" and not ours.fullmatch(other.name):
                other.rename(staging / other.name)
        old = out_dir.with_name(staging.name.replace(".writing-", ".replaced-"))
        out_dir.rename(old)
        staging.rename(out_dir)
        shutil.rmtree(old)
    else:
        staging.rename(out_dir)


def index_existing(directory: str | Path) -> dict:
    """Count the samples of shards written by another tool, so the loader can size epochs."""
    directory = Path(directory)
    counts = {}
    for tar in tqdm(sorted(directory.glob("*.tar")), desc="counting", unit="shard", disable=None):
        with tarfile.open(tar) as f:
            counts[tar.name] = len({m.name.split(".", 1)[0] for m in f.getmembers() if m.isfile()})
    index = {"shards": counts, "total": sum(counts.values())}
    (directory / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    write = sub.add_parser("write", help="manifest / conversations -> shards + index.json")
    write.add_argument("--manifest", type=Path, help="JSONL (or JSON list) of {id, image, prompt, answer|response}")
    write.add_argument("--images-root", type=Path, help="directory the manifest's image paths are relative to")
    write.add_argument("--conversations", type=Path, help="JSONL of {id, messages: [{role, content}, ...]}")
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--prefix", default="shard")
    write.add_argument("--max-count", type=int, default=10_000, help="samples per shard at most")
    write.add_argument("--max-bytes", type=float, default=1e9, help="bytes per shard file at most")
    write.add_argument("--skip-bad", action="store_true", help="skip and count bad records instead of stopping")
    index = sub.add_parser("index", help="write index.json for existing shards")
    index.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "index":
        print(json.dumps(index_existing(args.directory)))
        return
    if args.manifest is None and args.conversations is None:
        parser.error("give --manifest and/or --conversations")
    skipped = Counter()
    try:
        result = write_shards(records(args.manifest, args.images_root, args.conversations, args.skip_bad, skipped),
                              args.out, args.prefix, args.max_count, args.max_bytes, skipped)
    except BadRecord as e:
        hint = "" if e.reason == "bad_file" else "\n(use --skip-bad to skip and count bad records)"
        raise SystemExit(f"error: {e}{hint}") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {result['total']} samples ({result['vision']} vision, {result['text']} text) in "
          f"{len(result['shards'])} shards to {args.out}; skipped {sum(skipped.values())} {dict(skipped)}")


if __name__ == "__main__":
    main()
