"""Is the model reading its images? Two measurements that a blind model cannot fake.

- The image-conditional loss gap: the loss of the same targets with each sample's own image and with another
  sample's image. A model that reads pays for the wrong page (gap of nats per token); a blind one does not (gap 0).
- The image-dependent share of the vision tokens: per token position, the variance across pages over the total
  energy. Towers that collapsed give every page the same tokens (share 0). Pooled (mean-over-tokens) similarity
  cannot tell: on pages of sparse text most tokens see background, so pooled vectors look alike even when the
  tokens over the ink differ.
- With a reading head (model/reading.py), its loss against a uniform guess over the characters of the pages:
  towers whose tokens vary from page to page but name no character yet sit at the guess, and then the GPT has
  nothing to read, however long it trains.
"""

from __future__ import annotations

import math

import torch

# Below this many nats per target token, the wrong image costs the model nothing worth the name.
BLIND_GAP = 0.05
# A reading head within this fraction of the uniform guess has found no character code worth the name.
NO_CODE = 0.9


def mismatched(pixels: torch.Tensor, previous: torch.Tensor | None) -> torch.Tensor:
    """Another sample's image for every image: the next one in the batch, and for the last the previous batch's
    first (the batch's own first when there is no previous batch and it has more than one image)."""
    if not len(pixels):
        return pixels
    spare = previous if previous is not None and len(previous) else pixels
    return torch.cat([pixels[1:], spare[:1]])


class VisionShare:
    """Per-position first and second moments of vision tokens (N, positions, width), summed over pages; `moments`
    is a plain tensor so ranks can all-reduce it."""

    def __init__(self, positions: int, width: int):
        self.moments = torch.zeros(3, positions, width, dtype=torch.float64)   # count, sum, sum of squares

    def add(self, tokens: torch.Tensor) -> None:
        tokens = tokens.detach().double().cpu()
        self.moments += torch.stack([torch.full_like(tokens[0], len(tokens)), tokens.sum(0), tokens.square().sum(0)])

    def share(self) -> float:
        """Variance across pages summed over positions and channels, over the summed mean square."""
        count, total, squares = self.moments
        if count.max() < 2:
            return float("nan")
        mean_square = squares / count
        variance = mean_square - (total / count).square()
        return (variance.sum() / mean_square.sum().clamp(min=1e-30)).item()


def verdict(gap: float) -> str:
    """One line a user reads at a glance."""
    if gap != gap:   # NaN: no pair of images to compare
        return "image gap n/a (fewer than two images)"
    if gap < BLIND_GAP:
        return (f"NOT READING: the loss barely changes with another page's image (gap {gap:.3f} nats/token < "
                f"{BLIND_GAP}); the model answers from the text alone")
    return f"reading: another page's image costs {gap:.3f} nats/token"


def towers_verdict(reading_loss: float, classes: int) -> str:
    """One line on the towers: the loss of the reading head's character readout (each token's own character, not
    the readouts of what comes before it) against a uniform guess over the `classes` characters of the val pages
    (log classes nats). Trained per token (pages with known positions), the head's other half, ink or
    background, is learnt within steps by any towers: what is left for towers that name no character is the same."""
    uniform = math.log(max(classes, 1))
    if reading_loss > NO_CODE * uniform:
        return (f"NO CHARACTER CODE: the reading head's character readout at {reading_loss:.2f} nats is the uniform "
                f"guess over the {classes} characters of the val pages ({uniform:.2f}); the towers don't tell them "
                f"apart yet")
    return (f"the towers tell characters apart: the reading head's character readout at {reading_loss:.2f} nats "
            f"against {uniform:.2f} for a guess")


def head_verdict(own: float, previous: float, gap: float, predecessor: float | None = None) -> str:
    """What the reading head names of the characters whose place the pages know (each token's last, what it is
    trained on), and where its predecessor looks, with one (model/reading.py's ACCURACIES): set against the CER of
    what the GPT writes, it tells which side lags."""
    return (f"the reading head names {own:.0%} of the pages' characters on their tokens (each token's last), "
            f"{previous:.0%} the character before and {gap:.0%} the gap before (nothing, a space, a line break)"
            + (f"; its predecessor attention finds the token before {predecessor:.0%} of them"
               if predecessor is not None else ""))
