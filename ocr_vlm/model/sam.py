"""SAM ViT-B image encoder with DeepSeek-OCR's 16x compressor (net_2, net_3), in DeepSeek's module names.

    pixels (B,3,S,S) ─ patch_embed ─▶ (B,G,G,W) + pos_embed ─ blocks (windowed; global at configured indexes,
    decomposed relative positions) ─ neck ─▶ (B,neck,G,G) ─ net_2, net_3 (3x3 stride 2) ─▶ (B,C,G/4,G/4)

Inputs other than the pretrained size work: the absolute position table is resized (bicubic, antialiased, fp32) and
the global blocks' relative-position tables are resized (linear, fp32), exactly as DeepSeek-OCR does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ocr_vlm.config import SamConfig
from ocr_vlm.model.layers import attention, resize_pos_grid, run_blocks


class LayerNorm2d(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)   # channels-last (B, G, G, W)


def resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    if table.shape[0] == length:
        return table
    resized = F.interpolate(table.float().t().unsqueeze(0), size=length, mode="linear")
    return resized.squeeze(0).t().to(table.dtype)


def rel_pos_bias(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """MViTv2's decomposed relative position bias for (B*, heads, h*w, d) queries -> (B*, heads, h*w, h*w)."""
    def table(rel: torch.Tensor, size: int) -> torch.Tensor:
        rel = resize_rel_pos(rel, 2 * size - 1)
        coords = torch.arange(size, device=rel.device)
        return rel[coords[:, None] - coords[None, :] + size - 1]          # (size, size, d)

    B, H, _, d = q.shape
    r = q.reshape(B, H, h, w, d)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", r, table(rel_h, h))
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", r, table(rel_w, w))
    return (bias_h[..., :, None] + bias_w[..., None, :]).reshape(B, H, h * w, h * w)


class Attention(nn.Module):
    def __init__(self, width: int, heads: int, rel_pos_size: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, width // heads))
        self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, width // heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, h, w, C = x.shape
        q, k, v = self.qkv(x).reshape(B, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4)   # [q | k | v] rows
        bias = rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, h, w)
        y = attention(q, k, v, mask=bias.to(q.dtype))
        return self.proj(y.transpose(1, 2).reshape(B, h, w, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.lin1 = nn.Linear(width, hidden)
        self.lin2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(F.gelu(self.lin1(x)))


class Block(nn.Module):
    """Pre-LN block; `window` > 0 attends within zero-padded non-overlapping windows, 0 attends globally."""

    def __init__(self, cfg: SamConfig, window: int):
        super().__init__()
        self.window = window
        self.norm1 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.attn = Attention(cfg.width, cfg.heads, window or cfg.grid)
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)
        self.mlp = MLP(cfg.width, int(cfg.width * cfg.mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        if self.window:
            B, H, W, C = y.shape
            s = self.window
            ph, pw = -H % s, -W % s
            y = F.pad(y, (0, 0, 0, pw, 0, ph))
            Hp, Wp = H + ph, W + pw
            y = y.reshape(B, Hp // s, s, Wp // s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, s, s, C)
            y = self.attn(y)
            y = y.reshape(B, Hp // s, Wp // s, s, s, C).permute(0, 1, 3, 2, 4, 5).reshape(B, Hp, Wp, C)
            y = y[:, :H, :W]
        else:
            y = self.attn(y)
        x = x + y
        return x + self.mlp(self.norm2(x))


class SamEncoder(nn.Module):
    def __init__(self, cfg: SamConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.grid, cfg.grid, cfg.width))
        self.blocks = nn.ModuleList(
            Block(cfg, 0 if i in cfg.global_attn_indexes else cfg.window_size) for i in range(cfg.depth))
        n = cfg.neck_channels
        self.neck = nn.Sequential(nn.Conv2d(cfg.width, n, 1, bias=False), LayerNorm2d(n),
                                  nn.Conv2d(n, n, 3, padding=1, bias=False), LayerNorm2d(n))
        c2, c3 = cfg.compressor_channels
        self.net_2 = nn.Conv2d(n, c2, 3, stride=2, padding=1, bias=False)
        self.net_3 = nn.Conv2d(c2, c3, 3, stride=2, padding=1, bias=False)
        self.gradient_checkpointing = False
        if self.pos_embed.device.type != "meta":
            nn.init.trunc_normal_(self.pos_embed, std=0.02)   # SAM trains it from zeros; a random init breaks symmetry

    def forward_neck(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,S,S) -> (B, neck_channels, S/p, S/p): what HF's SamVisionEncoder returns."""
        p = self.cfg.patch_size
        if pixels.ndim != 4 or pixels.shape[1] != 3 or pixels.shape[2] != pixels.shape[3] or pixels.shape[2] % p:
            # The position table is resized to a square grid; anything else would fail deep inside with a shape error.
            raise ValueError(f"pixels: expected (B, 3, S, S) with S a multiple of sam.patch_size={p}, "
                             f"got {tuple(pixels.shape)}")
        x = self.patch_embed(pixels)
        x = x + resize_pos_grid(self.pos_embed, x.shape[1]).to(x.dtype)
        x = run_blocks(self.blocks, x, self.gradient_checkpointing)
        return self.neck(x.permute(0, 3, 1, 2))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.net_3(self.net_2(self.forward_neck(pixels)))
