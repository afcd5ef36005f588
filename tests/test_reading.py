"""Whether a model reads: the reading head's frame order and loss, the image-gap and vision-share diagnostics."""

import dataclasses
import random

import numpy as np
import pytest
import torch

from ocr_vlm import config
from ocr_vlm.config import ConfigError
from ocr_vlm.diagnostics import BLIND_GAP, VisionShare, mismatched, verdict
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.model.reading import BLANK, CLASSES, ReadingHead, reading_targets
from ocr_vlm.model.vlm import build_model

CFG = dataclasses.replace(config.mini(), reading_head=(2, 4))


def test_reading_targets_are_the_bytes_without_whitespace():
    assert reading_targets("aB 3\nxY") == list(b"aB3xY")
    assert BLANK not in reading_targets("any text at all 0123")


def test_frames_run_in_raster_order_over_sub_rows():
    """Frame order: token row, sub-row, token column, sub-column — a text line crosses a whole sub-row of frames."""
    grid, rows, cols = 3, 2, 4
    head = ReadingHead(width=1, grid=grid, subframes=(rows, cols))
    with torch.no_grad():    # class 0's logit = the token's index; class 1's = the sub-frame's index inside the token
        head.proj.weight.zero_()
        head.proj.bias.zero_()
        weight, bias = head.proj.weight.view(rows, cols, CLASSES), head.proj.bias.view(rows, cols, CLASSES)
        weight[:, :, 0] = 1.0
        bias[:, :, 1] = torch.arange(rows * cols, dtype=torch.float).view(rows, cols)
    frames = head(torch.arange(grid * grid, dtype=torch.float).view(1, grid * grid, 1))[0]
    expected = [(r * grid + c, a * cols + b) for r in range(grid) for a in range(rows) for c in range(grid)
                for b in range(cols)]
    assert [(int(f[0]), int(f[1])) for f in frames] == expected


def test_reading_loss_trains_the_towers_and_unalignable_pages_cost_nothing():
    torch.manual_seed(0)
    model = build_model(CFG)
    torch.nn.init.normal_(model.reading_head.proj.weight, std=0.02)    # as after a step: zero weights pass no grad
    ids = torch.tensor([[1] + [CFG.image_token_id] * CFG.image_tokens * 2 + [5, 6]])
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, -2] = 7
    frames = CFG.vision_grid ** 2 * 8
    text = torch.tensor(reading_targets("Ab3") + [ord("x")] * (frames + 1), dtype=torch.long)
    lm, reading = model(ids, targets=targets, pixel_values=torch.randn(2, 3, CFG.image_size, CFG.image_size),
                        reading=(text, torch.tensor([3, frames + 1])))
    assert torch.isfinite(reading) and reading > 0          # the second page (more bytes than frames) adds zero
    reading.backward()
    for name in ("sam_model", "vision_model", "projector", "reading_head"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads), name
    assert model.gpt.lm_head.weight.grad is None             # the reading loss never reaches the GPT


def test_a_new_head_emits_blank_everywhere_whatever_the_page():
    head = ReadingHead(width=16, grid=2, subframes=(2, 4))
    probs = head(torch.randn(3, 4, 16)).softmax(-1)
    assert probs[..., BLANK].min() > 0.98 and torch.equal(probs[0], probs[1])


def test_reading_weight_needs_a_reading_head():
    with pytest.raises(ConfigError, match="reading_weight"):
        config.TrainConfig(reading_weight=0.1).validate()
    with pytest.raises(ConfigError, match="reading_head"):
        dataclasses.replace(config.mini(), reading_head=(2,)).validate()
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


def test_reading_pages_are_random_strings_that_fit_and_repeat_by_seed():
    from ocr_vlm.data.render import READING_ALPHABET, READING_SETS, reading_page

    spec = READING_SETS["page"]
    pages = [reading_page(random.Random(f"t/{i}"), spec) for i in range(40)]
    again = reading_page(random.Random("t/0"), spec)
    assert again.text == pages[0].text and again.image.tobytes() == pages[0].image.tobytes()
    assert len({p.text for p in pages}) == 40
    for page in pages:
        lines = page.text.split("\n")
        assert spec.lines[0] <= len(lines) <= spec.lines[1] and page.image.size == (spec.side, spec.side)
        assert all(spec.chars[0] <= len(line) <= spec.chars[1] and "  " not in line and line == line.strip()
                   and set(line) <= set(READING_ALPHABET + " ") for line in lines)
        ink = np.asarray(page.image.convert("L"))
        assert ink.min() < 100 < 190 < ink.max()                  # dark ink on a light page
