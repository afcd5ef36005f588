"""The VLM end to end at mini scale: image merge, losses, packing isolation, checkpointing, d20 sizes on meta."""

import pytest
import torch
import torch.nn.functional as F

from ocr_vlm import config
from ocr_vlm.model.gpt import IGNORE_INDEX, chunked_cross_entropy, softcap
from ocr_vlm.model.vlm import build_model, parameter_counts
from conftest import randomize

CFG = config.mini()
N_IMG = CFG.image_tokens


def trained_like(seed=0):
    torch.manual_seed(seed)
    return randomize(build_model(CFG), 0.05, seed=None)


def sequence(*segments):
    """Token ids from segments: an int n -> n image placeholders, a list -> those ids."""
    ids = []
    for seg in segments:
        ids += [CFG.image_token_id] * seg if isinstance(seg, int) else seg
    return torch.tensor([ids])


def test_forward_backward_reaches_every_trainable_parameter():
    model = trained_like()
    ids = torch.cat([sequence([1, 2], N_IMG, list(range(3, 78))), sequence([5], N_IMG, [7], N_IMG, [1, 2])])
    targets = ids.roll(-1, 1).masked_fill(ids == CFG.image_token_id, IGNORE_INDEX)
    pixels = torch.randn(3, 3, CFG.image_size, CFG.image_size)
    loss = model(ids, targets=targets, pixel_values=pixels)
    loss.backward()
    assert torch.isfinite(loss)
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_placeholder_count_mismatch_names_both_counts():
    model = trained_like()
    with pytest.raises(ValueError, match=rf"2 image\(s\) need {2 * N_IMG} <\|image\|> placeholders .* holds {N_IMG}"):
        model(sequence([1], N_IMG, [2]), pixel_values=torch.randn(2, 3, CFG.image_size, CFG.image_size))


def test_text_only_training_batch_still_gives_the_towers_a_gradient():
    model = trained_like().train()
    loss = model(sequence(list(range(1, 20))), targets=sequence(list(range(2, 21))))
    loss.backward()
    assert model.sam_model.net_3.weight.grad is not None and model.projector.layers.weight.grad is not None


def test_packed_samples_do_not_see_each_other():
    """Changing sample A (image and text) leaves sample B's logits unchanged; B equals B run alone."""
    model = trained_like().eval()
    a_len, b = N_IMG + 12, sequence([9], N_IMG, list(range(40, 60)))
    b_len = b.shape[1]
    doc_ids = torch.tensor([[0] * a_len + [1] * b_len])
    positions = torch.cat([torch.arange(a_len), torch.arange(b_len)]).unsqueeze(0)
    img_b = torch.randn(1, 3, CFG.image_size, CFG.image_size)

    def packed_logits(a_tokens, a_image):
        ids = torch.cat([sequence([3], N_IMG, a_tokens), b], dim=1)
        with torch.no_grad():
            return model(ids, pixel_values=torch.cat([a_image, img_b]), position_ids=positions, doc_ids=doc_ids)

    first = packed_logits(list(range(100, 111)), torch.randn(1, 3, CFG.image_size, CFG.image_size))
    second = packed_logits(list(range(200, 211)), torch.randn(1, 3, CFG.image_size, CFG.image_size))
    with torch.no_grad():
        alone = model(b, pixel_values=img_b)
    assert not torch.allclose(first[:, :a_len], second[:, :a_len])
    assert (first[:, a_len:] - second[:, a_len:]).abs().max() == 0
    assert (first[:, a_len:] - alone).abs().max() <= 1e-5


def test_chunked_loss_equals_full_cross_entropy_in_value_and_gradient():
    torch.manual_seed(0)
    h = torch.randn(2, 50, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (2, 50))
    targets[0, :10] = IGNORE_INDEX
    full = F.cross_entropy(softcap(h @ w.T, 15.0).reshape(-1, 97), targets.reshape(-1), ignore_index=IGNORE_INDEX)
    grads_full = torch.autograd.grad(full, (h, w))
    chunked = chunked_cross_entropy(h, w, targets, 15.0, chunk=16)
    grads_chunked = torch.autograd.grad(chunked, (h, w))
    assert (full - chunked).abs() <= 1e-6
    for a, b in zip(grads_full, grads_chunked):
        assert (a - b).abs().max() <= 1e-6
    nothing = chunked_cross_entropy(h, w, torch.full_like(targets, IGNORE_INDEX), 15.0)
    assert nothing.item() == 0 and torch.autograd.grad(nothing, w)[0].abs().sum() == 0


def full_logits_loss(h, w, targets):
    """The reference: fp32 logits for every position, softcapped, then cross-entropy over the supervised ones."""
    logits = softcap(h @ w.T, 15.0)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX)


def test_loss_on_supervised_rows_only_equals_full_logits_cross_entropy():
    """~10% of positions supervised, as in packed rows; several chunks; an upstream gradient other than 1."""
    torch.manual_seed(0)
    h = torch.randn(2, 200, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    targets = torch.randint(0, 97, (2, 200)).masked_fill(torch.rand(2, 200) > 0.1, IGNORE_INDEX)
    full, chunked = full_logits_loss(h, w, targets), chunked_cross_entropy(h, w, targets, 15.0, chunk=8)
    assert (full - chunked).abs() <= 1e-6
    for a, b in zip(torch.autograd.grad(3 * full, (h, w)), torch.autograd.grad(3 * chunked, (h, w))):
        assert (a - b).abs().max() <= 1e-6
    frozen = w.detach()                     # a frozen lm_head: h's gradient alone
    (grad_full,) = torch.autograd.grad(full_logits_loss(h, frozen, targets), h)
    (grad_chunked,) = torch.autograd.grad(chunked_cross_entropy(h, frozen, targets, 15.0, chunk=8), h)
    assert (grad_full - grad_chunked).abs().max() <= 1e-6


def test_loss_with_nothing_supervised_gives_h_and_lm_head_a_zero_gradient():
    """ZeRO-3: a rank whose rows carry no target still runs lm_head, so every parameter gets a gradient."""
    h = torch.randn(2, 30, 16, requires_grad=True)
    w = torch.randn(97, 16, requires_grad=True)
    loss = chunked_cross_entropy(h, w, torch.full((2, 30), IGNORE_INDEX), 15.0)
    grad_h, grad_w = torch.autograd.grad(loss, (h, w))      # raises if either is not in the graph
    assert loss.item() == 0
    assert grad_h.shape == h.shape and grad_h.abs().sum() == 0
    assert grad_w.shape == w.shape and grad_w.abs().sum() == 0


def test_activation_checkpointing_changes_nothing_numerically():
    ids = sequence([1], N_IMG, list(range(2, 30)))
    targets = ids.roll(-1, 1)
    pixels = torch.randn(1, 3, CFG.image_size, CFG.image_size)
    results = []
    for on in (False, True):
        model = trained_like()
        model.set_activation_checkpointing(config.TOWERS if on else ())
        loss = model(ids, targets=targets, pixel_values=pixels)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_off, grads_off), (loss_on, grads_on) = results
    assert torch.equal(loss_off, loss_on)
    assert grads_off.keys() == grads_on.keys() and all(torch.equal(grads_off[n], grads_on[n]) for n in grads_off)


def test_d20_parameter_counts_on_meta():
    counts = {name: n for name, (n, _) in parameter_counts(build_model(config.d20(), device="meta")).items()}
    counts["total"] = sum(counts.values())
    expected = {"sam": 95.57e6, "clip": 302.6e6, "projector": 2.62e6, "gpt": 560_988_160 + 2 * 1280, "total": 962e6}
    for name, value in expected.items():
        assert abs(counts[name] - value) / value <= 0.005, name


@pytest.mark.parametrize("mode, grid", [("tiny", 8), ("small", 10), ("base", 16), ("large", 20)])
def test_d20_encoder_shapes_per_mode_on_meta(mode, grid):
    cfg = config.d20()
    cfg = cfg.with_mode(mode)
    model = build_model(cfg, device="meta")
    pixels = torch.empty(2, 3, cfg.image_size, cfg.image_size, device="meta")
    assert model.sam_model(pixels).shape == (2, 1024, grid, grid)
    assert model.vision_model(model.sam_model(pixels)).shape == (2, 1 + grid * grid, 1024)
    assert model.encode_images(pixels).shape == (2, grid * (grid + 1) + 1, 1280)


def test_mini16_gives_a_16x16_token_grid_and_keeps_sam_local():
    cfg = config.preset("mini16")
    model = build_model(cfg).eval()
    pixels = torch.rand(2, 3, 256, 256) * 2 - 1
    assert model.encode_images(pixels).shape == (2, 16 * 17 + 1, cfg.gpt.n_embd)
    # SAM attends within 8x8-patch (32 px) windows only, so ink in the top-left window leaves the far corner's
    # compressed tokens as they were (CLIP's layers are what see the whole page).
    changed = pixels.clone()
    changed[:, :, :32, :32] = -1
    with torch.no_grad():
        before, after = model.sam_model(pixels), model.sam_model(changed)
    assert before.shape == (2, 128, 16, 16)
    assert torch.equal(before[..., 8:, 8:], after[..., 8:, 8:]) and not torch.equal(before, after)
