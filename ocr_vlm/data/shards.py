"""Write WebDataset shards from manifests; count existing shards. Format: shards/README.md.

    python -m ocr_vlm.data.shards write --manifest pages.jsonl --images-root pages/ \\
        [--conversations chats.jsonl] --out shards/train [--max-count 10000] [--max-bytes 1e9] [--skip-bad]
    python -m ocr_vlm.data.shards index shards/foreign     # write index.json for shards made elsewhere

Every record is validated as it is read: a bad one stops the run with an error naming the file and line, or with
--skip-bad it is left out and counted by reason (in index.json too). The same input gives byte-identical shards.
"""

from __future__ import annotations

import argparse
import json
import re
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

IMAGE_SUFFIXES = {".png": "png", ".jpg": "jpg", ".jpeg": "jpg", ".webp": "webp"}
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]+")   # webdataset splits member names at the first dot


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


def read_jsonl(path: Path) -> Iterator[tuple[str, object]]:
    """(where, parsed JSON) per line of a JSONL file, or per element of a JSON list; `where` is file:line."""
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        items = json.loads(text)
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


def vision_record(where: str, item: object, images_root: Path) -> Record:
    """A manifest line {id, image, prompt, answer|response, ...free metadata} -> Record (image bytes copied as is)."""
    if not isinstance(item, dict):
        raise BadRecord("bad_json", f"{where}: expected a JSON object")
    fields = dict(item)
    if "response" not in fields and "answer" in fields:      # the prototype's manifests say "answer"
        fields["response"] = fields.pop("answer")
    for name in ("id", "image", "prompt", "response"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            raise BadRecord("bad_fields", f"{where}: field '{name}' missing or not a non-empty string")
    key = fields["id"]
    if not KEY_PATTERN.fullmatch(key):
        raise BadRecord("bad_fields", f"{where}: field 'id' {key!r} may only hold letters, digits, '_' and '-'")
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
        raise BadRecord("bad_fields", f"{where}: field 'id' missing or not letters, digits, '_' and '-'")
    if not isinstance(messages, list) or not messages:
        raise BadRecord("bad_fields", f"{where}: field 'messages' missing or empty")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if not roles or any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)):
        raise BadRecord("bad_fields", f"{where}: roles {roles} must alternate user, assistant, ...")
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
    """Write records into `out_dir/prefix-000000.tar, ...` plus index.json; returns the index."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    kinds = Counter()
    pattern = str(out_dir / f"{prefix}-%06d.tar")
    # mtime fixed and members in key order: the same input gives byte-identical tars.
    with wds.ShardWriter(pattern, maxcount=max_count, maxsize=max_bytes, verbose=0, mtime=0, encoder=False) as sink:
        for record in tqdm(items, desc=f"writing {out_dir}", unit="sample", disable=None):
            sink.write(record.members())
            name = Path(sink.fname).name
            counts[name] = counts.get(name, 0) + 1
            kinds["vision" if record.image is not None else "text"] += 1
    index = {"shards": counts, "total": sum(counts.values()), "vision": kinds["vision"], "text": kinds["text"],
             "skipped": dict(sorted((skipped or Counter()).items()))}
    (out_dir / "index.json").write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return index


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
    write.add_argument("--max-bytes", type=float, default=1e9, help="a shard closes once it reaches this size")
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
        raise SystemExit(f"error: {e}\n(use --skip-bad to skip and count bad records)") from None
    print(f"wrote {result['total']} samples ({result['vision']} vision, {result['text']} text) in "
          f"{len(result['shards'])} shards to {args.out}; skipped {sum(skipped.values())} {dict(skipped)}")


if __name__ == "__main__":
    main()
