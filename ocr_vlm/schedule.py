"""The learning-rate schedule of a recipe: linear warmup, then cosine, step decay, warmdown or constant."""

from __future__ import annotations

import math

from ocr_vlm.config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on cfg.lr for the optimizer step `step` (0-based): linear warmup, then the stage's decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.decay_factor ** (step // cfg.decay_every)
    if cfg.schedule == "warmdown":
        # constant, then a straight line to the floor over the last warmdown_ratio of the run (nanochat's shape)
        left = (cfg.steps - step) / max(1.0, cfg.warmdown_ratio * cfg.steps)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * min(1.0, left)
    return 1.0
