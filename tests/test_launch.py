"""The launch scripts hand every argument to the launcher intact: braces, globs and spaces are data, not shell.

The cluster is replaced by stubs on PATH (`srun`, `scontrol`, `deepspeed`) that record the argv they receive; the
scripts themselves run unmodified in a copy of launch/, so nothing is written into the checkout.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ocr_vlm import cli, plan

REPO = Path(__file__).resolve().parents[1]

# Each of these breaks when arguments pass through an unquoted `$*`: the brace pattern becomes four shards, the
# space splits a value, the glob matches the file planted below, and `$HOME` expands.
TRICKY = ["--data.shards=/d/{000000..000003}.tar", "--run_name=two words", "--data.text_shards=*.tar",
          "--val_shards=/d/shard-?.tar", "--tokenizer=$HOME/tok.json", "--init=ocr_vlm=/w/a b,nanochat=/w/[x]"]

STUBS = {
    # argv, NUL-separated, one file per call
    "deepspeed": 'printf "%s\\0" "$@" > "$RECORD/deepspeed"',
    # records its own argv, then runs the step's command as node 0 would (options end at the first non-option)
    "srun": 'printf "%s\\0" "$@" > "$RECORD/srun"\nwhile [ "${1#-}" != "$1" ]; do shift; done\n'
            'SLURM_NODEID=0 exec "$@"',
    "scontrol": 'printf "node-0\\nnode-1\\n"',
}


@pytest.fixture
def cluster(tmp_path):
    """A copy of launch/ to run, stub binaries first on PATH, and a reader for what the stubs recorded."""
    repo, bin_dir, record = tmp_path / "repo", tmp_path / "bin", tmp_path / "record"
    shutil.copytree(REPO / "launch", repo / "launch")
    for d in (bin_dir, record):
        d.mkdir()
    for name, body in STUBS.items():
        (bin_dir / name).write_text(f"#!/usr/bin/env bash\n{body}\n")
        (bin_dir / name).chmod(0o755)
    (repo / "--data.text_shards=planted.tar").touch()   # what `--data.text_shards=*.tar` globs to, unquoted
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record)}

    def run(script: str, *args: str, **extra: str) -> dict[str, list[str]]:
        subprocess.run(["bash", f"launch/{script}", *args], cwd=repo, env={**env, **extra}, check=True,
                       capture_output=True, text=True)
        return {f.name: f.read_text().split("\0")[:-1] for f in record.iterdir()}

    run.repo = repo
    return run


def test_slurm_forwards_arguments_intact(cluster):
    calls = cluster("slurm.sbatch", *TRICKY, SLURM_SUBMIT_DIR=str(cluster.repo), SLURM_JOB_NODELIST="node-[0-1]",
                    SLURM_JOB_ID="7", SLURM_NNODES="2", SLURM_CPUS_PER_TASK="16")
    assert calls["deepspeed"][-len(TRICKY):] == TRICKY
    ds = calls["deepspeed"]
    assert ds[ds.index("--node_rank") + 1] == "0" and ds[ds.index("--hostfile") + 1] == "runs/hostfile-7"
    assert (cluster.repo / "runs/hostfile-7").read_text() == "node-0 slots=8\nnode-1 slots=8\n"
    srun = calls["srun"]
    assert "--cpus-per-task=16" in srun and "--kill-on-bad-exit=1" in srun


def test_slurm_log_directory_exists_at_submit_time():
    """Slurm opens --output before the script can create anything: a log in a missing directory is lost."""
    (output,) = re.findall(r"^#SBATCH --output=(\S+)", (REPO / "launch/slurm.sbatch").read_text(), re.M)
    assert os.path.dirname(output) == ""


@pytest.mark.parametrize("env", [{"NODE_RANK": "1", "MASTER_ADDR": "node-0"}, {}], ids=["no_ssh", "pdsh"])
def test_multi_node_forwards_arguments_intact(cluster, env):
    assert cluster("multi_node.sh", *TRICKY, **env)["deepspeed"][-len(TRICKY):] == TRICKY


def test_single_node_forwards_arguments_intact(cluster):
    ds = cluster("single_node.sh", "2", *TRICKY)["deepspeed"]
    assert ds[-len(TRICKY):] == TRICKY and ds[ds.index("--num_gpus") + 1] == "2"


@pytest.mark.parametrize("script", ["stage1.sh", "stage2.sh"])
@pytest.mark.parametrize("nodes", ["1", "0"])
def test_stage_scripts_append_arguments_after_the_recipe(cluster, script, nodes):
    """The user's arguments come last, so they override the recipe's (later --key=value wins)."""
    ds = cluster(script, *TRICKY, DATA="/data/my ocr", NODES=nodes)["deepspeed"]
    assert ds[-len(TRICKY):] == TRICKY
    assert "--data.shards=/data/my ocr/train" in ds


@pytest.mark.parametrize("script", ["stage1.sh", "stage2.sh"])
def test_stage_recipes_fit_a_40gb_gpu(cluster, script):
    """What the stage scripts launch, planned per GPU on 8 GPUs: within a 40 GB A100 under the shipped ds_config."""
    ds = cluster(script, DATA="/data")["deepspeed"]
    args = ds[ds.index("--ds_config") + 2:]
    planned = plan.plan(cli.train_config(args), plan.DeepSpeedSettings.from_json(str(REPO / ds[ds.index("--ds_config") + 1])),
                        gpus=8)
    assert planned["images"] < plan.images_per_micro_batch(plan.with_sizes(cli.train_config(args), max_images=0))
    assert planned["total"] < 40 * plan.GiB
