"""The vision towers on their own: position-table resizing, shapes and input errors. (Parity with transformers:
test_parity.py; d20 shapes and counts, activation checkpointing: test_model.py.)"""


import pytest
import torch

from ocr_vlm import config
from ocr_vlm.model.clip import ClipEncoder
from ocr_vlm.model.layers import resize_pos_grid
from ocr_vlm.model.sam import SamEncoder

def test_resize_pos_grid_identity_shape_and_fp32():
    pos = torch.randn(1, 8, 8, 16)
    assert resize_pos_grid(pos, 8) is pos
    assert resize_pos_grid(torch.full((1, 8, 8, 4), 0.5), 5).sub(0.5).abs().max() <= 1e-6   # a constant stays put
    half = pos.bfloat16()
    resized = resize_pos_grid(half, 5)
    assert resized.shape == (1, 5, 5, 16) and resized.dtype == torch.bfloat16
    assert torch.equal(resized, resize_pos_grid(half.float(), 5).bfloat16())   # computed in fp32, cast once


def test_mini_sam_shape_at_its_image_size():
    cfg = config.mini()
    torch.manual_seed(0)
    with torch.no_grad():
        out = SamEncoder(cfg.sam)(torch.randn(2, 3, cfg.image_size, cfg.image_size))
    assert out.shape == (2, 128, 8, 8)


def test_bad_inputs_name_the_tensor():
    cfg = config.mini()
    with torch.device("meta"):
        sam, clip = SamEncoder(cfg.sam), ClipEncoder(cfg.clip)
        with pytest.raises(ValueError, match="pixels"):
            sam(torch.empty(1, 3, 256, 192))
        with pytest.raises(ValueError, match="sam_map"):
            clip(torch.empty(1, 64, 8, 8))
