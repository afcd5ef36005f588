"""Evaluation metrics on hand-worked pairs, and the report files holding exactly what the metrics compute."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from ocr_vlm import config
from ocr_vlm.metrics import Normalization, Totals, scores
from ocr_vlm.model.vlm import build_model
from ocr_vlm.report import evaluate, write_report
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

TIER1 = str(Path(__file__).resolve().parents[1] / "shards" / "tier1")


def test_metrics_on_hand_worked_pairs():
    assert scores("TOTAL 12.47", "TOTAL 12.47")["cer"] == 0.0 and scores("TOTAL 12.47", "TOTAL 12.47")["exact"]
    kitten = scores("kitten", "sitting")
    assert kitten["cer"] == 3 / 7 and kitten["ned"] == 3 / 7     # 2 substitutions + 1 insertion over 7 characters
    assert scores("", "abc")["ned"] == 1.0 and scores("abcdef", "abc")["cer"] == 1.0
    # WER: "the cat sat" -> "the bat sat down": one substitution, one insertion over 3 reference words
    assert scores("the bat sat down", "the cat sat")["wer"] == 2 / 3
    assert scores("open 24 hours", "OPEN 24 HOURS now", Normalization(casefold=True))["word_recall"] == 0.75


def test_normalisation_is_stated_and_optional():
    decomposed, composed = "Cafe\u0301", "Café"            # NFC makes these the same 4 characters
    assert scores(decomposed, composed)["exact"]
    assert scores("TOTAL\n\n 12.47  ", "TOTAL 12.47")["exact"]    # whitespace runs collapse, ends trimmed
    assert scores("Total: 12", "TOTAL 12")["cer"] == 5 / 8       # 4 case edits + the colon, by default
    assert scores("Total: 12", "TOTAL 12", Normalization(casefold=True))["cer"] == 1 / 8
    assert scores("Total: 12", "TOTAL 12", Normalization(casefold=True, strip_punctuation=True))["exact"]
    assert Normalization(True, True).describe() == "NFC, whitespace collapsed, case-folded, punctuation stripped"


def test_totals_per_type_mean_and_corpus_rates():
    totals = Totals()
    totals.add(scores("ab", "abcd"), "receipt")              # 2 edits / 4 characters
    totals.add(scores("x", "y"), "receipt")                  # 1 edit / 1 character
    totals.add(scores("same", "same"), "sign")
    s = totals.summary()
    receipts = s["by_type"]["receipt"]
    assert receipts["samples"] == 2 and receipts["exact_match"] == 0
    assert receipts["mean_cer"] == pytest.approx((0.5 + 1.0) / 2) and receipts["corpus_cer"] == pytest.approx(3 / 5)
    assert s["by_type"]["sign"]["exact_match"] == 1 and s["samples"] == 3 and s["corpus_cer"] == pytest.approx(3 / 9)


class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows, self.links = 0, []

    def handle_starttag(self, tag, attrs):
        self.rows += tag == "tr"
        if tag == "a":
            self.links.append(dict(attrs)["href"])


def test_report_streams_and_files_hold_the_computed_numbers(tmp_path):
    torch.manual_seed(0)
    model = build_model(config.mini())
    out = tmp_path / "report"
    # batches of 3 over 10 pages: the mismatched image crosses batch boundaries, the last batch is short
    result = evaluate(model, Tokenizer.load(MINI_TOKENIZER), TIER1, max_new_tokens=8, batch_size=3,
                      images_dir=out / "images")
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 6))
                       + json.dumps({"step": 5, "eval/loss": 1.0, "eval/image_gap": 0.5, "eval/cer": 0.4,
                                     "samples_seen": 50, "train_seconds": 30.0}) + "\n")
    write_report(result, out, metrics, source="checkpoint X · shards tier1")
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["samples"] == 10 and len(saved["samples"]) == 10
    for row in saved["samples"]:
        expected = scores(row["generated"], row["expected"])
        assert all(row[k] == expected[k] for k in ("cer", "wer", "ned", "exact"))
        assert (out / row["image_file"]).is_file() and row["type"] in ("receipt", "chart", "sign")
    assert saved["summary"]["exact_match"] == sum(r["exact"] for r in saved["samples"])
    assert saved["summary"]["by_type"]["receipt"]["samples"] == 4 and sum(
        g["samples"] for g in saved["summary"]["by_type"].values()) == 10
    page = (out / "report.html").read_text()
    parser = Rows()
    parser.feed(page)
    assert parser.rows == 1 + 4 + 1 + 10              # type table (3 types + all), pages table header + one per page
    worst = sorted(saved["samples"], key=lambda r: (-r["cer"], r["key"]))
    assert parser.links == [r["image_file"] for r in worst]       # worst first, each page opens full size
    assert "checkpoint X · shards tier1" in page
    for plot in ("loss.png", "reading.png"):                 # reading.png: CER by minutes and pages seen
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an untrained model is blind, and the report says so in words
    assert abs(saved["summary"]["image_gap"]) < 0.05 and "NOT READING" in page


def test_limit_reads_only_that_many_pages():
    torch.manual_seed(0)
    result = evaluate(build_model(config.mini()), Tokenizer.load(MINI_TOKENIZER), TIER1, max_new_tokens=2, limit=1)
    assert result["summary"]["samples"] == 1 and result["summary"]["image_gap"] != result["summary"]["image_gap"]
