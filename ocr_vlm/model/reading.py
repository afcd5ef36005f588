"""The reading head: a training-only CTC loss that ties each image's vision tokens to the characters on the page.

Why it exists: a GPT learns the answer's character frequencies within a few hundred steps, long before it learns
to look at the image. Until it looks, the only gradient reaching the vision towers is noise, and trained towers (or
the projector) answer it by making their output the same for every page — after which there is nothing left to
look at. The reading head gives the towers a gradient of their own from the first step: a linear map splits every
vision token into rows x cols sub-frames, the frames are read in raster order (token row, sub-row, token column,
sub-column), and CTC aligns them with the page's text, whitespace removed. Lines read top to bottom then fit the
raster order as long as each line can take a sub-row of its own; pages that cannot be aligned (more characters
than frames, lines packed tighter than a sub-row) give zero loss rather than infinity.

Classes are byte values: NUL (never in text) is CTC's blank, every other byte of the UTF-8 text is a class.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BLANK = 0
CLASSES = 256
# Initial blank logit: a head that starts out emitting blank everywhere (p(blank) ~ 0.99 per frame) is already on
# CTC's all-blank plateau. Its first gradients are about which character sits where; a head starting from uniform
# outputs would first push every frame of every page towards blank, which the towers satisfy fastest by giving every
# page the same tokens — the collapse this head exists to prevent.
BLANK_BIAS = 10.0


def reading_targets(text: str) -> list[int]:
    """The CTC target of a page: its text's UTF-8 bytes without whitespace (which has no ink to align with)."""
    return list("".join(text.split()).encode("utf-8"))


class ReadingHead(nn.Module):
    def __init__(self, width: int, grid: int, subframes: tuple[int, int]):
        super().__init__()
        self.grid, (self.rows, self.cols) = grid, subframes
        self.proj = nn.Linear(width, self.rows * self.cols * CLASSES)
        if self.proj.weight.device.type != "meta":
            self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Zero weights and a blank bias: the same all-blank output for every token until the towers teach it."""
        self.proj.weight.zero_()
        self.proj.bias.view(self.rows * self.cols, CLASSES).copy_(
            F.one_hot(torch.tensor(BLANK), CLASSES).float() * BLANK_BIAS)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, g², D) vision tokens -> (N, frames, CLASSES) logits, frames in raster order."""
        n, g = tokens.shape[0], self.grid
        x = self.proj(tokens).view(n, g, g, self.rows, self.cols, CLASSES)
        return x.permute(0, 1, 3, 2, 4, 5).reshape(n, g * self.rows * g * self.cols, CLASSES)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean CTC loss per target byte over the images; `targets` holds every image's bytes concatenated."""
        log_probs = self(tokens).float().log_softmax(-1).transpose(0, 1)    # (frames, N, CLASSES), as ctc_loss takes
        frames = torch.full((tokens.shape[0],), log_probs.shape[0], dtype=torch.long)
        return F.ctc_loss(log_probs, targets, frames, lengths, blank=BLANK, zero_infinity=True)
