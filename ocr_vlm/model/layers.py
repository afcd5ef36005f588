"""Pieces both vision towers share: position-table resizing and per-block activation checkpointing."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


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
