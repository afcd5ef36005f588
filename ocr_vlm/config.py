"""Configuration as data: one dataclass per component, model presets, training-stage presets. No parsing here
(`cli.py` turns `--key=value` into these); every default lives once, in a field below or in a preset.

Model presets: `d20` is the real nano-DeepSeek-OCR (DeepSeek-OCR's DeepEncoder + nanochat d20, ~962M params).
`mini` keeps every code path of d20 (windowed and global SAM blocks with rel-pos, the two stride-2 compressor convs,
CLIP on SAM tokens, newline/separator layout) at CPU-trainable sizes.
Stage presets: `stage1` (TrainConfig's own defaults) and `stage2`, as the DeepSeek-OCR paper trains.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field, replace

# Resolution modes of DeepSeek-OCR: processed image side, and whether the page is padded to a
# square keeping its aspect ("pad") or stretched ("resize"), as the released code does.
RESOLUTION_MODES = {
    "tiny": (512, "resize"),
    "small": (640, "resize"),
    "base": (1024, "pad"),
    "large": (1280, "pad"),
}
# Gundam: the Base-style global view plus 640-px tiles of the stretched page (reference/deepencoder.md §1.5-1.6).
# Sizes follow SAM's pretrained side (1024 at d20, 256 at mini), so the mini preset keeps the same rules at 256/160.
GUNDAM = "gundam"
GUNDAM_TILE = 640 / 1024          # tile side per global side
MODES = (*RESOLUTION_MODES, GUNDAM)

# The model's trainable components and their top-level modules (model/vlm.py), as freezing, checkpointing, the
# parameter table and the gradient norms name them. The towers are built of blocks, so they can checkpoint.
COMPONENTS = {
    "sam": ("sam_model",),
    "clip": ("vision_model",),
    "projector": ("projector", "image_newline", "view_separator", "reading_head", "reading_places"),
    "gpt": ("gpt",),
}
TOWERS = ("sam", "clip", "gpt")


@dataclass
class SamConfig:
    """SAM ViT image encoder + neck + the 16x conv compressor (net_2, net_3)."""
    image_size: int = 1024        # pretrained input side: sets the pos-embed grid and global rel-pos tables
    patch_size: int = 16          # pixels per patch side
    width: int = 768              # transformer width
    depth: int = 12               # transformer blocks
    heads: int = 12               # attention heads
    mlp_ratio: float = 4.0        # MLP hidden width per width
    window_size: int = 14         # windowed-attention side in patches
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)   # blocks with global attention (the others are windowed)
    neck_channels: int = 256      # neck output channels
    compressor_channels: tuple[int, int] = (512, 1024)   # net_2, net_3 outputs (each 3x3 stride 2)

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class ClipConfig:
    """CLIP-L transformer body fed with compressed SAM tokens instead of its own patch embedding."""
    width: int = 1024             # transformer width (= sam.compressor_channels[1])
    depth: int = 24               # transformer layers
    heads: int = 16               # attention heads
    mlp_dim: int = 4096           # MLP hidden width
    pos_grid: int = 16            # pretrained position grid (16x16 patches + class token = 257 rows)


@dataclass
class GPTConfig:
    """nanochat GPT (d20 era): rotary, QK-norm, relu^2 MLP, parameter-free RMSNorm, untied head."""
    sequence_len: int = 2048      # context length in tokens (rotary tables cover 10x); >= data.seq_len
    vocab_size: int = 65537       # nanochat's 65536 + <|image|>
    n_layer: int = 20             # transformer blocks
    n_head: int = 10              # d20 is 10 heads of 128, not 16
    n_kv_head: int = 10           # key/value heads (fewer than n_head: grouped-query attention)
    n_embd: int = 1280            # width
    logit_softcap: float = 15.0   # logits = cap * tanh(logits / cap)
    rope_base: float = 10000.0    # rotary base frequency
    smear: bool = False           # each input embedding plus a learned per-channel share of the one before (model/gpt.py)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class VLMConfig:
    """The whole model: the towers, the GPT, and how images enter the sequence."""
    sam: SamConfig = field(default_factory=SamConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    gpt: GPTConfig = field(default_factory=GPTConfig)
    image_size: int = 1024        # processed side at run time; may differ from sam.image_size (pos-embeds interpolate)
    image_resize: str = "pad"     # "pad" (aspect kept, grey 127) or "resize" (stretch)
    image_token_id: int = 65536   # <|image|>: appended after the tokenizer's own vocabulary
    vision_norm: bool = False     # batch-norm the vision tokens over pages (model/reading.py): for towers trained from scratch
    reading_head: bool = False    # a character loss on the vision tokens, training-only unless reading_code (model/reading.py)
    reading_pointer: bool = False  # training-only: one GPT head points at the character it writes (model/reading.py)
    reading_code: bool = False    # the GPT reads what the reading head names, embedded, with each vision token (model/reading.py)
    reading_back: int = 1         # characters before each token's own that its reading head names: 1, or 2 (model/reading.py)
    reading_predecessor: bool = False   # the reading head finds each token's predecessor in reading order (model/reading.py)
    reading_place: bool = False   # the GPT is told where on the page the pointer read each answer token (model/reading.py)
    tile_size: int = 0            # Gundam's local tile side (0: fixed mode, global view only)
    min_crops: int = 2            # Gundam tile grids hold min_crops..max_crops tiles (the paper trained up to 9)
    max_crops: int = 6            # Gundam's most tiles per page

    @property
    def vision_grid(self) -> int:
        """Side of the compressed token grid: SAM patches, then two stride-2 convs."""
        return self.image_size // self.sam.patch_size // 4

    @property
    def tile_grid_side(self) -> int:
        """Side of one Gundam tile's token grid (10 at d20's 640 px)."""
        return self.tile_size // self.sam.patch_size // 4

    @property
    def image_tokens(self) -> int:
        """Embeddings of the global view: each row + newline, then the separator (a whole image in fixed modes)."""
        return self.image_tokens_for((1, 1))

    def image_tokens_for(self, grid: tuple[int, int]) -> int:
        """Embeddings of an image cut into `grid` = (w_t, h_t) tiles ((1, 1): none): the tiles stitched into one
        grid of 10·h_t rows of 10·w_t tokens, each row + newline, then the global view."""
        w, h = grid
        t, g = self.tile_grid_side, self.vision_grid
        local = 0 if (w, h) == (1, 1) else t * h * (t * w + 1)
        return local + g * (g + 1) + 1

    def tile_grids(self) -> list[tuple[int, int]]:
        """Every grid an image may get: (1, 1) (no tiles), plus the tile grids in InternVL's candidate order
        (sorted by tile count; image.tile_grid's tie rule depends on it)."""
        if not self.tile_size:
            return [(1, 1)]
        n, m = self.min_crops, self.max_crops
        grids = {(i, j) for k in range(n, m + 1) for i in range(1, k + 1) for j in range(1, k + 1) if n <= i * j <= m}
        return [(1, 1)] + sorted(grids, key=lambda ij: ij[0] * ij[1])

    @property
    def max_image_tokens(self) -> int:
        """The most embeddings one image can take (image_tokens in fixed modes)."""
        return max(self.image_tokens_for(grid) for grid in self.tile_grids())

    def with_mode(self, mode: str) -> "VLMConfig":
        """A copy in a DeepSeek-OCR resolution mode: the processed side, its resize rule and Gundam's tile side."""
        if mode == GUNDAM:
            return replace(self, image_size=self.sam.image_size, image_resize="pad",
                           tile_size=round(self.sam.image_size * GUNDAM_TILE))
        if mode not in RESOLUTION_MODES:
            raise ConfigError(f"mode: unknown resolution mode {mode!r}; choose from {', '.join(MODES)}")
        size, resize = RESOLUTION_MODES[mode]
        return replace(self, image_size=size, image_resize=resize, tile_size=0)

    def validate(self) -> "VLMConfig":
        s, c, g = self.sam, self.clip, self.gpt
        _check(s.width % s.heads == 0, "sam.width", f"{s.width} is not divisible by sam.heads={s.heads}")
        _check(c.width % c.heads == 0, "clip.width", f"{c.width} is not divisible by clip.heads={c.heads}")
        _check(g.n_embd % g.n_head == 0, "gpt.n_embd", f"{g.n_embd} is not divisible by gpt.n_head={g.n_head}")
        _check(g.n_head % g.n_kv_head == 0, "gpt.n_kv_head", f"gpt.n_head={g.n_head} is not a multiple of {g.n_kv_head}")
        _check(g.head_dim % 2 == 0, "gpt.n_head", f"head dim {g.head_dim} must be even for rotary")
        _check(s.image_size % (s.patch_size * 4) == 0, "sam.image_size",
               f"{s.image_size} is not a multiple of patch_size*4 = {s.patch_size * 4}")
        _check(self.image_size % (s.patch_size * 4) == 0, "image_size",
               f"{self.image_size} is not a multiple of sam.patch_size*4 = {s.patch_size * 4}")
        _check(self.image_resize in ("pad", "resize"), "image_resize", f"{self.image_resize!r} is not 'pad' or 'resize'")
        _check(all(0 <= i < s.depth for i in s.global_attn_indexes), "sam.global_attn_indexes",
               f"{s.global_attn_indexes} must index blocks 0..{s.depth - 1}")
        _check(s.window_size > 0, "sam.window_size", "must be positive")
        _check(c.width == s.compressor_channels[1], "clip.width",
               f"{c.width} must equal sam.compressor_channels[1]={s.compressor_channels[1]}: SAM tokens are CLIP's patch embeddings")
        _check(c.pos_grid * 4 * s.patch_size == s.image_size, "clip.pos_grid",
               f"{c.pos_grid} must be sam.image_size/(patch_size*4) = {s.image_size // (s.patch_size * 4)}")
        _check(0 <= self.image_token_id < g.vocab_size, "image_token_id",
               f"{self.image_token_id} is outside the vocabulary of gpt.vocab_size={g.vocab_size}")
        _check(self.tile_size % (s.patch_size * 4) == 0, "tile_size",
               f"{self.tile_size} is not a multiple of sam.patch_size*4 = {s.patch_size * 4}")
        _check(self.min_crops >= 2, "min_crops", f"{self.min_crops} is below 2 (a 1x1 grid means no tiles)")
        _check(self.max_crops >= self.min_crops, "max_crops", f"{self.max_crops} is below min_crops={self.min_crops}")
        _check(self.reading_head or not self.reading_pointer, "reading_pointer",
               "trains with the reading head's data: set reading_head=true too")
        _check(self.reading_back in (1, 2), "reading_back", f"{self.reading_back} is not 1 or 2")
        _check(self.reading_head or not self.reading_predecessor, "reading_predecessor",
               "is part of the reading head: set reading_head=true too")
        _check(self.reading_head or not self.reading_code, "reading_code",
               "embeds the reading head's readouts: set reading_head=true too")
        _check(self.reading_pointer or not self.reading_place, "reading_place",
               "tells the GPT where its pointer read: set reading_pointer=true too")
        _check(not (self.reading_place and self.tile_size), "reading_place", "takes the global view only, not Gundam")
        _check(g.sequence_len > self.max_image_tokens, "gpt.sequence_len",
               f"{g.sequence_len} leaves no room for text after {self.max_image_tokens} image embeddings")
        return self


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {why}")


def d20() -> VLMConfig:
    """The real model: DeepEncoder (SAM ViT-B, CLIP-L) + nanochat d20, Base mode (1024 px, 273 embeddings)."""
    return VLMConfig().validate()


def mini() -> VLMConfig:
    """Same topology at widths a 2-core CPU trains in minutes: 256 px pages give 8x8 tokens (73 embeddings)."""
    return VLMConfig(
        sam=SamConfig(image_size=256, patch_size=8, width=64, depth=4, heads=2, window_size=8,
                      global_attn_indexes=(1, 3), neck_channels=32, compressor_channels=(64, 128)),
        clip=ClipConfig(width=128, depth=2, heads=2, mlp_dim=512, pos_grid=8),
        # vocab: the shipped mini tokenizer (753 BPE ranks + nanochat's 9 specials + <|image|>); context: stage 1's
        gpt=GPTConfig(sequence_len=4096, vocab_size=763, n_layer=4, n_head=2, n_kv_head=2, n_embd=128),
        image_size=256,
        image_resize="pad",
        image_token_id=762,
    ).validate()


def mini16() -> VLMConfig:
    """mini with a 16x16 token grid (273 embeddings) for small text: 4 px patches, where mini's 32 px tokens each hold
    two characters of a 24 px line, a code towers trained from scratch take far longer to learn. Over 64x64 patches
    SAM is most of the model's cost, so it attends within its 8x8 windows only (mini's two global blocks would make
    the towers 10x slower; CLIP's layers still see the whole page), and it has half mini's width and depth: the
    narrow SAM learns the line set's character code about as fast a step as mini's, at a third of the time
    (bench/reading_towers.py)."""
    small = mini()
    return replace(small, sam=replace(small.sam, patch_size=4, width=32, heads=1, depth=2, global_attn_indexes=()),
                   clip=replace(small.clip, pos_grid=16)).validate()


PRESETS = {"d20": d20, "mini": mini, "mini16": mini16}


def preset(name: str) -> VLMConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose from {sorted(PRESETS)}")
    return PRESETS[name]()


@dataclass
class DataConfig:
    """What the loader streams and how it packs it; the rows per micro-batch are the recipe's micro_batch."""
    shards: str = "shards/tier1"  # `::`-joined directories, brace patterns, index.json files; URLs (pipe:, https://) too
    text_shards: str = ""         # optional text-only conversation shards, mixed in at text_ratio
    text_ratio: float = 0.0       # fraction of samples drawn from text_shards (stage 2: 0.1)
    seq_len: int = 4096           # tokens per packed row (images count as their embeddings); <= model.gpt.sequence_len
    max_images: int = 0           # views per micro-batch at most (0: no cap; a Gundam page is its tiles + 1): they all go through the towers at once
    num_workers: int = 2          # DataLoader worker processes per rank
    shuffle_buffer: int = 1000    # raw samples held for shuffling in each worker
    seed: int = 0                 # shard order, shuffling and text/vision mixing

    def validate(self) -> "DataConfig":
        _check(0.0 <= self.text_ratio <= 1.0, "data.text_ratio", f"{self.text_ratio} is not in [0, 1]")
        _check(self.text_ratio == 0.0 or bool(self.text_shards), "data.text_shards",
               f"required when data.text_ratio={self.text_ratio} > 0")
        _check(self.seq_len > 0, "data.seq_len", "must be positive")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_images >= 0, "data.max_images", f"{self.max_images} is not >= 0 (0: no cap)")
        return self


@dataclass
class TrainConfig:
    """The recipe: what trains, on what, for how long, at what learning rate. The ds_config owns the engine.
    Its defaults are stage 1's; `stage2()` changes what stage 2 changes."""
    preset: str = "mini"          # model preset: d20 (the real model) or mini (same topology, CPU-sized)
    stage: int = 1                # DeepSeek-OCR training stage (1: everything trains; 2: SAM frozen, longer rows, text mixed in)
    mode: str = ""                # resolution mode: tiny, small, base, large or gundam ("" = the preset's own)
    tokenizer: str = ""           # tokenizer JSON; empty = the shipped mini tokenizer (mini preset only)
    init: str = ""                # pretrained weights, "format=path" items joined by ",", e.g. deepseek_ocr=/w,nanochat=/n
    steps: int = 100              # optimizer steps
    micro_batch: int = 1          # packed rows per rank per micro-step
    global_batch: int = 8         # packed rows per optimizer step over all ranks (sets gradient accumulation)
    lr: float = 5e-5              # peak learning rate (AdamW; with optimizer=muon, of everything Muon does not train)
    optimizer: str = "adamw"      # adamw | muon (DeepSpeed's Muon on the hidden matrices, AdamW on the rest, as nanochat)
    muon_lr: float = 0.02         # optimizer=muon: peak learning rate of the hidden matrices (nanochat's 0.02)
    muon_momentum: float = 0.95   # optimizer=muon: Muon's momentum
    vision_lr_scale: float = 1.0  # lr multiplier for SAM, CLIP and the projector (the GPT trains at lr)
    schedule: str = "cosine"      # cosine | step (x decay_factor every decay_every) | warmdown | constant, after warmup
    warmup_steps: int = 100       # steps of linear warmup
    min_lr_ratio: float = 0.0     # cosine and warmdown floor as a fraction of lr
    warmdown_ratio: float = 0.4   # warmdown schedule: share of the steps, at the end, that decay linearly to the floor
    decay_every: int = 2000       # step schedule: steps between decays
    decay_factor: float = 0.1     # step schedule: lr multiplier at each decay
    weight_decay: float = 0.0     # AdamW weight decay
    reading_weight: float = 0.0   # weight of the reading head's (and pointer's) loss (needs model.reading_head); 0 = off
    beta1: float = 0.9            # AdamW beta1
    beta2: float = 0.95           # AdamW beta2
    freeze: tuple[str, ...] = ()  # components kept bit-identical: sam, clip, projector, gpt
    checkpointing: tuple[str, ...] = TOWERS   # towers with per-block activation checkpointing (sam, clip, gpt)
    output_dir: str = "runs/stage1"   # checkpoints, metrics.jsonl, config.json and the export go here
    resume: str = ""              # "" (fresh), "auto" (latest in output_dir if any) or a checkpoint directory
    trust_checkpoint: bool = False  # resume may unpickle arbitrary objects (only for checkpoints you made yourself)
    save_every: int = 0           # steps between checkpoints (0: only at the end)
    keep_checkpoints: int = 3     # newest checkpoints kept (0: all); one of d20 with its Adam state is ~13 GB
    val_every: int = 0            # steps between validations on val_shards (0: never)
    val_shards: str = ""          # held-out shards for validation loss, image gap and read-back
    val_read: int = 0             # val pages read back (greedy generation, CER) at each validation; 0 = none
    val_read_tokens: int = 64     # new tokens at most per page read back
    log_every: int = 1            # steps between printed step lines (every step is in metrics.jsonl)
    max_bad_steps: int = 5        # consecutive non-finite losses tolerated (each skipped) before stopping
    diverge_steps: int = 3        # consecutive diverged steps (zero/non-finite grad norm, loss spike) that stop a run
    diverge_loss: float = 3.0     # a step's loss above this multiple of its running mean counts as diverged
    wandb: bool = False           # also log to Weights & Biases (offline without an API key)
    wandb_project: str = "ocr_vlm"   # W&B project
    run_name: str = ""            # W&B run name (default: the output directory's name)
    seed: int = 0                 # Python, numpy and torch RNGs
    model: VLMConfig = field(default_factory=mini)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> "TrainConfig":
        _check(self.preset in PRESETS, "preset", f"{self.preset!r} is not one of {', '.join(PRESETS)}")
        _check(self.stage in STAGES, "stage", f"{self.stage} is not 1 or 2")
        _check(self.mode in ("", *MODES), "mode", f"{self.mode!r} is not one of {', '.join(MODES)}")
        _check(self.schedule in ("cosine", "step", "warmdown", "constant"), "schedule",
               f"{self.schedule!r} is not cosine|step|warmdown|constant")
        _check(0 < self.warmdown_ratio <= 1, "warmdown_ratio", f"{self.warmdown_ratio} is not in (0, 1]")
        _check(self.steps > 0, "steps", "must be positive")
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", f"{self.lr} is not a positive finite number")
        _check(self.optimizer in ("adamw", "muon"), "optimizer", f"{self.optimizer!r} is not adamw|muon")
        _check(math.isfinite(self.muon_lr) and self.muon_lr > 0, "muon_lr",
               f"{self.muon_lr} is not a positive finite number")
        _check(0 <= self.muon_momentum < 1, "muon_momentum", f"{self.muon_momentum} is not in [0, 1)")
        _check(math.isfinite(self.vision_lr_scale) and self.vision_lr_scale > 0, "vision_lr_scale",
               f"{self.vision_lr_scale} is not a positive finite number")
        _check(self.micro_batch > 0, "micro_batch", "must be positive")
        _check(self.global_batch % self.micro_batch == 0, "global_batch",
               f"{self.global_batch} is not a multiple of micro_batch={self.micro_batch}")
        for name in self.freeze:
            _check(name in COMPONENTS, "freeze", f"{name!r} is not one of {', '.join(COMPONENTS)}")
        for name in self.checkpointing:
            _check(name in TOWERS, "checkpointing", f"{name!r} is not one of {', '.join(TOWERS)}")
        _check(self.reading_weight >= 0, "reading_weight", "must be >= 0")
        _check(self.keep_checkpoints >= 0, "keep_checkpoints", f"{self.keep_checkpoints} is not >= 0 (0: keep all)")
        _check(self.diverge_steps > 0, "diverge_steps", "must be positive")
        _check(self.diverge_loss > 1, "diverge_loss", f"{self.diverge_loss} must be above 1 (a multiple of the mean)")
        _check(self.reading_weight == 0 or bool(self.model.reading_head), "reading_weight",
               f"{self.reading_weight} > 0 needs a reading head: set --model.reading_head=true")
        self.model.validate()
        self.data.validate()
        m = self.model
        _check(self.data.seq_len <= m.gpt.sequence_len, "data.seq_len",
               f"{self.data.seq_len} exceeds the model's context model.gpt.sequence_len={m.gpt.sequence_len}")
        _check(self.data.seq_len > m.max_image_tokens, "data.seq_len",
               f"{self.data.seq_len} cannot hold one image's {m.max_image_tokens} embeddings")
        # The cap counts views (a Gundam page is its tiles + 1 global view), so it must hold the largest page.
        _check(self.data.max_images == 0 or self.data.max_images >= 1 + (m.max_crops if m.tile_size else 0),
               "data.max_images", f"{self.data.max_images} cannot hold one Gundam page of up to "
               f"model.max_crops={m.max_crops} tiles + its global view")
        return self


def with_context(cfg: TrainConfig, seq_len: int) -> TrainConfig:
    """Rows of `seq_len` tokens, and the GPT's context to match (a stage trains at its row length)."""
    return replace(cfg, data=replace(cfg.data, seq_len=seq_len),
                   model=replace(cfg.model, gpt=replace(cfg.model.gpt, sequence_len=seq_len)))


def stage1(cfg: TrainConfig) -> TrainConfig:
    """Everything trains, AdamW lr 5e-5, warmup then cosine, rows of 4096 tokens, vision data only: TrainConfig's
    own defaults, with the model's context set to the rows'."""
    return with_context(replace(cfg, stage=1), cfg.data.seq_len)


def stage2(cfg: TrainConfig) -> TrainConfig:
    """SAM + compressor frozen; CLIP, projector and GPT train at lr 3e-5, x0.1 every 2000 steps, rows of 8192 tokens
    with 10% text-only conversations."""
    cfg = replace(cfg, stage=2, lr=3e-5, schedule="step", freeze=("sam",), output_dir="runs/stage2",
                  data=replace(cfg.data, text_ratio=0.1))
    return with_context(cfg, 8192)


STAGES = {1: stage1, 2: stage2}


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls, data: dict):
    """Rebuild a (nested) config dataclass from `to_dict` output, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(f"{sorted(unknown)[0]}: unknown key for {cls.__name__}")
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            value = from_dict(typ, value)
        elif typing.get_origin(typ) is tuple:
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)
