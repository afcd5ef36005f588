"""nanochat's GPT as of its d20 release: rotary, QK-norm, relu² MLP, parameter-free RMSNorm, untied head, softcap.

The VLM splices image embeddings between `embed` and `hidden`, so there is one forward, not two copies that drift.
Packed rows pass `doc_ids` (which sample each token belongs to) and `position_ids` (restarting per sample);
attention then runs document by document, so its cost follows the samples' lengths, not the row's.
Generation passes a `KVCache` and `key_valid` (False on left padding) and feeds only the new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ocr_vlm.config import GPTConfig
from ocr_vlm.model.layers import attention

IGNORE_INDEX = -1          # nanochat's convention for targets that carry no loss
LOSS_CHUNK = 256           # supervised tokens per lm_head chunk: bounds fp32 logits to LOSS_CHUNK x vocab


def norm(x: torch.Tensor) -> torch.Tensor:
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """nanochat's half-split rotation; x is (B, H, T, D), cos/sin (B, 1, T, D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of every layer for a batch being generated, preallocated to `max_len` positions."""

    def __init__(self, cfg: GPTConfig, batch: int, max_len: int, device, dtype):
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0            # positions filled; advanced after the last layer wrote
        self.previous = None       # the last position's input embedding (B, 1, D), for the smear

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


class Documents:
    """Packed rows cut into their documents, so that attention costs the sum of squared document lengths.

    A document is a run of equal `doc_ids` within a row: the loader writes each sample contiguously, and the row's
    padding is one more run. Each document gets its own causal SDPA call on views of q, k and v: `split`, whose
    backward is one concatenation, so no gather or scatter of the whole row. Built once per forward, shared by all
    layers.
    """

    def __init__(self, doc_ids: torch.Tensor):
        # Run lengths of each row, as Python ints for `split`: the packed forward's one host sync per row.
        self.lengths = [torch.unique_consecutive(row, return_counts=True)[1].tolist() for row in doc_ids]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """Causal attention within each document; q, k, v and the result are (B, heads, T, head_dim)."""
        rows = []
        for lengths, *row in zip(self.lengths, q.unbind(0), k.unbind(0), v.unbind(0)):
            documents = zip(*(x.split(lengths, dim=1) for x in row))      # per document, (heads, length, head_dim)
            out = [attention(*(x.unsqueeze(0) for x in qkv), causal=True, gqa=gqa).squeeze(0) for qkv in documents]
            rows.append(torch.cat(out, dim=1))
        return torch.stack(rows)


def left_padded_positions(valid: torch.Tensor) -> torch.Tensor:
    """Rotary positions of left-padded rows (B, T) bool: each row counts from its first real token, so a row gets
    the positions it would have alone (padding gets 0; its keys are masked)."""
    return (valid.cumsum(1) - 1).clamp(min=0)


def attention_mask(key_valid: torch.Tensor | None, past: int, new: int, device) -> torch.Tensor | None:
    """(B, 1, new, past+new) bool mask for generation, or None for plain causal attention (the fast path).

    key_valid: causal, skipping padded keys; every query also sees itself, so a padding query has one key and never
    yields NaN (its output is never used).
    """
    if key_valid is None and (past == 0 or new == 1):
        return None            # plain causal, or one new token that may see everything before it
    causal = torch.ones(new, past + new, dtype=torch.bool, device=device).tril(diagonal=past)
    mask = causal.unsqueeze(0)
    if key_valid is not None:
        itself = torch.zeros_like(causal)
        itself[:, past:] = torch.eye(new, dtype=torch.bool, device=device)
        mask = (mask & key_valid.unsqueeze(1)) | itself
    return mask.unsqueeze(1)


# Which keys each query sees: None = causal (or one cached query that sees every key), a bool mask, or Documents.
Layout = Documents | torch.Tensor | None


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.c_q = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=False)
        self.c_k = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_v = nn.Linear(cfg.n_embd, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """(B, T, D) -> q (B, heads, T, head_dim), k and v (B, kv heads, T, head_dim); q and k rotated, then normed."""
        B, T, _ = x.shape
        q = self.c_q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.c_k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.c_v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        return norm(apply_rotary(q, cos, sin)), norm(apply_rotary(k, cos, sin)), v   # QK-norm after rotary

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout,
                cache: KVCache | None = None, layer: int = 0, look: int | None = None):
        """The layer's attention output; with `look` (a head), also the scores that head gives from each new
        position to every key so far, cached and new: (B, T, keys), before masking and softmax."""
        B, T, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        gqa = self.n_head != self.n_kv_head
        if isinstance(layout, Documents):
            y = layout.attend(q, k, v, gqa)
        else:   # causal over the sequence, a single cached-decode query that sees every key, or the mask
            y = attention(q, k, v, mask=layout, causal=layout is None and q.shape[2] == k.shape[2], gqa=gqa)
        y = self.c_proj(y.transpose(1, 2).reshape(B, T, -1))
        if look is None:
            return y
        kv_head = look // (self.n_head // self.n_kv_head)
        return y, q[:, look] @ k[:, kv_head].transpose(1, 2) * self.head_dim ** -0.5

    def one_head(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, doc_ids: torch.Tensor | None,
                 pairs: torch.Tensor, head: int) -> tuple[torch.Tensor, torch.Tensor]:
        """What `head` does at each of `pairs`' queries, attending as `forward` would (causal, within the query's
        document): the log of the attention it pays to every position of the query's row (P, T), and its output (the
        values it weighs, through its share of c_proj: what it alone adds to the residual stream). pairs: (P, 2+) =
        (row, query position, ...), in row order."""
        q, k, v = self.project(x, cos, sin)
        rows, queries = pairs[:, 0], pairs[:, 1]
        kv_head = head // (self.n_head // self.n_kv_head)
        positions = torch.arange(x.shape[1], device=x.device)
        log_probs, outputs = [], []
        # one row at a time: a (pairs, T) score matrix per row, not (pairs, T, head_dim) keys gathered per pair
        row_ids, counts = rows.unique_consecutive(return_counts=True)
        for row, at in zip(row_ids.tolist(), queries.split(counts.tolist())):
            scores = q[row, head, at] @ k[row, kv_head].T * self.head_dim ** -0.5
            visible = positions <= at.unsqueeze(1)
            if doc_ids is not None:
                visible &= doc_ids[row] == doc_ids[row, at].unsqueeze(1)
            log_probs.append(scores.float().masked_fill(~visible, float("-inf")).log_softmax(-1))
            outputs.append(log_probs[-1].exp().to(v.dtype) @ v[row, kv_head])
        log_probs = torch.cat(log_probs) if log_probs else q.new_zeros(0, x.shape[1], dtype=torch.float32)
        weighed = torch.cat(outputs) if outputs else v.new_zeros(0, self.head_dim)
        share = self.c_proj.weight[:, head * self.head_dim:(head + 1) * self.head_dim]
        return log_probs, weighed @ share.T


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.attn = CausalSelfAttention(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, layout: Layout,
                cache: KVCache | None = None, layer: int = 0, look: int | None = None):
        """The block's output; with `look`, also its attention's scores from that head (`CausalSelfAttention`)."""
        y = self.attn(norm(x), cos, sin, layout, cache, layer, look)
        y, scores = y if look is not None else (y, None)
        x = x + y
        x = x + self.mlp(norm(x))
        return x if look is None else (x, scores)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.transformer = nn.ModuleDict({
            "wte": nn.Embedding(cfg.vocab_size, cfg.n_embd),
            "h": nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer)),
        })
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.smear_gate = nn.Parameter(torch.zeros(cfg.n_embd)) if cfg.smear else None
        # fp32 rotary tables, ten times the trained context as nanochat does; not saved, so init_weights fills them
        # (a meta build + to_empty would otherwise leave them as uninitialised memory).
        table = (cfg.sequence_len * 10, cfg.head_dim // 2)
        self.register_buffer("cos", torch.empty(table, dtype=torch.float32), persistent=False)
        self.register_buffer("sin", torch.empty(table, dtype=torch.float32), persistent=False)
        self.gradient_checkpointing = False
        if self.lm_head.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """nanochat's init: scaled normal matrices, unit embedding, zero lm_head and zero output projections.

        Also computes the rotary tables, so `to_empty` + `init_weights` after a meta build gives a usable model."""
        self.rotary_tables()
        for module in self.modules():
            if isinstance(module, nn.Linear):
                fan_out, fan_in = module.weight.shape
                module.weight.normal_(0, fan_in ** -0.5 * min(1.0, (fan_out / fan_in) ** 0.5))
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0, 1.0)
        self.lm_head.weight.zero_()
        if self.smear_gate is not None:
            self.smear_gate.zero_()
        for block in self.transformer.h:
            block.attn.c_proj.weight.zero_()
            block.mlp.c_proj.weight.zero_()

    @torch.no_grad()
    def rotary_tables(self) -> None:
        """Fill the (unsaved) cos/sin buffers: after loading weights into a model built without them."""
        cfg, device = self.cfg, self.cos.device
        inv_freq = 1.0 / cfg.rope_base ** (torch.arange(0, cfg.head_dim, 2, device=device).float() / cfg.head_dim)
        angles = torch.outer(torch.arange(self.cos.shape[0], device=device).float(), inv_freq)
        self.cos.copy_(angles.cos())
        self.sin.copy_(angles.sin())

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Raw token embeddings; `hidden` applies nanochat's norm after embedding."""
        return self.transformer.wte(idx)

    def hidden(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None,
               key_valid: torch.Tensor | None = None, cache: KVCache | None = None,
               attention: tuple[int, int, torch.Tensor] | None = None, look: tuple[int, int] | None = None,
               probe: bool = False):
        """(B, T, D) embeddings of the new tokens -> final-normed hidden states.

        With a cache, `key_valid` covers the cached and the new positions: (B, cache.length + T). With `attention` =
        (layer, head, pairs) it returns (hidden states, that head's `one_head` over the pairs) instead, or with `probe` that
        alone, running no layer past it; with `look` = (layer, head), (hidden states, that head's scores from the new
        positions to every key, `CausalSelfAttention`)."""
        B, T, _ = x.shape
        past = cache.length if cache is not None else 0
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device).expand(B, T)
        cos = self.cos[position_ids].unsqueeze(1).to(x.dtype)
        sin = self.sin[position_ids].unsqueeze(1).to(x.dtype)
        layout = Documents(doc_ids) if doc_ids is not None else attention_mask(key_valid, past, T, x.device)
        if self.smear_gate is not None:
            x = self.smear(x, doc_ids, key_valid, cache)
        x = norm(x)
        checkpointed = self.gradient_checkpointing and torch.is_grad_enabled()
        attended = None
        for i, block in enumerate(self.transformer.h):
            if attention is not None and i == attention[0]:      # outside the checkpoint: computed once, kept for backward
                attended = block.attn.one_head(norm(x), cos, sin, doc_ids, attention[2], attention[1])
                if probe:
                    return attended
            args = (x, cos, sin, layout, cache, i)   # the same call either way: a checkpointed block still fills the cache
            if look is not None and i == look[0]:   # generation's: nothing to checkpoint
                x, attended = block(*args, look[1])
            else:
                x = checkpoint(block, *args, use_reentrant=False) if checkpointed else block(*args)
        if cache is not None:
            cache.length += T
        return norm(x) if attention is None and look is None else (norm(x), attended)

    def smear(self, x: torch.Tensor, doc_ids: torch.Tensor | None, key_valid: torch.Tensor | None,
              cache: KVCache | None) -> torch.Tensor:
        """Each position's input embedding plus `smear_gate` (per channel, zero at first) times the one before it, so
        that the first layer's queries know the last two tokens: the pointer's query (model/reading.py) can then tell
        the second `t` of `tt` from the first. Only a predecessor of the same document (`doc_ids`) that is a real token
        (`key_valid`, left padding) counts; in cached decoding it is the cache's last embedding."""
        B, T, D = x.shape
        past = cache.length if cache is not None else 0
        before = cache.previous if past else x.new_zeros(B, 1, D)
        if cache is not None:
            cache.previous = x[:, -1:]
        previous = torch.cat([before, x[:, :-1]], 1)
        kept = torch.ones(B, T, dtype=torch.bool, device=x.device)
        kept[:, 0] = past > 0
        if doc_ids is not None:
            kept[:, 1:] &= doc_ids[:, 1:] == doc_ids[:, :-1]
        if key_valid is not None:     # (B, past + T): whether each new position's predecessor is a real token
            kept[:, 1:] &= key_valid[:, past:past + T - 1]
            if past:
                kept[:, 0] &= key_valid[:, past - 1]
        return x + self.smear_gate.to(x.dtype) * previous * kept.unsqueeze(-1)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return softcap(self.lm_head(h).float(), self.cfg.logit_softcap)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        h = self.hidden(self.embed(idx), position_ids, doc_ids)
        if targets is None:
            return self.logits(h)
        return chunked_cross_entropy(h, self.lm_head.weight, targets, self.cfg.logit_softcap)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap)


class _SoftcappedCrossEntropySum(torch.autograd.Function):
    """Summed cross-entropy of softcap(h @ weight.T) against targets, `chunk` rows of fp32 logits at a time.

    Plain autograd would keep every row's logits for backward; checkpointing each chunk instead still gives one
    full-size weight gradient per chunk, two of them alive while autograd adds them up. Here backward recomputes
    each chunk's logits and adds its weight gradient in place (in the weight's dtype, as that sum was), so the
    peak is the gradients of h and the weight plus one chunk's logits. torch's F.linear_cross_entropy chunks
    too, but has no softcap.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float, chunk: int):
        ctx.save_for_backward(h, weight, targets)
        ctx.cap, ctx.chunk = cap, chunk
        return sum(F.cross_entropy(cap * _tanh_logits(rows, weight, cap), rows_targets, reduction="sum")
                   for rows, rows_targets in zip(h.split(chunk), targets.split(chunk)))

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor):
        h, weight, targets = ctx.saved_tensors
        need_h, need_weight = ctx.needs_input_grad[:2]      # a frozen GPT needs no weight gradient
        grad_h, grad_weight = [], torch.zeros_like(weight) if need_weight else None
        for rows, rows_targets in zip(h.split(ctx.chunk), targets.split(ctx.chunk)):
            tanh = _tanh_logits(rows, weight, ctx.cap)
            grad = torch.softmax(ctx.cap * tanh, dim=-1)              # d CE / d logits = softmax - one_hot
            grad[torch.arange(len(grad), device=grad.device), rows_targets] -= 1
            grad *= (1 - tanh.square()) * grad_total                  # d softcap(z) / dz = 1 - tanh(z / cap)^2
            grad = grad.to(rows.dtype)
            if need_h:
                grad_h.append(grad @ weight)
            if need_weight:
                grad_weight.addmm_(grad.T, rows)
        return torch.cat(grad_h) if need_h else None, grad_weight, None, None, None


def _tanh_logits(h: torch.Tensor, weight: torch.Tensor, cap: float) -> torch.Tensor:
    """tanh(logits / cap) in fp32: softcap(logits) = cap * this, and its derivative is 1 - this^2."""
    return torch.tanh(F.linear(h, weight).float() / cap)


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, cap: float,
                          chunk: int = LOSS_CHUNK) -> torch.Tensor:
    """Mean cross-entropy over targets != IGNORE_INDEX, with lm_head run on the supervised positions only.

    Packed rows supervise ~10% of their positions (image embeddings and prompts carry no target), so gathering
    those rows first divides the vocabulary-wide work, and its memory, by ten. With no supervised position, one
    empty chunk still runs: h and the weight get an all-zero gradient, as ZeRO-3 needs every rank to use every
    parameter in every step.
    """
    targets = targets.reshape(-1)
    supervised = (targets != IGNORE_INDEX).nonzero().squeeze(1)       # one host sync: the row count
    rows = h.reshape(-1, h.size(-1)).index_select(0, supervised)
    total = _SoftcappedCrossEntropySum.apply(rows, weight, targets.index_select(0, supervised), cap, chunk)
    return total / max(supervised.numel(), 1)
