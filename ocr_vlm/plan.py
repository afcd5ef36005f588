"""Per-GPU memory of a training run, from the config: what a micro-batch costs and the largest that fits.

    python -m ocr_vlm.plan --preset=d20 --stage=2 --data.seq_len=8192 --gpus 8 --gpu_mem 24 \
        [--ds_config ds_configs/zero2.json ...] [--key=value recipe overrides]

Parameter counts come from the model built on the meta device, trainable vs frozen from the stage's freeze set,
ZeRO stage, buckets and offload from the ds_config JSON. Activations are counted per token (GPT) and per image
(vision towers) from the tensors each block keeps for backward; `bench/plan_vs_measured.py` checks the sum against
measured peaks. Without `data.max_images` the packer may put seq_len // image_tokens images in every row, and every
image of a micro-batch goes through SAM at once, so the worst case is what is planned (Gundam: in global-view
equivalents, see images_per_micro_batch).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

from ocr_vlm import cli
from ocr_vlm.config import ConfigError, TrainConfig
from ocr_vlm.model.gpt import LOSS_CHUNK
from ocr_vlm.model.vlm import build_model, parameter_counts as component_counts

GiB = 2 ** 30
SHIPPED = ("ds_configs/zero2.json", "ds_configs/zero3.json", "ds_configs/zero3_offload.json")
CUDA_OVERHEAD = 1.5 * GiB     # CUDA context, NCCL buffers, cuBLAS workspaces: not seen on CPU, so not validated
FRAGMENTATION = 0.10          # allocator slack on the dynamic part (activations), a common rule of thumb


@dataclass
class DeepSpeedSettings:
    """What the ds_config decides about memory. bf16: bf16 weights and gradients with fp32 master weights."""
    zero_stage: int = 0
    bf16: bool = True
    grad_accum_fp32: bool = False   # data_types.grad_accum_dtype: the accumulated (partitioned) gradients in fp32
    overlap_comm: bool = False
    reduce_bucket: int = 0        # elements
    prefetch_bucket: int = 0      # elements (ZeRO-3)
    max_live: int = 0             # elements (ZeRO-3): gathered parameters the prefetcher stops at
    persistence_threshold: int = 0   # ZeRO-3: parameters this small stay whole on every rank
    offload_optimizer: bool = False
    offload_param: bool = False
    name: str = "plain"

    @classmethod
    def from_json(cls, path: str, bf16: bool = True) -> "DeepSpeedSettings":
        """bf16 "auto" means bf16 on GPUs, which is what this plans for."""
        ds = json.loads(Path(path).read_text())
        zero = ds.get("zero_optimization", {})
        return cls(zero_stage=zero.get("stage", 0), bf16=bf16, overlap_comm=zero.get("overlap_comm", False),
                   grad_accum_fp32=ds.get("data_types", {}).get("grad_accum_dtype") == "fp32",
                   reduce_bucket=int(zero.get("reduce_bucket_size", 5e8)),
                   prefetch_bucket=int(zero.get("stage3_prefetch_bucket_size", 5e7)),
                   max_live=int(zero.get("stage3_max_live_parameters", 1e9)),
                   persistence_threshold=int(zero.get("stage3_param_persistence_threshold", 1e5)),
                   offload_optimizer=zero.get("offload_optimizer", {}).get("device", "none") != "none",
                   offload_param=zero.get("offload_param", {}).get("device", "none") != "none",
                   name=Path(path).stem)


@dataclass
class Counts:
    total: int
    trainable: int
    persistent: int               # parameters of at most persistence_threshold elements (ZeRO-3 keeps them whole)
    by_component: dict[str, tuple[int, int]]   # component -> (parameters, trainable)


def parameter_counts(cfg: TrainConfig, persistence_threshold: int = 0) -> Counts:
    model = build_model(cfg.model, device="meta")
    model.freeze(cfg.freeze)
    by = component_counts(model)
    persistent = sum(p.numel() for p in model.parameters() if p.numel() <= persistence_threshold)
    return Counts(sum(n for n, _ in by.values()), sum(t for _, t in by.values()), persistent, by)


def images_per_micro_batch(cfg: TrainConfig) -> int:
    """The packer's worst case, in global views: rows of nothing but the pages whose tile grid puts the most tower
    work into a row, unless data.max_images caps the micro-batch's views. A Gundam tile weighs (tile/size)² of a
    global view (the towers' activations grow with their tokens, linearly but for the global blocks' bias); the cap
    counts tiles whole, so under it untiled pages are the worst case."""
    m = cfg.model
    tile = (m.tile_size / m.image_size) ** 2

    def views(grid: tuple[int, int]) -> float:
        return 1 + (grid[0] * grid[1] * tile if grid != (1, 1) else 0)

    most = max(math.ceil(cfg.micro_batch * (cfg.data.seq_len // m.image_tokens_for(grid)) * views(grid))
               for grid in m.tile_grids())
    return min(most, cfg.data.max_images) if cfg.data.max_images else most


# ---------------------------------------------------------------------------------------------------------------
# Activations: elements each block keeps for backward, per token, read off the block's forward (model/*.py).

def gpt_block_saved(d: int, kv: int) -> int:
    """Per token of one GPT block. Attention: the input and its norm, q/k/v, the rotated and normed q and k, the
    negated half the rotation multiplies, each document's output and their concatenation, the copy c_proj reads
    (13d with kv = d). MLP: the input and its norm, relu's output and its square (2d + 8d)."""
    attention = d + d + (d + 2 * kv) + (d + kv) // 2 + 2 * (d + kv) + 3 * d
    return attention + 2 * d + 2 * 4 * d


def clip_layer_saved(c: int, mlp: int) -> int:
    """Per token of one CLIP layer: the input and its LayerNorm, qkv, the attention output and the copy out_proj
    reads, the residual and its LayerNorm, then fc1's output, 1.702·h, its sigmoid and the product fc2 reads."""
    return c + c + 3 * c + 2 * c + c + c + 4 * mlp


def _sam_attention_shape(tokens: int, window: int, grid: int) -> tuple[int, int, int]:
    """(queries after window padding, keys per query, side of the attended square) of a SAM block; window 0 = global."""
    side = window or grid
    padded = tokens if not window else (-(-grid // window) * window) ** 2
    return padded, side * side, side


def sam_block_saved(width: int, heads: int, mlp: int, tokens: int, window: int, grid: int,
                    probabilities: bool) -> int:
    """Per image, one SAM block run for backward: norms, padded windows, qkv, the relative-position bias (heads x keys
    per query) and its two factors, attention output, projections and the MLP. `probabilities`: the attention kernel
    keeps softmax weights too (torch's CPU kernel does when the bias needs a gradient; CUDA's memory-efficient
    kernel does not)."""
    padded, keys, side = _sam_attention_shape(tokens, window, grid)
    per_query = 7 * width + heads * (keys + 2 * side) + (heads * keys if probabilities else 0)
    return padded * per_query + tokens * (4 * width + 2 * mlp)


def sam_block_forward(width: int, heads: int, tokens: int, window: int, grid: int, scores: bool) -> int:
    """Per image, one frozen SAM block's live set at its widest point, attention: the input, qkv, the bias and the
    output (nothing is kept for backward). `scores`: the kernel materialises the scores next to the bias (CPU)."""
    padded, keys, _ = _sam_attention_shape(tokens, window, grid)
    return tokens * width + padded * (4 * width + heads * keys * (2 if scores else 1))


def activation_terms(cfg: TrainConfig, images: int, math_attention: bool = False) -> dict[str, int]:
    """Elements (not bytes) of activations: what stays until backward (`*_kept`) and what one block holds while it
    runs (`*_block`: the block recomputed in backward when checkpointed, a frozen SAM block in forward)."""
    m, g = cfg.model, cfg.model.gpt
    tokens = cfg.micro_batch * cfg.data.seq_len
    block = gpt_block_saved(g.n_embd, g.n_kv_head * g.head_dim) * tokens
    # Outside the blocks: embeddings, the spliced sequence, both norms, and the residual's gradient in backward.
    around = 6 * g.n_embd * tokens
    gpt = {"gpt_kept": g.n_layer * g.n_embd * tokens + around, "gpt_block": block,   # checkpointed
           "gpt_full": g.n_layer * block + around}                                   # not checkpointed

    s, c = m.sam, m.clip
    grid = m.image_size // s.patch_size
    sam_tokens, clip_tokens, vision = grid * grid, m.vision_grid ** 2 + 1, m.vision_grid ** 2
    mlp = int(s.width * s.mlp_ratio)
    sam_trains = "sam" not in cfg.freeze
    windows = [0 if i in s.global_attn_indexes else s.window_size for i in range(s.depth)]
    sam_blocks = [sam_block_saved(s.width, s.heads, mlp, sam_tokens, w, grid, math_attention) for w in windows]
    neck = sam_tokens * (s.width + 6 * s.neck_channels) + sam_tokens // 4 * s.compressor_channels[0]
    if not sam_trains:     # no gradient flows into a frozen SAM: nothing is kept, one block's forward is live at a time
        sam_kept = 0
        sam_block = max(sam_block_forward(s.width, s.heads, sam_tokens, w, grid, math_attention) for w in windows)
    else:        # backward writes the relative-position bias's gradient whole: heads x keys per query, once more
        bias_grad = max(s.heads * padded * keys for padded, keys, _ in
                        (_sam_attention_shape(sam_tokens, w, grid) for w in windows))
        if "sam" in cfg.checkpointing:
            sam_kept, sam_block = s.depth * sam_tokens * s.width + neck, max(sam_blocks) + bias_grad
        else:
            sam_kept, sam_block = sum(sam_blocks) + neck, bias_grad
    clip_layer = clip_layer_saved(c.width, c.mlp_dim) * clip_tokens
    clip_kept, clip_block = (c.depth * clip_tokens * c.width, clip_layer) if "clip" in cfg.checkpointing \
        else (c.depth * clip_layer, 0)
    # The pixels, SAM's compressed tokens, the fused tokens the projector reads, its output and the laid-out embeddings.
    inputs = 3 * m.image_size ** 2 + s.compressor_channels[1] * vision
    projector = vision * (c.width + s.compressor_channels[1]) + 2 * m.image_tokens * g.n_embd
    # Every image of the micro-batch goes through each block together.
    vision_terms = {"vision_kept": images * (sam_kept + clip_kept + projector + inputs),
                    "vision_block": images * max(sam_block, clip_block)}
    # chunked_cross_entropy's backward: fp32 logits, their tanh and softmax for one chunk (the caller counts them
    # in fp32), plus a full lm_head-sized gradient buffer when the GPT trains.
    loss = {"loss_chunk": 3 * LOSS_CHUNK * g.vocab_size,
            "loss_weight_grad": g.vocab_size * g.n_embd if "gpt" not in cfg.freeze else 0}
    return {**gpt, **vision_terms, **loss}


def activation_peak(act: dict[str, float], gpt_checkpointed: bool) -> float:
    """Bytes at the worst moment of the step. The GPT's stored activations and the towers' coexist from the end of
    forward until the GPT's backward is done; the loss's buffers and each recomputed GPT block come and go within that
    span. The towers' block peak comes later (backward) or earlier (a frozen SAM's forward), without the GPT's."""
    gpt_kept = act["gpt_kept"] if gpt_checkpointed else act["gpt_full"]
    gpt_block = act["gpt_block"] if gpt_checkpointed else 0
    during_gpt = gpt_kept + act["vision_kept"] + max(act["loss"], gpt_block)
    return max(during_gpt, act["vision_kept"] + act["vision_block"])


# ---------------------------------------------------------------------------------------------------------------

def plan(cfg: TrainConfig, ds: DeepSpeedSettings, gpus: int, images: int | None = None, math_attention: bool = False,
         overhead: bool = True, counts: Counts | None = None) -> dict[str, float]:
    """Bytes per GPU at the step's peak, by term; `total` sums the terms in use. `counts` saves rebuilding the
    meta model when only batch sizes change."""
    counts = counts or parameter_counts(cfg, ds.persistence_threshold)
    images = images_per_micro_batch(cfg) if images is None else images
    b = 2 if ds.bf16 else 4
    zero, n = ds.zero_stage, gpus
    trainable, total = counts.trainable, counts.total

    if zero == 3:   # each rank holds its slice; gathered layers (up to max_live: prefetching stops there) and small ones
        gathered = min(total, max(ds.max_live, ds.prefetch_bucket) + counts.persistent)
        params = gathered * b + (0 if ds.offload_param else total * b / n)
    else:
        params = total * b
    # fp32 master weights (bf16 only: in fp32 the weights are their own master) and Adam's two moments.
    state = trainable * ((4 if ds.bf16 else 0) + 8)
    optimizer = 0 if ds.offload_optimizer else state / (n if zero >= 1 else 1)
    grads = trainable * (4 if ds.grad_accum_fp32 else b) / (n if zero >= 2 else 1)
    # Gradient reduction buffers of reduce_bucket elements (DeepSpeed 0.19 setup_buckets): ZeRO-1/2 keep a second
    # one with overlap_comm; ZeRO-3 one. The all-gather writes into the weights themselves (no buffer of its own).
    buckets = ds.reduce_bucket * b * (2 if zero in (1, 2) and ds.overlap_comm else 1) if zero else 0

    elements = activation_terms(cfg, images, math_attention)
    act = {k: v * b for k, v in elements.items() if not k.startswith("loss")}
    act["loss"] = elements["loss_chunk"] * 4 + elements["loss_weight_grad"] * b
    peak = activation_peak(act, "gpt" in cfg.checkpointing)
    out = {"params": params, "master_and_adam": optimizer, "gradients": grads, "buckets": buckets,
           "gpt_checkpointed": act["gpt_kept"] + act["gpt_block"], "gpt_full": act["gpt_full"],
           "vision_kept": act["vision_kept"], "vision_block": act["vision_block"],
           "vision_per_image": (act["vision_kept"] + act["vision_block"]) / max(images, 1), "loss": act["loss"],
           "activation_peak": peak, "overhead": (CUDA_OVERHEAD + FRAGMENTATION * peak) if overhead else 0.0,
           "images": images}
    out["total"] = params + optimizer + grads + buckets + peak + out["overhead"]
    return out


def largest(cfg: TrainConfig, ds: DeepSpeedSettings, gpus: int, budget: float, field: str, limit: int) -> int:
    """Largest `field` ("micro_batch" or "max_images") up to `limit` whose plan fits `budget` bytes; 0: none."""
    best, counts = 0, parameter_counts(cfg, ds.persistence_threshold)
    for value in range(1, limit + 1):
        trial = with_sizes(cfg, **{field: value})
        if plan(trial, ds, gpus, counts=counts)["total"] > budget:
            break
        best = value
    return best


def with_sizes(cfg: TrainConfig, micro_batch: int | None = None, max_images: int | None = None) -> TrainConfig:
    """A copy of `cfg` with other batch sizes (max_images=0: uncapped)."""
    return replace(cfg, micro_batch=cfg.micro_batch if micro_batch is None else micro_batch,
                   data=replace(cfg.data, max_images=cfg.data.max_images if max_images is None else max_images))


ROWS = [("params", "weights"), ("master_and_adam", "fp32 master + Adam"), ("gradients", "gradients"),
        ("buckets", "reduce buckets"), ("gpt_checkpointed", "GPT act. checkpointed"),
        ("gpt_full", "GPT act. not checkpointed"), ("vision_kept", "towers: kept"),
        ("vision_block", "towers: block at once"), ("vision_per_image", "towers: per image"),
        ("loss", "loss chunk + lm_head grad"), ("activation_peak", "activation peak"),
        ("overhead", "CUDA + slack"), ("total", "peak per GPU")]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ds_config", nargs="+", default=list(SHIPPED),
                        help="one column each (default: the three shipped)")
    parser.add_argument("--gpus", type=int, default=8, help="data-parallel ranks (ZeRO partitions over them)")
    parser.add_argument("--gpu_mem", type=float, default=80, help="GiB per GPU")
    args, overrides = parser.parse_known_args(argv)
    try:    # stage 2 requires text shards; the plan never reads data, so a placeholder stands in unless given
        cfg = cli.train_config(["--data.text_shards=unread", *overrides])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    settings = [DeepSpeedSettings.from_json(p) for p in args.ds_config]
    plans = [plan(cfg, e, args.gpus) for e in settings]
    counts = parameter_counts(cfg)
    print(f"{cfg.preset}, stage {cfg.stage}: {counts.total / 1e6:,.1f}M parameters, {counts.trainable / 1e6:,.1f}M "
          f"trainable (frozen: {','.join(cfg.freeze) or 'none'}); {args.gpus} GPUs, bf16; micro_batch "
          f"{cfg.micro_batch} x {cfg.data.seq_len} tokens, {plans[0]['images']} images "
          f"({'data.max_images' if cfg.data.max_images else 'no cap: the packer worst case'}); "
          f"checkpointing {','.join(cfg.checkpointing) or 'off'}")
    print(f"{'GiB per GPU':<26}" + "".join(f"{e.name:>15}" for e in settings))
    for key, label in ROWS:
        print(f"{label:<26}" + "".join(f"{p[key] / GiB:>15.2f}" for p in plans))
    budget = args.gpu_mem * GiB
    print(f"fits {args.gpu_mem:g} GiB:")
    print(f"{'  largest micro_batch':<26}" + "".join(
        f"{largest(cfg, e, args.gpus, budget, 'micro_batch', 64):>15}" for e in settings))
    print(f"{'  largest data.max_images':<26}" + "".join(
        f"{largest(cfg, e, args.gpus, budget, 'max_images', images_per_micro_batch(with_sizes(cfg, max_images=0))):>15}"
        for e in settings))


if __name__ == "__main__":
    main()
