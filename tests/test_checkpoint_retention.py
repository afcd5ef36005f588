"""--keep_checkpoints: a long run keeps its newest checkpoints only (a d20 one with its Adam state is ~13 GB)."""

import sys

from tests.test_train import TINY_RUN, run


def test_only_the_newest_checkpoints_stay(tmp_path):
    run([sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero2.json", f"--output_dir={tmp_path}",
         *TINY_RUN, "--global_batch=1", "--steps=4", "--save_every=1", "--keep_checkpoints=2"])
    ckpt = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.is_dir()) == ["step000003", "step000004"]
    assert (ckpt / "latest").read_text() == "step000004"
