"""Checkpoints in each real format, written here, load strictly through ocr_vlm.weights' key tables."""

import dataclasses
import json

import pytest
import torch
from safetensors.torch import save_file

from ocr_vlm import config
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER
from ocr_vlm.weights import WeightLoadError, load_export, load_pretrained, nanochat_gpt_config, save_export, to_format
from conftest import randomize


def randomized(model):
    return randomize(model, 0.05)


def mini_model(**gpt):
    cfg = config.mini()
    for k, v in gpt.items():
        setattr(cfg.gpt, k, v)
    return build_model(cfg.validate())


def assert_same(a: dict, b: dict, keys):
    for k in keys:
        assert torch.equal(a[k], b[k]), k


def deepseek_keys(state):
    """DeepSeek-OCR names, written independently of the table under test."""
    out = {}
    for k, v in state.items():
        if k.startswith(("sam_model.", "vision_model.", "projector.", "image_newline")):
            out["model." + k] = v
    out["model.view_seperator"] = state["view_separator"]
    return out


def test_deepseek_ocr_checkpoint_loads_encoder_and_ignores_its_language_model(tmp_path):
    source = randomized(mini_model()).state_dict()
    tensors = deepseek_keys(source)
    tensors.update({"model.embed_tokens.weight": torch.zeros(10, 4), "model.layers.0.mlp.gate.weight": torch.zeros(2),
                    "model.norm.weight": torch.zeros(4), "lm_head.weight": torch.zeros(10, 4),
                    "model.vision_model.embeddings.patch_embedding.weight": torch.zeros(128, 3, 14, 14)})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "model-00001-of-000001.safetensors")

    model = mini_model()
    gpt_before = {k: v.clone() for k, v in model.gpt.state_dict().items()}
    report = load_pretrained(model, tmp_path, "deepseek_ocr")
    encoder_keys = [k for k in source if not k.startswith("gpt.")]
    assert_same(model.state_dict(), source, encoder_keys)
    assert sorted(report.loaded) == sorted(encoder_keys)
    assert len(report.ignored) == 5
    assert_same(model.gpt.state_dict(), gpt_before, gpt_before)          # out of this format's scope


def test_renamed_key_fails_naming_it(tmp_path):
    tensors = deepseek_keys(randomized(mini_model()).state_dict())
    tensors["model.sam_model.blocks.0.norm_1.weight"] = tensors.pop("model.sam_model.blocks.0.norm1.weight")
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "m.safetensors")
    with pytest.raises(WeightLoadError) as err:
        load_pretrained(mini_model(), tmp_path / "m.safetensors", "deepseek_ocr")
    assert "unexpected key: model.sam_model.blocks.0.norm_1.weight" in str(err.value)
    assert "missing key: sam_model.blocks.0.norm1.weight" in str(err.value)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    tensors = deepseek_keys(randomized(mini_model()).state_dict())
    tensors["model.projector.layers.bias"] = torch.zeros(7)
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "m.safetensors")
    with pytest.raises(WeightLoadError, match=r"projector\.layers\.bias has shape \(7,\)"):
        load_pretrained(mini_model(), tmp_path / "m.safetensors", "deepseek_ocr")


def test_sharded_checkpoint_with_index(tmp_path):
    tensors = deepseek_keys(randomized(mini_model()).state_dict())
    names = sorted(tensors)
    shards = {"a.safetensors": names[: len(names) // 2], "b.safetensors": names[len(names) // 2:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, tmp_path / shard)
    index = {"metadata": {}, "weight_map": {k: s for s, keys in shards.items() for k in keys}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    report = load_pretrained(mini_model(), tmp_path, "deepseek_ocr")
    assert len(report.loaded) == len(tensors)


def test_hf_clip_split_qkv_with_and_without_prefix_round_trip(tmp_path):
    source = randomized(mini_model()).state_dict()
    hf = to_format(source, "hf_clip")
    assert "vision_model.encoder.layers.0.self_attn.q_proj.weight" in hf
    assert hf["vision_model.encoder.layers.0.self_attn.q_proj.weight"].shape == (128, 128)
    for name, tensors in {"prefixed": hf, "bare": {k.removeprefix("vision_model."): v for k, v in hf.items()}}.items():
        tensors = dict(tensors, **{"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
                                   "logit_scale": torch.zeros(())})
        save_file(tensors, tmp_path / f"{name}.safetensors")
        model = mini_model()
        report = load_pretrained(model, tmp_path / f"{name}.safetensors", "hf_clip")
        clip_keys = [k for k in source if k.startswith("vision_model.")]
        assert_same(model.state_dict(), source, clip_keys)
        assert sorted(report.ignored) == ["logit_scale", "text_model.embeddings.token_embedding.weight"]


def test_hf_sam_leaves_the_compressor_at_init(tmp_path):
    source = randomized(mini_model()).state_dict()
    save_file(to_format(source, "hf_sam"), tmp_path / "sam.safetensors")
    model = mini_model()
    report = load_pretrained(model, tmp_path / "sam.safetensors", "hf_sam")
    assert report.left_at_init == ["sam_model.net_2.weight", "sam_model.net_3.weight"]
    assert_same(model.state_dict(), source, [k for k in source if k.startswith("sam_model.") and "net_" not in k])


def write_nanochat(directory, model, step, n_head):
    gpt = model.cfg.gpt
    state = {k.removeprefix("gpt."): v[:-1] if "wte" in k or "lm_head" in k else v
             for k, v in model.state_dict().items() if k.startswith("gpt.")}
    state = {"_orig_mod." + k: v for k, v in state.items()}          # as torch.compile'd runs save it
    torch.save(state, directory / f"model_{step:06d}.pt")
    meta = {"step": step, "model_config": {"sequence_len": gpt.sequence_len, "vocab_size": gpt.vocab_size - 1,
                                           "n_layer": gpt.n_layer, "n_head": n_head, "n_kv_head": n_head,
                                           "n_embd": gpt.n_embd}}
    (directory / f"meta_{step:06d}.json").write_text(json.dumps(meta))


def test_nanochat_native_checkpoint_heads_come_from_meta_and_image_row_is_added(tmp_path):
    # d20's attention geometry (width 1280 = 10 heads of 128) in one layer; 16 heads of 80 would store alike.
    source = randomized(mini_model(n_embd=1280, n_head=10, n_kv_head=10, n_layer=1))
    write_nanochat(tmp_path, source, step=650, n_head=10)
    gpt_cfg = nanochat_gpt_config(tmp_path)
    assert (gpt_cfg.n_head, gpt_cfg.head_dim, gpt_cfg.vocab_size) == (10, 128, 763)

    cfg = config.mini()
    cfg.gpt = gpt_cfg
    model = build_model(cfg.validate())
    report = load_pretrained(model, tmp_path, "nanochat")
    assert report.extended_rows == {"gpt.transformer.wte.weight": (762, 763), "gpt.lm_head.weight": (762, 763)}
    ours, theirs = model.state_dict(), source.state_dict()
    assert torch.equal(ours["gpt.transformer.wte.weight"][:762], theirs["gpt.transformer.wte.weight"][:762])
    assert_same(ours, theirs, [k for k in theirs if k.startswith("gpt.transformer.h.")])
    cfg.gpt.n_head = cfg.gpt.n_kv_head = 16                          # the prototype's bug: refused, not corrupted
    with pytest.raises(WeightLoadError, match=r"model\.gpt\.n_head=16 but the nanochat config .* says 10"):
        load_pretrained(build_model(cfg), tmp_path, "nanochat")


def test_nanochat_without_meta_is_refused(tmp_path):
    write_nanochat(tmp_path, mini_model(), step=1, n_head=2)
    (tmp_path / "meta_000001.json").unlink()
    with pytest.raises(WeightLoadError, match="head count"):
        nanochat_gpt_config(tmp_path)


def test_an_export_without_places_starts_a_model_with_them_where_it_was(tmp_path):
    cfg = dataclasses.replace(config.mini(), reading_head=True, reading_pointer=True)
    model = randomized(build_model(cfg)).eval()
    save_export(model, tmp_path / "export", MINI_TOKENIZER)
    placed = build_model(dataclasses.replace(cfg, reading_place=True)).eval()
    report = load_pretrained(placed, tmp_path / "export" / "model.safetensors", "ocr_vlm")
    assert sorted(report.left_at_init) == ["reading_places.key", "reading_places.query"]
    ids = torch.randint(0, 700, (1, 90))
    ids[0, 1:1 + cfg.image_tokens] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels), placed(ids, pixel_values=pixels))
    # only those: a checkpoint without a part that does not start at zero is refused, naming it
    head = build_model(dataclasses.replace(cfg, reading_back=2))
    with pytest.raises(WeightLoadError, match="missing key: reading_head.two_back.weight"):
        load_pretrained(head, tmp_path / "export" / "model.safetensors", "ocr_vlm")


def test_export_and_load_back_give_identical_outputs(tmp_path):
    model = randomized(mini_model()).eval()
    save_export(model, tmp_path / "export", MINI_TOKENIZER)
    again, _ = load_export(tmp_path / "export")
    cfg = again.cfg
    assert cfg == model.cfg
    ids = torch.randint(0, 700, (1, 90))
    ids[0, 1:1 + cfg.image_tokens] = cfg.image_token_id
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        assert torch.equal(model(ids, pixel_values=pixels), again.eval()(ids, pixel_values=pixels))
