"""Run tracking: the metrics file holds every step of a logical run exactly once, across a crash and a resume."""

import json

from ocr_vlm.tracking import Tracker


def test_a_resumed_run_logs_each_step_once(tmp_path):
    first = Tracker(tmp_path, {})
    for step in range(1, 8):                    # checkpoint at 4, crash after logging 7 (an eval row at 6)
        first.log(step, {"loss": 1.0 / step})
        if step == 6:
            first.log(step, {"val_loss": 0.5})
    first.metrics.flush()
    resumed = Tracker(tmp_path, {}, resume=True)
    resumed.resume_at(4)
    for step in range(5, 9):
        resumed.log(step, {"loss": 2.0 / step})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "val_loss" not in str(rows)
    assert rows[4]["loss"] == 2.0 / 5
