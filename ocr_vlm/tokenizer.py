"""nanochat-compatible BPE tokenizer plus `<|image|>`, encoding with tiktoken, stored as pickle-free JSON.

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
FORMAT = "ocr_vlm-tokenizer-v1"
# The tiny preset's tokenizer, trained on the synthetic renderer's corpus:
#   python -m ocr_vlm.data.render corpus --n 3000 --out corpus.txt
#   python -m ocr_vlm.tokenizer train --input corpus.txt --vocab-size 2048 --out ocr_vlm/assets/tiny_tokenizer.json
# (the corpus supports only 753 merges+bytes, so training stops there: 763 tokens with the specials and <|image|>)
TINY_TOKENIZER = Path(__file__).parent / "assets" / "tiny_tokenizer.json"


class TokenizerError(ValueError):
    """A tokenizer file or input is invalid; the message says which part."""


class Tokenizer:
    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str, special_tokens: dict[str, int]):
        missing = [t for t in SPECIAL_TOKENS if t not in special_tokens]
        if missing:
            raise TokenizerError(f"special_tokens: missing nanochat's {missing}")
        specials = dict(special_tokens)
        specials.setdefault(IMAGE_TOKEN, len(mergeable_ranks) + len(specials))
        self.enc = tiktoken.Encoding(name="ocr_vlm", pat_str=pattern, mergeable_ranks=mergeable_ranks,
                                     special_tokens=specials)
        self.specials = specials
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

    # ------------------------------------------------------------------------------------------------------------
    def render_sample(self, prompt: str, response: str, image_tokens: int) -> tuple[list[int], list[int]]:
        """One OCR sample; targets only on the response and its end token."""
        ids, mask = self._user_turn(prompt, image_tokens)
        body = self.encode(response) + [self.assistant_end_id]
        return ids + body, mask + [1] * len(body)

    def render_prompt(self, prompt: str, image_tokens: int) -> list[int]:
        """The prefix generation continues from (ends with <|assistant_start|>)."""
        return self._user_turn(prompt, image_tokens)[0]

    def _user_turn(self, prompt: str, image_tokens: int) -> tuple[list[int], list[int]]:
        if IMAGE_PLACEHOLDER not in prompt:
            prompt = f"{IMAGE_PLACEHOLDER}\n{prompt}"
        ids = [self.bos_id, self.user_start_id]
        for i, text in enumerate(prompt.split(IMAGE_PLACEHOLDER)):
            ids += ([self.image_id] * image_tokens if i else []) + self.encode(text)
        ids += [self.user_end_id, self.assistant_start_id]
        return ids, [0] * len(ids)

    def render_conversation(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """A text-only nanochat conversation: user/assistant turns, an optional leading system message merged
        into the first user turn. `<image>` in text-only data is just text."""
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
        ids, mask = [self.bos_id], [0]
        for i, m in enumerate(messages):
            expected = "user" if i % 2 == 0 else "assistant"
            if m["role"] != expected:
                raise TokenizerError(f"messages[{i}]: role {m['role']!r}, expected {expected!r} (turns alternate)")
            if expected == "user":
                turn = [self.user_start_id] + self.encode(m["content"]) + [self.user_end_id]
                ids, mask = ids + turn, mask + [0] * len(turn)
            else:
                body = self.encode(m["content"]) + [self.assistant_end_id]
                ids, mask = ids + [self.assistant_start_id] + body, mask + [0] + [1] * len(body)
        return ids, mask

    # ------------------------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        ranks = sorted(self.enc._mergeable_ranks.items(), key=lambda kv: kv[1])
        data = {"format": FORMAT, "pattern": self.enc._pat_str, "special_tokens": self.specials,
                "mergeable_ranks": [base64.b64encode(token).decode("ascii") for token, _ in ranks]}
        Path(path).write_text(json.dumps(data, indent=0, ensure_ascii=True))

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{path}: cannot read tokenizer JSON ({e})") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise TokenizerError(f"{path}: not an {FORMAT} file (convert nanochat's tokenizer.pkl with "
                                 "`python -m ocr_vlm.tokenizer convert`)")
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
            raise TokenizerError(f"{path} is a pickle, and loading a pickle can run arbitrary code. If you trust it, "
                                 "convert it once: python -m ocr_vlm.tokenizer convert --nanochat-dir "
                                 f"{Path(directory)} --trust-pickle --out tokenizer.json")
        with open(path, "rb") as f:
            enc = pickle.load(f)
        if not isinstance(enc, tiktoken.Encoding):
            raise TokenizerError(f"{path}: holds a {type(enc).__name__}, not a tiktoken Encoding")
        return cls(dict(enc._mergeable_ranks), enc._pat_str, dict(enc._special_tokens))

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """BPE with nanochat's trainer (rustbpe); `vocab_size` counts nanochat's 9 specials, not `<|image|>`."""
        import rustbpe

        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(ranks, trainer.get_pattern(), specials)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a nanochat tokenizer or train a small one.")
    sub = parser.add_subparsers(dest="command", required=True)
    convert = sub.add_parser("convert", help="nanochat tokenizer.pkl -> pickle-free tokenizer.json")
    convert.add_argument("--nanochat-dir", required=True)
    convert.add_argument("--trust-pickle", action="store_true", help="you trust this pickle file")
    convert.add_argument("--out", required=True)
    train = sub.add_parser("train", help="train a BPE tokenizer on text files")
    train.add_argument("--input", nargs="+", required=True)
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.command == "convert":
        tok = Tokenizer.from_nanochat_dir(args.nanochat_dir, trust_pickle=args.trust_pickle)
    else:
        tok = Tokenizer.train((Path(p).read_text() for p in args.input), args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}: vocab {tok.vocab_size} (<|image|> = {tok.image_id})")


if __name__ == "__main__":
    main()
