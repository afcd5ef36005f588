"""Pieces the towers and the GPT share: attention on fused kernels only, position-table resizing and per-block
activation checkpointing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

# Not MATH, which materialises every head's (T, T) scores. FLASH takes no attn_mask, so a masked call (SAM's
# relative-position bias, generation's padding mask) may only run on the two kernels that take one.
UNMASKED_KERNELS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]
MASKED_KERNELS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
              causal: bool = False, gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention; on CUDA only a fused kernel may run it.

    Given inputs no fused kernel takes, torch silently falls back to its math kernel, which materialises the
    (T, T) scores of every head: a slow, memory-hungry step that looks like a working one (at SAM's 4096-patch
    global blocks, an OOM an hour into a run). Here it is an error naming the inputs.
    """
    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)

    if q.device.type != "cuda":
        return sdpa()
    try:
        with sdpa_kernel(UNMASKED_KERNELS if mask is None else MASKED_KERNELS):
            return sdpa()
    except RuntimeError as err:
        if "No available kernel" not in str(err):     # torch's words when every allowed kernel refused
            raise
        raise RuntimeError(
            f"no fused attention kernel takes {q.dtype} q {tuple(q.shape)}, k {tuple(k.shape)} (head dim "
            f"{q.shape[-1]}), {'a ' + str(mask.dtype) + ' mask' if mask is not None else 'no mask'}, "
            f"enable_gqa={gqa}; torch's warnings above give each kernel's reason") from err


def resize_pos_grid(pos: torch.Tensor, size: int) -> torch.Tensor:
    """(1, H, W, C) channels-last table -> (1, size, size, C): bicubic, antialiased, in fp32, as DeepSeek-OCR does."""
    if pos.shape[1] == size:
        return pos
    grid = pos.permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return grid.to(pos.dtype).permute(0, 2, 3, 1)


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, checkpointed: bool) -> torch.Tensor:
    """Apply blocks in order; with `checkpointed`, each block's activations are recomputed in backward.

    Non-reentrant checkpointing: correct when the tower's own parameters are frozen and under ZeRO-3.
    """
    for block in blocks:
        x = checkpoint(block, x, use_reentrant=False) if checkpointed and torch.is_grad_enabled() else block(x)
    return x
