"""--optimizer=muon: which parameters DeepSpeed's Muon trains, at what lr, and the ds_config it needs."""

import pytest
import torch

from ocr_vlm import cli
from ocr_vlm.config import ConfigError
from ocr_vlm.model.vlm import build_model
from ocr_vlm.train import _optimizer, deepspeed_config, param_groups
from test_train import forced_bf16

READING = ["--preset=mini16", "--model.vision_norm=true", "--model.reading_head=true", "--model.reading_code=true"]


def test_muon_trains_the_hidden_matrices_and_adamw_the_rest():
    cfg = cli.train_config(["--optimizer=muon", "--lr=1e-3", "--muon_lr=0.02", "--vision_lr_scale=0.5", *READING])
    model = build_model(cfg.model)
    groups = param_groups(model, cfg)
    placed = [id(p) for g in groups for p in g["params"]]
    assert sorted(placed) == sorted(id(p) for p in model.parameters())        # every parameter, once
    assert all(p.use_muon is g["use_muon"] for g in groups for p in g["params"])
    muon = {id(p) for g in groups if g["use_muon"] for p in g["params"]}
    gpt, sam = model.gpt.transformer, model.sam_model
    for hidden in (gpt.h[0].attn.c_q, gpt.h[-1].mlp.c_proj, sam.blocks[0].attn.qkv, model.vision_model.transformer.layers[0].mlp.fc1,
                   model.projector.layers):
        assert id(hidden.weight) in muon
    outside = [gpt.wte.weight, model.gpt.lm_head.weight, *model.reading_head.parameters(), sam.patch_embed.proj.weight,
               sam.blocks[0].attn.rel_pos_h, model.vision_model.embeddings.position_embedding.weight,
               model.image_newline, model.projector.layers.bias]
    assert not any(id(p) in muon for p in outside)     # embeddings, output layers, convolutions, vectors: AdamW
    assert all(p.ndim == 2 for g in groups if g["use_muon"] for p in g["params"])
    lrs = {(g["use_muon"], any(p is gpt.wte.weight or p is gpt.h[0].attn.c_q.weight for p in g["params"])): g["lr"]
           for g in groups}
    assert lrs == {(False, True): 1e-3, (True, True): 0.02, (False, False): 5e-4, (True, False): 0.01}
    assert [g["use_muon"] for g in groups][0] is False      # the step line's lr is the recipe's


def test_adamw_keeps_two_groups_and_leaves_frozen_parameters_out():
    cfg = cli.train_config(["--freeze=sam"])
    model = build_model(cfg.model)
    model.freeze(cfg.freeze)
    groups = param_groups(model, cfg)
    assert [g["lr"] for g in groups] == [cfg.lr, cfg.lr]
    assert not any(id(p) in {id(q) for q in model.sam_model.parameters()} for g in groups for p in g["params"])


def test_muon_turns_deepspeed_gradient_clipping_off_and_says_so():
    cfg = cli.train_config(["--optimizer=muon"])
    ds, chose = deepspeed_config("ds_configs/zero2.json", cfg, world=2, device=torch.device("cpu"))
    assert ds["gradient_clipping"] == 0.0
    assert "optimizer=muon turned gradient_clipping 1.0 off" in chose
    ds, _ = deepspeed_config("ds_configs/zero2.json", cli.train_config([]), world=2, device=torch.device("cpu"))
    assert ds["gradient_clipping"] == 1.0


def test_muon_turns_reduce_scatter_off_under_bf16_and_zero3_and_says_so(tmp_path):
    bf16 = forced_bf16("zero2", tmp_path)
    muon, cpu = cli.train_config(["--optimizer=muon"]), torch.device("cpu")
    for path in (bf16, "ds_configs/zero3.json"):
        ds, chose = deepspeed_config(str(path), muon, world=2, device=cpu)
        assert ds["zero_optimization"]["reduce_scatter"] is False
        assert "optimizer=muon turned zero_optimization.reduce_scatter off" in chose
    ds, chose = deepspeed_config("ds_configs/zero2.json", muon, world=2, device=cpu)   # fp32 ZeRO-2 keeps it
    assert ds["zero_optimization"]["reduce_scatter"] is True and "reduce_scatter" not in chose
    ds, _ = deepspeed_config(str(bf16), cli.train_config([]), world=2, device=cpu)       # and AdamW everywhere
    assert ds["zero_optimization"]["reduce_scatter"] is True


def test_muon_with_an_offloaded_optimizer_is_refused():
    cfg = cli.train_config(["--optimizer=muon"])
    with pytest.raises(ConfigError, match="optimizer: muon does not run with offload_optimizer"):
        _optimizer(param_groups(build_model(cfg.model), cfg), cfg, offload=True)
