"""Evaluation metrics on hand-made pairs, and the report files holding exactly what the metrics compute."""

import json
from html.parser import HTMLParser
from pathlib import Path

import torch

from ocr_vlm import config
from ocr_vlm.report import cer, evaluate, ned, word_recall, write_report
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

TIER1 = str(Path(__file__).resolve().parents[1] / "shards" / "tier1")


def test_metrics_on_hand_made_pairs():
    assert cer("TOTAL 12.47", "TOTAL 12.47") == 0.0
    assert cer("kitten", "sitting") == 3 / 7                 # 2 substitutions + 1 insertion, over the reference
    assert ned("kitten", "sitting") == 3 / 7                 # over the longer string
    assert ned("", "abc") == 1.0 and cer("abcdef", "abc") == 1.0
    assert word_recall("open 24 hours", "OPEN 24 HOURS now") == 0.75


class Rows(HTMLParser):
    def __init__(self):
        super().__init__()
        self.rows = 0

    def handle_starttag(self, tag, attrs):
        self.rows += tag == "tr"


def test_report_files_hold_the_computed_numbers(tmp_path):
    torch.manual_seed(0)
    model = build_model(config.mini())
    result = evaluate(model, Tokenizer.load(MINI_TOKENIZER), TIER1, max_new_tokens=8)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps({"step": s, "loss": 5.0 / s}) + "\n" for s in range(1, 6))
                       + json.dumps({"step": 5, "val_loss": 1.0, "image_gap": 0.5, "val_cer": 0.4, "samples_seen": 50,
                                     "train_seconds": 30.0}) + "\n")
    out = write_report(result, tmp_path / "report", metrics)
    saved = json.loads((out / "report.json").read_text())
    assert saved["summary"]["samples"] == 10 and len(saved["samples"]) == 10
    for row in saved["samples"]:
        assert row["cer"] == cer(row["generated"], row["expected"]) and row["ned"] == ned(row["generated"], row["expected"])
    assert saved["summary"]["exact_match"] == sum(r["generated"] == r["expected"] for r in saved["samples"])
    parser = Rows()
    parser.feed((out / "report.html").read_text())
    assert parser.rows == 1 + 10                              # header + one row per sample
    for plot in ("loss.png", "reading.png"):                 # reading.png: CER by minutes and pages seen
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an untrained model is blind, and the report says so in words
    assert abs(saved["summary"]["image_gap"]) < 0.05 and "NOT READING" in (out / "report.html").read_text()
