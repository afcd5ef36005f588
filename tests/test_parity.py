"""Numerical parity with the transformers implementations (random weights, fp32), moved through the key tables users
load with (weights.load_pretrained), at the pretrained size and at sizes where position tables are resized."""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

transformers = pytest.importorskip("transformers")

from ocr_vlm import config  # noqa: E402
from ocr_vlm.model.layers import resize_pos_grid  # noqa: E402
from ocr_vlm.model.vlm import build_model  # noqa: E402
from ocr_vlm.weights import hf_nanochat_gpt_config, load_pretrained  # noqa: E402
from conftest import randomize  # noqa: E402


def hf_sam_neck_by_hand(hf: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """HF's SAM encoder accepts only its pretrained size; its submodules (rel-pos resizing, window padding) run at any."""
    enc = hf.vision_encoder
    x = enc.patch_embed.projection(pixels).permute(0, 2, 3, 1)
    x = x + resize_pos_grid(enc.pos_embed, x.shape[1])
    for layer in enc.layers:
        x = layer(x)
    return enc.neck(x)


@pytest.mark.parametrize("size", [80, 64, 112], ids=["pretrained", "shrink", "grow"])
def test_sam_trunk_and_neck_match_hf_sam_vision_encoder(tmp_path, size):
    """Windowed blocks whose grid needs padding (10 % 4 != 0) and a global block with its own rel-pos table; at
    64 / 112 px (grid 8 / 14) the global block's 19-row rel-pos tables become 15 / 27 rows, the abs table 8x8 / 14x14."""
    hf_cfg = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=80,
                                          patch_size=8, window_size=4, global_attn_indexes=[1], output_channels=16,
                                          mlp_dim=128, attn_implementation="sdpa")
    hf = randomize(transformers.SamVisionModel(hf_cfg), 0.2).eval()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "sam.safetensors")

    cfg = config.mini()
    cfg.sam = dataclasses.replace(cfg.sam, image_size=80, patch_size=8, width=32, depth=3, heads=2, window_size=4,
                                  global_attn_indexes=(1,), neck_channels=16)
    model = build_model(cfg).eval()
    report = load_pretrained(model, tmp_path / "sam.safetensors", "hf_sam")
    assert report.left_at_init == ["sam_model.net_2.weight", "sam_model.net_3.weight"]

    pixels = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ours = model.sam_model.forward_neck(pixels)
        theirs = hf(pixels).last_hidden_state if size == 80 else hf_sam_neck_by_hand(hf, pixels)
    assert ours.shape == theirs.shape == (2, 16, size // 8, size // 8)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("grid", [8, 6], ids=["pretrained-grid", "resized-grid"])
def test_clip_layers_match_hf_clip_encoder(tmp_path, grid):
    cfg = config.mini()                       # CLIP width 128, 2 layers, 2 heads, 8x8 position grid
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=8 * 14, patch_size=14,
                                           hidden_act="quick_gelu", attn_implementation="sdpa")
    hf = randomize(transformers.CLIPVisionModel(hf_cfg), 0.2).eval()
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, tmp_path / "clip.safetensors")
    model = build_model(cfg).eval()
    report = load_pretrained(model, tmp_path / "clip.safetensors", "hf_clip")
    assert any("patch_embedding" in k for k in report.ignored) and any("post_layernorm" in k for k in report.ignored)

    sam_map = torch.randn(2, 128, grid, grid)
    tokens = sam_map.flatten(2).transpose(1, 2)
    with torch.no_grad():
        ours = model.vision_model(sam_map)
        emb = hf.embeddings
        pos = emb.position_embedding.weight              # class row kept, patch rows resized row-major
        patch_pos = resize_pos_grid(pos[1:].reshape(1, 8, 8, 128), grid).reshape(grid * grid, 128)
        x = torch.cat([emb.class_embedding.expand(2, 1, -1), tokens], 1) + torch.cat([pos[:1], patch_pos])
        theirs = hf.encoder(inputs_embeds=hf.pre_layrnorm(x)).last_hidden_state
    assert ours.shape == theirs.shape == (2, 1 + grid * grid, 128)
    assert (ours - theirs).abs().max().item() <= 1e-5


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_gpt_logits_match_hf_nanochat(tmp_path, kv_heads):
    hf_cfg = transformers.NanoChatConfig(vocab_size=512, hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=kv_heads,
                                         max_position_embeddings=256, final_logit_softcapping=15.0,
                                         rms_norm_eps=torch.finfo(torch.float32).eps,   # F.rms_norm's eps=None
                                         tie_word_embeddings=False, attn_implementation="sdpa")
    hf = randomize(transformers.NanoChatForCausalLM(hf_cfg), 0.2).eval()
    hf.save_pretrained(tmp_path)

    cfg = config.mini()
    cfg.gpt = hf_nanochat_gpt_config(tmp_path)
    assert (cfg.gpt.n_head, cfg.gpt.n_kv_head, cfg.gpt.vocab_size) == (4, kv_heads, 513)
    cfg.image_token_id = 512
    model = build_model(cfg).eval()
    report = load_pretrained(model, tmp_path, "hf_nanochat")
    assert report.extended_rows["gpt.lm_head.weight"] == (512, 513)

    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        ours = model.gpt(ids)[..., :512]
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-4
