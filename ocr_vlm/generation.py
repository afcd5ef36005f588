"""Generation: prefill the prompt with its image (vision embeddings computed once, Gundam tiles included), then decode
with a KV cache.

Prompts of different lengths share a batch by left padding: padded keys are masked and each row's rotary
positions start at its first real token, so a row generates exactly what it would alone. Tokens the model must
never emit (`<|image|>`, the chat markers other than the end token) are masked out of the logits. A model told
where its pointer reads (`reading_place`) gets, with each token it generated, the place of the image its pointer
looked at most when it wrote it.
"""

from __future__ import annotations

import torch

from ocr_vlm.model.gpt import KVCache, left_padded_positions
from ocr_vlm.model.vlm import VLM
from ocr_vlm.tokenizer import IMAGE_TOKEN, SPECIAL_TOKENS, Tokenizer


class Generator:
    def __init__(self, model: VLM, tokenizer: Tokenizer):
        self.model, self.tokenizer = model.eval(), tokenizer
        never = [tokenizer.specials[t] for t in (*SPECIAL_TOKENS, IMAGE_TOKEN) if t != "<|assistant_end|>"]
        self.never_generated = torch.tensor(never)

    @torch.no_grad()
    def generate(self, prompts: list[str], pixels: torch.Tensor, max_new_tokens: int = 256, temperature: float = 0.0,
                 top_k: int | None = None, seed: int = 0, use_cache: bool = True, tiles: torch.Tensor | None = None,
                 grids: torch.Tensor | None = None) -> list[str]:
        """One response per prompt; `pixels` holds the prompts' images in order (N, 3, S, S), uint8 as `stack_views`
        gives them; in Gundam mode `tiles` (M, 3, t, t) all their tiles in order and `grids` (N, 2) each image's grid.

        `use_cache=False` recomputes the whole sequence at every step (the reference the cache is tested against).
        """
        model, gpt, device = self.model, self.model.gpt, self.model.gpt.lm_head.weight.device
        tiled = tiles is not None and len(tiles) > 0
        counts = [model.cfg.image_tokens_for(tuple(g)) for g in grids.tolist()] if tiled else \
            [model.cfg.image_tokens] * len(prompts)
        rows = [self.tokenizer.render_prompt(p, n) for p, n in zip(prompts, counts)]
        width = max(map(len, rows))
        ids = torch.tensor([[self.tokenizer.bos_id] * (width - len(r)) + r for r in rows], device=device)
        valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows], device=device)
        positions = left_padded_positions(valid)
        padded = bool((~valid).any())          # without padding, decoding needs no mask at all (the fast path)
        x = model.embed(ids, model.vision_tokens(pixels.to(device)),
                        model.vision_tokens(tiles.to(device)) if tiled else None, grids if tiled else None)
        cache = KVCache(gpt.cfg, len(rows), width + max_new_tokens, device, x.dtype) if use_cache else None
        look = model.look            # a place model has no tiles
        slots = model.image_slots(ids) if look else None
        h = gpt.hidden(x, positions, key_valid=valid, cache=cache, look=look)
        generator = torch.Generator(device=device).manual_seed(seed)
        out = torch.empty(len(rows), 0, dtype=torch.long, device=device)
        done = torch.zeros(len(rows), dtype=torch.bool, device=device)
        for _ in range(max_new_tokens):
            if look:
                h, scores = h
                told = model.told_next(scores, slots)
            token = self._sample(gpt.logits(h[:, -1]), temperature, top_k, generator)
            token = torch.where(done, self.tokenizer.assistant_end_id, token)
            out = torch.cat([out, token[:, None]], dim=1)
            done |= token == self.tokenizer.assistant_end_id
            if done.all():
                break
            valid = torch.cat([valid, torch.ones_like(valid[:, :1])], dim=1)
            positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
            new = gpt.embed(token[:, None]) + (told.to(x.dtype) if look else 0)
            if use_cache:
                h = gpt.hidden(new, positions[:, -1:], key_valid=valid if padded else None, cache=cache, look=look)
            else:
                x = torch.cat([x, new], dim=1)
                h = gpt.hidden(x, positions, key_valid=valid, look=look)
        return [self._text(row) for row in out.tolist()]

    def _sample(self, logits: torch.Tensor, temperature: float, top_k: int | None,
                generator: torch.Generator) -> torch.Tensor:
        logits[:, self.never_generated.to(logits.device)] = float("-inf")
        if temperature == 0.0:
            return logits.argmax(dim=-1)
        logits = logits / temperature
        if top_k is not None:
            kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(1)

    def _text(self, tokens: list[int]) -> str:
        end = self.tokenizer.assistant_end_id
        return self.tokenizer.decode(tokens[: tokens.index(end)] if end in tokens else tokens)
