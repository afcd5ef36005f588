"""CLIP-L's transformer body, fed with compressed SAM tokens as its patch embeddings (DeepSeek-OCR's `vision_model`).

    SAM map (B,C,g,g) ─ flatten ─▶ [class] + tokens + positions (resized when g differs from the pretrained 16)
    ─ pre_layrnorm ─ pre-LN layers (quick-GELU) ─▶ (B, 1+g², C)          no post-LayerNorm, as in DeepSeek-OCR

CLIP's pixel patch-embedding conv is not built: SAM replaces it, and a parameter that never gets a gradient only
costs optimizer state (and trips DDP-style unused-parameter checks).
"""

from __future__ import annotations

import torch
from torch import nn

from ocr_vlm.config import ClipConfig
from ocr_vlm.model.layers import attention, resize_pos_grid, run_blocks


class Embeddings(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.grid = cfg.pos_grid
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width ** -0.5)
        self.position_embedding = nn.Embedding(cfg.pos_grid ** 2 + 1, cfg.width)
        if self.class_embedding.device.type != "meta":
            # CLIP's init: small positions. nn.Embedding's N(0, 1) would drown the SAM tokens' content, and every
            # image would look alike to the projector (vision collapse) before training even starts.
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, grid: int) -> torch.Tensor:
        pos = self.position_embedding.weight
        patch_pos = pos[1:].reshape(1, self.grid, self.grid, -1)
        patch_pos = resize_pos_grid(patch_pos, grid).reshape(grid * grid, -1)
        pos = torch.cat([pos[:1], patch_pos], dim=0)
        cls = self.class_embedding.to(tokens.dtype).expand(tokens.shape[0], 1, -1)
        return torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv_proj = nn.Linear(width, 3 * width)      # fused [q | k | v], as DeepSeek stores it
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv_proj(x).view(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        y = attention(q, k, v)
        return self.out_proj(y.transpose(1, 2).reshape(B, N, C))


class MLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))   # quick-GELU, what CLIP-L was trained with


class Layer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.self_attn = SelfAttention(cfg.width, cfg.heads)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=1e-5)
        self.mlp = MLP(cfg.width, cfg.mlp_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.layers = nn.ModuleList(Layer(cfg) for _ in range(cfg.depth))


class ClipEncoder(nn.Module):
    def __init__(self, cfg: ClipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=1e-5)   # sic: the checkpoint's spelling
        self.transformer = Transformer(cfg)
        self.gradient_checkpointing = False

    def forward(self, sam_map: torch.Tensor) -> torch.Tensor:
        """(B, C, g, g) compressed SAM features -> (B, 1 + g*g, C), class token first."""
        if sam_map.ndim != 4 or sam_map.shape[1] != self.cfg.width or sam_map.shape[2] != sam_map.shape[3]:
            raise ValueError(f"sam_map: expected (B, clip.width={self.cfg.width}, g, g), got {tuple(sam_map.shape)}")
        x = self.embeddings(sam_map.flatten(2).transpose(1, 2), sam_map.shape[-1])
        x = self.pre_layrnorm(x)
        return run_blocks(self.transformer.layers, x, self.gradient_checkpointing)
