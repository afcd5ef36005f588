"""The training engine with real DeepSpeed ranks on CPU (gloo): ZeRO-2/3, offload, stage 2 freezing, exact resume,
universal-checkpoint resume on another world size, a two-node launch over loopback, W&B offline, export."""

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from ocr_vlm import cli, config
from ocr_vlm.data import render
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.sample import read_examples
from ocr_vlm.data.shards import text_record, write_shards
from ocr_vlm.generation import Generator
from ocr_vlm.image import stack_views
from ocr_vlm.model.reading import reading_targets
from ocr_vlm.report import evaluate
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer
from ocr_vlm.train import deepspeed_config
from ocr_vlm.weights import load_export
from conftest import transformers_generate

pytestmark = pytest.mark.slow    # every test here runs real DeepSpeed ranks in subprocesses
ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY_RUN = ["--data.seq_len=256", "--data.num_workers=1", "--micro_batch=1", "--global_batch=4", "--warmup_steps=1",
            "--lr=2e-3", "--checkpointing="]
# The zero2 run's model: with the vision norm, whose running statistics each rank moves with its own pages.
NORMED = ["--model.vision_norm=true"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline",
                TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions")))


def run(cmd: list[str], timeout: int = 600) -> str:
    result = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def deepspeed(out: Path, *args: str, ranks: int = 2, ds_config: str = "zero2.json") -> str:
    return run([str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", str(free_port()),
                "launch/train.py", "--ds_config", str(ROOT / "ds_configs" / ds_config), f"--output_dir={out}",
                *TINY_RUN, *args])


def forced_bf16(name: str, out_dir: Path) -> Path:
    """ds_configs/<name>.json with bf16 forced on (the shipped configs leave it to "auto": fp32 on CPU)."""
    forced = out_dir / f"{name}_bf16.json"
    forced.write_text(json.dumps({**json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()),
                                  "bf16": {"enabled": True}}))
    return forced


def losses(out: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "loss" in m}


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    deepspeed(out, *NORMED, "--steps=8", "--save_every=4", "--wandb=true", "--val_every=4",
              "--val_shards=shards/tier1", "--val_read=4", "--val_read_tokens=8")
    return out


def test_zero2_on_two_ranks_learns(zero2):
    trace = losses(zero2)
    assert sorted(trace) == list(range(1, 9))
    assert (trace[7] + trace[8]) / 2 < trace[1] - 0.5


def test_cpu_ranks_leave_no_shared_memory_behind(tmp_path):
    """DeepSpeed's CPU all-reduce buffers (69 MB a rank in /dev/shm) are gone once the run ends."""
    before = set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    deepspeed(tmp_path, "--steps=1")
    assert set(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")) - before == set()


def test_eval_on_val_shards_every_n_steps(zero2):
    evals = [m for m in map(json.loads, (zero2 / "metrics.jsonl").read_text().splitlines()) if "eval/loss" in m]
    assert [m["step"] for m in evals] == [4, 8] and evals[1]["eval/loss"] < evals[0]["eval/loss"]
    for m in evals:      # whether the model reads: the wrong page's loss, the varying share of the vision tokens, CER
        assert m["eval/image_gap"] == m["eval/loss_other_image"] - m["eval/loss"] and 0 <= m["eval/vision_share"] <= 1
        assert 0 <= m["eval/cer"] and 0 <= m["eval/exact"] <= 1 and m["samples_seen"] > 0 and m["train_seconds"] > 0


def test_reading_head_and_tower_gradients_are_logged(tmp_path):
    out = deepspeed(tmp_path, "--steps=2", "--model.reading_head=true", "--model.reading_pointer=true",
                    "--reading_weight=0.1", "--val_every=2", "--val_shards=shards/tier1")
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m]
    assert all(m["reading_loss"] > 0 for m in steps)
    assert all(m["pointer_loss"] == 0 for m in steps)     # tier1's pages say not where their characters are
    # at eval, the loss of the head's character readout since the last one against a uniform guess over the
    # characters the val pages hold
    (val,) = [m for m in metrics if "eval/reading_character_loss" in m]
    examples, _ = read_examples("shards/tier1", Tokenizer.load(MINI_TOKENIZER), config.mini())
    assert val["eval/reading_classes"] == len({b for ex in examples for b in reading_targets(ex.response)})
    assert val["eval/reading_character_loss"] == pytest.approx(sum(m["reading_character_loss"] for m in steps) / 2)
    assert "NO CHARACTER CODE" in out                                 # two steps have taught it nothing
    assert "eval/head_accuracy" not in val     # tier1's pages say not where their characters are: nothing to count
    # after one update every component has a gradient (nanochat's zero-initialised output layers pass none at step 1)
    assert all(steps[-1][f"grad_norm/{name}"] > 0 for name in ("sam", "clip", "projector", "gpt"))
    assert "reading " in out and "(sam " in out
    model, _ = load_export(tmp_path / "export")     # the head travels with the export, strictly loaded
    cfg = model.cfg
    assert cfg.reading_head and model.reading_head is not None and cfg.reading_pointer


def test_gundam_trains_on_two_ranks_evaluates_and_generates(chats, tmp_path):
    """Gundam at mini (256-px global views, 160-px tiles): tier1's pages (320-384 px wide) all get 2x2 or 3x2 tiles,
    so packed rows mix embedding counts. Under ZeRO-3 with text-only micro-batches: a rank without tiles runs a blank
    one, or the ranks' gathers mismatch. The export keeps the mode for evaluation and generation."""
    model = config.mini()
    model = model.with_mode("gundam")
    data = config.DataConfig(shards="shards/tier1", text_shards=str(chats), text_ratio=0.9, seq_len=512, num_workers=1)
    streams = [iter(Loader(data, model, MINI_TOKENIZER, rank, 2)) for rank in range(2)]
    tiled = [[len(next(s)["tile_values"]) > 0 for _ in range(12)] for s in streams]     # 6 steps x 2 micro-steps
    assert any(a != b for a, b in zip(*tiled))        # at some micro-step one rank has tiles, the other none

    deepspeed(tmp_path, "--mode=gundam", "--steps=6", "--data.seq_len=512", f"--data.text_shards={chats}",
              "--data.text_ratio=0.9", ds_config="zero3.json")
    trace = losses(tmp_path)
    assert sorted(trace) == list(range(1, 7)) and (trace[5] + trace[6]) / 2 < trace[1] - 0.5
    model, tokenizer = load_export(tmp_path / "export")
    cfg = model.cfg
    assert (cfg.image_size, cfg.tile_size, cfg.max_crops) == (256, 160, 6)
    result = evaluate(model, tokenizer, "shards/tier1", max_new_tokens=4, limit=2)
    assert result["summary"]["samples"] == 2 and all(r["loss"] > 0 for r in result["samples"])
    Image.new("RGB", (400, 300), "white").save(tmp_path / "page.png")
    run([sys.executable, "-m", "ocr_vlm.generate", "--checkpoint", str(tmp_path / "export"), "--image",
         str(tmp_path / "page.png"), "--max_new_tokens", "4", "--max_crops", "9"])


def test_metrics_reach_jsonl_and_wandb_offline(zero2):
    (run_dir,) = (zero2 / "wandb").glob("offline-run-*")
    (run_file,) = run_dir.glob("run-*.wandb")
    logged = run_file.read_bytes()
    for step, loss in losses(zero2).items():
        assert json.dumps(loss).encode() in logged, step      # every step's loss is in the W&B history
    evals = [m for m in map(json.loads, (zero2 / "metrics.jsonl").read_text().splitlines()) if "eval/cer" in m]
    assert b"eval/cer" in logged and json.dumps(evals[-1]["eval/cer"]).encode() in logged
    # the predictions table: a page image, expected and generated text per read-back page (rank 0's 2 of 4)
    (*_, table_file) = sorted(run_dir.glob("files/media/table/eval/predictions_*.table.json"))
    table = json.loads(table_file.read_text())
    assert table["columns"] == ["key", "page", "expected", "generated", "cer", "exact"] and len(table["data"]) == 2
    # W&B keeps a table's images in the table's artifact (staged, synced with the run), named in the run file
    assert len(set(re.findall(rb"media/images/[0-9a-f]+\.png", logged))) >= 2
    assert b"deepspeed_config" in logged and b"zero_optimization" in logged      # the resolved configs
    assert b"modeling_ocr_vlm.py" in logged and b"model.safetensors" in logged   # the export, as an artifact


def test_latest_points_at_the_final_checkpoint_and_export_reloads(zero2):
    assert (zero2 / "checkpoints" / "latest").read_text() == "step000008"
    model, _ = load_export(zero2 / "export")
    cfg = model.cfg
    module = torch.load(zero2 / "checkpoints" / "step000008" / "mp_rank_00_model_states.pt",
                        map_location="cpu", weights_only=True)["module"]   # nothing in it needs unpickling
    reference = type(model)(cfg)
    reference.load_state_dict(module)
    ids = torch.randint(0, 700, (1, 100))
    ids[0, 2:2 + cfg.image_tokens] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(model.eval()(ids, pixel_values=pixels), reference.eval()(ids, pixel_values=pixels))


def test_trained_export_generates_the_same_under_transformers(zero2, tmp_path):
    """The run's export, loaded by transformers in a fresh process, reads two tier-1 pages as our engine does."""
    model, tokenizer = load_export(zero2 / "export")
    examples, _ = read_examples("shards/tier1", tokenizer, model.cfg, limit=2)
    pixels, _, _ = stack_views([e.views for e in examples], model.cfg)
    prompts = [e.prompt for e in examples]
    ours = Generator(model, tokenizer).generate(prompts, pixels, max_new_tokens=24)
    assert transformers_generate(zero2 / "export", prompts, pixels, 24, tmp_path)["texts"] == ours


def test_export_cli_exports_any_saved_checkpoint(zero2, tmp_path):
    """The final checkpoint exports to the run's own end-of-run export, tensor for tensor; an earlier one to the
    weights it saved (ZeRO-2 keeps them whole in the model states)."""
    for tag in ("step000004", "step000008"):
        run([sys.executable, "-m", "ocr_vlm.export", "--checkpoint", str(zero2 / "checkpoints" / tag),
             "--out", str(tmp_path / tag)])
    final, _ = load_export(tmp_path / "step000008")
    end_of_run, _ = load_export(zero2 / "export")
    assert all(torch.equal(a, b) for a, b in zip(final.state_dict().values(), end_of_run.state_dict().values()))
    earlier, _ = load_export(tmp_path / "step000004")
    module = torch.load(zero2 / "checkpoints" / "step000004" / "mp_rank_00_model_states.pt", map_location="cpu",
                        weights_only=True)["module"]
    assert earlier.state_dict().keys() == module.keys()
    assert all(torch.equal(earlier.state_dict()[k], module[k]) for k in module)
    assert not all(torch.equal(earlier.state_dict()[k], final.state_dict()[k]) for k in module)   # another step's
    assert (tmp_path / "step000004" / "tokenizer.json").read_bytes() == MINI_TOKENIZER.read_bytes()


def test_resume_reproduces_the_uninterrupted_loss_trace(zero2, tmp_path):
    """Bit for bit, the vision norm's statistics included: the checkpoint holds rank 0's, so the ranks must have
    kept theirs equal (before they did, the page stage of `make read` resumed with losses 0.5-1% off)."""
    deepspeed(tmp_path, *NORMED, "--steps=8", f"--resume={zero2 / 'checkpoints' / 'step000004'}")
    uninterrupted, resumed = losses(zero2), losses(tmp_path)
    assert sorted(resumed) == [5, 6, 7, 8]
    assert [resumed[s] for s in range(5, 9)] == [uninterrupted[s] for s in range(5, 9)]


def test_muon_learns_and_resumes_exactly(tmp_path):
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    log = deepspeed(first, "--steps=8", "--save_every=4", "--optimizer=muon")
    assert "ZeRO-2, fp32, MuonWithAuxAdam" in log and "optimizer=muon turned gradient_clipping 1.0 off" in log
    deepspeed(resumed, "--steps=8", "--optimizer=muon", f"--resume={first / 'checkpoints' / 'step000004'}")
    uninterrupted, after = losses(first), losses(resumed)
    assert uninterrupted[8] < uninterrupted[1] - 1.0
    assert [after[s] for s in range(5, 9)] == [uninterrupted[s] for s in range(5, 9)]   # Muon's momentum came back


def test_muon_under_bf16_follows_the_fp32_trace(tmp_path):
    """DeepSpeed's reduce-scatter loses gradients with Muon under bf16 (the trainer turns it off): every weight would
    stay put. bf16 rounding aside, the run must learn what fp32 learns."""
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    deepspeed(fp32, "--steps=6", "--optimizer=muon")
    log = deepspeed(bf16, "--steps=6", "--optimizer=muon", ds_config=str(forced_bf16("zero2", tmp_path)))
    assert "ZeRO-2, bf16, MuonWithAuxAdam" in log and "turned zero_optimization.reduce_scatter off" in log
    want, got = losses(fp32), losses(bf16)
    assert want[6] < want[1] - 0.5
    assert all(abs(got[s] - want[s]) < 0.01 for s in range(1, 7)), (want, got)


def test_universal_checkpoint_resumes_two_ranks_on_one(zero2, tmp_path):
    universal = tmp_path / "step000008_universal"
    run([sys.executable, "launch/to_universal.py", "--input_folder",
         str(zero2 / "checkpoints" / "step000008"), "--output_folder", str(universal)])
    out = tmp_path / "one_rank"
    log = run([sys.executable, "launch/train.py", "--ds_config", "ds_configs/zero2.json", f"--output_dir={out}",
               *TINY_RUN, *NORMED, "--global_batch=2", "--steps=11", f"--resume={universal}"])
    before, after = losses(zero2), losses(out)
    assert sorted(after) == [9, 10, 11]
    assert all(loss < before[1] - 0.5 for loss in after.values())     # continues from trained weights
    assert after[11] < after[9]
    assert "resume: 2 rank(s) -> 1; each epoch's unread samples are shared over the new ranks x workers" in log


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    out = tmp_path_factory.mktemp("chats")
    records = [text_record(f"line{i}", chat) for i, chat in enumerate(render.conversations(64, seed=0))]
    write_shards(records, out, prefix="chat", max_count=32)
    return out


def test_stage2_zero3_freezes_sam_and_survives_text_only_micro_batches(zero2, chats, tmp_path):
    args = [*NORMED, "--stage=2", f"--init=ocr_vlm={zero2 / 'export'}", f"--data.text_shards={chats}",
            "--data.text_ratio=0.9", "--steps=4", "--lr=2e-3", "--checkpointing=sam,clip,gpt"]
    # The same data the two ranks will draw: at some micro-step one rank has only text while the other has pages.
    data = config.DataConfig(shards="shards/tier1", text_shards=str(chats), text_ratio=0.9, seq_len=256, num_workers=1)
    streams = [iter(Loader(data, config.mini(), MINI_TOKENIZER, rank, 2)) for rank in range(2)]
    has_pages = [[next(s)["counters"].get("vision_samples", 0) > 0 for _ in range(8)] for s in streams]
    assert any(a != b for a, b in zip(*has_pages))

    deepspeed(tmp_path, *args, ds_config="zero3.json")
    init, _ = load_export(zero2 / "export")
    final, _ = load_export(tmp_path / "export")
    before, after = init.state_dict(), final.state_dict()
    for name in before:
        if name.startswith("sam_model."):
            assert torch.equal(before[name], after[name]), name            # SAM + compressor bit-identical
    for prefix in ("vision_model.", "projector.", "gpt."):
        assert any(not torch.equal(before[n], after[n]) for n in before if n.startswith(prefix)), prefix
    trace = losses(tmp_path)
    assert trace[4] < trace[1]


def test_zero3_offload_trains_with_deepspeed_cpu_adam(tmp_path):
    out = deepspeed(tmp_path, "--steps=3", "--global_batch=1", ranks=1, ds_config="zero3_offload.json")
    assert "deepspeed: ZeRO-3, fp32, DeepSpeedCPUAdam" in out
    trace = losses(tmp_path)
    assert sorted(trace) == [1, 2, 3] and trace[3] < trace[1]


def test_two_nodes_over_loopback(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=1\n127.0.0.1 slots=1\n")
    port = str(free_port())
    nodes = [subprocess.Popen([str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(rank),
                               "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py",
                               "--ds_config", "ds_configs/zero2.json", f"--output_dir={tmp_path / 'run'}", *TINY_RUN,
                               "--steps=3"], cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for rank in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    assert sorted(losses(tmp_path / "run")) == [1, 2, 3]


def test_tier1_pages_are_read_back_exactly(tmp_path):
    """The demo in small: 4 tier-1 pages (two receipts of one store, a chart, a sign), trained with real DeepSpeed
    ranks, come back exactly from greedy generation, each page its own text."""
    pages = render.tier1_pages()
    records = [render.page_record(f"tier1_{i:02d}_{pages[i].kind}", pages[i], "test") for i in (0, 1, 4, 7)]
    write_shards(records, tmp_path / "pages", prefix="tier1")
    deepspeed(tmp_path / "run", f"--data.shards={tmp_path / 'pages'}", "--steps=140", "--lr=3e-3",
              "--min_lr_ratio=0.1", "--warmup_steps=5", "--data.shuffle_buffer=4", "--freeze=sam,clip")
    model, tokenizer = load_export(tmp_path / "run" / "export")
    result = evaluate(model, tokenizer, str(tmp_path / "pages"),
                      max_new_tokens=120)
    assert [s["generated"] for s in result["samples"]] == [s["expected"] for s in result["samples"]]
    assert result["summary"]["distinct_outputs"] == 4
    assert result["summary"]["image_gap"] > 1.0 and result["summary"]["vision_share"] > 0.01   # it reads its images


def test_torchrun_launch(tmp_path):
    run([str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "launch/train.py",
         "--ds_config", "ds_configs/zero2.json", f"--output_dir={tmp_path}", *TINY_RUN, "--steps=2"])
    assert sorted(losses(tmp_path)) == [1, 2]


@pytest.mark.parametrize("name", ["zero2", "zero3", "zero3_offload"])
def test_shipped_deepspeed_configs_accumulate_in_fp32_and_say_what_bf16_auto_chose(name, tmp_path):
    cfg = cli.train_config(["--micro_batch=2", "--global_batch=8"])
    ds, chose = deepspeed_config(f"ds_configs/{name}.json", cfg, world=2, device=torch.device("cpu"))
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 2, 8)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"       # bf16 gradients summed over micro-batches lose bits
    assert ds["bf16"]["enabled"] is False and chose == ('bf16 "auto" chose fp32: cpu runs fp32 unless the config '
                                                        'enables bf16 (native only with AVX512-BF16 or AMX; emulated, '
                                                        'several times slower, elsewhere)')
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 100_000_000                 # 2 x 191 MiB of bf16 buffers, not 2 x 954 MiB
    if zero["stage"] == 3:       # each below the 962M-parameter model, or ZeRO-3 would gather all of it
        assert zero["stage3_max_live_parameters"] == zero["stage3_max_reuse_distance"] == 200_000_000
        assert zero["stage3_prefetch_bucket_size"] == 50_000_000 and zero["stage3_param_persistence_threshold"] == 100_000
    ds, chose = deepspeed_config(str(forced_bf16(name, tmp_path)), cfg, world=2, device=torch.device("cpu"))
    assert ds["bf16"]["enabled"] is True and chose == ""              # a config that says so is obeyed, unremarked
