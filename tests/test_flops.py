"""FLOPs count attention per document: a packed row of short documents costs Σ length², not seq_len²."""

import torch

from ocr_vlm import config, flops


def test_attention_is_counted_per_document_on_a_packed_batch():
    # row 0: documents of 3 and 2 tokens, then 1 padding token; row 1: one document of 6 tokens
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, -1], [0, 0, 0, 0, 0, 0]])
    assert flops.squared_document_lengths(doc_ids) == 3 * 3 + 2 * 2 + 6 * 6 == 49
    g = config.d20().gpt
    assert flops.gpt_attention_train_flops(config.d20(), 49) == 12 * g.n_layer * g.n_head * g.head_dim * 49
    assert g.n_layer * g.n_head * g.head_dim == 20 * 10 * 128


def test_d20_per_token_flops_are_six_per_non_embedding_parameter():
    # 20 blocks of q, k, v, proj (4 x 1280²) and MLP (8 x 1280²), plus the untied lm_head (65537 x 1280)
    assert flops.gpt_train_flops_per_token(config.d20()) == 6 * (20 * 12 * 1280 ** 2 + 65537 * 1280)


def test_a_gundam_tile_costs_the_towers_what_an_image_of_its_side_does():
    cfg = config.d20()
    cfg = cfg.with_mode("gundam")
    tile = flops.image_train_flops(cfg, (), side=cfg.tile_size)
    base = config.d20()
    base.image_size = cfg.tile_size
    assert tile == flops.image_train_flops(base, ())
    # 640 px tiles: 40² SAM tokens against 64² for the 1024 px global view, and 10² vs 16² CLIP tokens
    assert 0.3 < tile / flops.image_train_flops(cfg, ()) < 0.4
