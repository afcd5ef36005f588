"""Whether a model reads: the reading head's loss, the vision norm, the image-gap and vision-share diagnostics."""

import dataclasses
import json
import math
import random

import numpy as np
import pytest
import torch

from ocr_vlm import config
from ocr_vlm.config import ConfigError, GPTConfig
from ocr_vlm.data.render import READING_SETS, page_record, reading_page
from ocr_vlm.data.sample import decode
from ocr_vlm.diagnostics import BLIND_GAP, VisionShare, mismatched, verdict
from ocr_vlm.model.gpt import GPT, IGNORE_INDEX, norm
from ocr_vlm.model.reading import (BACKGROUND, CLASSES, NEWLINE, SPACE, Places, Predecessor, ReadingHead, VisionNorm,
                                   byte_loss, places, pointer_loss, predecessor_loss, reading_cells, reading_gaps,
                                   reading_predecessors, reading_targets)
from ocr_vlm.model.vlm import build_model
from ocr_vlm.rejected import Rejected
from ocr_vlm.tokenizer import MINI_TOKENIZER, Tokenizer

CFG = dataclasses.replace(config.mini(), reading_head=True, vision_norm=True)


def test_reading_targets_are_the_bytes_without_whitespace():
    assert reading_targets("aB 3\nxY") == list(b"aB3xY")


def test_each_targets_gap_is_the_whitespace_between_it_and_the_character_before():
    assert reading_gaps("aB 3\nxY") == [BACKGROUND, BACKGROUND, SPACE, NEWLINE, BACKGROUND]
    assert reading_gaps(" a \n b  c") == [SPACE, NEWLINE, SPACE]          # a line break among spaces is a line break
    assert reading_gaps("a \u00e9") == [BACKGROUND, SPACE, BACKGROUND]    # é's second byte follows its first


def test_the_reading_loss_is_the_cross_entropy_to_each_pages_byte_histogram():
    head = ReadingHead(width=2)
    with torch.no_grad():       # token logits: class "a" = feature 0, class "b" = feature 1, every other class 0
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        head.proj.weight[ord("a"), 0] = head.proj.weight[ord("b"), 1] = 1.0
    tokens = torch.tensor([[[3.0, 0.0], [0.0, 0.0]],            # page 0: one token says "a"
                           [[0.0, 0.0], [0.0, 0.0]]])            # page 1: nothing
    pooled = torch.stack([torch.stack([torch.logsumexp(tokens[n, :, f], 0) for f in (0, 1)]) for n in range(2)])
    log_p = torch.full((2, CLASSES), math.log(2)).index_put_(      # 2 tokens of logit 0 pool to log 2
        (torch.arange(2).repeat_interleave(2), torch.tensor([97, 98] * 2)), pooled.flatten()).log_softmax(-1)
    # page 0 reads "aab" (histogram 2/3 a, 1/3 b); page 1 has no characters and adds zero to the mean
    expected = -(2 / 3 * log_p[0, ord("a")] + 1 / 3 * log_p[0, ord("b")]) / 2
    loss = byte_loss(head.proj(tokens), torch.tensor(reading_targets("a a b")), torch.tensor([3, 0]), None)
    assert torch.allclose(loss, expected, atol=1e-6)


def test_reading_cells_train_each_token_on_the_last_byte_under_it():
    assert reading_cells("a\u00e9 b", [4, 5, 9]) == [4, -1, 5, 9]      # é is two bytes under one token: its last
    assert reading_cells("ab cd", [4, 4, 4, 5]) == [-1, -1, 4, 5]        # three characters on token 4: c, the last
    assert reading_cells("a\u00e9 b", None) == [-1] * 4


def test_a_token_holding_two_characters_is_trained_on_the_last_and_its_previous_readout_on_the_first():
    torch.manual_seed(0)
    head = ReadingHead(width=4, predecessor=True)
    tokens = torch.randn(1, 4, 4)                               # a 2x2 grid
    (own, previous, gap), log_attention = (x.log_softmax(-1) for x in head.read(tokens))
    empty = [0, 2, 3]                                           # both on token 1; the rest is background
    expected = -torch.stack([own[0, 1, ord("b")] + own[0, empty, BACKGROUND].mean(),
                             previous[0, 1, ord("a")] + previous[0, empty, BACKGROUND].mean(),
                             gap[0, 1, BACKGROUND] + gap[0, empty, BACKGROUND].mean(),
                             log_attention[0, 1, 1]])           # the page's first token: its own predecessor
    assert torch.allclose(head.losses(head.read(tokens), places([("ab", [1, 1])])), expected, atol=1e-6)


def test_each_placed_byte_has_the_token_of_the_character_before_it_on_another_token():
    assert reading_predecessors("ab\ncd", [0, 1, 8, 9]) == [0, 0, 1, 8]     # a line's first: the line above's last
    assert reading_predecessors("ab cd", [4, 4, 4, 5]) == [-1, -1, 4, 4]    # a, b, c share token 4, the page's first
    assert reading_predecessors("a\u00e9b", [3, 5, 6]) == [3, -1, 3, 5]    # é's first byte is not its token's last
    assert reading_predecessors("ab", None) == [-1, -1]


def test_the_predecessor_attention_learns_where_the_character_before_is_from_the_tokens_places():
    torch.manual_seed(0)
    attend = Predecessor(width=8)
    optimizer = torch.optim.Adam(attend.parameters(), lr=3e-2)
    cells = torch.arange(1, 16).view(3, 5)[:, 1:].flatten()     # a 4x4 grid: every token but a row's first ...
    for _ in range(200):                                        # ... looks at the one to its left
        log_attention = attend(torch.randn(8, 16, 8))
        loss = -log_attention[:, cells, cells - 1].mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    found = attend(torch.randn(8, 16, 8))[:, cells].argmax(-1) == cells - 1
    assert found.float().mean() > 0.95, found.float().mean()
    with pytest.raises(ValueError, match="not a square grid"):
        attend(torch.randn(1, 15, 8))


def test_with_positions_each_token_is_trained_on_the_character_centred_on_it():
    torch.manual_seed(0)
    head = ReadingHead(width=4)
    tokens = torch.randn(2, 3, 4)
    # page 0 knows its positions: "a" under token 0, "b" under token 2, token 1 is background;
    # page 1 does not ("b" somewhere): the bag, as without positions
    loss = byte_loss(head.proj(tokens), torch.tensor(reading_targets("a b") + reading_targets("b")),
                     torch.tensor([2, 1]), torch.tensor(reading_cells("a b", [0, 2]) + reading_cells("b", None)))
    log_p = head.proj(tokens).log_softmax(-1)
    per_token = -(log_p[0, 0, ord("a")] + log_p[0, 2, ord("b")]) / 2 - log_p[0, 1, BACKGROUND]
    bag = -head.proj(tokens[1]).logsumexp(0).log_softmax(-1)[ord("b")]
    assert torch.allclose(loss, (per_token + bag) / 2, atol=1e-6)


def test_the_reading_head_also_reads_the_character_and_the_gap_before_each_token():
    torch.manual_seed(0)
    head = ReadingHead(width=4, predecessor=True)
    tokens = torch.randn(2, 4, 4)
    reading = places([("a b", [0, 2]), ("c", [1])])
    targets, lengths, cells = reading.targets, reading.lengths, reading.cells
    before = torch.tensor([BACKGROUND, ord("a"), BACKGROUND])         # each page's first character has none
    gaps = torch.tensor([BACKGROUND, SPACE, BACKGROUND])
    (own, previous, gap), log_attention = head.read(tokens)
    # where the character before is: page 0's a (token 0) is its first, b follows it; page 1's c is its first
    pointed = -torch.stack([(log_attention[0, 0, 0] + log_attention[0, 2, 0]) / 2, log_attention[1, 1, 1]]).mean()
    expected = torch.stack([byte_loss(logits, wanted, lengths, cells)
                            for logits, wanted in ((own, targets), (previous, before), (gap, gaps))] + [pointed])
    assert torch.allclose(head.losses(head.read(tokens), reading), expected, atol=1e-6)


def test_with_two_back_the_head_also_reads_the_character_before_the_previous_one():
    torch.manual_seed(0)
    head = ReadingHead(width=4, code=True, back=2, predecessor=True)
    tokens = torch.randn(2, 4, 4)
    reading = places([("a b\nc", [0, 1, 2]), ("d", [1])])
    targets, lengths, cells = reading.targets, reading.lengths, reading.cells
    previous = torch.tensor([BACKGROUND, ord("a"), ord("b"), BACKGROUND])
    two_back = torch.tensor([BACKGROUND, BACKGROUND, ord("a"), BACKGROUND])   # a page's first two have none
    gaps = torch.tensor([BACKGROUND, SPACE, NEWLINE, BACKGROUND])
    wanted = (targets, previous, two_back, gaps)
    logits, log_attention = head.read(tokens)
    expected = torch.stack([byte_loss(each, w, lengths, cells) for each, w in zip(logits, wanted)] +
                           [predecessor_loss(log_attention, reading)])
    assert torch.allclose(head.losses(head.read(tokens), reading), expected, atol=1e-6)
    assert head.embed(head(tokens)).shape == tokens.shape and head.code.in_features == 4 * CLASSES


def test_without_a_predecessor_each_readout_reads_its_token_alone():
    torch.manual_seed(0)
    head = ReadingHead(width=4, back=2)
    tokens = torch.randn(2, 4, 4)
    reading = places([("a b\nc", [0, 1, 2]), ("d", [1])])
    read = head.read(tokens)
    assert read.log_attention is None and len(head.accuracies) == 3
    assert all(readout.in_features == 4 for readout in head.readouts())
    assert torch.equal(read.logits, torch.stack([readout(tokens) for readout in head.readouts()]))
    assert len(head.losses(read, reading)) == 4 and len(head.named(read, reading)) == 4


def test_the_head_counts_the_placed_characters_each_readout_names_on_their_tokens():
    head = ReadingHead(width=CLASSES, predecessor=True)
    with torch.no_grad():        # both character readouts' logits are the tokens themselves
        for readout in (head.proj, head.previous):
            readout.weight.zero_()
            readout.weight[:, :CLASSES] = torch.eye(CLASSES)   # the previous readout: of the token, not its context
            readout.bias.zero_()
        head.gap.weight.zero_()   # and the gap readout says "nothing before" everywhere
        head.gap.bias.zero_()
        head.gap.bias[BACKGROUND] = 1.0
        for p in head.predecessor.parameters():   # the predecessor attends alike everywhere: most to the first token
            p.zero_()
    tokens = torch.zeros(2, 4, CLASSES)
    tokens[0, 0, ord("a")] = tokens[0, 2, ord("c")] = tokens[1, 1, ord("d")] = 1.0   # names a, c, d at those tokens
    # page 0 "a b": a named at token 0, b (token 2) read as c; page 1 "d" has no positions, so it is not counted.
    # What comes before: a is the page's first (BACKGROUND, which token 0 does not name), before b comes a (not c);
    # nothing comes between the page's start and a, a space between a and b. The token before both is token 0 (a's
    # own, as the page's first).
    reading = places([("a b", [0, 2]), ("d", None)])
    assert head.named(head.read(tokens), reading).tolist() == [1, 0, 1, 2, 2]
    tokens[0, 2, ord("c")], tokens[0, 2, ord("a")] = 0.0, 1.0      # token 2 now names a: right before b, wrong as b
    assert head.named(head.read(tokens), reading).tolist() == [1, 1, 1, 2, 2]


def test_a_rendered_page_knows_which_token_each_character_is_under():
    cfg = config.mini16()
    page = reading_page(random.Random(3), READING_SETS["page"])
    example = decode({"__key__": "p", "json": json.dumps(page_record("p", page, "t").meta).encode(),
                      "png": page.encoded()[0]}, Tokenizer.load(MINI_TOKENIZER), cfg)
    side = cfg.image_size // cfg.vision_grid
    darkness = 255 - example.views.global_view.float().mean(0).unfold(0, side, side).unfold(1, side, side)
    ink = darkness.flatten(0, 1).amax((1, 2))                 # each token's darkest pixel against the paper
    assert len(example.cells) == len("".join(page.text.split()))
    assert ink[example.cells].min() > 100 and ink.median() < 60          # every character's token holds ink
    bad = page_record("p", page, "t").meta | {"chars": page.chars[:-1]}
    with pytest.raises(Rejected, match="field 'chars' must list one box per non-whitespace character"):
        decode({"__key__": "p", "json": json.dumps(bad).encode(), "png": page.encoded()[0]},
               Tokenizer.load(MINI_TOKENIZER), cfg)


def test_the_pointer_pairs_each_answer_token_with_the_next_characters_token_and_the_end_with_the_separator():
    cfg, tokenizer = config.mini16(), Tokenizer.load(MINI_TOKENIZER)
    page = reading_page(random.Random(3), READING_SETS["page"])          # lines of words: spaces and newlines
    example = decode({"__key__": "p", "json": json.dumps(page_record("p", page, "t").meta).encode(),
                      "png": page.encoded()[0]}, tokenizer, cfg)
    g, image = cfg.vision_grid, example.inputs.index(cfg.image_token_id)
    separator = image + g * (g + 1)                                          # the image's last placeholder
    written, expected, blank = "", [], 0
    for position, target in enumerate(example.targets):
        if target == tokenizer.assistant_end_id:   # the end: the view separator after the grid's rows
            expected.append((position, separator))
        elif target != IGNORE_INDEX:   # the next inked character from the token's start: its own, or the one after
            row, col = divmod(example.cells[len("".join(written.split()))], g)
            expected.append((position, image + row * (g + 1) + col))
            blank += not tokenizer.decode([target]).strip()
            written += tokenizer.decode([target])
    assert written == page.text and len(expected) > 10 and blank > 0
    assert list(example.pointer) == expected
    assert example.inputs[separator] == cfg.image_token_id != example.inputs[separator + 1]


def test_the_pointers_loss_is_where_its_head_looks_and_what_it_carries_with_every_page_weighed_alike():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(sequence_len=32, vocab_size=97, n_layer=1, n_head=2, n_kv_head=2, n_embd=64))
    torch.nn.init.normal_(gpt.lm_head.weight)                             # nanochat starts it at zero
    log_attention, carried = torch.tensor([0.5, 0.25, 0.9]).log(), torch.randn(3, 64)
    targets = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    pairs = torch.tensor([[0, 0, 20, 0], [0, 1, 21, 0], [1, 2, 22, 2]])     # (row, position, key, page); page 1 has none
    carries = torch.nn.functional.cross_entropy(gpt.logits(norm(carried)), torch.tensor([5, 6, 11]), reduction="none")
    looks_and_carries = carries - log_attention
    expected = (looks_and_carries[:2].mean() + looks_and_carries[2]) / 2
    rows = torch.full((3, 24), -9.0).log_softmax(-1).index_put((torch.arange(3), pairs[:, 2]), log_attention)
    torch.testing.assert_close(pointer_loss(gpt, (rows, carried), targets, pairs, 3), expected)   # each pair's key
    assert pointer_loss(gpt, (rows[:0], carried[:0]), targets, pairs[:0], 3) == 0


def test_each_answer_token_is_told_the_place_its_character_was_read_from_and_each_vision_token_its_own():
    cfg = dataclasses.replace(CFG, reading_pointer=True, reading_place=True).validate()
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():                                       # zero at first: a model given them starts where it was
        assert not model.reading_places.key.any() and not model.reading_places.query.any()
        model.reading_places.key.normal_(), model.reading_places.query.normal_()
    n, g = cfg.image_tokens, cfg.vision_grid
    ids = torch.tensor([[1] + [cfg.image_token_id] * n + [5, 6, 7, 2] + [cfg.image_token_id] * n + [8, 9]])
    vision = torch.randn(2, g * g, cfg.gpt.n_embd)
    x = model.embed(ids, vision)
    bare = model.gpt.embed(ids).masked_scatter((ids == cfg.image_token_id).unsqueeze(-1), model.layout(vision))
    added = x - bare
    second = 1 + n + 4                                          # where the second image starts
    torch.testing.assert_close(added[0, 1:1 + n], model.reading_places.keys(torch.arange(n)))
    torch.testing.assert_close(added[0, second:second + n], model.reading_places.keys(torch.arange(n)))
    assert not added[0, 1 + n:second].any() and not added[0, 0].any()
    # (row, position, vision position, page): the token each position writes is told its pair's place where it is
    # read next; the last one writes the end, which nothing reads
    targets = torch.cat([ids[:, 1:], torch.tensor([[3]])], 1)
    pairs = torch.tensor([[0, n, 1 + 3 * (g + 1) + 2, 0], [0, n + 1, 1 + n - 1, 0], [0, second + n, second + g, 1],
                          [0, second + n + 1, second + n - 1, 1]])
    told = model.told(x, ids, targets, pairs) - x
    expected = torch.zeros_like(x)
    expected[0, [n + 1, n + 2, second + n + 1]] = model.reading_places.told(torch.tensor([3 * (g + 1) + 2, n - 1, g]))
    torch.testing.assert_close(told, expected)
    # a place's code is its row's and its column's: row 1's first is not row 0's second, though next in raster order
    code = Places(g, 8).code(torch.tensor([1, g + 1, 2 * (g + 1) + 1]))
    assert not torch.allclose(code[0], code[1])
    torch.testing.assert_close(code[0, 10:], code[2, 10:])          # the same column's half
    for bad in (dict(reading_pointer=False), dict(reading_pointer=True, tile_size=CFG.image_size // 2)):
        with pytest.raises(ConfigError, match="reading_place"):
            dataclasses.replace(CFG, reading_place=True, **bad).validate()


def test_training_tells_each_token_where_the_pointer_looked_most_as_generation_does():
    cfg = dataclasses.replace(CFG, reading_pointer=True, reading_place=True,
                              gpt=dataclasses.replace(CFG.gpt, smear=True)).validate()
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    n = cfg.image_tokens
    ids = torch.tensor([[1] + [cfg.image_token_id] * n + [5, 6, 7, 8, 9]])
    targets = torch.cat([ids[:, 1:], torch.tensor([[3]])], 1)
    x = model.embed(ids, torch.randn(1, cfg.vision_grid ** 2, cfg.gpt.n_embd))
    pairs = torch.tensor([[0, n + k, 1 + 7 * k, 0] for k in range(5)])           # the true places: any
    looked = model.looked(x, ids, targets, pairs, None, None)
    # generation's path to the same head: its scores from every position, told the true places
    _, scores = model.gpt.hidden(model.told(x, ids, targets, pairs), look=(0, 0))
    slots = model.image_slots(ids)[0]
    expected = slots[scores[0, pairs[:, 1]][:, slots].argmax(-1)]
    assert torch.equal(looked[:, 2], expected) and torch.equal(looked[:, [0, 1, 3]], pairs[:, [0, 1, 3]])
    assert not torch.equal(looked, pairs)


@pytest.mark.parametrize("predecessor", [False, True])
def test_reading_loss_trains_the_towers_and_not_the_gpt(predecessor):
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(CFG, reading_predecessor=predecessor))
    ids = torch.tensor([[1] + [CFG.image_token_id] * CFG.image_tokens * 2 + [5, 6]])
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, -2] = 7
    lm, reading, _ = model(ids, targets=targets, pixel_values=torch.randn(2, 3, CFG.image_size, CFG.image_size),
                        reading=places([("Ab3", [0, 5, 9]), ("xy", None)]))   # the predecessor's needs places
    assert torch.isfinite(reading).all() and (reading > 0).all()
    reading.sum().backward()
    for name in ("sam_model", "vision_model", "projector", "reading_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert model.gpt.lm_head.weight.grad is None             # the reading loss never reaches the GPT


def test_with_reading_code_the_gpt_reads_what_the_head_names_and_trains_it():
    torch.manual_seed(0)
    pixels = torch.randint(0, 256, (2, 3, CFG.image_size, CFG.image_size), dtype=torch.uint8)
    plain, coded = build_model(CFG).eval(), build_model(dataclasses.replace(CFG, reading_code=True)).eval()
    for model, reads_the_head in ((plain, False), (coded, True)):
        before = model.vision_tokens(pixels)
        with torch.no_grad():
            model.reading_head.proj.weight.mul_(3.0)
        assert torch.equal(before, model.vision_tokens(pixels)) != reads_the_head
    coded.train()
    with torch.no_grad():                      # nanochat zero-initialises its output projections: no gradient yet
        for p in coded.gpt.parameters():
            p.normal_(0, 0.05)
    ids = torch.tensor([[1] + [CFG.image_token_id] * CFG.image_tokens * 2 + [5, 6]])
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, -2] = 7
    coded(ids, targets=targets, pixel_values=pixels).backward()    # the language-model loss alone
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in coded.reading_head.parameters())
    with pytest.raises(ConfigError, match="reading_code"):
        dataclasses.replace(config.mini(), reading_code=True).validate()


def test_the_reading_head_reads_a_page_the_same_whatever_shares_its_batch():
    torch.manual_seed(0)
    model = build_model(CFG).train()          # with the vision norm, whose statistics every batch moves
    ids = torch.tensor([[1] + [CFG.image_token_id] * CFG.image_tokens * 2 + [5, 6]])
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, -2] = 7
    pixels = torch.randint(0, 256, (3, 3, CFG.image_size, CFG.image_size), dtype=torch.uint8)
    # page 0 reads "ab" at tokens 5 and 6; its batch mate has no characters, so adds zero
    reading = places([("ab", [5, 6]), ("", [])])
    _, alone, _ = model(ids, targets=targets, pixel_values=pixels[[0, 1]], reading=reading)
    _, with_another, _ = model(ids, targets=targets, pixel_values=pixels[[0, 2]], reading=reading)
    assert torch.allclose(alone, with_another)          # page 0's code is its own


def test_the_vision_norm_standardises_pages_and_reads_them_alike_in_training_and_evaluation():
    torch.manual_seed(0)
    norm = VisionNorm(4, 8)
    common = 5.0 * torch.randn(1, 4, 8)                      # a large part every page shares (position by position)
    pages = lambda scale: common + scale * torch.randn(64, 4, 8)   # and a page-dependent one
    for _ in range(100):
        norm(pages(1.0))
    tokens = pages(1.0)
    out = norm(tokens)
    assert out.mean(0).abs().max() < 0.5 and (out.std(0, unbiased=False) - 1).abs().max() < 0.5
    for _ in range(100):                                     # shrink what varies tenfold: once the statistics
        norm(pages(0.1))                                     # have caught up, nothing is gained
    assert (norm(pages(0.1)).std(0, unbiased=False) - 1).abs().max() < 0.5
    tracked = norm.running_mean.clone(), norm.running_var.clone()
    norm(torch.zeros(2, 4, 8), batch_statistics=False)        # blank stand-in images: statistics left alone
    norm(tokens[:1])                                         # one page has no spread to measure: the same
    assert torch.equal(norm.running_mean, tracked[0]) and torch.equal(norm.running_var, tracked[1])
    trained = norm(tokens[:1])
    norm.eval()                                              # evaluation reads a page as training did
    assert torch.equal(norm(tokens[:1]), trained)


def test_reading_weight_needs_a_reading_head():
    with pytest.raises(ConfigError, match="reading_weight"):
        config.TrainConfig(reading_weight=0.1).validate()
    config.TrainConfig(reading_weight=0.1, model=CFG).validate()


def test_vision_share_measures_what_varies_across_pages():
    torch.manual_seed(0)
    same = VisionShare(4, 8)
    same.add(torch.ones(5, 4, 8) * 3)
    assert same.share() == 0.0                               # collapsed towers: every page gives the same tokens
    iid = VisionShare(4, 8)
    for _ in range(4):
        iid.add(torch.randn(500, 4, 8))
    assert abs(iid.share() - 1) < 0.02                       # zero-mean tokens: all their energy varies
    mixed = VisionShare(4, 8)
    mixed.add(2.0 + 0.5 * torch.randn(4000, 4, 8))          # variance 0.25 over mean square 4.25
    assert abs(mixed.share() - 0.25 / 4.25) < 0.003
    assert VisionShare(4, 8).share() != VisionShare(4, 8).share()   # NaN before two pages


def test_mismatched_images_never_pair_a_page_with_itself():
    pixels, previous = torch.arange(4).view(4, 1), torch.tensor([[9]])
    assert mismatched(pixels, previous).flatten().tolist() == [1, 2, 3, 9]
    assert mismatched(pixels[:1], previous).flatten().tolist() == [9]
    assert mismatched(pixels, None).flatten().tolist() == [1, 2, 3, 0]


def test_verdict_says_in_words_when_the_model_is_not_reading():
    assert verdict(BLIND_GAP / 2).startswith("NOT READING")
    assert verdict(2.0).startswith("reading")


@pytest.mark.parametrize("name", ["page", "lines", "dense"])
def test_reading_pages_are_random_strings_that_fit_and_repeat_by_seed(name):
    from ocr_vlm.data.render import READING_ALPHABET, READING_SETS, reading_page

    spec = READING_SETS[name]
    pages = [reading_page(random.Random(f"t/{i}"), spec) for i in range(40)]
    again = reading_page(random.Random("t/0"), spec)
    assert again.text == pages[0].text and again.image.tobytes() == pages[0].image.tobytes()
    assert len({p.text for p in pages}) == 40
    for page in pages:
        lines = page.text.split("\n")
        assert spec.lines[0] <= len(lines) <= spec.lines[1] and page.image.size == (spec.side, spec.side)
        assert all(spec.chars[0] <= len(line) <= spec.chars[1] and "  " not in line and line == line.strip()
                   and set(line) <= set(READING_ALPHABET + " ") for line in lines)
        assert all(0 <= x0 < x1 <= spec.side and 0 <= y0 < y1 <= spec.side for x0, y0, x1, y1 in page.chars)
        ink = np.asarray(page.image.convert("L"))
        assert ink.min() < 100 < 190 < ink.max()                  # dark ink on a light page
