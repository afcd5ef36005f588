"""The memory planner's arithmetic on known configs, and the image cap it plans with, enforced by the packer."""

import json

import pytest

from ocr_vlm import cli, config, plan
from ocr_vlm.config import DataConfig
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.shards import write_shards
from ocr_vlm.tokenizer import MINI_TOKENIZER
from tests.test_loader import page

ZERO2 = plan.DeepSpeedSettings.from_json("ds_configs/zero2.json")
ZERO3 = plan.DeepSpeedSettings.from_json("ds_configs/zero3.json")
OFFLOAD = plan.DeepSpeedSettings.from_json("ds_configs/zero3_offload.json")


def cfg(*overrides):
    return cli.train_config(["--data.text_shards=unread", *overrides])


def test_d20_parameter_counts_match_the_model_table():
    counts = plan.parameter_counts(cfg("--preset=d20", "--stage=2"))
    assert counts.total == 961_760_768 == sum(n for n, _ in counts.by_component.values())
    assert counts.trainable == counts.total - counts.by_component["sam"][0]   # stage 2 freezes SAM + compressor


@pytest.mark.parametrize("stage", [1, 2])
def test_static_terms_are_counts_times_bytes(stage):
    c = cfg("--preset=mini", f"--stage={stage}")
    counts = plan.parameter_counts(c)
    p = plan.plan(c, ZERO2, gpus=4)
    assert p["params"] == counts.total * 2                               # bf16 weights, whole on every rank
    assert p["master_and_adam"] == counts.trainable * 12 / 4             # fp32 master, m, v: partitioned
    assert p["gradients"] == counts.trainable * 4 / 4                    # ZeRO-2 partitions fp32-accumulated gradients
    assert p["buckets"] == 100_000_000 * 2 * 2                           # two bf16 reduce buffers with overlap_comm
    fp32 = plan.plan(c, plan.DeepSpeedSettings(bf16=False), gpus=1, overhead=False)
    assert (fp32["params"], fp32["master_and_adam"], fp32["gradients"], fp32["buckets"]) == \
        (counts.total * 4, counts.trainable * 8, counts.trainable * 4, 0)


def test_zero3_partitions_weights_and_offload_leaves_only_the_working_set():
    c = cfg("--preset=d20", "--stage=1")
    counts = plan.parameter_counts(c, ZERO3.persistence_threshold)
    gathered = min(counts.total, 200_000_000 + counts.persistent) * 2     # stage3_max_live_parameters
    assert plan.plan(c, ZERO3, gpus=8)["params"] == gathered + counts.total * 2 / 8
    off = plan.plan(c, OFFLOAD, gpus=8)
    assert off["params"] == gathered and off["master_and_adam"] == 0 and off["buckets"] == 100_000_000 * 2


def test_ds_config_fields_are_read(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": False, "reduce_bucket_size": 1000}}))
    assert plan.plan(cfg(), plan.DeepSpeedSettings.from_json(str(path)), gpus=2)["buckets"] == 1000 * 2


def test_the_image_cap_bounds_the_towers_and_the_planner_uses_it():
    free = cfg("--preset=d20", "--stage=2", "--micro_batch=2")
    assert plan.images_per_micro_batch(free) == 2 * (8192 // 273)          # the packer's worst case
    capped = cfg("--preset=d20", "--stage=2", "--micro_batch=2", "--data.max_images=12")
    assert plan.images_per_micro_batch(capped) == 12
    a, b = plan.plan(capped, ZERO2, gpus=8), plan.plan(free, ZERO2, gpus=8)
    assert a["images"] == 12 and a["vision_block"] * 60 == pytest.approx(b["vision_block"] * 12)
    assert a["total"] < b["total"]


def test_largest_micro_batch_fits_and_one_more_does_not():
    c = cfg("--preset=d20", "--stage=2", "--data.max_images=16")
    budget = 40 * plan.GiB
    best = plan.largest(c, ZERO2, 8, budget, "micro_batch", 64)
    assert 0 < best < 64
    assert plan.plan(plan.with_sizes(c, micro_batch=best), ZERO2, 8)["total"] <= budget
    assert plan.plan(plan.with_sizes(c, micro_batch=best + 1), ZERO2, 8)["total"] > budget


def test_bad_field_is_one_line_naming_it():
    with pytest.raises(SystemExit, match=r"^error: data.max_images: -1 is not >= 0"):
        plan.main(["--preset=d20", "--data.max_images=-1"])


def test_packer_never_exceeds_the_image_cap(tmp_path):
    write_shards([page(f"p{i:03d}", f"PAGE {i}") for i in range(30)], tmp_path / "pages", max_count=10)
    data = DataConfig(shards=str(tmp_path / "pages"), seq_len=1024, num_workers=0, max_images=3)
    batches = list(Loader(data, config.mini(), MINI_TOKENIZER, finite=True, batch_rows=2))
    images = [len(b["pixel_values"]) for b in batches]
    assert max(images) == 3                                   # 1024 tokens would hold ~11 of these pages per row
    assert sum(images) == sum(b["counters"]["vision_samples"] for b in batches) == 30   # none dropped
