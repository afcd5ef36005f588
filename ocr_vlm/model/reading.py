"""What lets a model trained from scratch learn to read: the vision-token norm and the reading head.

Why they exist. A GPT learns the answer's character frequencies within a few dozen steps, long before it can find
a character among the page's vision tokens. Until it can, the page-to-page variation of those tokens is noise to it,
and the fastest way to lower the loss is to remove that noise: trained towers (or only the projector) make every
page's tokens the same within 5-25 steps (the image-dependent share of the tokens falls from 0.08 to below 1e-3),
under the language-model loss and under every direct loss on the tokens alike. After that there is nothing left
to read, and the model never starts.

- `VisionNorm` standardises every position's channels of the vision tokens over the batch's pages (batch norm
  without a learned scale). The loss then no longer depends on how large the page-dependent part is, so shrinking
  it gains nothing and the collapse has no gradient; whatever varies from page to page reaches the GPT at unit
  scale. Evaluation and generation use the running statistics, as batch norm does.
- `ReadingHead` gives the towers a gradient of their own from the first step: every vision token's logits over
  bytes, pooled over the page (log-sum-exp), are trained towards the page's byte histogram. A token can only help
  by naming the character under it, so the tokens become position-independent character codes, which the GPT
  then learns to read in order. Training only: it travels with the export, but generation never runs it.

Classes are byte values of the UTF-8 text, whitespace removed (it has no ink).
"""

from __future__ import annotations

import torch
from torch import nn

CLASSES = 256


def reading_targets(text: str) -> list[int]:
    """The bytes a page's reading head is trained on: its text's UTF-8 bytes without whitespace."""
    return list("".join(text.split()).encode("utf-8"))


class VisionNorm(nn.Module):
    """Affine-free batch norm of (N, positions, D) vision tokens: each position's channels over the batch's pages,
    in fp32. Per position, because most of a page is background: a channel's spread over positions is mostly where
    on the page a token sits, which the towers could keep while every page's tokens become the same."""

    def __init__(self, positions: int, width: int, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.register_buffer("running_mean", torch.zeros(positions, width))
        self.register_buffer("running_var", torch.ones(positions, width))

    def forward(self, tokens: torch.Tensor, batch_statistics: bool = True) -> torch.Tensor:
        """In training, normalise with the batch's statistics and track them; otherwise, or for a batch of one page
        (no spread to measure), with the tracked ones."""
        x = tokens.float()
        if self.training and batch_statistics and len(x) > 1:
            mean, var = x.mean(0), x.var(0, unbiased=False)
            with torch.no_grad():
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(var.to(self.running_var.dtype), self.momentum)
        else:
            mean, var = self.running_mean.float(), self.running_var.float()
        return ((x - mean) * torch.rsqrt(var + self.eps)).to(tokens.dtype)


class ReadingHead(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Linear(width, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, tokens, D) -> (N, CLASSES): each page's log-probabilities of which byte a character on it is."""
        return self.proj(tokens).float().logsumexp(1).log_softmax(-1)

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean over the pages of the cross-entropy from each page's byte histogram to its prediction; `targets`
        holds every page's `reading_targets` concatenated. A page without characters adds zero."""
        page = torch.repeat_interleave(torch.arange(len(lengths), device=targets.device), lengths)
        counts = torch.zeros(len(lengths), CLASSES, device=targets.device).index_put_(
            (page, targets), torch.ones(len(targets), device=targets.device), accumulate=True)
        histogram = counts / lengths.clamp(min=1).unsqueeze(1)
        return -(histogram * self(tokens)).sum(-1).mean()
