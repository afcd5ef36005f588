"""Synthetic OCR pages with exact ground truth: receipts, charts and scene-text signs, deterministic by seed.

    python -m ocr_vlm.data.render tier1 --out shards/tier1     # the shipped 10-sample set, byte-identical
    python -m ocr_vlm.data.render synth --n 200 --seed 1 --out data/synth   # manifest + images + conversations
    python -m ocr_vlm.data.render corpus --n 3000 --out corpus.txt          # text for training a tokenizer
    python -m ocr_vlm.data.render reading --set page --n 5000 --seed 1 --out shards/read  # pages to learn reading

Receipts, charts and signs are drawn with Pillow's built-in scalable font; reading pages with the DejaVu fonts that
matplotlib ships. Nothing is downloaded and the pixels are reproducible. The ground truth is exactly the drawn text
in reading order, one drawn line per text line.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import string
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import matplotlib
from PIL import Image, ImageDraw, ImageFont

from ocr_vlm.data.shards import Record, write_shards

PROMPTS = {"receipt": "<image>\nFree OCR.", "chart": "<image>\nParse the figure.",
           "sign": "<image>\nRead the text in the image.", "reading": "<image>\nFree OCR."}
STORES = ["CORNER MARKET", "BLUE BAKERY", "CITY PHARMACY", "GREEN GROCER", "NORTH CAFE", "HARBOR HARDWARE",
          "SUNNY BOOKS", "RIVER DELI"]
ITEMS = ["milk", "bread", "eggs", "apples", "coffee", "tea", "rice", "butter", "cheese", "bananas", "soap",
         "pasta", "tomatoes", "honey", "juice", "nails", "tape", "notebook", "pens", "yogurt"]
CHART_TOPICS = [("Monthly Sales", "month", "units", ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]),
                ("Visitors per Day", "day", "visitors", ["Mon", "Tue", "Wed", "Thu", "Fri"]),
                ("Rainfall", "season", "mm", ["Spring", "Summer", "Autumn", "Winter"]),
                ("Team Scores", "team", "points", ["Red", "Blue", "Green", "Gold"])]
SIGNS = [["OPEN", "24 HOURS"], ["NO PARKING", "TOW AWAY ZONE"], ["EXIT"], ["WET FLOOR"], ["MAIN STREET"],
         ["STOP"], ["FRESH COFFEE", "INSIDE"], ["PLATFORM 4", "TRAINS TO CENTRAL"], ["CAUTION", "WORK AHEAD"]]
SIGN_COLORS = [((200, 30, 30), (255, 255, 255)), ((20, 90, 40), (255, 255, 255)), ((250, 210, 40), (20, 20, 20)),
               ((30, 60, 160), (255, 255, 255)), ((245, 245, 240), (30, 30, 30))]


@dataclass
class Page:
    kind: str
    image: Image.Image
    text: str
    chars: list[list[float]] | None = None   # reading pages: each non-whitespace character's [x0, y0, x1, y1]

    @property
    def prompt(self) -> str:
        return PROMPTS[self.kind]

    def encoded(self) -> tuple[bytes, str]:
        """PNG for documents, JPEG (fixed quality) for photos of signs: both decoders get exercised."""
        buf = io.BytesIO()
        if self.kind == "sign":
            self.image.save(buf, format="JPEG", quality=90)
            return buf.getvalue(), "jpg"
        self.image.save(buf, format="PNG", compress_level=6)   # zlib 9 takes 5x as long for 4% fewer bytes
        return buf.getvalue(), "png"


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


# ----------------------------------------------------------------------------------------------------------------
# Content (text only; also the tokenizer's training corpus) and drawing.

def receipt_lines(rng: random.Random, store: str | None = None) -> list[str]:
    store = store or rng.choice(STORES)
    date = f"2026-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
    items = rng.sample(ITEMS, rng.randint(2, 4))
    prices = [rng.randint(50, 1999) for _ in items]
    subtotal = sum(prices)
    tax = round(subtotal * 0.08)
    lines = [store, f"DATE {date}"]
    lines += [f"{name} {price // 100}.{price % 100:02d}" for name, price in zip(items, prices)]
    lines += [f"TAX {tax // 100}.{tax % 100:02d}", f"TOTAL {(subtotal + tax) // 100}.{(subtotal + tax) % 100:02d}"]
    return lines


def draw_receipt(lines: list[str], width: int = 320) -> Image.Image:
    size, gap = 20, 8
    height = 24 + len(lines) * (size + gap) + 16
    image = Image.new("RGB", (width, height), (252, 250, 244))
    draw = ImageDraw.Draw(image)
    y = 24
    for i, line in enumerate(lines):
        if i == 0:                                   # store name centred, like a printed header
            w = draw.textlength(line, font=font(size))
            draw.text(((width - w) / 2, y), line, font=font(size), fill=(10, 10, 10))
        else:
            draw.text((20, y), line, font=font(size), fill=(25, 25, 25))
        y += size + gap
        if i == 1 or i == len(lines) - 3:            # rules under the date and above the tax line
            draw.line((16, y - gap / 2, width - 16, y - gap / 2), fill=(120, 120, 120), width=1)
    return image


def chart_content(rng: random.Random, title: str | None = None) -> tuple[str, str, str, list[str], list[int], str]:
    topic = rng.choice(CHART_TOPICS) if title is None else {t[0]: t for t in CHART_TOPICS}[title]
    title, x_label, y_label, categories = topic
    values = [rng.randint(2, 60) for _ in categories]
    return title, x_label, y_label, categories, values, rng.choice(["bar", "line"])


def chart_text(title: str, x_label: str, y_label: str, categories: list[str], values: list[int]) -> str:
    return f"{title}\n{x_label}: {', '.join(categories)}\n{y_label}: {', '.join(map(str, values))}"


def draw_chart(title, x_label, y_label, categories, values, style, width: int = 384, height: int = 288) -> Image.Image:
    image = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((width / 2 - draw.textlength(title, font=font(20)) / 2, 8), title, font=font(20), fill=(0, 0, 0))
    left, right, top, bottom = 44, width - 16, 48, height - 52
    draw.line((left, top, left, bottom), fill=(0, 0, 0), width=2)
    draw.line((left, bottom, right, bottom), fill=(0, 0, 0), width=2)
    draw.text((6, top - 22), y_label, font=font(14), fill=(60, 60, 60))
    draw.text((width / 2 - draw.textlength(x_label, font=font(14)) / 2, height - 22), x_label, font=font(14),
              fill=(60, 60, 60))
    step = (right - left) / len(categories)
    scale = (bottom - top - 24) / max(values)
    points = [(left + step * (i + 0.5), bottom - value * scale) for i, value in enumerate(values)]
    if style == "line":
        draw.line(points, fill=(200, 60, 60), width=3)
    for (cx, cy), name, value in zip(points, categories, values):
        if style == "bar":
            draw.rectangle((cx - step * 0.3, cy, cx + step * 0.3, bottom), fill=(70, 110, 190))
        else:
            draw.ellipse((cx - 4, cy - 4, cx + 4, cy + 4), fill=(200, 60, 60))
        label = str(value)
        at = (cx - draw.textlength(label, font=font(14)) / 2, cy - 24)
        # the label sits on a white patch: a line passing through it would make the value unreadable
        x0, y0, x1, y1 = draw.textbbox(at, label, font=font(14))
        draw.rectangle((x0 - 3, y0 - 2, x1 + 3, y1 + 2), fill=(255, 255, 255))
        draw.text(at, label, font=font(14), fill=(0, 0, 0))
        draw.text((cx - draw.textlength(name, font=font(14)) / 2, bottom + 6), name, font=font(14), fill=(0, 0, 0))
    return image


def draw_sign(lines: list[str], rng: random.Random, width: int = 352, height: int = 256) -> Image.Image:
    """A sign board on a noisy two-tone 'street' background."""
    sky, ground = [tuple(rng.randint(60, 200) for _ in range(3)) for _ in range(2)]
    image = Image.new("RGB", (width, height), sky)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, height * 0.65, width, height), fill=ground)
    for _ in range(40):                               # clutter so the board is not the only thing in view
        x, y = rng.randrange(width), rng.randrange(height)
        draw.ellipse((x, y, x + 6, y + 6), fill=tuple(rng.randint(0, 255) for _ in range(3)))
    board, ink = rng.choice(SIGN_COLORS)
    size = 30 if max(map(len, lines)) <= 12 else 22
    box_w = max(draw.textlength(line, font=font(size)) for line in lines) + 40
    box_h = len(lines) * (size + 10) + 30
    x0, y0 = (width - box_w) / 2 + rng.randint(-20, 20), (height - box_h) / 2 + rng.randint(-20, 10)
    draw.rectangle((x0 + 4, y0 + 4, x0 + box_w + 4, y0 + box_h + 4), fill=(30, 30, 30))
    draw.rectangle((x0, y0, x0 + box_w, y0 + box_h), fill=board, outline=ink, width=3)
    for i, line in enumerate(lines):
        w = draw.textlength(line, font=font(size))
        draw.text((x0 + (box_w - w) / 2, y0 + 15 + i * (size + 10)), line, font=font(size), fill=ink)
    return image


def receipt(rng: random.Random, store: str | None = None) -> Page:
    lines = receipt_lines(rng, store)
    return Page("receipt", draw_receipt(lines), "\n".join(lines))


def chart(rng: random.Random, title: str | None = None) -> Page:
    content = chart_content(rng, title)
    return Page("chart", draw_chart(*content), chart_text(*content[:5]))


def sign(rng: random.Random, lines: list[str] | None = None) -> Page:
    lines = lines or rng.choice(SIGNS)
    return Page("sign", draw_sign(lines, rng), "\n".join(lines))


def random_page(rng: random.Random) -> Page:
    return rng.choice([receipt, chart, sign])(rng)


# ----------------------------------------------------------------------------------------------------------------
# Reading pages: random strings, so a model can only get them right by reading the image (no language prior helps).

READING_FONTS = ("DejaVuSans.ttf", "DejaVuSansMono.ttf", "DejaVuSerif.ttf")   # in matplotlib's mpl-data
READING_ALPHABET = string.ascii_letters + string.digits


@dataclass(frozen=True)
class ReadingSet:
    """How reading pages are drawn: ranges are inclusive."""
    lines: tuple[int, int]
    chars: tuple[int, int]          # characters per line, spaces included
    px: tuple[int, int]             # font size in pixels
    spaces: bool                    # single spaces between random words
    alphabet: str = READING_ALPHABET
    side: int = 256


READING_SETS = {
    "digit": ReadingSet(lines=(1, 1), chars=(1, 1), px=(56, 72), spaces=False, alphabet=string.digits),
    "line": ReadingSet(lines=(1, 1), chars=(4, 8), px=(24, 32), spaces=False),
    # the line set's lines, up to five a page: the same glyphs, three times the characters a page on average
    "lines": ReadingSet(lines=(1, 5), chars=(4, 8), px=(24, 32), spaces=False),
    # `make read`'s: up to eight such lines of 4-10 characters, fuller pages for the towers, short ones for the end
    "dense": ReadingSet(lines=(1, 8), chars=(4, 10), px=(24, 32), spaces=False),
    "page": ReadingSet(lines=(1, 4), chars=(4, 16), px=(16, 28), spaces=True),
}


@lru_cache(maxsize=None)
def reading_font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(f"{matplotlib.get_data_path()}/fonts/ttf/{name}", size)


def reading_line(rng: random.Random, n: int, spec: ReadingSet) -> str:
    """n characters of the set's alphabet, with single spaces (never first, last or doubled) when `spaces`."""
    chars = [rng.choice(spec.alphabet) for _ in range(n)]
    if spec.spaces:
        for i in range(1, n - 1):
            if chars[i - 1] != " " and rng.random() < 0.2:
                chars[i] = " "
    return "".join(chars)


def reading_page(rng: random.Random, spec: ReadingSet) -> Page:
    """Dark ink on a light background; the block of lines and each line's start placed at random, lines read top
    to bottom. A draw whose widest line or block of lines would not fit the page is redrawn (the line pitch is drawn
    only once the lines fit across, so sets whose blocks always fit draw the pages they drew before this check).
    The page keeps every character's inked box, in reading order: where the reading head learns each glyph
    (model/reading.py)."""
    margin = 4
    room = spec.side - 2 * margin
    while True:
        face = reading_font(rng.choice(READING_FONTS), rng.randint(*spec.px))
        lines = [reading_line(rng, rng.randint(*spec.chars), spec) for _ in range(rng.randint(*spec.lines))]
        widths = [face.getlength(line) for line in lines]
        if max(widths) > room:
            continue
        pitch = round(face.size * rng.uniform(1.2, 1.6))
        height = pitch * (len(lines) - 1) + round(face.size * 1.2)
        if height <= room:
            break
    paper = tuple(rng.randint(200, 255) for _ in range(3))
    ink = tuple(rng.randint(0, 90) for _ in range(3))
    image = Image.new("RGB", (spec.side, spec.side), paper)
    draw = ImageDraw.Draw(image)
    top = rng.randint(margin, max(margin, spec.side - height - margin))
    chars = []
    for i, (line, width) in enumerate(zip(lines, widths)):
        left, y = rng.randint(margin, int(spec.side - width - margin)), top + i * pitch
        draw.text((left, y), line, font=face, fill=ink)
        # a character's box: its advance along the line, the line's inked height (so a line's characters share
        # one row of tokens, whatever their ascenders and descenders)
        _, ink_top, _, ink_bottom = draw.textbbox((left, y), line, font=face)
        chars += [[round(left + face.getlength(line[:j]), 1), ink_top, round(left + face.getlength(line[:j + 1]), 1),
                   ink_bottom] for j, ch in enumerate(line) if not ch.isspace()]
    return Page("reading", image, "\n".join(lines), chars)


def write_reading(spec: ReadingSet, n: int, seed: int, out_dir: str | Path) -> dict:
    """`n` reading pages as shards; a different seed gives pages never seen under another."""
    rng = random.Random(f"reading/{seed}")
    records = (page_record(f"read_{seed}_{i:07d}", reading_page(rng, spec), "synthetic-reading") for i in range(n))
    return write_shards(records, out_dir, prefix="read")


# ----------------------------------------------------------------------------------------------------------------
# The tier-1 set and larger synthetic sets.

def tier1_pages() -> list[Page]:
    """4 receipts (two from the same store: same layout, different content), 3 charts with distinct titles, 3 signs."""
    return [receipt(random.Random(101), "CORNER MARKET"), receipt(random.Random(102), "CORNER MARKET"),
            receipt(random.Random(103), "BLUE BAKERY"), receipt(random.Random(104), "CITY PHARMACY"),
            chart(random.Random(201), "Monthly Sales"), chart(random.Random(202), "Team Scores"),
            chart(random.Random(203), "Visitors per Day"),
            sign(random.Random(301), ["OPEN", "24 HOURS"]), sign(random.Random(302), ["NO PARKING", "TOW AWAY ZONE"]),
            sign(random.Random(303), ["PLATFORM 4", "TRAINS TO CENTRAL"])]


def page_record(key: str, page: Page, source: str) -> Record:
    data, ext = page.encoded()
    meta = {"id": key, "prompt": page.prompt, "response": page.text, "source": source, "type": page.kind}
    if page.chars is not None:
        meta["chars"] = page.chars
    return Record(key, meta, data, ext)


def write_tier1(out_dir: str | Path) -> dict:
    records = [page_record(f"tier1_{i:02d}_{p.kind}", p, "synthetic-tier1") for i, p in enumerate(tier1_pages())]
    return write_shards(records, out_dir, prefix="tier1", max_count=len(records))


def conversations(n: int, seed: int) -> Iterator[dict]:
    """Text-only chats for stage-2 mixing at small scale: arithmetic, spelling, prices."""
    rng = random.Random(f"conversations/{seed}")
    for i in range(n):
        kind = rng.randrange(3)
        if kind == 0:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            q, r = f"What is {a} + {b}?", f"{a} + {b} = {a + b}."
        elif kind == 1:
            word = rng.choice(ITEMS)
            q, r = f"Spell the word {word}.", "-".join(word)
        else:
            item, cents = rng.choice(ITEMS), rng.randint(50, 1999)
            q = f"Two {item} cost {cents // 100}.{cents % 100:02d} each. What is the total?"
            r = f"The total is {2 * cents // 100}.{2 * cents % 100:02d}."
        yield {"id": f"chat_{seed}_{i:06d}", "messages": [{"role": "user", "content": q},
                                                          {"role": "assistant", "content": r}]}


def corpus_texts(n: int, seed: int) -> Iterator[str]:
    """Ground-truth texts, prompts and chats without drawing anything: the mini tokenizer's training corpus."""
    rng = random.Random(f"corpus/{seed}")
    yield from PROMPTS.values()
    for _ in range(n):
        yield "\n".join(receipt_lines(rng))
        yield chart_text(*chart_content(rng)[:5])
        yield "\n".join(rng.choice(SIGNS))
    for chat in conversations(n, seed):
        yield "\n".join(m["content"] for m in chat["messages"])


def write_synth(n: int, seed: int, out_dir: str | Path) -> Path:
    """`n` random pages as manifest.jsonl + images/, and `n` chats as conversations.jsonl."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"synth/{seed}")
    with open(out_dir / "manifest.jsonl", "w") as manifest:
        for i in range(n):
            page = random_page(rng)
            data, ext = page.encoded()
            name = f"synth_{seed}_{i:06d}"
            (out_dir / "images" / f"{name}.{ext}").write_bytes(data)
            manifest.write(json.dumps({"id": name, "image": f"images/{name}.{ext}", "prompt": page.prompt,
                                       "answer": page.text, "source": "synthetic", "type": page.kind}) + "\n")
    with open(out_dir / "conversations.jsonl", "w") as chats:
        for chat in conversations(n, seed):
            chats.write(json.dumps(chat) + "\n")
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    tier1 = sub.add_parser("tier1", help="write the shipped 10-sample tier-1 shard")
    tier1.add_argument("--out", default="shards/tier1")
    synth = sub.add_parser("synth", help="write a manifest + images + conversations of random pages")
    synth.add_argument("--n", type=int, required=True)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--out", required=True)
    corpus = sub.add_parser("corpus", help="write ground-truth texts, prompts and chats as one text file")
    corpus.add_argument("--n", type=int, default=3000)
    corpus.add_argument("--seed", type=int, default=0)
    corpus.add_argument("--out", required=True)
    reading = sub.add_parser("reading", help="write shards of random-string pages (learning to read)")
    reading.add_argument("--set", choices=sorted(READING_SETS), default="page")
    reading.add_argument("--n", type=int, required=True)
    reading.add_argument("--seed", type=int, default=0)
    reading.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "tier1":
        print(json.dumps(write_tier1(args.out)))
    elif args.command == "reading":
        print(json.dumps(write_reading(READING_SETS[args.set], args.n, args.seed, args.out)))
    elif args.command == "synth":
        print(f"wrote {write_synth(args.n, args.seed, args.out)}")
    else:
        Path(args.out).write_text("\n\n".join(corpus_texts(args.n, args.seed)))


if __name__ == "__main__":
    main()
