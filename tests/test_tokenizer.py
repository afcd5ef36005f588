"""Tokenizer: nanochat layout plus <|image|>, rendering masks, pickle-free storage, and the trust-gated conversion."""

import base64
import json
import pickle
import random

import pytest
import tiktoken

from ocr_vlm.tokenizer import (IMAGE_TOKEN, SPECIAL_TOKENS, SPLIT_PATTERN, MINI_TOKENIZER, Tokenizer,
                               TokenizerError, main)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.load(MINI_TOKENIZER)


def test_layout_matches_nanochat_plus_image(tok):
    n_ranks = len(tok.ranks)
    assert [tok.specials[name] for name in SPECIAL_TOKENS] == list(range(n_ranks, n_ranks + 9))
    assert tok.image_id == n_ranks + 9 == tok.vocab_size - 1
    assert tok.special_ids == set(range(n_ranks, n_ranks + 10))


def test_unicode_round_trip_and_no_special_injection(tok):
    text = "Größe 12.99 € — naïve café 東京 <|bos|> <|image|>"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.image_id not in ids


def test_render_sample_expands_images_and_masks_only_the_response(tok):
    ids, mask = tok.render_sample("<image>\nFree OCR.", "TOTAL 12.47", image_tokens=73)
    assert ids.count(tok.image_id) == 73
    assert ids[:2] == [tok.bos_id, tok.user_start_id] and ids[-1] == tok.assistant_end_id
    supervised = [i for i, m in zip(ids, mask) if m]
    assert tok.decode(supervised) == "TOTAL 12.47<|assistant_end|>"
    with pytest.raises(TokenizerError, match="<image> appears 2 times; a sample has one image"):
        tok.render_sample("<image> and <image>: compare", "same", image_tokens=5)
    no_placeholder, _ = tok.render_sample("Free OCR.", "x", image_tokens=5)   # prepended as "<image>\n"
    assert no_placeholder[2:7] == [tok.image_id] * 5
    assert tok.render_prompt("<image>\nFree OCR.", 73) == ids[:ids.index(tok.assistant_start_id) + 1]


def test_render_conversation_masks_assistant_turns(tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "6"}]
    ids, mask = tok.render_conversation(messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "4<|assistant_end|>6<|assistant_end|>"
    assert tok.decode(ids).startswith("<|bos|><|user_start|>Be brief.\n\n2+2?<|user_end|>")
    with pytest.raises(TokenizerError, match=r"messages\[1\]: role 'user', expected 'assistant'"):
        tok.render_conversation([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TokenizerError, match=r"messages\[0\]"):
        tok.render_conversation([{"role": "user", "content": 3}])
    text_only, _ = tok.render_conversation([{"role": "user", "content": "<image> is text here"},
                                            {"role": "assistant", "content": "ok"}])
    assert tok.image_id not in text_only and "<image> is text here" in tok.decode(text_only)


def test_render_conversation_with_an_image_masks_every_assistant_turn(tok):
    turns = [{"role": "user", "content": "What is the total?\n<image>"}, {"role": "assistant", "content": "12.47"},
             {"role": "user", "content": "And the store?"}, {"role": "assistant", "content": "CORNER MARKET"}]
    ids, mask = tok.render_conversation(turns, image_tokens=5)
    assert ids.count(tok.image_id) == 5 and ids.index(tok.image_id) > 2           # where the user turn put it
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "12.47<|assistant_end|>CORNER MARKET<|assistant_end|>"
    first = [{"role": "system", "content": "Be exact."}] + [{**t, "content": t["content"].replace("\n<image>", "")}
                                                            for t in turns]
    ids, _ = tok.render_conversation(first, image_tokens=5)                       # none: before the first turn
    assert ids[2:7] == [tok.image_id] * 5 and ids.count(tok.image_id) == 5
    with pytest.raises(TokenizerError, match="an assistant turn holds <image>"):
        tok.render_conversation(turns[:1] + [{"role": "assistant", "content": "<image>"}], image_tokens=5)


def test_render_rejects_a_non_positive_image_count(tok):
    with pytest.raises(TokenizerError, match="image_tokens"):
        tok.render_sample("<image>\nFree OCR.", "x", image_tokens=0)


def test_json_round_trip_and_corrupt_files(tok, tmp_path):
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    sample = "CORNER MARKET\nTOTAL 40.26"
    assert again.encode(sample) == tok.encode(sample) and again.specials == tok.specials
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot read tokenizer JSON"):
        Tokenizer.load(tmp_path / "bad.json")
    data = json.loads((tmp_path / "t.json").read_text())
    (tmp_path / "wordpiece.json").write_text(json.dumps(dict(data, model={"type": "WordPiece", "vocab": {}})))
    with pytest.raises(TokenizerError, match="not a byte-level BPE tokenizer.json"):
        Tokenizer.load(tmp_path / "wordpiece.json")
    swapped = [dict(t, id={tok.bos_id: tok.user_start_id, tok.user_start_id: tok.bos_id}.get(t["id"], t["id"]))
               for t in data["added_tokens"]]
    (tmp_path / "swapped.json").write_text(json.dumps(dict(data, added_tokens=swapped)))
    with pytest.raises(TokenizerError, match=r"<\|bos\|> = \d+ \(expected \d+\)"):
        Tokenizer.load(tmp_path / "swapped.json")


def test_legacy_json_still_loads_and_checks(tok, tmp_path):
    """Exports written before the HF layout: base64 ranks in rank order."""
    ranks = [base64.b64encode(t).decode() for t, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])]
    legacy = {"format": "ocr_vlm-tokenizer-v1", "pattern": tok.pattern, "special_tokens": tok.specials,
              "mergeable_ranks": ranks}
    (tmp_path / "old.json").write_text(json.dumps(legacy))
    assert Tokenizer.load(tmp_path / "old.json").ranks == tok.ranks
    (tmp_path / "wrong.json").write_text('{"format": "ocr_vlm-tokenizer-v1", "pattern": "x"}')
    with pytest.raises(TokenizerError, match="'special_tokens' missing"):
        Tokenizer.load(tmp_path / "wrong.json")
    (tmp_path / "repeated.json").write_text(json.dumps(dict(legacy, mergeable_ranks=ranks + ranks[:1])))
    with pytest.raises(TokenizerError, match="repeats a token"):
        Tokenizer.load(tmp_path / "repeated.json")


def varied_texts(n: int, seed: int = 0) -> list[str]:
    """Receipts-like ASCII, accents, CJK, emoji, contractions, digit runs, tabs and CRLFs, in random mixes."""
    rng = random.Random(seed)
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJ0123456789 .,:;!?$%-\n\t\r'\"()éüß中文🙂"
    fixed = ["TOTAL 12.47\nThank you!", "  leading spaces\tand tabs\r\n", "it's they're we'll I'M",
             "héllo wörld — ünïcode 中文 🙂", "1234567 3.14159", "a" * 50, "ab" * 40, ""]
    return fixed + ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(n)]


@pytest.mark.parametrize("which", ["mini", "trained"])
def test_hf_tokenizers_and_auto_tokenizer_encode_exactly_as_we_do(tok, which, tmp_path):
    """The saved file is HF's format: `tokenizers` and `AutoTokenizer` give our ids (specials included) and decode
    back, for the shipped tokenizer and for one trained on the varied texts themselves (many more merges)."""
    from tokenizers import Tokenizer as HFTokenizer
    from transformers import AutoTokenizer

    ours = tok if which == "mini" else Tokenizer.train(varied_texts(400, seed=1), 3000)
    ours.save(tmp_path / "tokenizer.json")
    fast, auto = HFTokenizer.from_file(str(tmp_path / "tokenizer.json")), AutoTokenizer.from_pretrained(tmp_path)
    for text in varied_texts(1000):
        ids = ours.encode(text)
        assert fast.encode(text, add_special_tokens=False).ids == ids, text
        assert auto.decode(ids) == text
    prompt = ours.render_prompt("<image>\nFree OCR.", 3)
    assert auto(ours.decode(prompt), add_special_tokens=False)["input_ids"] == prompt


def test_layout_checks_ranks_and_bytes():
    ranks = {bytes([b]): b for b in range(256)}
    specials = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}
    assert Tokenizer(ranks, SPLIT_PATTERN, specials).image_id == 265
    with pytest.raises(TokenizerError, match=r"ranks must be exactly 0\.\.256"):
        Tokenizer(ranks | {b"ab": 300}, SPLIT_PATTERN, specials)
    no_zero_byte = {bytes([b]): b - 1 for b in range(1, 256)} | {b"ab": 255}
    with pytest.raises(TokenizerError, match="1 single bytes have no token"):
        Tokenizer(no_zero_byte, SPLIT_PATTERN, specials)


def nanochat_pickle(directory, extra_specials=()):
    """A nanochat-style tokenizer.pkl: byte ranks + one merge, the 9 specials after them."""
    ranks = {bytes([b]): b for b in range(256)} | {b"he": 256}
    specials = {name: 257 + i for i, name in enumerate(SPECIAL_TOKENS + tuple(extra_specials))}
    enc = tiktoken.Encoding(name="nanochat", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens=specials)
    with open(directory / "tokenizer.pkl", "wb") as f:
        pickle.dump(enc, f)
    return enc


def test_nanochat_pickle_converts_only_on_explicit_trust(tmp_path):
    enc = nanochat_pickle(tmp_path)
    with pytest.raises(TokenizerError, match="is a pickle"):
        Tokenizer.from_nanochat_dir(tmp_path)
    tok = Tokenizer.from_nanochat_dir(tmp_path, trust_pickle=True)
    assert tok.image_id == enc.n_vocab == 266 and tok.vocab_size == 267
    assert tok.encode("hello") == enc.encode_ordinary("hello")
    tok.save(tmp_path / "tokenizer.json")
    assert Tokenizer.load(tmp_path / "tokenizer.json").encode("the hero") == enc.encode_ordinary("the hero")


def test_nanochat_conversion_checks_the_specials_and_the_file(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_nanochat_dir(tmp_path, trust_pickle=True)
    nanochat_pickle(tmp_path, extra_specials=[IMAGE_TOKEN])   # the prototype's pickle already holds <|image|>
    assert Tokenizer.from_nanochat_dir(tmp_path, trust_pickle=True).image_id == 266
    nanochat_pickle(tmp_path, extra_specials=["<|audio|>"])
    with pytest.raises(TokenizerError, match="<\\|audio\\|>"):
        Tokenizer.from_nanochat_dir(tmp_path, trust_pickle=True)


def test_cli_convert_refuses_without_trust_and_writes_json_with_it(tmp_path, capsys):
    nanochat_pickle(tmp_path)
    out = tmp_path / "tokenizer.json"
    with pytest.raises(SystemExit):
        main(["convert", "--nanochat_dir", str(tmp_path), "--out", str(out)])
    assert "is a pickle" in capsys.readouterr().err and not out.exists()
    main(["convert", "--nanochat_dir", str(tmp_path), "--trust_pickle", "--out", str(out)])
    assert Tokenizer.load(out).image_id == 266


def test_train_reaches_requested_size(tmp_path):
    words = [f"word{i} token{i * 7} " for i in range(400)]
    tok = Tokenizer.train(words * 5, vocab_size=300)
    assert tok.vocab_size == 301 and tok.image_id == 300
    assert tok.decode(tok.encode("word12 token84")) == "word12 token84"
    with pytest.raises(TokenizerError, match="vocab_size: 200 is below 265"):
        Tokenizer.train(words, vocab_size=200)


def test_cli_train_writes_a_loadable_tokenizer(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"TOTAL {i}.{i % 100:02d}\nInvoice {i * 3}\n" for i in range(300)))
    main(["train", "--input", str(corpus), "--vocab_size", "290", "--out", str(tmp_path / "tok.json")])
    tok = Tokenizer.load(tmp_path / "tok.json")
    assert tok.vocab_size == 291 and tok.decode(tok.encode("TOTAL 7.07")) == "TOTAL 7.07"
