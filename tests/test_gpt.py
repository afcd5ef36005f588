"""The GPT on its own: nanochat's init rule, meta build + to_empty + init_weights, exact d20 sizes.

Parity with transformers' NanoChat is in test_parity.py; packing, chunked loss and checkpointing in test_model.py.
"""

import torch

from ocr_vlm.config import GPTConfig
from ocr_vlm.model.gpt import GPT

SMALL = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=256)


def test_init_follows_nanochat_rule():
    torch.manual_seed(0)
    model = GPT(SMALL)
    block = model.transformer.h[0]
    d, kv = SMALL.n_embd, SMALL.n_kv_head * SMALL.head_dim
    expected_std = {
        "wte": (model.transformer.wte, 1.0),
        "c_q": (block.attn.c_q, d ** -0.5),
        "c_k": (block.attn.c_k, d ** -0.5 * (kv / d) ** 0.5),   # fan_out < fan_in shrinks the std
        "c_fc": (block.mlp.c_fc, d ** -0.5),                     # fan_out > fan_in does not grow it
    }
    for name, (module, std) in expected_std.items():
        assert abs(module.weight.std().item() / std - 1) <= 0.03, name
    zeros = [model.lm_head] + [m for b in model.transformer.h for m in (b.attn.c_proj, b.mlp.c_proj)]
    assert all(m.weight.abs().max() == 0 for m in zeros)


def test_meta_build_then_to_empty_and_init_weights_is_usable():
    """Big models are built on meta; the non-persistent rotary tables must come back from init_weights."""
    torch.manual_seed(0)
    direct = GPT(SMALL).eval()
    with torch.no_grad():
        for p in direct.parameters():
            p.normal_(0, 0.1)
    with torch.device("meta"):
        model = GPT(SMALL)
    model.to_empty(device="cpu")
    model.init_weights()
    model.load_state_dict(direct.state_dict())       # weights only: the rotary tables are not in the state dict
    assert torch.equal(model.cos, direct.cos) and torch.equal(model.sin, direct.sin)
    ids = torch.randint(0, SMALL.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), direct(ids))


def test_d20_parameter_count_is_nanochat_exactly():
    def count(vocab: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in GPT(GPTConfig(vocab_size=vocab)).parameters())

    assert count(65536) == 560_988_160                 # nanochat's published d20
    assert count(65537) - count(65536) == 2 * 1280     # <|image|>: one wte row and one lm_head row
