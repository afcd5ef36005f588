"""Pretrained weights in, trained weights out: declared key tables for every real checkpoint format.

Each format is a table of (our key, their key) templates. `{i}` matches a layer index, `{wb}` weight|bias, and
`{qkv}` marks three checkpoint tensors (q, k, v) that become one fused tensor of ours (and split again on export).
Loading is strict: every checkpoint tensor is consumed or matches the format's declared `ignore` list, and every
parameter of the component the format covers is filled or declared `not_provided` (or `optional`) — anything else is
an error that names the key. Nothing is unpickled: safetensors, or `torch.load(weights_only=True)` for nanochat's `.pt`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ocr_vlm import config
from ocr_vlm.config import ConfigError, GPTConfig, VLMConfig
from ocr_vlm.tokenizer import Tokenizer

_FIELDS = {"i": r"\d+", "wb": r"weight|bias", "qkv": r"q|k|v", "rest": r".+"}


@dataclass(frozen=True)
class KeyTable:
    name: str
    pairs: tuple[tuple[str, str], ...]              # (our key template, checkpoint key template)
    ignore: tuple[str, ...] = ()                    # checkpoint keys dropped on purpose (regex)
    not_provided: tuple[str, ...] = ()              # our keys this format has no tensor for (regex)
    # our keys a checkpoint may lack (regex): parts that start at zero, so the model computes what the checkpoint did
    optional: tuple[str, ...] = ()
    scope: tuple[str, ...] = ()                     # our top-level modules this format fills
    strip_prefix: str = ""                          # optional checkpoint prefix (e.g. hub CLIP's "vision_model.")


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)
    body = "".join(re.escape(p) if k % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for k, p in enumerate(parts))
    return re.compile(body + r"\Z")


def _translate(key: str, table: KeyTable, ours_to_theirs: bool) -> tuple[str, str | None] | None:
    """Map one key across the table; returns (mapped key, q/k/v slot or None), or None if no pair matches."""
    for ours, theirs in table.pairs:
        src, dst = (ours, theirs) if ours_to_theirs else (theirs, ours)
        match = _regex(src).match(key)
        if match:
            groups = match.groupdict()
            slot = groups.pop("qkv", None)          # loading: which of q, k, v this tensor is
            if "{qkv}" in dst:
                groups["qkv"] = "{qkv}"              # exporting: left for the caller to fill per split part
            return dst.format(**groups), slot
    return None


SAM_HF = KeyTable(
    name="HF SamVisionModel",
    pairs=(
        ("sam_model.patch_embed.proj.{wb}", "vision_encoder.patch_embed.projection.{wb}"),
        ("sam_model.pos_embed", "vision_encoder.pos_embed"),
        ("sam_model.blocks.{i}.norm1.{wb}", "vision_encoder.layers.{i}.layer_norm1.{wb}"),
        ("sam_model.blocks.{i}.norm2.{wb}", "vision_encoder.layers.{i}.layer_norm2.{wb}"),
        ("sam_model.blocks.{i}.attn.qkv.{wb}", "vision_encoder.layers.{i}.attn.qkv.{wb}"),
        ("sam_model.blocks.{i}.attn.proj.{wb}", "vision_encoder.layers.{i}.attn.proj.{wb}"),
        ("sam_model.blocks.{i}.attn.rel_pos_h", "vision_encoder.layers.{i}.attn.rel_pos_h"),
        ("sam_model.blocks.{i}.attn.rel_pos_w", "vision_encoder.layers.{i}.attn.rel_pos_w"),
        ("sam_model.blocks.{i}.mlp.lin1.{wb}", "vision_encoder.layers.{i}.mlp.lin1.{wb}"),
        ("sam_model.blocks.{i}.mlp.lin2.{wb}", "vision_encoder.layers.{i}.mlp.lin2.{wb}"),
        ("sam_model.neck.0.weight", "vision_encoder.neck.conv1.weight"),
        ("sam_model.neck.1.{wb}", "vision_encoder.neck.layer_norm1.{wb}"),
        ("sam_model.neck.2.weight", "vision_encoder.neck.conv2.weight"),
        ("sam_model.neck.3.{wb}", "vision_encoder.neck.layer_norm2.{wb}"),
    ),
    # A full SamModel checkpoint also holds the promptable mask decoder, which an encoder does not use.
    ignore=(r"(prompt_encoder|mask_decoder|shared_image_embedding)\..*",),
    not_provided=(r"sam_model\.net_[23]\.weight",),   # the compressor is DeepSeek's: HF SAM has none
    scope=("sam_model",),
)

CLIP_HF = KeyTable(
    name="HF CLIPVisionModel",
    pairs=(
        ("vision_model.embeddings.class_embedding", "embeddings.class_embedding"),
        ("vision_model.embeddings.position_embedding.weight", "embeddings.position_embedding.weight"),
        ("vision_model.pre_layrnorm.{wb}", "pre_layrnorm.{wb}"),
        ("vision_model.transformer.layers.{i}.layer_norm1.{wb}", "encoder.layers.{i}.layer_norm1.{wb}"),
        ("vision_model.transformer.layers.{i}.layer_norm2.{wb}", "encoder.layers.{i}.layer_norm2.{wb}"),
        ("vision_model.transformer.layers.{i}.self_attn.qkv_proj.{wb}", "encoder.layers.{i}.self_attn.{qkv}_proj.{wb}"),
        ("vision_model.transformer.layers.{i}.self_attn.out_proj.{wb}", "encoder.layers.{i}.self_attn.out_proj.{wb}"),
        ("vision_model.transformer.layers.{i}.mlp.fc1.{wb}", "encoder.layers.{i}.mlp.fc1.{wb}"),
        ("vision_model.transformer.layers.{i}.mlp.fc2.{wb}", "encoder.layers.{i}.mlp.fc2.{wb}"),
    ),
    # Pixels never reach CLIP here (SAM tokens are its patch embeddings) and DeepSeek has no post-LN;
    # a full CLIPModel file also carries the text tower.
    ignore=(r"embeddings\.patch_embedding\.weight", r"embeddings\.position_ids", r"post_layernorm\..*",
            r"text_model\..*", r"(visual|text)_projection\.weight", r"logit_scale"),
    scope=("vision_model",),
    strip_prefix="vision_model.",
)

DEEPSEEK_OCR = KeyTable(
    name="DeepSeek-OCR",
    pairs=(
        ("sam_model.{rest}", "model.sam_model.{rest}"),
        ("vision_model.{rest}", "model.vision_model.{rest}"),
        ("projector.layers.{wb}", "model.projector.layers.{wb}"),
        ("image_newline", "model.image_newline"),
        ("view_separator", "model.view_seperator"),   # sic: DeepSeek's spelling
    ),
    # Its language model is DeepSeek3B-MoE; ours is nanochat. CLIP's pixel patch conv is unused (see CLIP_HF).
    ignore=(r"model\.(embed_tokens|layers|norm)\..*", r"lm_head\..*", r"model\.vision_model\.embeddings\.patch_embedding\..*"),
    scope=("sam_model", "vision_model", "projector", "image_newline", "view_separator"),
)

NANOCHAT = KeyTable(
    name="nanochat",
    pairs=(("gpt.{rest}", "{rest}"),),
    scope=("gpt",),
)

NANOCHAT_HF = KeyTable(
    name="HF NanoChatForCausalLM",
    pairs=(
        ("gpt.transformer.wte.weight", "model.embed_tokens.weight"),
        ("gpt.transformer.h.{i}.attn.c_q.weight", "model.layers.{i}.self_attn.q_proj.weight"),
        ("gpt.transformer.h.{i}.attn.c_k.weight", "model.layers.{i}.self_attn.k_proj.weight"),
        ("gpt.transformer.h.{i}.attn.c_v.weight", "model.layers.{i}.self_attn.v_proj.weight"),
        ("gpt.transformer.h.{i}.attn.c_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
        ("gpt.transformer.h.{i}.mlp.c_fc.weight", "model.layers.{i}.mlp.fc1.weight"),
        ("gpt.transformer.h.{i}.mlp.c_proj.weight", "model.layers.{i}.mlp.fc2.weight"),
        ("gpt.lm_head.weight", "lm_head.weight"),
    ),
    scope=("gpt",),
)

EXPORT_PREFIX = "model."     # the transformers wrapper's attribute holding the VLM (hf_model.py)
OCR_VLM = KeyTable(name="ocr_vlm export", pairs=(("{rest}", "{rest}"),),
                   scope=("sam_model", "vision_model", "projector", "image_newline", "view_separator", "gpt",
                          "vision_norm", "reading_head", "reading_places"),
                   optional=(r"reading_places\..+",),    # places added to a model trained without (Places)
                   strip_prefix=EXPORT_PREFIX)      # optional: exports before the transformers layout have none

FORMATS = {"hf_sam": SAM_HF, "hf_clip": CLIP_HF, "deepseek_ocr": DEEPSEEK_OCR, "nanochat": NANOCHAT,
           "hf_nanochat": NANOCHAT_HF, "ocr_vlm": OCR_VLM}
_VOCAB_ROWS = ("gpt.transformer.wte.weight", "gpt.lm_head.weight")   # grow by the rows <|image|> adds


@dataclass
class LoadReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    left_at_init: list[str] = field(default_factory=list)
    extended_rows: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"{self.source}: loaded {len(self.loaded)} tensors, ignored {len(self.ignored)} by declaration"]
        lines += [f"  left at init (format has none): {k}" for k in self.left_at_init]
        lines += [f"  {k}: rows {a}->{b}, new rows left at init" for k, (a, b) in self.extended_rows.items()]
        return "\n".join(lines)


class WeightLoadError(ValueError):
    """A checkpoint does not match its format's key table; the message names the keys."""


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoints: single safetensors, sharded index, or nanochat's model_NNNNNN.pt + meta_NNNNNN.json.

def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = _checkpoint_file(Path(path))
    if path.name.endswith(".safetensors.index.json"):
        weight_map = json.loads(path.read_text())["weight_map"]
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            tensors.update(_read_safetensors(path.parent / shard))
        return tensors
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix == ".pt":
        state = torch.load(path, map_location="cpu", weights_only=True)   # never a full unpickle
        return {k.removeprefix("_orig_mod."): v for k, v in state.items()}   # torch.compile's wrapper prefix
    raise WeightLoadError(f"{path}: not a .safetensors, .safetensors.index.json or nanochat .pt file")


def _checkpoint_file(path: Path) -> Path:
    if not path.is_dir():
        return path
    for pattern in ("*.safetensors.index.json", "*.safetensors"):
        found = sorted(path.glob(pattern))
        if len(found) > 1:
            raise WeightLoadError(f"{path}: several {pattern} files ({', '.join(f.name for f in found)}); name one")
        if found:
            return found[0]
    steps = sorted(path.glob("model_*.pt"))
    if not steps:
        raise WeightLoadError(f"{path}: no *.safetensors, *.safetensors.index.json or nanochat model_*.pt inside")
    return steps[-1]   # nanochat writes one file per saved step: take the latest


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def nanochat_gpt_config(path: str | Path) -> GPTConfig:
    """The GPT shape from a nanochat checkpoint's meta file (heads included), plus the <|image|> row."""
    step_file = _checkpoint_file(Path(path))
    meta_file = step_file.with_name(step_file.name.replace("model_", "meta_").replace(".pt", ".json"))
    if not meta_file.exists():
        raise WeightLoadError(f"{meta_file}: missing; nanochat's head count is only recorded there")
    model_config = json.loads(meta_file.read_text())["model_config"]
    keys = ("sequence_len", "vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd")
    missing = [k for k in keys if k not in model_config]
    if missing:
        raise WeightLoadError(f"{meta_file}: model_config lacks {missing}")
    gpt = GPTConfig(**{k: model_config[k] for k in keys})
    gpt.vocab_size += 1
    return gpt


def hf_nanochat_gpt_config(path: str | Path) -> GPTConfig:
    """The GPT shape from a transformers NanoChat config.json, plus the <|image|> row."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return GPTConfig(sequence_len=cfg.get("max_position_embeddings", 2048), vocab_size=cfg["vocab_size"] + 1,
                     n_layer=cfg["num_hidden_layers"], n_head=heads,
                     n_kv_head=cfg.get("num_key_value_heads") or heads, n_embd=cfg["hidden_size"],
                     logit_softcap=cfg.get("final_logit_softcapping", 15.0),
                     rope_base=(cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0))


GPT_CONFIG_READERS = {"nanochat": nanochat_gpt_config, "hf_nanochat": hf_nanochat_gpt_config}


def check_gpt_shape(ours: GPTConfig, theirs: GPTConfig, source: str) -> None:
    """Head counts never show in tensor shapes (10x128 and 16x80 store alike), so compare the configs."""
    for name in ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size"):
        if getattr(ours, name) != getattr(theirs, name):
            raise WeightLoadError(f"model.gpt.{name}={getattr(ours, name)} but the {source} says "
                                  f"{getattr(theirs, name)}" + (" (counting <|image|>)" if name == "vocab_size" else ""))


# ----------------------------------------------------------------------------------------------------------------
# Loading and exporting.

def load_pretrained(model: torch.nn.Module, path: str | Path, fmt: str) -> LoadReport:
    """Copy a checkpoint of format `fmt` into `model` strictly; returns what was loaded, ignored or left at init."""
    if fmt not in FORMATS:
        raise WeightLoadError(f"format: unknown weight format {fmt!r}; choose from {sorted(FORMATS)}")
    table, tensors = FORMATS[fmt], read_tensors(path)
    if fmt in GPT_CONFIG_READERS:
        check_gpt_shape(model.cfg.gpt, GPT_CONFIG_READERS[fmt](path), f"{table.name} config at {path}")
    report = LoadReport(source=f"{table.name} ({path})")
    ours = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in table.scope}
    mapped, origin, fused, unexpected = {}, {}, {}, []
    for key, tensor in tensors.items():
        name = key.removeprefix(table.strip_prefix) if table.strip_prefix else key
        hit = _translate(name, table, ours_to_theirs=False)
        if any(re.fullmatch(p, name) for p in table.ignore):
            report.ignored.append(key)
        elif hit is None or hit[0] not in ours:
            unexpected.append(key)
        elif hit[1] is not None:
            fused.setdefault(hit[0], {})[hit[1]] = tensor
        else:
            mapped[hit[0]], origin[hit[0]] = tensor, key
    for key, parts in fused.items():
        if sorted(parts) != ["k", "q", "v"]:
            raise WeightLoadError(f"{table.name}: {key} needs q, k and v tensors, found only {sorted(parts)}")
        mapped[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    missing = [k for k in ours if k not in mapped
               and not any(re.fullmatch(p, k) for p in table.not_provided + table.optional)]
    if unexpected or missing:
        raise WeightLoadError(f"{table.name} checkpoint {path} does not match the model:\n"
                              + "".join(f"  unexpected key: {k}\n" for k in sorted(unexpected))
                              + "".join(f"  missing key: {k}\n" for k in sorted(missing)))
    with torch.no_grad():
        for key, target in ours.items():
            if key not in mapped:
                report.left_at_init.append(key)
                continue
            source = mapped[key]
            if key in _VOCAB_ROWS and source.shape[1:] == target.shape[1:] and source.shape[0] < target.shape[0]:
                report.extended_rows[key] = (source.shape[0], target.shape[0])
                target[: source.shape[0]].copy_(source)
            elif source.shape != target.shape:
                raise WeightLoadError(f"{table.name}: {origin.get(key, key)} has shape {tuple(source.shape)} in the "
                                      f"checkpoint, {key} has {tuple(target.shape)} in the model")
            else:
                target.copy_(source)
            report.loaded.append(key)
    return report


def to_format(state_dict: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Rename (and split fused q/k/v) our tensors of a format's scope into that format's checkpoint keys."""
    table, out = FORMATS[fmt], {}
    for key, tensor in state_dict.items():
        if key.split(".")[0] not in table.scope or any(re.fullmatch(p, key) for p in table.not_provided):
            continue
        hit = _translate(key, table, ours_to_theirs=True)
        if hit is None:
            raise WeightLoadError(f"{table.name}: no checkpoint name for {key}")
        name = table.strip_prefix + hit[0] if table.strip_prefix else hit[0]
        if "{qkv}" in name:
            for slot, part in zip("qkv", tensor.chunk(3, dim=0)):
                out[name.format(qkv=slot)] = part.contiguous()
        else:
            out[name] = tensor.contiguous()
    return out


def save_export(model: torch.nn.Module, out_dir: str | Path, tokenizer: str | Path,
                state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """A self-contained export: `model.safetensors` + `config.json` + `tokenizer.json`, all `load_export` needs, and
    what transformers loads it with (hf_export.py). Pass `state_dict` when the live one is partitioned (ZeRO-3) or
    the model is on the meta device. Tensors are stored under `EXPORT_PREFIX`, where the transformers wrapper holds
    the VLM."""
    from ocr_vlm import hf_export

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {EXPORT_PREFIX + k: v.detach().cpu().contiguous() for k, v in (state_dict or model.state_dict()).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tok = Tokenizer.load(tokenizer)
    tok.save(out_dir / "tokenizer.json")
    hf_export.write(out_dir, model.cfg, tok)
    return out_dir


def load_export(path: str | Path, device: str = "cpu"):
    """(model, tokenizer) from a `save_export` directory: weights loaded strictly, tokenizer checked against them."""
    from ocr_vlm.model.vlm import build_model

    data = json.loads((Path(path) / "config.json").read_text())
    # Exports from before the transformers layout hold the VLMConfig itself.
    cfg = config.from_dict(VLMConfig, data["vlm"] if "model_type" in data else data).validate()
    tokenizer = Tokenizer.load(Path(path) / "tokenizer.json")
    check_tokenizer(tokenizer, cfg, Path(path) / "tokenizer.json")
    model = build_model(cfg, device=device)
    load_pretrained(model, Path(path) / "model.safetensors", "ocr_vlm")
    return model, tokenizer


def check_tokenizer(tokenizer: Tokenizer, cfg: VLMConfig, source: str | Path) -> None:
    """The tokenizer's vocabulary and <|image|> id must be the model's: a mismatch would embed the wrong rows."""
    if (tokenizer.vocab_size, tokenizer.image_id) != (cfg.gpt.vocab_size, cfg.image_token_id):
        raise ConfigError(f"tokenizer {source} has vocab {tokenizer.vocab_size} with <|image|>={tokenizer.image_id}; "
                          f"the model expects model.gpt.vocab_size={cfg.gpt.vocab_size} and "
                          f"model.image_token_id={cfg.image_token_id}")
