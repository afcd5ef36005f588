"""Generation: the KV cache changes nothing, batching changes nothing, never-generated tokens never appear."""

import torch

from ocr_vlm import config
from ocr_vlm.generation import Generator
from ocr_vlm.model.vlm import build_model
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer
from conftest import randomize

CFG = config.mini()
TOK = Tokenizer.load(MINI_TOKENIZER)
PROMPTS = ["<image>\nFree OCR.", "<image>\nRead the text in the image.", "<image>\nParse the figure, then list it."]


def engine(seed=0) -> Generator:
    torch.manual_seed(seed)
    model = randomize(build_model(CFG), 0.3, seed=None)      # random but confident: greedy paths differ per image
    return Generator(model, TOK)


def images(n=3):
    torch.manual_seed(1)
    return torch.randn(n, 3, CFG.image_size, CFG.image_size)


def test_kv_cache_equals_full_recompute_token_for_token():
    gen = engine()
    cached = gen.generate(PROMPTS, images(), max_new_tokens=40)
    naive = gen.generate(PROMPTS, images(), max_new_tokens=40, use_cache=False)
    assert cached == naive
    assert len(set(cached)) == 3                         # different images, different outputs


def test_batched_left_padded_equals_one_by_one():
    gen = engine()
    batched = gen.generate(PROMPTS, images(), max_new_tokens=30)
    alone = [gen.generate([p], images()[i:i + 1], max_new_tokens=30)[0] for i, p in enumerate(PROMPTS)]
    assert batched == alone


def test_sampling_is_seeded():
    gen = engine()
    a = gen.generate(PROMPTS, images(), max_new_tokens=20, temperature=1.0, top_k=50, seed=3)
    b = gen.generate(PROMPTS, images(), max_new_tokens=20, temperature=1.0, top_k=50, seed=3)
    assert a == b


def test_image_and_chat_markers_never_generated_even_when_favoured():
    gen = engine()
    forced = [TOK.image_id, TOK.bos_id, TOK.user_start_id]

    def favour(_module, _inputs, logits):
        logits[..., forced] += 1000.0
        return logits

    gen.model.gpt.lm_head.register_forward_hook(favour)
    ids = [TOK.encode(text) for text in gen.generate(PROMPTS, images(), max_new_tokens=20)]
    assert all(not set(forced) & set(row) for row in ids)
    assert all("<|image|>" not in TOK.decode(row) for row in ids)
