"""The vision towers on their own: parity with transformers' SAM and CLIP (random fp32 weights, copied through the
explicit name tables below), shapes and parameter counts at d20 size on the meta device, position-table resizing,
and activation checkpointing changing nothing."""


import pytest
import torch

from ocr_vlm import config
from ocr_vlm.config import ClipConfig, SamConfig
from ocr_vlm.model.clip import ClipEncoder
from ocr_vlm.model.layers import resize_pos_grid
from ocr_vlm.model.sam import SamEncoder

transformers = pytest.importorskip("transformers")

# transformers name -> ours; "{i}" is a block index. Plain dicts so they can move into ocr_vlm/weights.py as is.
SAM_FROM_HF = {
    "vision_encoder.patch_embed.projection.weight": "patch_embed.proj.weight",
    "vision_encoder.patch_embed.projection.bias": "patch_embed.proj.bias",
    "vision_encoder.pos_embed": "pos_embed",
    **{f"vision_encoder.layers.{{i}}.{hf}.{t}": f"blocks.{{i}}.{ours}.{t}"
       for hf, ours in [("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("attn.qkv", "attn.qkv"),
                        ("attn.proj", "attn.proj"), ("mlp.lin1", "mlp.lin1"), ("mlp.lin2", "mlp.lin2")]
       for t in ("weight", "bias")},
    "vision_encoder.layers.{i}.attn.rel_pos_h": "blocks.{i}.attn.rel_pos_h",
    "vision_encoder.layers.{i}.attn.rel_pos_w": "blocks.{i}.attn.rel_pos_w",
    "vision_encoder.neck.conv1.weight": "neck.0.weight",
    "vision_encoder.neck.layer_norm1.weight": "neck.1.weight",
    "vision_encoder.neck.layer_norm1.bias": "neck.1.bias",
    "vision_encoder.neck.conv2.weight": "neck.2.weight",
    "vision_encoder.neck.layer_norm2.weight": "neck.3.weight",
    "vision_encoder.neck.layer_norm2.bias": "neck.3.bias",
}
CLIP_FROM_HF = {
    "embeddings.class_embedding": "embeddings.class_embedding",
    "embeddings.position_embedding.weight": "embeddings.position_embedding.weight",
    "pre_layrnorm.weight": "pre_layrnorm.weight",
    "pre_layrnorm.bias": "pre_layrnorm.bias",
    **{f"encoder.layers.{{i}}.{name}.{t}": f"transformer.layers.{{i}}.{name}.{t}"
       for name in ("layer_norm1", "layer_norm2", "self_attn.out_proj", "mlp.fc1", "mlp.fc2") for t in ("weight", "bias")},
}
# Ours built from several of theirs, concatenated on dim 0 in this order ([q | k | v] rows, heads contiguous).
CLIP_FUSED_FROM_HF = {f"transformer.layers.{{i}}.self_attn.qkv_proj.{t}":
                      [f"encoder.layers.{{i}}.self_attn.{p}_proj.{t}" for p in "qkv"] for t in ("weight", "bias")}
CLIP_HF_UNUSED = ("embeddings.patch_embedding.weight", "post_layernorm.weight", "post_layernorm.bias")


def per_block(table: dict, depth: int) -> dict:
    out = {}
    for theirs, ours in table.items():
        for i in range(depth) if "{i}" in str(ours) else [0]:
            out[theirs.format(i=i)] = [t.format(i=i) for t in ours] if isinstance(ours, list) else ours.format(i=i)
    return out


def randomize(module: torch.nn.Module) -> torch.nn.Module:
    """Every tensor random: rel-pos and pos tables start at zero and would hide a wrong mapping."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return module


def hf_sam_and_ours() -> tuple[torch.nn.Module, SamEncoder]:
    """Grid 16: windows of 5 need zero-padding (16 -> 20), block 1 attends globally with its own rel-pos table."""
    torch.manual_seed(0)
    hf_cfg = transformers.SamVisionConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, image_size=128,
                                          patch_size=8, mlp_dim=128, window_size=5, global_attn_indexes=[1],
                                          use_rel_pos=True, use_abs_pos=True, output_channels=16,
                                          attn_implementation="sdpa")
    hf = randomize(transformers.SamVisionModel(hf_cfg)).eval()
    ours = SamEncoder(SamConfig(image_size=128, patch_size=8, width=32, depth=3, heads=2, mlp_ratio=4.0, window_size=5,
                                global_attn_indexes=(1,), neck_channels=16, compressor_channels=(16, 32))).eval()
    theirs = hf.state_dict()
    mapped = {ours_key: theirs.pop(hf_key) for hf_key, ours_key in per_block(SAM_FROM_HF, 3).items()}
    assert not theirs, f"HF SAM keys left unmapped: {sorted(theirs)}"
    mapped |= {k: v for k, v in ours.state_dict().items() if k.startswith(("net_2.", "net_3."))}   # not in HF SAM
    ours.load_state_dict(mapped, strict=True)
    return hf, ours


def hf_sam_neck_by_hand(hf: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """HF's SAM encoder accepts only its pretrained size; its submodules (rel-pos resizing, window padding) run at any."""
    enc = hf.vision_encoder
    x = enc.patch_embed.projection(pixels).permute(0, 2, 3, 1)
    x = x + resize_pos_grid(enc.pos_embed, x.shape[1])
    for layer in enc.layers:
        x = layer(x)
    return enc.neck(x)


def test_sam_neck_matches_hf_at_pretrained_size():
    hf, ours = hf_sam_and_ours()
    pixels = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        mine, theirs = ours.forward_neck(pixels), hf(pixels).last_hidden_state
        compressed = ours(pixels)
    assert mine.shape == theirs.shape == (2, 16, 16, 16)
    diff = (mine - theirs).abs().max().item()
    print(f"SAM neck max|diff| vs HF at 128 px: {diff:.3e}")
    assert diff <= 1e-5
    assert compressed.shape == (2, 32, 4, 4)


@pytest.mark.parametrize("size", [96, 160], ids=["shrink", "grow"])
def test_sam_at_other_sizes_resizes_positions_like_hf_layers(size):
    """Grid 12 / 20: the global block's 31-row rel-pos tables become 23 / 39 rows, the abs table 12x12 / 20x20."""
    hf, ours = hf_sam_and_ours()
    pixels = torch.randn(1, 3, size, size)
    with torch.no_grad():
        mine, theirs = ours.forward_neck(pixels), hf_sam_neck_by_hand(hf, pixels)
        compressed = ours(pixels)
    grid = size // 8
    assert mine.shape == theirs.shape == (1, 16, grid, grid)
    diff = (mine - theirs).abs().max().item()
    print(f"SAM neck max|diff| vs HF layers at {size} px: {diff:.3e}")
    assert diff <= 1e-5
    assert compressed.shape == (1, 32, grid // 4, grid // 4)


@pytest.mark.parametrize("grid", [4, 6], ids=["pretrained-grid", "resized-grid"])
def test_clip_layers_match_hf_clip_encoder(grid):
    torch.manual_seed(0)
    hf_cfg = transformers.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                           num_attention_heads=4, image_size=4 * 14, patch_size=14,
                                           hidden_act="quick_gelu", attn_implementation="sdpa")
    hf = randomize(transformers.CLIPVisionModel(hf_cfg)).eval()
    ours = ClipEncoder(ClipConfig(width=64, depth=2, heads=4, mlp_dim=256, pos_grid=4)).eval()
    theirs = hf.state_dict()
    mapped = {ours_key: theirs.pop(hf_key) for hf_key, ours_key in per_block(CLIP_FROM_HF, 2).items()}
    for ours_key, parts in per_block(CLIP_FUSED_FROM_HF, 2).items():
        mapped[ours_key] = torch.cat([theirs.pop(p) for p in parts], dim=0)
    assert sorted(theirs) == sorted(CLIP_HF_UNUSED)
    ours.load_state_dict(mapped, strict=True)

    sam_map = torch.randn(2, 64, grid, grid)
    with torch.no_grad():
        mine = ours(sam_map)
        pos = hf.embeddings.position_embedding.weight          # class row kept, patch rows resized row-major
        patch_pos = resize_pos_grid(pos[1:].reshape(1, 4, 4, 64), grid).reshape(grid * grid, 64)
        tokens = sam_map.flatten(2).transpose(1, 2)
        x = torch.cat([hf.embeddings.class_embedding.expand(2, 1, -1), tokens], 1) + torch.cat([pos[:1], patch_pos])
        theirs = hf.encoder(inputs_embeds=hf.pre_layrnorm(x)).last_hidden_state
    assert mine.shape == theirs.shape == (2, 1 + grid * grid, 64)
    diff = (mine - theirs).abs().max().item()
    print(f"CLIP max|diff| vs HF encoder at grid {grid}: {diff:.3e}")
    assert diff <= 1e-5


def test_resize_pos_grid_identity_shape_and_fp32():
    pos = torch.randn(1, 8, 8, 16)
    assert resize_pos_grid(pos, 8) is pos
    assert resize_pos_grid(torch.full((1, 8, 8, 4), 0.5), 5).sub(0.5).abs().max() <= 1e-6   # a constant stays put
    half = pos.bfloat16()
    resized = resize_pos_grid(half, 5)
    assert resized.shape == (1, 5, 5, 16) and resized.dtype == torch.bfloat16
    assert torch.equal(resized, resize_pos_grid(half.float(), 5).bfloat16())   # computed in fp32, cast once


@pytest.mark.parametrize("size, grid", [(1024, 16), (640, 10)])
def test_d20_tower_shapes_on_meta(size, grid):
    cfg = config.d20()
    with torch.device("meta"):
        sam, clip = SamEncoder(cfg.sam), ClipEncoder(cfg.clip)
        compressed = sam(torch.empty(2, 3, size, size))
        assert compressed.shape == (2, 1024, grid, grid)
        assert clip(compressed).shape == (2, 1 + grid * grid, 1024)


def test_mini_sam_shape_at_its_image_size():
    cfg = config.mini()
    torch.manual_seed(0)
    with torch.no_grad():
        out = SamEncoder(cfg.sam)(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (2, 128, 8, 8)


def test_d20_parameter_counts_on_meta():
    cfg = config.d20()
    with torch.device("meta"):
        sam, clip = SamEncoder(cfg.sam), ClipEncoder(cfg.clip)
    count = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert abs(count(sam) - 95.57e6) / 95.57e6 <= 0.005, count(sam)
    assert abs(count(clip) - 302.6e6) / 302.6e6 <= 0.005, count(clip)


def test_bad_inputs_name_the_tensor():
    cfg = config.mini()
    with torch.device("meta"):
        sam, clip = SamEncoder(cfg.sam), ClipEncoder(cfg.clip)
        with pytest.raises(ValueError, match="pixels"):
            sam(torch.empty(1, 3, 256, 192))
        with pytest.raises(ValueError, match="sam_map"):
            clip(torch.empty(1, 64, 8, 8))


def test_activation_checkpointing_changes_nothing():
    cfg = config.mini()
    torch.manual_seed(0)
    sam, clip = SamEncoder(cfg.sam), ClipEncoder(cfg.clip)
    pixels = torch.randn(1, 3, cfg.image_size, cfg.image_size)
    results = []
    for on in (False, True):
        sam.gradient_checkpointing = clip.gradient_checkpointing = on
        sam.zero_grad(set_to_none=True), clip.zero_grad(set_to_none=True)
        out = clip(sam(pixels))
        out.square().mean().backward()
        grads = {n: p.grad.clone() for n, p in [*sam.named_parameters(), *clip.named_parameters(prefix="clip")]}
        results.append((out.detach(), grads))
    (out_off, grads_off), (out_on, grads_on) = results
    assert torch.equal(out_off, out_on)
    assert grads_off.keys() == grads_on.keys() and all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off)
