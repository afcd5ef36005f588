"""The fault suite: each fault a run meets (a kill during a checkpoint save, a planted pickle, unreadable data, a
failed shard write, a crash after logging, divergence, non-finite losses, bad launch input) and what survives it.
Training runs are real DeepSpeed engines on one CPU rank (a plain `python launch/train.py` is rank 0 of 1)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from ocr_vlm import config
from ocr_vlm.config import DataConfig
from ocr_vlm.data.loader import Loader, UnreadableData
from ocr_vlm.data.shards import Record, write_shards
from ocr_vlm.data.shards import main as shards_main
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER
from ocr_vlm.tracking import Tracker
from ocr_vlm.train import DivergenceGuard, TrainingError
from ocr_vlm.weights import save_export
from test_loader import VLM, png
from test_shards import manifest  # noqa: F401  (a fixture this suite shares)
from test_train import ROOT, TINY_RUN, env, losses

ONE_RANK = [*TINY_RUN, "--global_batch=1"]
RUN = ["--steps=6", "--save_every=2"]          # checkpoints at steps 2, 4 and 6


def train_cmd(out, *args: str) -> list[str]:
    return [sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero2.json", f"--output_dir={out}",
            *ONE_RANK, *args]


def train(out, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(train_cmd(out, *args), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def last_error(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def steps_logged(out) -> list[int]:
    return [m["step"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in m]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = train(out, *RUN)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


# ---------------------------------------------------------------------------------------------------------------
# A SIGKILL while the step-4 checkpoint is being written, at several points of the save.
SAVE = "checkpoints/step000004"
KILL_POINTS = {
    "directory made": lambda out: (out / SAVE).is_dir(),
    "model states begun": lambda out: (out / SAVE / "mp_rank_00_model_states.pt").exists(),
    "optimizer states begun": lambda out: (out / SAVE / "zero_pp_rank_0_mp_rank_00_optim_states.pt").exists(),
    "latest moved": lambda out: (out / "checkpoints/latest").exists()
                                and (out / "checkpoints/latest").read_text() == "step000004",
}


def kill_when(out, reached, timeout: float = 300) -> None:
    """Start a run and SIGKILL its whole process group (trainer and loader worker) as soon as `reached(out)`."""
    with open(out.parent / f"{out.name}.log", "w") as log:
        proc = subprocess.Popen(train_cmd(out, *RUN), cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        deadline = time.monotonic() + timeout
        while not reached(out):
            assert proc.poll() is None, "the run ended before the kill point"
            assert time.monotonic() < deadline, "the kill point never came"
            time.sleep(0.0005)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_during_a_save_resumes_from_the_last_complete_checkpoint(uninterrupted, tmp_path, point):
    out = tmp_path / "run"
    kill_when(out, KILL_POINTS[point])
    resumed_from = (out / "checkpoints/latest").read_text()
    assert resumed_from in ("step000002", "step000004")          # never a checkpoint whose save was cut short
    result = train(out, *RUN, "--resume=auto")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / resumed_from}" in result.stdout
    # Every step logged once, and the loss trace is the uninterrupted run's, bit for bit.
    assert steps_logged(out) == list(range(1, 7))
    assert losses(out) == losses(uninterrupted)


def test_a_crashed_run_resumed_logs_each_step_once(tmp_path):
    first = Tracker(tmp_path, {})
    for step in range(1, 8):                    # checkpoint at 4, crash after logging 7 (an eval row at 6)
        first.log(step, {"loss": 1.0 / step})
        if step == 6:
            first.log(step, {"eval/loss": 0.5})
    first.metrics.flush()
    resumed = Tracker(tmp_path, {}, resume=True)
    resumed.resume_at(4)
    for step in range(5, 9):
        resumed.log(step, {"loss": 2.0 / step})
    resumed.close()
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9)) and "eval/loss" not in str(rows)
    assert rows[4]["loss"] == 2.0 / 5


# ---------------------------------------------------------------------------------------------------------------
class Planted:
    """What an attacker plants: unpickling it runs a shell command."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_planted_pickle_is_refused_on_resume_unless_trusted(uninterrupted, tmp_path):
    checkpoint = tmp_path / "checkpoints" / "step000002"
    checkpoint.parent.mkdir()
    subprocess.run(["cp", "-r", str(uninterrupted / "checkpoints" / "step000002"), str(checkpoint)], check=True)
    marker = tmp_path / "code_ran"
    torch.save({"module": Planted(marker)}, checkpoint / "mp_rank_00_model_states.pt")

    result = train(tmp_path / "run", *RUN, f"--resume={checkpoint}")
    assert result.returncode == 1 and not marker.exists()
    assert last_error(result) == (f"error: resume: a file in {checkpoint} pickles posix.system, which a checkpoint of "
                                  "this trainer never holds; refused without unpickling (--trust_checkpoint=true "
                                  "loads it if you made it)")
    assert not (tmp_path / "run" / "export").exists()
    converted = subprocess.run([sys.executable, "launch/to_universal.py", "--input_folder", str(checkpoint),
                                "--output_folder", str(tmp_path / "universal")], cwd=ROOT, env=env(),
                               capture_output=True, text=True, timeout=300)
    assert converted.returncode == 1 and not marker.exists()
    assert last_error(converted).startswith(f"error: to_universal: a file in {checkpoint} pickles posix.system")

    trusted = train(tmp_path / "trusted", *RUN, f"--resume={checkpoint}", "--trust_checkpoint=true")
    assert trusted.returncode != 0 and marker.exists()      # the opt-out unpickles: the planted command ran


# ---------------------------------------------------------------------------------------------------------------
def unreadable_shards(path):
    """A foreign tar whose samples all lack the response field."""
    write_shards([Record(f"u{i}", {"prompt": "<image>\nFree OCR.", "text": "no response field"}, png(), "png")
                  for i in range(3)], path)
    return path


def test_a_slot_with_no_readable_sample_is_an_error_not_a_hang(tmp_path, caplog):
    """One pass over the slot's share, then an error naming why (the alarm bounds a hang)."""
    cfg = DataConfig(shards=str(unreadable_shards(tmp_path / "bad")), seq_len=200, num_workers=0,
                     shuffle_buffer=0)
    signal.signal(signal.SIGALRM, lambda *_: pytest.fail("the loader hung on unreadable data"))
    signal.alarm(60)
    try:
        with pytest.raises(UnreadableData, match=r"slot 0 of 1 .* epoch 0 .*'bad_fields': 3"):
            next(iter(Loader(cfg, VLM, MINI_TOKENIZER)))
    finally:
        signal.alarm(0)
    assert sum("skipping sample" in r.message for r in caplog.records) == 3      # each bad sample warned once


@pytest.mark.slow
def test_a_training_run_on_unreadable_data_stops_with_the_reason(tmp_path):
    result = train(tmp_path / "run", "--steps=2", f"--data.shards={unreadable_shards(tmp_path / 'bad')}", timeout=120)
    assert result.returncode != 0 and "found no usable sample; skipped by reason: {'bad_fields': 3}" in result.stderr
    assert not (tmp_path / "run" / "export").exists()


def test_a_failed_shard_write_leaves_the_previous_set_byte_identical(tmp_path, manifest):  # noqa: F811
    pages, _ = manifest
    out = tmp_path / "set"
    shards_main(["write", "--manifest", str(pages), "--out", str(out), "--max_count", "3"])
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (out / "NOTES.txt").write_text("mine")
    lines = pages.read_text().splitlines()
    bad = pages.parent / "late_bad.jsonl"                  # fails on line 6, after the first shards are written
    bad.write_text("\n".join(lines[:5] + ["{oops"] + lines[5:]) + "\n")
    with pytest.raises(SystemExit, match=r"late_bad\.jsonl:6"):
        shards_main(["write", "--manifest", str(bad), "--out", str(out), "--max_count", "2"])
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "NOTES.txt"} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set", "synth"]     # no staging directory left behind
    shards_main(["write", "--manifest", str(pages), "--out", str(out), "--max_count", "5"])
    assert (out / "NOTES.txt").read_text() == "mine" and json.loads((out / "index.json").read_text())["total"] == 12


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_huge_lr_stops_the_run_before_any_export(tmp_path):
    """The issue's run: at lr 1e6 the softcapped logits saturate, the gradient norm is exactly 0 from step 2 on
    and the loss stays finite; three such steps stop the run, and no checkpoint or export is written."""
    result = train(tmp_path, "--lr=1e6", "--steps=8")
    assert result.returncode == 1
    assert last_error(result) == ("error: step 4: training diverged (gradient norm 0.0, 3 steps in a row); the likely "
                                  "cause is the learning rate (--lr=1e+06): lower it or resume from an earlier checkpoint")
    assert steps_logged(tmp_path) == [1, 2, 3, 4]
    assert not (tmp_path / "export").exists() and not (tmp_path / "checkpoints").exists()


def test_a_loss_far_above_its_running_mean_counts_as_divergence():
    guard = DivergenceGuard(patience=2, ratio=2.0)
    for step, loss in enumerate([6.0, 5.0, 4.0, 13.0, 4.0, 14.0], start=1):   # single spikes are tolerated
        guard.check(step, loss, grad_norm=1.0, lr=1e-3)
    with pytest.raises(TrainingError, match=r"^step 7: training diverged \(loss 14.5000 above 2 x its running mean "
                                            r"5\.\d+, 2 steps in a row\); the likely cause is the learning rate \(--lr=0.001\)"):
        guard.check(7, 14.5, grad_norm=1.0, lr=1e-3)


@pytest.mark.slow
def test_non_finite_losses_stop_the_run(tmp_path):
    """Pretrained weights holding a NaN (a corrupt download): every loss is non-finite, each micro-batch is dropped
    on every rank, and max_bad_steps of them in a row stop the run before anything is saved."""
    model = build_model(config.mini())
    with torch.no_grad():
        model.projector.layers.weight[0, 0] = math.nan
    save_export(model, tmp_path / "poisoned", MINI_TOKENIZER)
    result = train(tmp_path / "run", "--steps=4", f"--init=ocr_vlm={tmp_path / 'poisoned'}", "--max_bad_steps=2")
    assert result.returncode == 1
    assert last_error(result) == ("error: 2 non-finite losses in a row at step 0: lower the lr, check the data, or "
                                  "resume from an earlier checkpoint")
    assert not (tmp_path / "run" / "export").exists() and not (tmp_path / "run" / "checkpoints").exists()


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["--ds_config", "ds_configs/nope.json"], "--ds_config: ds_configs/nope.json does not exist"),
    (["--data.shards=/nowhere/shards"], "data.shards: shards: /nowhere/shards does not exist"),
    (["--data.shards=ocr_vlm"], "data.shards: shards: 'ocr_vlm' names no .tar files"),
    (["--global_batch=3", "--micro_batch=2"], "global_batch: 3 is not a multiple of micro_batch=2"),
    (["--lr=nan"], "lr: nan is not a positive finite number"),
    (["--lr=0"], "lr: 0.0 is not a positive finite number"),
    (["--resume=/nowhere/step000004"],
     "resume: /nowhere/step000004 is not a checkpoint directory (no mp_rank_00_model_states.pt)"),
])
def test_bad_input_is_one_line_before_any_model_is_built(tmp_path, args, message):
    cmd = [sys.executable, "launch/train.py", *([] if "--ds_config" in args else ["--ds_config", "ds_configs/zero2.json"]),
           f"--output_dir={tmp_path}", *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1] == f"error: {message}"
    assert "Traceback" not in result.stderr and not (tmp_path / "metrics.jsonl").exists()
