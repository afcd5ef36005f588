"""The two training stages of DeepSeek-OCR as data, the command line that selects and overrides them, freezing,
and the learning-rate schedule. Nothing here knows about DeepSpeed.

stage 1: everything trains, AdamW lr 5e-5, warmup then cosine, seq_len 4096, vision data only.
stage 2: SAM + compressor frozen; CLIP, projector and GPT train; lr 3e-5, x0.1 every 2000 steps, seq_len 8192,
         10% text-only samples.
"""

from __future__ import annotations

import math

from ocr_vlm import config
from ocr_vlm.config import ConfigError, TrainConfig

STAGES = {
    1: {"lr": 5e-5, "schedule": "cosine", "warmup_steps": 100, "freeze": (), "output_dir": "runs/stage1",
        "data.seq_len": 4096, "data.text_ratio": 0.0},
    2: {"lr": 3e-5, "schedule": "step", "warmup_steps": 100, "decay_every": 2000, "decay_factor": 0.1,
        "freeze": ("sam",), "output_dir": "runs/stage2", "data.seq_len": 8192, "data.text_ratio": 0.1},
}


def build_config(overrides: list[str]) -> TrainConfig:
    """Preset and stage first (they choose the defaults), then every `--key=value` in the order given."""
    picked = dict(arg[2:].split("=", 1) for arg in overrides if arg.startswith(("--preset=", "--stage=")))
    try:
        stage = int(picked.get("stage", 1))
    except ValueError:
        raise ConfigError(f"stage: expected 1 or 2, got {picked['stage']!r}") from None
    if stage not in STAGES:
        raise ConfigError(f"stage: {stage} is not 1 or 2")
    preset = picked.get("preset", "tiny")
    cfg = TrainConfig(stage=stage, preset=preset, model=config.preset(preset))
    for arg in overrides:                  # a resolution mode sets image_size and its resize rule together
        if arg.startswith("--mode="):
            cfg.model.set_mode(arg.split("=", 1)[1])
    defaults = [f"--{k}={','.join(v) if isinstance(v, tuple) else v}" for k, v in STAGES[stage].items()]
    # One pass, so validation sees the stage defaults and the user's values together.
    return config.strict_overrides(cfg, defaults + [a for a in overrides if not a.startswith("--mode=")])


def freeze(model, components: tuple[str, ...]) -> None:
    """requires_grad=False on the named components; the engine then only ever sees the trainable rest."""
    for name in components:
        for p in model.component_parameters(name):
            p.requires_grad_(False)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Factor on cfg.lr for the optimizer step `step` (0-based): linear warmup, then the stage's decay."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.decay_factor ** (step // cfg.decay_every)
    return 1.0
