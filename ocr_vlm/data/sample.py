"""One shard sample -> one `Example`, the same for training, validation, the report and read-back; or `Rejected`.

A sample is `KEY.json` ({prompt, response|answer} or {messages} with `KEY.png|jpg|jpeg|webp`, or {messages} alone
for a text-only conversation; shards/README.md). Decoding parses the JSON once, makes the image's uint8 views, and renders the token
ids with their next-token targets (response tokens only).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Iterator

from ocr_vlm.config import VLMConfig
from ocr_vlm.data.stream import ShardSet, read_range
from ocr_vlm.image import IMAGE_MEMBERS, Views, load_views, token_cells
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import inked
from ocr_vlm.rejected import Rejected
from ocr_vlm.tokenizer import Tokenizer


@dataclass
class Example:
    key: str                          # the sample's key in its shard
    inputs: list[int]                 # token ids the model reads
    targets: list[int]                # the next token at each position; IGNORE_INDEX where unsupervised
    views: Views | None               # uint8 global view (+ Gundam tiles and grid); None for a text-only sample
    prompt: str = ""                  # vision samples: the prompt and the expected response
    response: str = ""
    image: bytes = b""                # vision samples: the encoded page, for reports
    type: str = ""                    # the sample's free `type` metadata (receipt, chart, ...): reports break down by it
    cells: list[int] | None = None    # the global view's token under each non-whitespace character of the response
                                      # (the centres of the sample's `chars` boxes); None when it has none
    pointer: tuple[tuple[int, int], ...] = ()   # with cells: `pointer_pairs`, what the GPT's pointer head is trained on


def with_response(fields: dict) -> dict:
    """The fields with `answer` (many manifests' name) renamed to `response`: one schema, accepted the same by the
    writer and the loader."""
    if "response" not in fields and "answer" in fields:
        fields = dict(fields)
        fields["response"] = fields.pop("answer")
    return fields


def decode(sample: dict, tokenizer: Tokenizer, vlm: VLMConfig) -> Example:
    """A raw shard sample (webdataset's dict of members) -> Example; raises Rejected naming what is wrong."""
    if "json" not in sample:
        raise Rejected("missing_json", "no .json member")
    try:
        meta = json.loads(sample["json"].decode("utf-8"))
    except UnicodeDecodeError:
        raise Rejected("bad_text", "json is not UTF-8") from None
    except json.JSONDecodeError as e:
        raise Rejected("bad_json", f"json does not parse ({e})") from None
    if not isinstance(meta, dict):
        raise Rejected("bad_json", "json is not an object")
    meta, key = with_response(meta), sample.get("__key__", "")
    image_key = next((ext for ext in IMAGE_MEMBERS if ext in sample), None)
    if image_key is None and ("prompt" in meta or "response" in meta):
        raise Rejected("missing_image", "vision sample has no image member")
    if "messages" in meta:
        messages = meta["messages"]
    elif image_key is None:
        raise Rejected("bad_fields", "text sample needs a 'messages' list")
    else:
        for name in ("prompt", "response"):
            if not isinstance(meta.get(name), str):
                raise Rejected("bad_fields", f"field '{name}' missing or not a string")
        messages = [{"role": "user", "content": meta["prompt"]}, {"role": "assistant", "content": meta["response"]}]
    views = load_views(sample[image_key], vlm) if image_key is not None else None
    try:
        # the placeholder count follows the page's own tile grid
        ids, mask = tokenizer.render_conversation(messages, vlm.image_tokens_for(views.grid) if views else 0)
    except ValueError as e:
        raise Rejected("bad_fields", str(e)) from None
    if views is None:
        return Example(key, ids[:-1], _targets(ids, mask), None)
    # A multi-turn page is evaluated (and read by the reading head) by its first exchange.
    user, assistant = first_exchange(messages)
    kind = meta.get("type")
    cells = token_cells(character_centres(meta["chars"], assistant), views.size, vlm) if "chars" in meta else None
    pointer = pointer_pairs(tokenizer, ids, assistant, cells, vlm.image_tokens_for(views.grid) - vlm.image_tokens,
                            vlm.vision_grid) if cells is not None else ()
    return Example(key, ids[:-1], _targets(ids, mask), views, user, assistant, sample[image_key],
                   kind if isinstance(kind, str) else "", cells, pointer)


def pointer_pairs(tokenizer: Tokenizer, ids: list[int], response: str, cells: list[int], tiles: int,
                  grid: int) -> tuple[tuple[int, int], ...]:
    """(position, vision position) for each token of the first answer in `ids` and its end token: the position that
    predicts the token, and the global-view token of the next character of `response` with ink from the token's
    start (its `cells` entry, laid out after the image's `tiles` tile embeddings, rows of `grid` + a newline). A
    newline points at the next line's first character; the end token, and whitespace that nothing follows, at the
    view separator after the grid: "nothing left to read" is a place to look too, so ending a page is one more
    lookup rather than a guess from the answer's length."""
    inked_index, byte_char = 0, []           # which non-whitespace character each byte of the response belongs to
    for char in response:
        byte_char += [None if char.isspace() else inked_index] * len(char.encode("utf-8"))
        inked_index += not char.isspace()
    next_char = [None] * (len(byte_char) + 1)      # the first inked character at or after each byte
    for at in reversed(range(len(byte_char))):
        next_char[at] = byte_char[at] if byte_char[at] is not None else next_char[at + 1]
    image, answer = ids.index(tokenizer.image_id) + tiles, ids.index(tokenizer.assistant_start_id) + 1
    end = ids.index(tokenizer.assistant_end_id, answer)       # the answer's tokens, already encoded in `ids`
    separator = image + grid * (grid + 1)
    pairs, at = [], 0
    for i, token in enumerate(tokenizer.token_bytes(ids[answer:end]) + [b""]):
        char = next_char[at]
        if char is None:
            pairs.append((answer + i - 1, separator))
        else:
            row, col = divmod(cells[char], grid)
            pairs.append((answer + i - 1, image + row * (grid + 1) + col))
        at += len(token)
    return tuple(pairs)


def character_centres(chars, response: str) -> list[tuple[float, float]]:
    """The centre of each box of a sample's `chars` field: one [x0, y0, x1, y1] in source pixels per non-whitespace
    character of the (first) response, in order."""
    expected = len(inked(response))
    if not isinstance(chars, list) or len(chars) != expected:
        raise Rejected("bad_fields", f"field 'chars' must list one box per non-whitespace character of the "
                                     f"response ({expected}), got {len(chars) if isinstance(chars, list) else chars!r}")
    for box in chars:
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            raise Rejected("bad_fields", f"field 'chars': {box!r} is not a box [x0, y0, x1, y1]")
    return [((x0 + x1) / 2, (y0 + y1) / 2) for x0, y0, x1, y1 in chars]


def first_exchange(messages: list[dict]) -> tuple[str, str]:
    """The first user turn (a leading system message merged in, as rendering does) and the first assistant turn."""
    contents = [m["content"] for m in messages]
    if messages[0]["role"] == "system":
        contents = [contents[0] + "\n\n" + contents[1]] + contents[2:]
    return contents[0], contents[1] if len(contents) > 1 else ""


def _targets(ids: list[int], mask: list[int]) -> list[int]:
    """Next-token targets of `ids`, IGNORE_INDEX where the mask does not supervise the next token."""
    return [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]


def read_examples(shards: str, tokenizer: Tokenizer, vlm: VLMConfig,
                  limit: int | None = None) -> tuple[list[Example], Counter]:
    """The vision examples of `shards` in order (at most `limit`), read once each on this process, and the count of
    rejected samples by reason: what validation read-back reads."""
    rejected = Counter()
    return list(iter_examples(shards, tokenizer, vlm, limit, rejected)), rejected


def iter_examples(shards: str, tokenizer: Tokenizer, vlm: VLMConfig, limit: int | None = None,
                  rejected: Counter | None = None) -> Iterator[Example]:
    """`read_examples` one at a time (the report streams any number of pages); rejections are counted into
    `rejected` as they are met."""
    rejected = Counter() if rejected is None else rejected
    shard_set, found = ShardSet.from_spec(shards), 0
    for url, count in zip(shard_set.urls, shard_set.counts):
        for item in read_range(url, 0, count):
            if limit is not None and found >= limit:
                return
            try:
                if isinstance(item, Rejected):
                    raise item
                example = decode(item, tokenizer, vlm)
            except Rejected as e:
                rejected[e.reason] += e.count
                continue
            if example.views is not None:          # text-only samples have nothing to read
                found += 1
                yield example
