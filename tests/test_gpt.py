"""The GPT on its own: nanochat's init rule, meta build + to_empty + init_weights, exact d20 sizes, per-document
attention against the dense document mask it replaced, the smear within a document.

Parity with transformers' NanoChat is in test_parity.py; packing, chunked loss and checkpointing in test_model.py.
"""

import pytest
import torch
import torch.nn.functional as F

from ocr_vlm.config import GPTConfig
from ocr_vlm.model.gpt import GPT, Documents
from ocr_vlm.model.layers import attention

from conftest import randomize

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
    direct = randomize(GPT(SMALL).eval(), 0.1, seed=None)
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


def dense_document_attention(q, k, v, doc_ids, gqa):
    """The reference: every pair of tokens computed, a (B, 1, T, T) mask keeping the causal pairs of one document."""
    T = doc_ids.shape[1]
    same_document = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    mask = (torch.ones(T, T, dtype=torch.bool).tril() & same_document).unsqueeze(1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_document_attention_equals_the_dense_document_mask(kv_heads):
    """Unequal lengths, equal lengths in both rows, an id running on into the next row, padding (-1) at the end."""
    doc_ids = torch.tensor([[0] * 5 + [1] * 9 + [2] * 5 + [3] * 3,
                            [3] * 9 + [4] * 10 + [-1] * 3])
    torch.manual_seed(0)
    q = torch.randn(2, 4, 22, 16, requires_grad=True)
    k, v = (torch.randn(2, kv_heads, 22, 16, requires_grad=True) for _ in range(2))
    upstream = torch.randn(2, 4, 22, 16)
    results = []
    for attend in (lambda: dense_document_attention(q, k, v, doc_ids, kv_heads != 4),
                   lambda: Documents(doc_ids).attend(q, k, v, kv_heads != 4)):
        out = attend()
        results.append((out, *torch.autograd.grad(out, (q, k, v), upstream)))
    for dense, per_document in zip(*results):           # the output, then the gradients of q, k and v
        torch.testing.assert_close(per_document, dense, atol=1e-6, rtol=1e-6)


def test_the_attention_a_head_pays_and_what_it_carries_are_what_the_pointer_is_trained_on():
    """In a packed row with GQA: the head's output is the value vectors weighed by `one_head`'s attention, over the
    query's own document only, and `one_head`'s output is that through the head's share of c_proj."""
    torch.manual_seed(0)
    gpt = GPT(SMALL)
    randomize(gpt, 0.05)                 # nanochat's zero-initialised projections would make layer 1 see layer 0's input
    doc_ids = torch.tensor([[0] * 5 + [1] * 9])
    position_ids = torch.tensor([list(range(5)) + list(range(9))])
    layer, head, query = 1, 3, 11
    inputs, outputs = [], []
    gpt.transformer.h[layer].attn.register_forward_pre_hook(lambda m, args: inputs.append(args[0]))
    gpt.transformer.h[layer].attn.c_proj.register_forward_pre_hook(lambda m, args: outputs.append(args[0]))
    pairs = torch.tensor([[0, query]])
    _, (log_attention, carried) = gpt.hidden(gpt.embed(torch.randint(0, 97, (1, 14))), position_ids, doc_ids,
                                             attention=(layer, head, pairs))
    weights = log_attention[0].exp()
    assert weights[:5].sum() == 0 and weights[query + 1:].sum() == 0       # another document; the future
    torch.testing.assert_close(weights.sum(), torch.tensor(1.0))
    attn = gpt.transformer.h[layer].attn
    cos, sin = (t[position_ids].unsqueeze(1) for t in (gpt.cos, gpt.sin))
    _, _, v = attn.project(inputs[0], cos, sin)
    expected = weights @ v[0, head // 2]                                   # 4 heads share 2 key/value heads
    torch.testing.assert_close(outputs[0][0, query].view(4, -1)[head], expected, atol=1e-5, rtol=1e-5)
    alone = outputs[0][0, query].view(4, -1) * (torch.arange(4) == head).unsqueeze(1)    # the other heads' share zeroed
    torch.testing.assert_close(carried[0], attn.c_proj(alone.flatten()), atol=1e-5, rtol=1e-5)


def test_the_smear_reads_the_previous_embedding_within_a_document_only():
    cfg = GPTConfig(sequence_len=32, vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, smear=True)
    gpt = randomize(GPT(cfg), 0.3)
    assert torch.equal(GPT(cfg).smear_gate, torch.zeros(64))         # off at first: a plain GPT until it learns
    a, b = torch.randint(0, 97, (1, 7)), torch.randint(0, 97, (1, 5))
    packed = gpt.hidden(gpt.embed(torch.cat([a, b], 1)), position_ids=torch.cat([torch.arange(7), torch.arange(5)])[None],
                        doc_ids=torch.tensor([[0] * 7 + [1] * 5]))
    alone = torch.cat([gpt.hidden(gpt.embed(ids)) for ids in (a, b)], 1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    gpt.smear_gate.data.zero_()
    assert not torch.allclose(gpt.hidden(gpt.embed(a)), alone[:, :7], atol=1e-3)   # the smear did change them


def test_documents_are_runs_within_a_row():
    documents = Documents(torch.tensor([[0] * 4 + [1] * 6 + [2] * 4, [2] * 6 + [3] * 4 + [-1] * 4]))
    assert documents.lengths == [[4, 6, 4], [6, 4, 4]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused-kernel rule applies on CUDA only")
def test_cuda_attention_refuses_the_math_fallback_and_names_the_cause():
    q = torch.randn(1, 2, 16, 16, device="cuda", dtype=torch.float64)      # no fused kernel takes fp64
    with pytest.raises(RuntimeError, match="no fused attention kernel takes torch.float64"):
        attention(q, q, q, causal=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused-kernel rule applies on CUDA only")
def test_cuda_masked_bf16_attention_runs_fused_and_matches_math():
    """SAM's case: bf16 with a float relative-position bias that trains. FLASH refuses masks, so this must run on
    EFFICIENT/cuDNN (allowed for a masked call), forward and backward, and agree with the math kernel in fp32."""
    q, k, v = (torch.randn(2, 12, 1024, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    bias = (torch.randn(2, 12, 1024, 1024, device="cuda") * 0.1).bfloat16().requires_grad_()
    out = attention(q, k, v, mask=bias)
    out.float().square().sum().backward()
    assert bias.grad is not None and torch.isfinite(bias.grad).all()
    reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.detach().float())
    torch.testing.assert_close(out.float(), reference, atol=2e-2, rtol=2e-2)
