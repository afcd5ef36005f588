"""nanochat-compatible BPE tokenizer plus `<|image|>`, encoding with tiktoken, stored as pickle-free JSON.

The file is HF `tokenizers`' own tokenizer.json (a byte-level BPE, the split pattern as its pre-tokenizer, the
specials as added tokens), so `transformers.AutoTokenizer` and `tokenizers.Tokenizer.from_file` read it and encode
exactly as tiktoken does here (tested on varied text). Files of the older `ocr_vlm-tokenizer-v1` layout still load.

nanochat's vocabulary is its BPE ranks followed by 9 special tokens; `<|image|>` is appended after them, so a
65536-token nanochat tokenizer becomes 65537 with `<|image|>` = 65536. nanochat ships `tokenizer.pkl` (a pickled
tiktoken Encoding): it is converted once, on an explicit trust flag, into our JSON file.

Rendering follows nanochat's chat format; a mask of 1 marks the tokens the model is trained to predict.

    <|bos|><|user_start|>[<|image|> x N]\\nFree OCR.<|user_end|><|assistant_start|>RESPONSE<|assistant_end|>
     0      0            0 ...            0          0          0                  1 ...    1
"""

from __future__ import annotations

import argparse
import base64
import json
import pickle
from pathlib import Path
from typing import Iterable

import tiktoken

SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|"""
                 r"""\s*[\r\n]|\s+(?!\S)|\s+""")
SPECIAL_TOKENS = ("<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|python_start|>", "<|python_end|>", "<|output_start|>", "<|output_end|>")
IMAGE_TOKEN = "<|image|>"
IMAGE_PLACEHOLDER = "<image>"     # what prompts write (DeepSeek-OCR style); expanded to the image's embedding count
LEGACY_FORMAT = "ocr_vlm-tokenizer-v1"    # base64 ranks in a list; what exports before the HF layout hold
# The mini preset's tokenizer, trained on the synthetic renderer's corpus:
#   python -m ocr_vlm.data.render corpus --n 3000 --out corpus.txt
#   python -m ocr_vlm.tokenizer train --input corpus.txt --vocab_size 2048 --out ocr_vlm/assets/mini_tokenizer.json
# (the corpus supports only 753 merges+bytes, so training stops there: 763 tokens with the specials and <|image|>)
MINI_TOKENIZER = Path(__file__).parent / "assets" / "mini_tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file or input is invalid; the message says which part."""


def check_layout(ranks: dict[bytes, int], special_tokens: dict[str, int]) -> dict[str, int]:
    """nanochat's id layout, which GPT embedding rows rely on: ranks 0..n-1 covering every single byte (so any
    text encodes), nanochat's 9 specials at n..n+8 in order, `<|image|>` at n+9 (appended here when absent).
    Returns the specials with `<|image|>`."""
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)):
        raise TokenizerError(f"mergeable_ranks: ranks must be exactly 0..{n - 1}, each once")
    missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
    if missing_bytes:
        raise TokenizerError(f"mergeable_ranks: {len(missing_bytes)} single bytes have no token "
                             f"(first: {missing_bytes[0]})")
    expected = {name: n + i for i, name in enumerate(SPECIAL_TOKENS + (IMAGE_TOKEN,))}
    specials = dict(special_tokens)
    specials.setdefault(IMAGE_TOKEN, expected[IMAGE_TOKEN])
    if specials != expected:
        wrong = [f"{name} = {specials.get(name)} (expected {expected.get(name)})"
                 for name in sorted(specials.keys() | expected.keys()) if specials.get(name) != expected.get(name)]
        raise TokenizerError(f"special_tokens: nanochat's 9 specials then {IMAGE_TOKEN} must take ids {n}..{n + 9} "
                             f"in order, right after the {n} ranks; wrong: {', '.join(wrong)}")
    return specials


def with_image_placeholder(messages: list[dict]) -> list[dict]:
    """A one-image conversation with its `<image>` in place: where a user turn says it (exactly once over the user
    turns), else prepended to the first turn as `<image>\n`, DeepSeek-OCR's and LLaVA's layout."""
    count = sum(m["content"].count(IMAGE_PLACEHOLDER) for m in messages if m["role"] != "assistant")
    if count > 1:
        raise TokenizerError(f"messages: {IMAGE_PLACEHOLDER} appears {count} times; a sample has one image")
    if any(IMAGE_PLACEHOLDER in m["content"] for m in messages if m["role"] == "assistant"):
        raise TokenizerError(f"messages: an assistant turn holds {IMAGE_PLACEHOLDER}; the image belongs to a user turn")
    if count == 1:
        return messages
    return [{**messages[0], "content": f"{IMAGE_PLACEHOLDER}\n{messages[0]['content']}"}] + messages[1:]


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]):
        specials = check_layout(mergeable_ranks, special_tokens)
        self.ranks, self.pattern, self.specials = mergeable_ranks, pattern, specials
        self.enc = tiktoken.Encoding(name="ocr_vlm", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=specials)
        self.special_ids = frozenset(specials.values())
        self.bos_id = specials["<|bos|>"]
        self.user_start_id, self.user_end_id = specials["<|user_start|>"], specials["<|user_end|>"]
        self.assistant_start_id = specials["<|assistant_start|>"]
        self.assistant_end_id = specials["<|assistant_end|>"]
        self.image_id = specials[IMAGE_TOKEN]

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def encode(self, text: str) -> list[int]:
        """Ordinary text only: a literal "<|bos|>" in data stays text, never becomes the special token."""
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode(ids)

    def token_bytes(self, ids: list[int]) -> list[bytes]:
        """Each token's bytes (a token may hold part of a character's UTF-8)."""
        return self.enc.decode_tokens_bytes(ids)

    # ------------------------------------------------------------------------------------------------------------
    def render_sample(self, prompt: str, response: str, image_tokens: int) -> tuple[list[int], list[int]]:
        """One OCR sample; targets only on the response and its end token."""
        self._check_image_tokens(image_tokens)
        return self.render_conversation([{"role": "user", "content": prompt},
                                         {"role": "assistant", "content": response}], image_tokens)

    def render_prompt(self, prompt: str, image_tokens: int) -> list[int]:
        """The prefix generation continues from (ends with <|assistant_start|>)."""
        self._check_image_tokens(image_tokens)
        return self.render_conversation([{"role": "user", "content": prompt}], image_tokens)[0] + \
            [self.assistant_start_id]

    @staticmethod
    def _check_image_tokens(image_tokens: int) -> None:
        if not isinstance(image_tokens, int) or image_tokens < 1:
            raise TokenizerError(f"image_tokens: expected a positive int, got {image_tokens!r}")

    def render_conversation(self, messages: list[dict], image_tokens: int = 0) -> tuple[list[int], list[int]]:
        """A nanochat conversation: user/assistant turns, an optional leading system message merged into the first
        user turn, targets on every assistant turn. With `image_tokens`, the sample's one image goes where its user
        turns say `<image>` (before the first user turn's text when none does), as that many <|image|>; without,
        the sample has no image and `<image>` is just text."""
        if not isinstance(messages, list) or not messages:
            raise TokenizerError("messages: expected a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise TokenizerError(f"messages[{i}]: expected {{'role': str, 'content': str}}")
        if messages[0]["role"] == "system":
            if len(messages) < 2 or messages[1]["role"] != "user":
                raise TokenizerError("messages: a system message must be followed by a user message")
            merged = {"role": "user", "content": messages[0]["content"] + "\n\n" + messages[1]["content"]}
            messages = [merged] + messages[2:]
        if image_tokens:
            messages = with_image_placeholder(messages)
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise TokenizerError(f"messages[{i}]: role {m['role']!r}, expected {expected!r} (turns alternate)")
            if expected == "user":
                turn = [self.user_start_id] + self._expand(m["content"], image_tokens) + [self.user_end_id]
                ids, mask = ids + turn, mask + [0] * len(turn)
            else:
                body = self.encode(m["content"]) + [self.assistant_end_id]
                ids, mask = ids + [self.assistant_start_id] + body, mask + [0] + [1] * len(body)
        return ids, mask

    def _expand(self, text: str, image_tokens: int) -> list[int]:
        """User text with its `<image>` (if the sample has an image) as `image_tokens` <|image|> ids."""
        if not image_tokens:
            return self.encode(text)
        before, placeholder, after = text.partition(IMAGE_PLACEHOLDER)
        return self.encode(before) + ([self.image_id] * image_tokens if placeholder else []) + self.encode(after)

    # ------------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=0, ensure_ascii=False), encoding="utf-8")

    def to_hf(self) -> dict:
        """The HF `tokenizers` JSON of this tokenizer. tiktoken merges the adjacent pair whose joined token has the
        lowest rank; HF BPE merges the pair earliest in `merges`. Listing every split of every token by its joined
        rank (as transformers' TikTokenConverter does) makes the two agree, and `ignore_merges` takes a whole
        pre-token that is itself a token at once, as tiktoken does."""
        chars = _byte_chars()
        text = {token: "".join(chars[b] for b in token) for token in self.ranks}
        merges = []
        for token, rank in sorted(self.ranks.items(), key=lambda kv: kv[1]):
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            splits = sorted((self.ranks[a], self.ranks[b], a, b) for a, b in splits if a in self.ranks and b in self.ranks)
            merges += [[text[a], text[b]] for _, _, a, b in splits]
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
        return {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": name, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": True} for name, i in self.specials.items()],
            "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                byte_level]},
            "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                      "vocab": {text[token]: rank for token, rank in self.ranks.items()}, "merges": merges},
        }

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read tokenizer JSON ({e})") from None
        if isinstance(data, dict) and data.get("format") == LEGACY_FORMAT:
            return cls._from_legacy(data, path)
        try:
            model, split = data["model"], data["pre_tokenizer"]["pretokenizers"][0]
            if model["type"] != "BPE" or split["type"] != "Split":
                raise TypeError
            inverse = {c: b for b, c in enumerate(_byte_chars())}
            ranks = {bytes(inverse[c] for c in token): rank for token, rank in model["vocab"].items()}
            specials = {t["content"]: t["id"] for t in data["added_tokens"]}
            pattern = split["pattern"]["Regex"]
        except (KeyError, IndexError, TypeError):
            raise TokenizerError(f"{path}: not a byte-level BPE tokenizer.json written by ocr_vlm (convert "
                                 "nanochat's tokenizer.pkl with `python -m ocr_vlm.tokenizer convert`)") from None
        return cls(ranks, pattern, specials)

    @classmethod
    def _from_legacy(cls, data: dict, path: str | Path) -> "Tokenizer":
        for key, kind in (("pattern", str), ("special_tokens", dict), ("mergeable_ranks", list)):
            if not isinstance(data.get(key), kind):
                raise TokenizerError(f"{path}: field '{key}' missing or not a {kind.__name__}")
        try:
            ranks = {base64.b64decode(token, validate=True): rank for rank, token in enumerate(data["mergeable_ranks"])}
        except (ValueError, TypeError):
            raise TokenizerError(f"{path}: field 'mergeable_ranks' holds a token that is not base64") from None
        if len(ranks) != len(data["mergeable_ranks"]):
            raise TokenizerError(f"{path}: field 'mergeable_ranks' repeats a token")
        return cls(ranks, data["pattern"], data["special_tokens"])

    @classmethod
    def from_nanochat_dir(cls, directory: str | Path, trust_pickle: bool = False) -> "Tokenizer":
        """Convert nanochat's `tokenizer.pkl`. Unpickling runs code from the file, so only on explicit trust."""
        path = Path(directory) / "tokenizer.pkl"
        if not trust_pickle:
            raise TokenizerError(f"{path} is a pickle, and loading a pickle can run arbitrary code. If you "
                                 "trust it, convert it once: python -m ocr_vlm.tokenizer convert --nanochat_dir "
                                 f"{Path(directory)} --trust_pickle --out tokenizer.json")
        if not path.is_file():
            raise TokenizerError(f"{path}: not found (expected nanochat's tokenizer directory)")
        with open(path, "rb") as f:
            try:
                enc = pickle.load(f)
            except Exception as e:   # a broken pickle fails in many ways; all mean "not a nanochat tokenizer"
                raise TokenizerError(f"{path}: cannot unpickle ({type(e).__name__}: {e})") from None
        if not isinstance(enc, tiktoken.Encoding):
            raise TokenizerError(f"{path}: holds a {type(enc).__name__}, not a tiktoken Encoding")
        return cls(dict(enc._mergeable_ranks), enc._pat_str, dict(enc._special_tokens))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """BPE with nanochat's trainer (rustbpe); `vocab_size` counts nanochat's 9 specials, not `<|image|>`.
        A small corpus can run out of pairs to merge, and then the vocabulary stops short of `vocab_size`."""
        import rustbpe

        smallest = 256 + len(SPECIAL_TOKENS)   # rustbpe starts from the 256 bytes (and panics below that)
        if vocab_size < smallest:
            raise TokenizerError(f"vocab_size: {vocab_size} is below {smallest} (256 bytes + 9 specials)")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(ranks, trainer.get_pattern(), specials)


def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet, the one HF's ByteLevel uses: byte b -> a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a nanochat tokenizer or train a small one.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="nanochat tokenizer.pkl -> pickle-free tokenizer.json")
    convert.add_argument("--nanochat_dir", required=True)
    convert.add_argument("--trust_pickle", action="store_true", help="you trust this pickle file")
    convert.add_argument("--out", required=True)
    train = sub.add_parser("train", help="train a BPE tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True)
    train.add_argument("--vocab_size", type=int, required=True)
    train.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    try:
        if args.command == "convert":
            tok = Tokenizer.from_nanochat_dir(args.nanochat_dir, trust_pickle=args.trust_pickle)
        else:
            missing = [p for p in args.input if not Path(p).is_file()]
            if missing:
                parser.error(f"--input: not a file: {', '.join(missing)}")
            tok = Tokenizer.train((Path(p).read_text(encoding="utf-8") for p in args.input), args.vocab_size)
        tok.save(args.out)
    except (TokenizerError, OSError, UnicodeDecodeError) as e:
        parser.error(str(e))
    print(f"wrote {args.out}: vocab {tok.vocab_size} (<|image|> = {tok.image_id})")
    if args.command == "train" and tok.vocab_size < args.vocab_size + 1:
        print(f"note: the corpus ran out of merges before --vocab_size {args.vocab_size}")


if __name__ == "__main__":
    main()
