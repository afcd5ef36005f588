"""Training FLOPs from the config — vision towers and attention included — and MFU against a device peak table.

Conventions: a multiply-add is 2 FLOPs; training costs 3x the forward pass for a trained part (forward + backward for
inputs and weights) and 1x for a frozen part that nothing upstream needs gradients through (stage 2's SAM). The GPT
uses nanochat's estimate (6 per non-embedding parameter + 12·L·H·Dh·T per token, T the keys a token attends), so MFU
numbers are comparable; packed rows attend document by document (model/gpt.py Documents), so T is the token's
document length and a row's attention costs 12·L·H·Dh·Σ length², not 12·L·H·Dh·seq_len².
"""

from __future__ import annotations

import dataclasses

import torch

from ocr_vlm.config import VLMConfig

# Dense bf16 tensor-core peaks in FLOP/s, matched against torch.cuda.get_device_name().
PEAK_FLOPS = {
    "H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12,
    "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12,
}


def _transformer_forward(tokens: int, width: int, mlp: int, depth: int, attended: int) -> float:
    """Per image: qkv + out projections, MLP, and attention scores + weighted sum over `attended` keys."""
    linear = 2 * tokens * depth * (4 * width * width + 2 * width * mlp)
    attention = 2 * 2 * tokens * attended * width * depth
    return linear + attention


def sam_forward_flops(cfg: VLMConfig) -> float:
    s = cfg.sam
    grid = cfg.image_size // s.patch_size
    tokens, mlp = grid * grid, int(s.width * s.mlp_ratio)
    windowed = s.depth - len(s.global_attn_indexes)
    flops = 2 * tokens * 3 * s.patch_size ** 2 * s.width                       # patch embedding conv
    flops += _transformer_forward(tokens, s.width, mlp, windowed, s.window_size ** 2)
    flops += _transformer_forward(tokens, s.width, mlp, len(s.global_attn_indexes), tokens)
    flops += 2 * tokens * (s.width * s.neck_channels + 9 * s.neck_channels ** 2)  # neck convs
    c2, c3 = s.compressor_channels
    flops += 2 * (tokens // 4) * 9 * s.neck_channels * c2 + 2 * (tokens // 16) * 9 * c2 * c3
    return flops


def clip_forward_flops(cfg: VLMConfig) -> float:
    c = cfg.clip
    tokens = cfg.vision_grid ** 2 + 1
    return _transformer_forward(tokens, c.width, c.mlp_dim, c.depth, tokens)


def projector_forward_flops(cfg: VLMConfig) -> float:
    return 2 * cfg.vision_grid ** 2 * (cfg.clip.width + cfg.sam.compressor_channels[1]) * cfg.gpt.n_embd


def gpt_train_flops_per_token(cfg: VLMConfig) -> float:
    """Everything but attention's scores and weighted sum: 6 per non-embedding parameter."""
    g = cfg.gpt
    non_embedding = g.n_layer * (2 * g.n_embd * g.n_head * g.head_dim + 2 * g.n_embd * g.n_kv_head * g.head_dim
                                 + 8 * g.n_embd * g.n_embd) + g.vocab_size * g.n_embd   # blocks + lm_head
    return 6 * non_embedding


def gpt_attention_train_flops(cfg: VLMConfig, squared_lengths: int) -> float:
    """Attention over documents whose squared lengths sum to `squared_lengths` (nanochat counts every key, not half)."""
    g = cfg.gpt
    return 12 * g.n_layer * g.n_head * g.head_dim * squared_lengths


def squared_document_lengths(doc_ids: torch.Tensor) -> int:
    """Σ length² over the documents of packed rows (runs of equal doc_ids in a row; padding, -1, is no document)."""
    total = 0
    for row in doc_ids:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        total += int(counts[ids >= 0].square().sum())
    return total


def image_train_flops(cfg: VLMConfig, frozen: tuple[str, ...], side: int | None = None) -> float:
    """One image (or, with `side`, one view of that side: a Gundam tile) through the towers in training. Gradients
    flow back through a frozen CLIP when SAM trains."""
    if side is not None:
        cfg = dataclasses.replace(cfg, image_size=side)
    sam = sam_forward_flops(cfg) * (1 if "sam" in frozen else 3)
    clip_needs_backward = "clip" not in frozen or "sam" not in frozen
    clip = clip_forward_flops(cfg) * (3 if clip_needs_backward else 1)
    projector = projector_forward_flops(cfg) * 3
    return sam + clip + projector


def peak_flops(device_name: str) -> float | None:
    """Peak bf16 FLOP/s of one device, or None where unknown (CPUs included: MFU is then not reported)."""
    for name, peak in PEAK_FLOPS.items():
        if name in device_name:
            return peak
    return None
