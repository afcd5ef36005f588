"""Write WebDataset shards from manifests; count existing shards. Format: shards/README.md.

    python -m ocr_vlm.data.shards write --manifest pages.jsonl --images_root pages/ \\
        [--conversations chats.jsonl] --out shards/train [--max_count 10000] [--max_bytes 1e9] [--skip_bad]
    python -m ocr_vlm.data.shards write --conversations llava.json --images_root images/ --out shards/chat
    python -m ocr_vlm.data.shards write --hf_dataset ds/ --image_column image --text_column text --out shards/hf
    python -m ocr_vlm.data.shards write --documents papers/ scans.tif [--dpi 144] --out shards/docs
    python -m ocr_vlm.data.shards index shards/foreign     # write index.json for shards made elsewhere

Every record is validated as it is read: a bad one stops the run with an error naming the file and line, or with
--skip_bad it is left out and counted by reason (in index.json too). The same input gives byte-identical shards.
A directory holds one shard set, described by its index.json.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import math
import re
import shutil
import tarfile
import tempfile
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable, Iterable, Iterator

import webdataset as wds
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from ocr_vlm.data.sample import with_response
from ocr_vlm.image import STORED_FORMATS, to_rgb
from ocr_vlm.rejected import Rejected
from ocr_vlm.tokenizer import IMAGE_PLACEHOLDER

DEFAULT_PROMPT = f"{IMAGE_PLACEHOLDER}\nFree OCR."                   # DeepSeek-OCR's plain-text prompt
# webdataset splits member names at the first dot; ustar tars hold member names of at most 100 bytes
KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,90}")
KEY_RULE = "1-90 letters, digits, '_' or '-'"
TAR_BLOCK, TAR_RECORD = 512, 10240             # a member is a header block plus padded data; files pad to records
# Left out and counted even without --skip_bad: a document's blank or scanned pages are expected, not errors.
ALWAYS_SKIPPED = frozenset({"empty_page"})


@dataclass
class Record:
    key: str
    meta: dict                      # becomes KEY.json
    image: bytes | None = None      # becomes KEY.png|jpg|webp
    image_ext: str = ""
    where: str = ""                 # the input it came from (file:line, file[row], file page n), for messages

    def members(self) -> dict:
        sample = {"__key__": self.key, "json": json.dumps(self.meta, sort_keys=True, ensure_ascii=False).encode()}
        if self.image is not None:
            sample[self.image_ext] = self.image
        return sample


Source = Iterator["Record | Rejected"]      # an input's records, or in a bad record's place why it is left out


def derived_key(name: str, number: int) -> str:
    """A sample key for inputs without ids: the file's name (made key-safe) and the sample's number in it."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", name)[:80]
    return f"{stem}-{number:06d}"


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
        raise Rejected("bad_file", f"{path}: cannot read ({e})") from None
    if path.suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise Rejected("bad_file", f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise Rejected("bad_json", f"{path}: expected a JSON list of records")
        yield from ((f"{path}[{i}]", item) for i, item in enumerate(items))
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                yield f"{path}:{number}", json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:{number}", Rejected("bad_json", f"{path}:{number}: not valid JSON ({e.msg})")


def vision_record(where: str, item: object, images_root: Path) -> Record:
    """A manifest line {id, image, prompt, answer|response, ...free metadata} -> Record (image bytes copied as is)."""
    if not isinstance(item, dict):
        raise Rejected("bad_json", f"{where}: expected a JSON object")
    fields = dict(with_response(item))
    for name in ("image", "prompt", "response"):
        if not isinstance(fields.get(name), str) or not fields[name]:
            raise Rejected("bad_fields", f"{where}: field '{name}' missing or not a non-empty string")
    key = record_key(where, fields)
    if fields["prompt"].count(IMAGE_PLACEHOLDER) > 1:
        raise Rejected("bad_fields", f"{where}: field 'prompt' holds {IMAGE_PLACEHOLDER} more than once; "
                                      "a sample has one image")
    data, ext = read_image(where, images_root / fields.pop("image"))
    return Record(key, fields, data, ext, where)


def read_image(where: str, path: Path) -> tuple[bytes, str]:
    """An image file's bytes as a shard member (`image_member`)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise Rejected("missing_image", f"{where}: image {path} does not exist") from None
    except OSError as e:
        raise Rejected("bad_image", f"{where}: image {path} is unreadable ({e})") from None
    return image_member(data, f"{where}: image {path}")


def image_member(data: bytes, what: str) -> tuple[bytes, str]:
    """(bytes, extension) of an image as a shard stores it: PNG, JPEG and WebP exactly as supplied; one frame in any
    other format Pillow reads (TIFF, BMP, ...) as PNG, losslessly, since the loader decodes only those three."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            frames = getattr(image, "n_frames", 1)
            if frames == 1 and image.format in STORED_FORMATS:
                image.verify()
                return data, STORED_FORMATS[image.format]
            if frames == 1:
                return png_bytes(image), "png"
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise Rejected("bad_image", f"{what} is unreadable ({e})") from None
    raise Rejected("multi_image", f"{what} has {frames} frames; a sample holds one image")


def png_bytes(image: Image.Image) -> bytes:
    """An image as PNG, orientation applied (a PNG carries no EXIF rotation the loader would honour)."""
    image = ImageOps.exif_transpose(image)
    if image.mode not in ("1", "L", "RGB"):
        image = to_rgb(image)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def text_record(where: str, item: object) -> Record:
    """A conversation line {id, messages: [{role, content}, ...]} -> Record (KEY.json only)."""
    if not isinstance(item, dict):
        raise Rejected("bad_json", f"{where}: expected a JSON object")
    key = record_key(where, item)
    if "prompt" in item or "response" in item:     # the loader reads those as a vision sample missing its image
        raise Rejected("bad_fields", f"{where}: a conversation carries 'messages', not 'prompt'/'response'")
    check_turns(where, item.get("messages"))
    if any(IMAGE_PLACEHOLDER in m["content"] for m in item["messages"]):
        raise Rejected("bad_fields", f"{where}: a message holds {IMAGE_PLACEHOLDER} but the record names no image "
                                      "('image' or 'images'); without one it would train as literal text")
    return Record(key, dict(item), where=where)


def record_key(where: str, item: dict) -> str:
    """The record's `id` as a sample key (a number becomes its digits)."""
    key = item.get("id")
    key = str(key) if isinstance(key, int) and not isinstance(key, bool) else key
    if not isinstance(key, str) or not KEY_PATTERN.fullmatch(key):
        raise Rejected("bad_fields", f"{where}: field 'id' {key!r} must be {KEY_RULE} (it names the tar members)")
    return key


def check_turns(where: str, messages: object) -> None:
    """nanochat's conversation shape: string contents, roles user, assistant, ... after an optional system message,
    with at least one assistant turn to learn from."""
    if not isinstance(messages, list) or not messages:
        raise Rejected("bad_fields", f"{where}: field 'messages' missing or empty")
    roles = [m.get("role") if isinstance(m, dict) else None for m in messages]
    if roles[0] == "system":
        roles = roles[1:]
    if any(r != ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(roles)) or "assistant" not in roles:
        raise Rejected("bad_fields", f"{where}: roles {roles} must alternate user, assistant, ... "
                                      "(after an optional system message) and include an assistant turn")
    if any(not isinstance(m.get("content"), str) for m in messages):
        raise Rejected("bad_fields", f"{where}: every message needs a string 'content'")


def converted(items: Iterable[tuple[str, object]], make: Callable[[str, object], Record]) -> Source:
    """Each (where, parsed item) of an input made into a Record, or the Rejected saying why it cannot be."""
    for where, item in items:
        try:
            yield item if isinstance(item, Rejected) else make(where, item)
        except Rejected as e:
            yield e


def records(sources: Iterable[Source], skip_bad: bool, skipped: Counter) -> Iterator[Record]:
    """The sources' records in order; a bad one stops the run, or with `skip_bad` is left out and counted."""
    seen: set[str] = set()
    for item in itertools.chain.from_iterable(sources):
        try:
            if isinstance(item, Rejected):
                raise item
            if item.key in seen:
                raise Rejected("duplicate_id", f"{item.where}: id {item.key!r} appears twice")
            seen.add(item.key)
            yield item
        except Rejected as e:
            if not (skip_bad or e.reason in ALWAYS_SKIPPED):
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
    write = sub.add_parser("write", help="manifest / conversations / dataset / documents -> shards + index.json")
    write.add_argument("--manifest", type=Path, help="JSONL (or JSON list) of {id, image, prompt, answer|response}")
    write.add_argument("--images_root", type=Path,
                       help="directory the manifest's and conversations' image paths are relative to")
    write.add_argument("--conversations", type=Path,
                       help="JSONL (or JSON list) of {id, messages: [{role, content}, ...]} or LLaVA/ShareGPT "
                            "{id, conversations: [{from, value}, ...]}, each with an optional 'image'/'images'")
    write.add_argument("--hf_dataset", type=Path, help="a datasets.save_to_disk directory, or parquet file(s)")
    write.add_argument("--image_column", default="image", help="--hf_dataset's image column")
    write.add_argument("--text_column", default="text", help="--hf_dataset's response column")
    write.add_argument("--documents", type=Path, nargs="+", help="PDFs, multi-page TIFFs or directories of them")
    write.add_argument("--dpi", type=float, default=144, help="--documents' PDF rendering resolution")
    write.add_argument("--prompt", default=DEFAULT_PROMPT, help="the prompt of --hf_dataset and --documents samples")
    write.add_argument("--out", type=Path, required=True)
    write.add_argument("--prefix", default="shard")
    write.add_argument("--max_count", type=int, default=10_000, help="samples per shard at most")
    write.add_argument("--max_bytes", type=float, default=1e9, help="bytes per shard file at most")
    write.add_argument("--skip_bad", action="store_true", help="skip and count bad records instead of stopping")
    index = sub.add_parser("index", help="write index.json for existing shards")
    index.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.command == "index":
        print(json.dumps(index_existing(args.directory)))
        return
    sources = input_sources(args)
    if not sources:
        parser.error("give --manifest, --conversations, --hf_dataset and/or --documents")
    skipped = Counter()
    try:
        result = write_shards(records(sources, args.skip_bad, skipped), args.out, args.prefix, args.max_count,
                              args.max_bytes, skipped)
    except Rejected as e:
        hint = "" if e.reason == "bad_file" else "\n(use --skip_bad to skip and count bad records)"
        raise SystemExit(f"error: {e}{hint}") from None
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(f"wrote {result['total']} samples ({result['vision']} vision, {result['text']} text) in "
          f"{len(result['shards'])} shards to {args.out}; skipped {sum(skipped.values())} {dict(skipped)}")


def input_sources(args: argparse.Namespace) -> list[Source]:
    """One source per input given, in a fixed order (the manifest's records first)."""
    # Imported here: those modules build on this one, and their libraries (pyarrow, pypdfium2) load only when used.
    from ocr_vlm.data.conversations import conversation_record
    from ocr_vlm.data.documents import document_records
    from ocr_vlm.data.hf_dataset import hf_records

    sources = []
    for path, make in ((args.manifest, vision_record), (args.conversations, conversation_record)):
        if path is not None:
            sources.append(converted(read_jsonl(path), partial(make, images_root=args.images_root or path.parent)))
    if args.hf_dataset is not None:
        sources.append(hf_records(args.hf_dataset, args.image_column, args.text_column, args.prompt))
    if args.documents:
        sources.append(document_records(args.documents, args.dpi, args.prompt))
    return sources


if __name__ == "__main__":
    main()
