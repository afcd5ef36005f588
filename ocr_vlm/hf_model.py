"""The model as transformers sees it: the thin `PreTrainedModel` every export ships as `modeling_ocr_vlm.py`.

`hf_export.py` copies this file and the plain-PyTorch model modules (config.py, model/*.py) into the export with their
`ocr_vlm.` imports made relative, so `AutoModelForCausalLM.from_pretrained(export, trust_remote_code=True)` runs this
project's own model code without ocr_vlm installed. Only the cache and the inputs are adapted here:

- `forward(input_ids, pixel_values, attention_mask, cache)` is what `generate` calls: images are encoded on the
  prefill step only, left padding is read from `attention_mask` (positions count from each row's first real token),
  and the KV cache is transformers' own, behind the `update`/`length` interface our GPT writes to.
- a model told where its pointer reads (`reading_place`) keeps, on the same cache, where each row's image is and
  the place its pointer looked at most for the token being generated, as `Generator` does.
- the export's generation_config.json suppresses the tokens our Generator never emits and stops at
  `<|assistant_end|>`, so greedy `generate` returns exactly what `ocr_vlm.generation.Generator` does (tested).
"""

from __future__ import annotations

import torch
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from ocr_vlm.config import VLMConfig, from_dict
from ocr_vlm.model.gpt import left_padded_positions
from ocr_vlm.model.vlm import VLM

# transformers renamed generate's `past_key_values` to `cache` during 5.x; the output carries whichever it has.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class OcrVlmConfig(PretrainedConfig):
    """ocr_vlm's VLMConfig as a dict under `vlm`, plus the names transformers' generic code reads."""
    model_type = "ocr_vlm"

    def __init__(self, vlm: dict | None = None, **kwargs):
        self.vlm = vlm or {}
        gpt = self.vlm.get("gpt", {})
        self.num_hidden_layers, self.hidden_size = gpt.get("n_layer"), gpt.get("n_embd")
        self.num_attention_heads, self.vocab_size = gpt.get("n_head"), gpt.get("vocab_size")
        super().__init__(**kwargs)


class OcrVlmForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = OcrVlmConfig
    main_input_name = "input_ids"

    def __init__(self, config: OcrVlmConfig):
        super().__init__(config)
        self.model = VLM(from_dict(VLMConfig, config.vlm).validate())
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module: torch.nn.Module) -> None:
        """Every weight comes from model.safetensors; the GPT's rotary tables are not saved, so they are made here."""
        if module is self.model.gpt:
            module.rotary_tables()

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, past_key_values=None,
                use_cache: bool | None = None, logits_to_keep: int = 0, tile_values: torch.Tensor | None = None,
                tile_grids: torch.Tensor | None = None, **kwargs) -> CausalLMOutputWithPast:
        """Logits of `input_ids` (the new tokens), with `pixel_values` (N, 3, S, S) uint8 written into the <|image|>
        placeholders (prefill); `attention_mask` (B, past + new) marks left padding with 0."""
        model, cache = self.model, cache if cache is not None else past_key_values
        if cache is None and (use_cache if use_cache is not None else self.config.use_cache):
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        valid = attention_mask.bool() if attention_mask is not None else \
            torch.ones(input_ids.shape[0], past + input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
        tiled = tile_values is not None and len(tile_values) > 0
        images = pixel_values is not None and len(pixel_values) > 0
        x = model.embed(input_ids, model.vision_tokens(pixel_values) if images else None,
                        model.vision_tokens(tile_values) if tiled else None, tile_grids if tiled else None)
        # As the Generator does: the prefill always masks by validity, decoding only when a row was padded.
        key_valid = valid if past == 0 or not valid.all() else None
        look = model.look
        if look and cache is None:
            raise ValueError("a model with reading_place generates with a cache (use_cache=True): each token is told "
                             "where the pointer looked when the one before it was written")
        if look and past:
            x = x + cache.ocr_vlm_told.to(x.dtype)
        h = model.gpt.hidden(x, left_padded_positions(valid)[:, past:], key_valid=key_valid,
                             cache=_Cache(cache) if cache is not None else None, look=look)
        if look:
            h, scores = h
            if not past:
                cache.ocr_vlm_slots = model.image_slots(input_ids)
            cache.ocr_vlm_told = model.told_next(scores, cache.ocr_vlm_slots)
        logits = model.gpt.logits(h[:, -logits_to_keep:] if logits_to_keep else h)
        return CausalLMOutputWithPast(logits=logits, **{CACHE_FIELD: cache})


class _Cache:
    """A transformers Cache behind the interface model/gpt.py's KVCache offers: `length`, `update(layer, k, v)` and
    `previous`, the last input embedding the smear reads (kept on the transformers cache, which lives across calls)."""

    def __init__(self, cache):
        self.cache, self.length = cache, cache.get_seq_length()

    @property
    def previous(self) -> torch.Tensor | None:
        return getattr(self.cache, "ocr_vlm_previous", None)

    @previous.setter
    def previous(self, embedding: torch.Tensor) -> None:
        self.cache.ocr_vlm_previous = embedding

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.update(k, v, layer)
