"""Conversation records -> Records: nanochat's messages, LLaVA's / ShareGPT's `conversations`, with or without an image.

    {"id": "c1", "messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}
    {"id": "v1", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\\nRead it."},
                                                     {"from": "gpt", "value": "..."}, ...]}
    {"id": "v2", "images": ["a.png"], "messages": [{"role": "user", "content": "<image>\\nRead it."}, ...]}

Image paths are relative to --images_root. A record with an image becomes a vision sample trained on every assistant
turn; its `<image>` goes where a user turn says it, or before the first user turn's text. One exchange (user,
assistant) is stored in the manifest's {prompt, response} schema, longer ones as {messages}. The loader and the model
take one image per sample: a record naming more is left out, never trained without them.
"""

from __future__ import annotations

from pathlib import Path

from ocr_vlm.data.shards import Record, check_turns, read_image, record_key, text_record
from ocr_vlm.rejected import Rejected
from ocr_vlm.tokenizer import TokenizerError, with_image_placeholder

# ShareGPT's speaker names (LLaVA writes human/gpt) -> nanochat's roles
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
IMAGE_FIELDS = ("image", "images")
TURN_FIELDS = ("messages", "conversations")


def conversation_record(where: str, item: object, images_root: Path) -> Record:
    if not isinstance(item, dict):
        raise Rejected("bad_json", f"{where}: expected a JSON object")
    messages = as_messages(where, item)
    rest = {k: v for k, v in item.items() if k not in IMAGE_FIELDS + TURN_FIELDS}
    images = image_paths(where, item)
    if not images:
        return text_record(where, {**rest, "messages": messages})
    if len(images) > 1:
        raise Rejected("multi_image", f"{where}: {len(images)} images; a sample holds one image")
    key = record_key(where, item)
    check_turns(where, messages)
    try:
        with_image_placeholder(messages)
    except TokenizerError as e:
        raise Rejected("bad_fields", f"{where}: {e}") from None
    data, ext = read_image(where, images_root / images[0])
    if [m["role"] for m in messages] == ["user", "assistant"]:
        meta = {**rest, "prompt": messages[0]["content"], "response": messages[1]["content"]}
    else:
        meta = {**rest, "messages": messages}
    return Record(key, {**meta, "id": key}, data, ext, where)


def as_messages(where: str, item: dict) -> object:
    """The record's turns as nanochat messages; ShareGPT's {from, value} renamed to {role, content}."""
    if "messages" in item:
        return item["messages"]
    turns = item.get("conversations")
    if not isinstance(turns, list):
        raise Rejected("bad_fields", f"{where}: needs 'messages' [{{role, content}}, ...] or "
                                      "'conversations' [{from, value}, ...]")
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in ROLES:
            raise Rejected("bad_fields", f"{where}: conversations[{i}]: 'from' {speaker!r} is not one of "
                                          f"{sorted(ROLES)}")
        messages.append({"role": ROLES[speaker], "content": turn.get("value")})
    return messages


def image_paths(where: str, item: dict) -> list[str]:
    """The record's image paths: `image` (a path, or a list as some LLaVA variants write) or `images` (a list)."""
    images = item.get("image", item.get("images", []))
    images = [images] if isinstance(images, str) else images
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise Rejected("bad_fields", f"{where}: field 'image'/'images' must be a path or a list of paths")
    return images
