"""The trainer: DeepSpeed is imported here (and in dist.py, the process group) and nowhere else.

    recipe + ds_config ─▶ model (pretrained init, freeze, activation checkpointing) ─▶ deepspeed.initialize
    resume: every checkpoint file loaded weights-only (no unpickling); the loader continues where the run was
    loader (this rank's packed batches) ─▶ a step's gas micro-batches, their supervised tokens counted over all ranks
    ─▶ micro-steps: forward, non-finite guard, backward of the token-loss sum over that count, engine.step
    every step: metrics (JSONL + W&B), divergence guard; every N: validation, checkpoint (DeepSpeed state + every
    rank's loader/RNG)
    end: checkpoint; rank 0 exports it (export_checkpoint: weights, config, tokenizer) once the process group is gone

Runs under the `deepspeed` launcher, torchrun, or as one plain python process (rank 0 of 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pickle
import random
import re
import shutil
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as torch_dist
from torch import nn
from deepspeed.accelerator import get_accelerator
from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                            UNIVERSAL_CHECKPOINT_VERSION_VALUE)
from deepspeed.runtime.fp16.loss_scaler import LossScaler
from deepspeed.runtime.zero.config import ZeroStageEnum
from deepspeed.utils import safe_get_full_grad
from deepspeed.utils.tensor_fragment import fragment_address

from ocr_vlm import cli, config, dist, flops, weights
from ocr_vlm.config import COMPONENTS, ConfigError, TrainConfig
from ocr_vlm.data.loader import Loader, batch_reading
from ocr_vlm.data.sample import read_examples
from ocr_vlm.data.stream import ShardSet
from ocr_vlm.diagnostics import VisionShare, head_verdict, mismatched, towers_verdict, verdict
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import CLASSES
from ocr_vlm.model.vlm import VLM, build_model, parameter_table
from ocr_vlm.metrics import scores
from ocr_vlm.report import read_back
from ocr_vlm.schedule import lr_multiplier
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer
from ocr_vlm.tracking import Tracker

CHECKPOINTS = "checkpoints"
# The only non-container, non-tensor types in a checkpoint this trainer resumes from, as listed by
# torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2, ZeRO-3 and ds_to_universal checkpoints
# (DeepSpeed's optimizer state holds these; the client state is plain Python and tensors).
CHECKPOINT_GLOBALS = [ZeroStageEnum, LossScaler, fragment_address]


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what to do."""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Train nano-DeepSeek-OCR with DeepSpeed: deepspeed launch/train.py --ds_config FILE [--key=value ...]",
        epilog=recipe_help(), formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--ds_config", required=True, help="DeepSpeed config JSON (ds_configs/*.json)")
    parser.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    args, overrides = parser.parse_known_args(argv)
    try:
        cfg = cli.train_config(overrides)
        check_inputs(cfg, args.ds_config, world=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as e:
        if os.environ.get("RANK", "0") == "0":        # every rank finds the same fault; one line says it
            print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    dist.init()
    rank = dist.rank()
    # On an exception this rank exits non-zero and the launcher stops the others; waiting for them here would hang.
    with _one_line_errors():
        trainer = Trainer(cfg, args.ds_config)
        final = trainer.run()
    torch_dist.barrier()
    torch_dist.destroy_process_group()   # without it a rank can abort at exit and fail the launcher
    if rank == 0:
        # Exported from the files just saved, after the process group is gone: no rank waits in a collective for
        # this (a ZeRO-3 gather of the whole model on the host can outlast NCCL's timeout), and no GPU is needed.
        with _one_line_errors():
            export = export_checkpoint(final, Path(cfg.output_dir) / "export", trusted=True)
        trainer.tracker.log_artifact(export, "export", "model")
    trainer.tracker.close()


def check_inputs(cfg: TrainConfig, ds_config: str, world: int) -> None:
    """What the run will read must exist and fit together, checked before any rank builds a model."""
    if not Path(ds_config).is_file():
        raise ConfigError(f"--ds_config: {ds_config} does not exist")
    if cfg.global_batch % (cfg.micro_batch * world):
        raise ConfigError(f"global_batch: {cfg.global_batch} rows is not a multiple of micro_batch "
                          f"{cfg.micro_batch} x {world} ranks")
    for name, spec in (("data.shards", cfg.data.shards), ("data.text_shards", cfg.data.text_shards),
                       ("val_shards", cfg.val_shards)):
        if spec:
            try:
                ShardSet.from_spec(spec)
            except ValueError as e:
                raise ConfigError(f"{name}: {e}") from None
    if cfg.resume not in ("", "auto") and not (Path(cfg.resume) / "mp_rank_00_model_states.pt").is_file() \
            and not (Path(cfg.resume) / "zero").is_dir():
        raise ConfigError(f"resume: {cfg.resume} is not a checkpoint directory (no mp_rank_00_model_states.pt)")


def recipe_help() -> str:
    """--help's list of every recipe key with its default (mini preset, stage 1) and what the other presets change."""
    base = dict((key, value) for key, value, _ in cli.keys(cli.train_config([])))
    lines = ["recipe options, --key=value (defaults: --preset=mini --stage=1):", cli.help_text(cli.train_config([]))]
    for arg in ("--stage=2", "--preset=d20", "--preset=mini16"):
        other = cli.keys(cli.train_config([arg, "--data.text_shards=TEXT"]))
        changed = [f"{key}={cli.show(value)}" for key, value, _ in other if value != base[key] and value != "TEXT"]
        lines.append(f"{arg} changes: {', '.join(changed)}")
    return "\n".join(lines)


class Trainer:
    def __init__(self, cfg: TrainConfig, ds_config_path: str):
        self.cfg = cfg
        self.rank, self.world = dist.rank(), dist.world()
        self.device = torch.device(get_accelerator().device_name(), int(os.environ.get("LOCAL_RANK", 0))) \
            if get_accelerator().device_name() != "cpu" else torch.device("cpu")
        self.on_gpu = self.device.type != "cpu"
        self.out = Path(cfg.output_dir)
        self.tokenizer_path = cfg.tokenizer or str(MINI_TOKENIZER)
        _seed_everything(cfg.seed)

        self.model = self._build_model()
        resume_from = checkpoint_to_resume(cfg)
        self.deepspeed_config, chose = deepspeed_config(ds_config_path, cfg, self.world, self.device)
        self.zero_stage = self.deepspeed_config["zero_optimization"].get("stage", 0)
        if cfg.val_read and self.zero_stage == 3:    # said before training, not at the first validation
            raise ConfigError("val_read: generation needs whole parameters on every rank (ZeRO-0/1/2)")
        if resume_from is not None and (resume_from / "zero").is_dir():
            # ds_to_universal's output: parameters stored whole, so any world size can load them.
            self.deepspeed_config["checkpoint"] = {"load_universal": True}
        optimizer = _optimizer(param_groups(self.model, cfg), cfg, offload=_offloads_optimizer(self.deepspeed_config))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))
        self.model_engine, _, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=scheduler, config=self.deepspeed_config)
        self.gas = self.model_engine.gradient_accumulation_steps()
        dist.print0(f"deepspeed: ZeRO-{self.zero_stage}, "
                    f"{'bf16' if self._bf16 else 'fp32'}, {type(optimizer).__name__}, {self.world} rank(s) x "
                    f"{cfg.micro_batch} row(s) x {self.gas} accumulation = {cfg.global_batch} rows per step"
                    + (f"; {chose}" if chose else ""))
        resolved = self._save_resolved_config()
        self.loader = Loader(cfg.data, cfg.model, self.tokenizer_path, self.rank, self.world, batch_rows=cfg.micro_batch)
        self.step, self.samples_seen, self.train_seconds = 0, 0, 0.0
        self.divergence = DivergenceGuard(cfg.diverge_steps, cfg.diverge_loss)
        self.bad_in_a_row = 0              # non-finite micro-batch losses in a row, across steps
        self.read_examples = None          # (tokenizer, this rank's share of the pages val_read reads back)
        self.recent_reading = [0.0, 0]     # the head's character readout's loss summed over the steps since the last
                                           # validation, steps
        self.tracker = Tracker(self.out, resolved, enabled=self.rank == 0, use_wandb=cfg.wandb,
                               project=cfg.wandb_project, run_name=cfg.run_name, resume=resume_from is not None)
        self.frozen_before = {n: p.detach().clone() for n, p in self.model.named_parameters() if not p.requires_grad} \
            if cfg.freeze and self.zero_stage < 3 else {}
        self.image_flops = flops.image_train_flops(cfg.model, cfg.freeze)
        self.tile_flops = flops.image_train_flops(cfg.model, cfg.freeze, side=cfg.model.tile_size) \
            if cfg.model.tile_size else 0.0
        self.token_flops = flops.gpt_train_flops_per_token(cfg.model)
        self.peak = flops.peak_flops(torch.cuda.get_device_name(self.device)) if self.on_gpu else None
        if resume_from is not None:
            self.resume(resume_from)

    # ------------------------------------------------------------------------------------------------------------
    def _build_model(self):
        cfg = self.cfg
        weights.check_tokenizer(Tokenizer.load(self.tokenizer_path), cfg.model, self.tokenizer_path)
        model = build_model(cfg.model)
        for item in filter(None, cfg.init.split(",")):
            fmt, _, path = item.partition("=")
            dist.print0(str(weights.load_pretrained(model, path, fmt)))
        model.freeze(cfg.freeze)
        model.set_activation_checkpointing(cfg.checkpointing)
        dist.print0(parameter_table(model))
        return model

    def _save_resolved_config(self) -> dict:
        """The run's whole configuration as it runs (recipe with model and data, DeepSpeed's config with "auto"
        filled in): printed, kept as output_dir/config.json, and returned (W&B's run config)."""
        resolved = {"recipe": config.to_dict(self.cfg), "deepspeed_config": self.deepspeed_config}
        dist.print0(f"config:\n{json.dumps(resolved, indent=1)}")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
        return resolved

    # ------------------------------------------------------------------------------------------------------------
    def run(self) -> Path:
        """Train to cfg.steps; returns the final checkpoint (main exports it once no rank waits on another)."""
        batches = iter(self.loader)
        while self.step < self.cfg.steps:
            started, lr = time.perf_counter(), self.scheduler.get_last_lr()[0]
            inspect = self._component_grad_norms if self._logs(self.step + 1) and self.zero_stage < 3 else None
            sums, counters, skipped_micro, grad_norms = self.train_step([next(batches) for _ in range(self.gas)],
                                                                        batches, inspect)
            self.step += 1
            metrics = self._log(sums, lr, counters, skipped_micro, grad_norms or {}, time.perf_counter() - started)
            # fp16's loss scaler skips overflowing steps itself (many in a row while it calibrates): not divergence.
            scaler_skipped = self.model_engine.fp16_enabled() and not self.model_engine.was_step_applied()
            self.divergence.check(self.step, metrics["loss"], None if scaler_skipped else metrics["grad_norm"],
                                  self.cfg.lr)          # before any save or export
            if self.cfg.val_every and self.step % self.cfg.val_every == 0:
                self.validate()
            if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                self.save()
        self.save()
        self._check_frozen()
        return self.out / CHECKPOINTS / f"step{self.step:06d}"

    def train_step(self, micro_batches: list[dict], spares, inspect=None):
        """One optimizer step on this rank's `gas` micro-batches, whose gradient is that of the mean token loss over
        the global batch (every micro-batch of every rank), plus reading_weight x the mean reading loss per image.

        Each micro-batch contributes its summed token loss over the step's global count of supervised tokens (one
        all-reduce, before any forward), so a row with few response tokens weighs what its tokens do, not what a
        row does. DeepSpeed would divide by gas (skipped here: scale_wrt_gas=False) and averages gradients over the
        ranks (undone by x world size). `inspect` runs on the step's gradient, before the update; a micro-batch
        whose loss is non-finite on any rank is replaced from `spares` on every rank.
        Returns (this rank's (token, reading head, pointer, the head's character readout) loss sums, counters,
        micro-batches skipped, inspect's result)."""
        reading_on = self.cfg.reading_weight > 0
        local = [[b["counters"].get("target_tokens", 0), b["counters"].get("vision_samples", 0)] for b in micro_batches]
        step_tokens, step_images = (max(x, 1.0) for x in
                                    self._sum_over_ranks(torch.tensor(local, dtype=torch.float64).sum(0)).tolist())
        queue, done, skipped, result = list(micro_batches), 0, 0, None
        sums, counters = torch.zeros(4, dtype=torch.float64, device=self.device), {}
        while done < self.gas:
            batch = queue.pop(0) if queue else next(spares)
            n, i = (batch["counters"].get(k, 0) for k in ("target_tokens", "vision_samples"))
            lm, head, pointer = self._forward(batch, reading=reading_on)
            # model losses are means: the token loss per token, the reading head's (its readouts' mean, and the
            # first's alone for the towers' verdict) and the pointer's per image
            token_sum = lm * n
            reading_sums = torch.stack([head.mean(), pointer, head[0]]) * i if reading_on else lm.new_zeros(3)
            loss = self.world * (token_sum / step_tokens
                                 + self.cfg.reading_weight * reading_sums[:2].sum() / step_images)
            if dist.any_rank_non_finite(loss):
                # Every rank drops this micro-batch together (no backward, no engine.step), so the optimizer never
                # sees a non-finite gradient; a fresh one takes its place (weighted by the step's count as drawn).
                self.bad_in_a_row, skipped = self.bad_in_a_row + 1, skipped + 1
                dist.print0(f"step {self.step}: non-finite loss, micro-batch skipped ({self.bad_in_a_row} in a row)")
                if self.bad_in_a_row >= self.cfg.max_bad_steps:
                    raise TrainingError(f"{self.bad_in_a_row} non-finite losses in a row at step {self.step}: "
                                        "lower the lr, check the data, or resume from an earlier checkpoint")
                continue
            self.bad_in_a_row = 0
            self.model_engine.backward(loss, scale_wrt_gas=False)
            done += 1
            if done == self.gas and inspect is not None:
                result = inspect()              # the step's gradient exists only until it is taken
            self.model_engine.step()
            sums += torch.cat([token_sum.detach().view(1), reading_sums.detach()]).double()
            for k, v in batch["counters"].items():
                counters[k] = counters.get(k, 0) + v
        self._average_running_statistics()
        return sums, counters, skipped, result

    def _average_running_statistics(self) -> None:
        """Set every rank's running statistics to their mean over the ranks. Each rank moved its own towards its
        own pages; left apart, the ranks would normalise the same page differently, and the checkpoint (rank 0's
        buffers) would resume the other ranks on statistics they never had. The update is linear in the batch
        statistics, so the mean is the update by the ranks' mean batch statistics."""
        stats = self.model.running_statistics()
        if self.world == 1 or not stats:
            return
        mean = self._sum_over_ranks(torch.cat([s.flatten().double() for s in stats])) / self.world
        for s, m in zip(stats, mean.split([s.numel() for s in stats])):
            s.copy_(m.view_as(s))

    def _forward(self, batch: dict, pixels: torch.Tensor | None = None, reading: bool = False):
        """(cross-entropy, the reading head's readouts' losses, pointer's loss), or (cross-entropy, None, None)
        without `reading`.
        `pixels` replaces the batch's global views (the mismatched-image check; Gundam tiles stay the page's own,
        their count is fixed by the placeholders)."""
        tensors = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if isinstance(v, torch.Tensor)}
        pixels = tensors["pixel_values"] if pixels is None else pixels.to(self.device)
        out = self.model_engine(tensors["input_ids"], targets=tensors["targets"],
                          pixel_values=pixels,
                          position_ids=tensors["position_ids"], doc_ids=tensors["doc_ids"],
                          reading=batch_reading(tensors, self.device) if reading else None,
                          tile_values=tensors["tile_values"],
                          tile_grids=tensors["tile_grids"])
        return out if reading else (out, None, None)

    def _logs(self, step: int) -> bool:
        """Whether `step` prints and records its metrics (the same answer on every rank)."""
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def _component_grad_norms(self) -> dict:
        """Each trainable component's gradient norm: a tower whose gradient stays near zero is not learning.
        Every rank calls this (ZeRO-1/2 assemble partitioned gradients collectively). Not under ZeRO-3, whose
        gradient reduction may still be in flight here: gathering then mismatches the ranks' collectives."""
        norms = {}
        for name in COMPONENTS:
            grads = [safe_get_full_grad(p) for p in self.model.component_parameters(name) if p.requires_grad]
            if grads:
                norms[name] = sum(g.float().square().sum().item() for g in grads if g is not None) ** 0.5
        return norms

    @property
    def _bf16(self) -> bool:
        return bool(self.deepspeed_config.get("bf16", {}).get("enabled"))

    def _log(self, sums: torch.Tensor, lr: float, counters: dict, skipped_micro: int, grad_norms: dict,
             dt: float) -> dict:
        """`sums`: this rank's (token, reading head, pointer, the head's character readout) losses summed over the
        step's supervised tokens and images (the last three per image). Returns the step's metrics, the same on every
        rank: the loss is the mean over the global batch's supervised tokens."""
        counts = torch.tensor([counters.get(k, 0) for k in ("target_tokens", "tokens", "samples", "vision_samples",
                                                            "tiles", "squared_lengths")]
                              + [sum(v for k, v in counters.items() if k.startswith("skipped/"))], dtype=torch.float64)
        totals = self._sum_over_ranks(torch.cat([sums, counts.to(sums.device)]))     # the step's one reduction of metrics
        target_tokens, tokens, samples, images, tiles, squared_lengths, skipped = (int(x) for x in totals[4:])
        loss_mean = totals[0].item() / max(target_tokens, 1)
        reading_mean, pointer_mean, character_mean = (totals[k].item() / max(images, 1) for k in (1, 2, 3))
        grad_norm = self.model_engine.get_global_grad_norm()
        train_flops = (tokens * self.token_flops + flops.gpt_attention_train_flops(self.cfg.model, squared_lengths)
                       + images * self.image_flops + tiles * self.tile_flops)
        metrics = {"loss": loss_mean, "lr": lr,
                   "grad_norm": float(grad_norm) if grad_norm is not None else None,
                   "dt_ms": dt * 1000, "tokens_per_s": tokens / dt, "samples_per_s": samples / dt,
                   "tflops_per_s": train_flops / dt / 1e12, "skipped_samples": skipped,
                   "skipped_micro_batches": skipped_micro, "samples_seen": self.samples_seen + samples,
                   **{f"grad_norm/{name}": norm for name, norm in grad_norms.items()}}
        self.samples_seen, self.train_seconds = metrics["samples_seen"], self.train_seconds + dt
        if self.cfg.reading_weight:
            metrics["reading_loss"], metrics["reading_character_loss"] = reading_mean, character_mean
            self.recent_reading[0] += character_mean        # the towers' verdict at the next validation
            self.recent_reading[1] += 1
        if self.cfg.model.reading_pointer:
            metrics["pointer_loss"] = pointer_mean
        if self.peak:
            metrics["mfu"] = train_flops / dt / (self.peak * self.world)
        if self.on_gpu:     # this rank's high-water marks since start: what `python -m ocr_vlm.plan` plans
            metrics["peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            metrics["peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
        if self.rank == 0 and self._logs(self.step):
            mfu = f"mfu {metrics['mfu'] * 100:.1f}%" if self.peak else "mfu n/a (cpu)"
            mem = f" | mem {metrics['peak_reserved_gib']:.1f} GiB" if self.on_gpu else ""
            grad = f"{metrics['grad_norm']:.3f}" if metrics["grad_norm"] is not None else "n/a"
            reading = f"reading {reading_mean:.4f} | " if self.cfg.reading_weight else ""
            reading += f"pointer {pointer_mean:.4f} | " if "pointer_loss" in metrics else ""
            towers = " ".join(f"{name} {norm:.2e}" for name, norm in grad_norms.items())
            print(f"step {self.step:05d}/{self.cfg.steps:05d} | loss {loss_mean:.4f} | {reading}lr {metrics['lr']:.2e} | "
                  f"grad {grad} ({towers}) | dt {dt * 1000:.0f}ms | tok/s {metrics['tokens_per_s']:,.0f} | "
                  f"samples/s {metrics['samples_per_s']:.2f} | {mfu}{mem} | skipped {skipped}", flush=True)
        self.tracker.log(self.step, metrics)
        return metrics

    def _sum_over_ranks(self, values: torch.Tensor) -> torch.Tensor:
        return dist.sum_over_ranks(values, self.device)

    # ------------------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self) -> dict:
        """Validation loss over every target token of the val shards (each sample once across ranks), and whether the
        model reads: the loss with each sample given another sample's image, the image-dependent share of the
        vision tokens (diagnostics.py), and with a reading head, how many of the characters whose place the pages
        know it names."""
        val_data = dataclasses.replace(self.cfg.data, shards=self.cfg.val_shards, text_ratio=0.0, num_workers=0)
        batches = iter(Loader(val_data, self.cfg.model, self.tokenizer_path, self.rank, self.world, finite=True,
                              batch_rows=self.cfg.micro_batch))
        self.model_engine.eval()
        # own and other image loss x tokens, tokens; which bytes the pages hold (the reading head's classes)
        total, classes, last = torch.zeros(3, dtype=torch.float64), torch.zeros(CLASSES, dtype=torch.float64), None
        share = VisionShare(self.cfg.model.vision_grid ** 2, self.cfg.model.gpt.n_embd)
        module = self.model_engine.module
        head = module.reading_head
        named = torch.zeros(len(head.accuracies) + 1 if head is not None else 1, dtype=torch.float64)   # its `named`
        while True:
            batch = next(batches, None)
            # ZeRO-3 gathers parameters collectively: ranks whose share ran out repeat a batch with zero weight.
            if not dist.any_rank(batch is not None, self.device):
                break
            weight = 1.0 if batch is not None else 0.0
            batch, previous = (batch if batch is not None else last), (last["pixel_values"] if last else None)
            n = int((batch["targets"] != IGNORE_INDEX).sum()) * weight
            # a model told where its pointer reads is told it here as in training (the page's own, either image)
            told = self.cfg.model.reading_place
            own, *_ = self._forward(batch, reading=told)
            other, *_ = self._forward(batch, pixels=mismatched(batch["pixel_values"], previous), reading=told)
            total += torch.tensor([own.float().item() * n, other.float().item() * n, n], dtype=torch.float64)
            if weight:
                classes[batch["reading_targets"]] = 1
            pixels = batch["pixel_values"].to(self.device)
            if len(pixels):      # weighted or not: ZeRO-3's gathers are collectives every rank takes part in
                projected = module.projected_tokens(pixels)
                tokens, read = module.read_tokens(projected, head=True)
                if head is not None:
                    named += head.named(read, batch_reading(batch, self.device)).cpu().double() * weight
                if weight:
                    share.add(tokens)
            last = batch
        total, share.moments = self._sum_over_ranks(total), self._sum_over_ranks(share.moments)
        classes, named = self._sum_over_ranks(classes), self._sum_over_ranks(named)
        self.model_engine.train()
        tokens = total[2].clamp(min=1)
        result = {"eval/loss": (total[0] / tokens).item(), "eval/loss_other_image": (total[1] / tokens).item(),
                  "eval/vision_share": share.share()}
        result["eval/image_gap"] = result["eval/loss_other_image"] - result["eval/loss"]
        dist.print0(f"step {self.step:05d} | val loss {result['eval/loss']:.4f} over {int(total[2])} target tokens | "
                    f"with another page's image {result['eval/loss_other_image']:.4f} | image-dependent share of "
                    f"vision tokens {result['eval/vision_share']:.4f} | {verdict(result['eval/image_gap'])}")
        if named[-1]:
            shares = (named[:-1] / named[-1]).tolist()
            result.update({f"eval/{name}": share for name, share in zip(head.accuracies, shares)})
        if self.recent_reading[1]:
            # The head as trained: under the norm's batch statistics. Evaluation's tracked statistics would measure
            # how far those lag behind towers that move fast, not whether the towers tell characters apart.
            result["eval/reading_character_loss"] = self.recent_reading[0] / self.recent_reading[1]
            result["eval/reading_classes"] = int((classes > 0).sum())
            self.recent_reading = [0.0, 0]
            dist.print0(f"step {self.step:05d} | "
                        f"{towers_verdict(result['eval/reading_character_loss'], result['eval/reading_classes'])}"
                        + ("; " + head_verdict(*(result[f"eval/{name}"] for name in head.accuracies))
                           if "eval/head_accuracy" in result else ""))
        predictions = []
        if self.cfg.val_read:
            read, predictions = self._read_back()
            result.update(read)
            dist.print0(f"step {self.step:05d} | read back {self.cfg.val_read} val pages: mean CER "
                        f"{read['eval/cer']:.4f}, exact {read['eval/exact']:.2f} after {self.samples_seen:,} samples, "
                        f"{self.train_seconds / 60:.1f} min of training")
        self.tracker.log(self.step, {**result, "samples_seen": self.samples_seen, "train_seconds": self.train_seconds})
        self.tracker.log_predictions(self.step, predictions)
        return result

    def _read_back(self) -> tuple[dict, list[dict]]:
        """Mean CER and exact-match rate of greedy generation on the first `val_read` val pages, split over the
        ranks, and this rank's pages as rows (image, expected, generated, metrics) for the predictions table."""
        if self.read_examples is None:
            tokenizer = Tokenizer.load(self.tokenizer_path)
            examples, _ = read_examples(self.cfg.val_shards, tokenizer, self.cfg.model, self.cfg.val_read)
            self.read_examples = (tokenizer, examples[self.rank::self.world])
        tokenizer, examples = self.read_examples
        self.model_engine.eval()
        outputs = read_back(self.model_engine.module, tokenizer, examples, max_new_tokens=self.cfg.val_read_tokens)
        self.model_engine.train()
        rows = [{"key": e.key, "image": e.image, "expected": e.response, "generated": o, **scores(o, e.response)}
                for o, e in zip(outputs, examples)]
        cer, exact, n = self._sum_over_ranks(torch.tensor([sum(r["cer"] for r in rows), sum(r["exact"] for r in rows),
                                                           len(rows)], dtype=torch.float64)).tolist()
        return {"eval/cer": cer / max(n, 1), "eval/exact": exact / max(n, 1)}, rows

    # ------------------------------------------------------------------------------------------------------------
    def save(self) -> None:
        """DeepSpeed state + every rank's loader and RNG state; `latest` moves only once all ranks are done."""
        states = [None] * self.world
        torch_dist.all_gather_object(states, {"loader": self.loader.state_dict(), "rng": _rng_state()})
        tag = f"step{self.step:06d}"
        ckpt_dir = self.out / CHECKPOINTS
        client = {"step": self.step, "samples_seen": self.samples_seen, "train_seconds": self.train_seconds,
                  "ranks": states, "recipe": config.to_dict(self.cfg),
                  # lets ds_to_universal convert it for a resume on another world size (no tensor parallelism here)
                  UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        self.model_engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client, save_latest=False)
        torch_dist.barrier()
        if self.rank == 0:
            tmp = ckpt_dir / "latest.tmp"
            tmp.write_text(tag)
            tmp.replace(ckpt_dir / "latest")
            _prune(ckpt_dir, self.cfg.keep_checkpoints)
        torch_dist.barrier()
        dist.print0(f"saved checkpoint {ckpt_dir / tag}")

    def resume(self, path: Path) -> None:
        """Continue the run saved at `path`: DeepSpeed's state (loaded weights-only), the step and sample counters,
        every rank's loader position and RNGs, and the metrics file cut back to the checkpoint's step."""
        if not path.is_dir():
            raise TrainingError(f"resume: {path} is not a checkpoint directory")
        with _unpickling(path, "resume", "--trust_checkpoint=true loads it", trusted=self.cfg.trust_checkpoint):
            loaded, client = self.model_engine.load_checkpoint(str(path.parent), tag=path.name)
        if loaded is None:
            raise TrainingError(f"resume: DeepSpeed could not load {path}")
        self.step, self.samples_seen = client["step"], client.get("samples_seen", 0)
        self.train_seconds = client.get("train_seconds", 0.0)
        ranks = client["ranks"]
        if self.loader.resume([r["loader"] for r in ranks]):
            _set_rng_state(ranks[self.rank]["rng"])
        else:
            dist.print0(f"resume: {len(ranks)} rank(s) -> {self.world}; each epoch's unread samples are shared over "
                        "the new ranks x workers")
        self.tracker.resume_at(self.step)
        dist.print0(f"resumed from {path} at step {self.step}")

    def _check_frozen(self) -> None:
        params = dict(self.model.named_parameters())
        for name, before in self.frozen_before.items():
            if not torch.equal(before, params[name].detach()):
                raise TrainingError(f"frozen parameter {name} changed during training")


# ----------------------------------------------------------------------------------------------------------------
class DivergenceGuard:
    """Stops a run whose steps no longer train: a gradient norm of exactly 0 (a huge lr saturates the softcapped
    logits, which then pass no gradient back while the loss stays finite) or non-finite, or a loss above `ratio` x
    its running mean. `patience` such steps in a row stop it, so one noisy batch does not."""

    def __init__(self, patience: int, ratio: float):
        self.patience, self.ratio = patience, ratio
        self.in_a_row, self.mean = 0, None

    def check(self, step: int, loss: float, grad_norm: float | None, lr: float) -> None:
        why = self._diverged(loss, grad_norm)
        if why is None:
            self.in_a_row = 0
            self.mean = loss if self.mean is None else 0.9 * self.mean + 0.1 * loss   # over the last ~10 steps
            return
        self.in_a_row += 1
        if self.in_a_row >= self.patience:
            raise TrainingError(f"step {step}: training diverged ({why}, {self.in_a_row} steps in a row); the likely "
                                f"cause is the learning rate (--lr={lr:g}): lower it or resume from an earlier "
                                "checkpoint")

    def _diverged(self, loss: float, grad_norm: float | None) -> str | None:
        if grad_norm is not None and (grad_norm == 0 or not math.isfinite(grad_norm)):
            return f"gradient norm {grad_norm}"
        if self.mean is not None and loss > self.ratio * self.mean:
            return f"loss {loss:.4f} above {self.ratio:g} x its running mean {self.mean:.4f}"
        return None


def checkpoint_to_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint `cfg.resume` names: none, the newest in output_dir ("auto"; none yet is a fresh start), or a path."""
    if cfg.resume == "auto":
        latest = Path(cfg.output_dir) / CHECKPOINTS / "latest"
        return latest.parent / latest.read_text().strip() if latest.exists() else None
    return Path(cfg.resume) if cfg.resume else None


def export_checkpoint(checkpoint: Path, out: Path, trusted: bool = False) -> Path:
    """Any saved step checkpoint (ZeRO-0/1/2/3) as model.safetensors + config.json + tokenizer.json, on one process
    without a GPU: weights gathered from the partition files by DeepSpeed's zero_to_fp32, every file loaded weights-only
    unless `trusted`; the model config and tokenizer come from the recipe the checkpoint carries."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = sorted(checkpoint.glob("*model_states.pt"))     # ZeRO-3 names one per rank, rank 0's first
    if not states:
        raise TrainingError(f"export: {checkpoint} is not a checkpoint directory (no *model_states.pt)")
    with _unpickling(checkpoint, "export", "--trust_checkpoint loads it", trusted=trusted):
        client = torch.load(states[0], map_location="cpu", weights_only=not trusted)
        if "recipe" not in client:
            raise TrainingError(f"export: {states[0]} holds no recipe (not a checkpoint of this trainer)")
        cfg = config.from_dict(TrainConfig, client["recipe"])
        partitioned = any(checkpoint.glob("*optim_states.pt"))   # ZeRO >= 1; ZeRO-0 keeps whole weights in "module"
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.parent), tag=checkpoint.name) \
            if partitioned else client["module"]
    weights.save_export(build_model(cfg.model, device="meta"), out, cfg.tokenizer or MINI_TOKENIZER, state_dict=state)
    print(f"exported {out}", flush=True)
    return out


def to_universal(argv: list[str]) -> None:
    """DeepSpeed's ds_to_universal (arguments as its own), with the resume's weights-only loading: converting a
    checkpoint for another world size runs no code planted in it."""
    from deepspeed.checkpoint import ds_to_universal

    sys.argv = ["ds_to_universal", *argv]
    args = ds_to_universal.parse_arguments()
    with _one_line_errors(), _unpickling(Path(args.input_folder), "to_universal",
                                         "python -m deepspeed.checkpoint.ds_to_universal converts it", trusted=False):
        ds_to_universal.main(args)


@contextmanager
def _one_line_errors():
    """A TrainingError ends the process with its reason on one line and exit code 1, not a traceback."""
    try:
        yield
    except TrainingError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


@contextmanager
def _unpickling(path: Path, what: str, opt_out: str, trusted: bool):
    """Every torch.load of a resume runs weights-only, allowing just CHECKPOINT_GLOBALS: DeepSpeed's engine and
    universal-checkpoint loaders pass weights_only=False, which TORCH_FORCE_WEIGHTS_ONLY_LOAD overrides at each call.
    A file pickling anything else is refused before any of its objects is built."""
    if trusted:
        yield
        return
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
            yield
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))   # the first type outside the allow-list
        holds = f"pickles {found.group(1)}" if found else "is not a weights-only checkpoint"
        raise TrainingError(f"{what}: a file in {path} {holds}, which a checkpoint of this trainer never holds; "
                            f"refused without unpickling ({opt_out} if you made it)") from None
    finally:
        if before is None:
            del os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"]
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def deepspeed_config(path: str, cfg: TrainConfig, world: int, device: torch.device) -> tuple[dict, str]:
    """The ds_config with the recipe's batch sizes (the one place they are set) and precision filled in, and a note
    of what the trainer decided for the user ("" if nothing): what bf16 "auto" chose and why, and which DeepSpeed
    settings Muon turned off."""
    ds = json.loads(Path(path).read_text())
    for owned in ("optimizer", "scheduler"):
        if owned in ds:
            raise ConfigError(f"{path}: remove '{owned}': the recipe owns it (--lr, --schedule, ...)")
    if "gradient_clipping" not in ds:
        raise ConfigError(f"{path}: set 'gradient_clipping' explicitly (DeepSpeed's default changed in 0.19.3)")
    ds["train_micro_batch_size_per_gpu"] = cfg.micro_batch
    ds["gradient_accumulation_steps"] = cfg.global_batch // (cfg.micro_batch * world)
    ds["train_batch_size"] = cfg.global_batch
    bf16, notes = ds.setdefault("bf16", {"enabled": "auto"}), []
    if bf16.get("enabled") == "auto":
        bf16["enabled"], why = _native_bf16(device)
        notes.append(f"bf16 \"auto\" chose {'bf16' if bf16['enabled'] else 'fp32'}: {why}")
    zero = ds.setdefault("zero_optimization", {})
    if cfg.optimizer == "muon" and (bf16["enabled"] or zero.get("stage") == 3) and zero.get("reduce_scatter", True):
        # DeepSpeed 0.19.8 refuses Muon with reduce-scatter under ZeRO-3, and under ZeRO-1/2 with bf16 (fp32 gradient
        # accumulation) its reduce-scatter merges a Muon matrix's range into the AdamW range before it and drops
        # that range's destination, so those gradients never arrive (measured: norm 0 from the first step). The
        # all-reduce path copies each parameter's range; the trace then matches fp32's (tests/test_train.py).
        zero["reduce_scatter"] = False
        notes.append("optimizer=muon turned zero_optimization.reduce_scatter off (DeepSpeed drops gradients with it "
                     "under bf16, refuses it under ZeRO-3)")
    if cfg.optimizer == "muon" and ds["gradient_clipping"]:
        # DeepSpeed clips Muon's orthogonalised updates by the norm of all of them (about the square root of the
        # matrices' rows), which would scale Muon's lr down by that much; Muon's update has a fixed size anyway.
        notes.append(f"optimizer=muon turned gradient_clipping {ds['gradient_clipping']} off (DeepSpeed would clip "
                     "Muon's updates, not its gradients)")
        ds["gradient_clipping"] = 0.0
    ds.setdefault("steps_per_print", 10 ** 9)
    return ds, "; ".join(notes)


def _native_bf16(device: torch.device) -> tuple[bool, str]:
    """Whether the device computes in bf16 natively, and why. torch's default check counts emulation (pre-Ampere
    GPUs), which runs several times slower than fp32. CPUs stay fp32, so a CPU run's precision (and every CPU
    test's) does not depend on the host; a config that enables bf16 gets it."""
    if device.type != "cuda":
        return False, (f"{device.type} runs fp32 unless the config enables bf16 (native only with AVX512-BF16 or AMX; "
                       "emulated, several times slower, elsewhere)")
    name = torch.cuda.get_device_name(device)
    with torch.cuda.device(device):
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return True, f"{name} supports it"
    return False, f"{name} has no native bf16 (before compute capability 8.0)"


def _prune(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` step checkpoints (0: keep all), once `latest` names the newest."""
    if keep:
        for old in sorted(p for p in ckpt_dir.iterdir() if re.fullmatch(r"step\d{6}", p.name))[:-keep]:
            shutil.rmtree(old)


def _offloads_optimizer(ds: dict) -> bool:
    return ds["zero_optimization"].get("offload_optimizer", {}).get("device", "none") != "none"


def param_groups(model: VLM, cfg: TrainConfig) -> list[dict]:
    """The trainable parameters: the GPT's at the recipe's lr, the vision side's (SAM, CLIP, projector) at
    lr x vision_lr_scale. Frozen components are left out, so the optimizer never holds state for them. With
    optimizer=muon each group splits in two: its `hidden_matrices`, which Muon trains at muon_lr (x the same
    scale), and the rest, which AdamW trains."""
    groups = [{"params": model.component_parameters("gpt"), "lr": cfg.lr},
              {"params": [p for name in COMPONENTS if name != "gpt" for p in model.component_parameters(name)],
               "lr": cfg.lr * cfg.vision_lr_scale}]
    groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in groups]
    if cfg.optimizer == "muon":
        muon = hidden_matrices(model)
        for p in model.parameters():
            p.use_muon = id(p) in muon          # where DeepSpeed's ZeRO looks for it
        adam = dict(use_muon=False, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        groups = [half for g in groups for half in (      # AdamW's first: the step line's lr is the first group's
            {**g, "params": [p for p in g["params"] if not p.use_muon], **adam},
            {"params": [p for p in g["params"] if p.use_muon], "lr": g["lr"] / cfg.lr * cfg.muon_lr,
             "use_muon": True, "momentum": cfg.muon_momentum, "weight_decay": cfg.weight_decay})]
    return [g for g in groups if g["params"]]


def hidden_matrices(model: VLM) -> set[int]:
    """ids of the weights Muon trains (optimizer=muon): every Linear layer's between the model's input and its
    outputs, so not the GPT's lm_head nor the reading head's (readouts, and the code: an embedding of what they
    name). Embeddings, convolutions, norms and biases stay with AdamW, as in nanochat and Muon's own recipe."""
    outputs = [model.gpt.lm_head, *([model.reading_head] if model.reading_head is not None else [])]
    excluded = {id(p) for module in outputs for p in module.parameters()}
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - excluded


def _optimizer(groups: list[dict], cfg: TrainConfig, offload: bool) -> torch.optim.Optimizer:
    """AdamW with the recipe's hyperparameters; DeepSpeed's CPU Adam when the optimizer state lives on CPU. With
    optimizer=muon, DeepSpeed's Muon (ZeRO orthogonalises each matrix's update as it partitions the gradients)
    with AdamW on the groups that are not Muon's."""
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "muon":
        if offload:
            raise ConfigError("optimizer: muon does not run with offload_optimizer (DeepSpeed's CPU Adam); "
                              "use a ds_config without it")
        from deepspeed.runtime.zero.muon.muon_optimizer import MuonWithAuxAdam   # imports compile its kernels

        return MuonWithAuxAdam(groups, adam_optimizer=torch.optim.AdamW,
                               adam_optimizer_kwargs=dict(kwargs, fused=torch.cuda.is_available()))
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=torch.cuda.is_available(), **kwargs)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _rng_state() -> dict:
    """Plain Python and tensors only, so a resume loads it weights-only (numpy's key array would need numpy globals)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (name, keys.tolist(), pos, has_gauss, cached),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


if __name__ == "__main__":
    main(sys.argv[1:])
