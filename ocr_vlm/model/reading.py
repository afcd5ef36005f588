"""What lets a model trained from scratch learn to read: the vision-token norm, the reading head and the pointer.

Why they exist. A GPT learns the answer's character frequencies within a few dozen steps, long before it can find
a character among the page's vision tokens. Until it can, the page-to-page variation of those tokens is noise to it,
and the fastest way to lower the loss is to remove that noise: trained towers (or only the projector) make every
page's tokens the same within 5-25 steps (the image-dependent share of the tokens falls from 0.08 to below 1e-3),
under the language-model loss and under every direct loss on the tokens alike. After that there is nothing left
to read, and the model never starts.

- `VisionNorm` standardises every position's channels of the vision tokens over pages (batch norm without a
  learned scale, always with the statistics it tracks over the training batches). Shrinking the page-dependent
  part then gains nothing for long: the statistics catch up within a few dozen steps, and whatever varies from page
  to page reaches the GPT at unit scale. Training, evaluation and generation read a page alike.
- `ReadingHead` gives the towers a gradient of their own from the first step: every vision token's logits over
  bytes. Where the data says where each character is (rendered pages keep every glyph's box, the shards' `chars`),
  each token is trained towards the last character centred on it, or towards "no character" (class 0: NUL is
  never ink), the two kinds of token weighed alike; most of a page is background. Last, because small text puts
  two characters on one token (13.5% of the 1–4-line page set's characters share theirs with the next, 3% of the
  line set's): one target mixing both names neither for sure, whereas the token's last character with the
  readouts below (what comes before it, and before that) names all of them, in order. Without positions the
  logits are pooled over the page (log-sum-exp) and trained towards its byte histogram: a token can then only help
  by naming the character under it, but which token that is the head has to find out, a far weaker signal (on
  one-line pages it found no code in 5,600 pages; per token it fell to a third of the guess in 14,000). Either way
  the tokens become position-independent character codes, which the GPT then learns to read in order. The head
  reads the tokens before the norm, so its code does not move with the norm's statistics (after a norm that
  centred each batch on its own mean, the per-token loss barely fell). Its second readout, `previous`, names the
  character before each token's in reading order: a token then says both what it is and what it follows, so
  finding the next character is one lookup (which token follows the one just written?) instead of two. Its `gap`
  readout names what separates the token's character from the previous one: nothing, a space or a line break.
  Whitespace leaves no ink of its own, and a space at 16-28 px is 5-9 px wide, less than a 16 px token, so where
  the answer has one is a matter of the pixels around a character, which only the towers see; without it the GPT
  had to guess spaces and line ends from where the pointed tokens sit. Training only, unless the model has the
  reading code: it travels with the export either way. What comes before a token's character is next to it within
  a line, but a line's first character follows the last of the line above, anywhere across the page, and readouts
  of the token alone never learned that (1% of the lines' first characters after `make read READ_SET=page`, 87% of
  those within a word): the pointer then has no key to find a line's start by. With `reading_predecessor`, the
  `Predecessor` attention, trained on where the character before each token's is, hands those readouts the token it
  finds and the one before that (then 40% of the lines' first characters; the GPT did not read such pages better,
  README #predecessor, so `make read` goes without it).
- The reading code (`reading_code`) hands the GPT what the head names. The head finds its code in a direction of
  the tokens that the GPT barely sees: on a line model whose head named 41% of the characters, the character
  explained no more of the normed tokens' variance at its token than chance, and the GPT wrote the right character
  for almost none of those its pointer and the head both had right. With the code, each vision token the GPT reads
  also carries an embedding of both readouts' distributions (`ReadingHead.embed`), as perfect codes reach the GPT
  in bench/reading_gpt.py, and the head learns from the GPT's loss too. Generation then runs the head.
- The pointer (`reading_pointer`) is what teaches the GPT to read in order. Codes alone are not enough: a GPT from
  scratch has to find the few tokens with ink among the page's 273 in the right order, and its attention, spread
  over all of them at first, passes back a gradient too weak to learn where to look (given perfect codes, a mini16
  GPT stayed blind for 600 steps, bench/reading_gpt.py). So one head (POINTER_HEAD of POINTER_LAYER) is trained
  to attend, from the position that writes each answer token, to the vision token of the next character it writes
  (a newline: the next line's first), and from the one that writes the end, to the view separator after the grid
  (`pointer_pairs`): minus the log of that attention, averaged per page. Where the page ends is then a lookup like
  any other (the line model trained on pages of 1–8 lines, held-out CER at 25 / 28 / 31 minutes: 0.64 / 0.54 /
  0.53 with it, 0.88 / 0.65 / 0.59 without; one seed each). With perfect codes that also name the previous
  character (and the pointer then in the middle layer), it attended 0.80 to the right token by step 50 and the GPT
  read 0.79 of the held-out tokens by step 350 (teacher-forced; 0.15 is blind); with codes of the character alone,
  0.30 by step 250, nothing read.
  The pointer is a head of the first layer because what it moves must still be the code: everything it needs is in
  the embeddings (the token just written, each vision token's code of what it follows), and the layers above
  overwrite the vision tokens. With the pointer in the middle layer of the line model, at step 2,000 it rested on the
  right token for 86% of the answer tokens and the head named 73% of them, yet the GPT wrote 7% right: a linear
  probe read the character off 66% of the pointed tokens' embeddings, 30% after two layers, 10% of the pointer
  head's values. From the first layer, the run had 3x the image gap at step 700 (0.98 nats, from 0.34).
  Pointing is not yet copying, so the pointer's head is also trained to carry what it points at: its output alone
  (its share of the layer's output projection), through the final norm and lm_head, should name the token being
  written. The rest of the GPT then need not find out what the pointed token's code means. With perfect codes
  (bench/reading_gpt.py, codes naming the previous character) the head rested 0.73 on the right token by step 200,
  yet the GPT wrote 0.24 of the held-out tokens right, 0.46 at step 300; trained to carry as well, 0.61 and 0.85. In
  `make read` the val loss fell 0.1-1.0 nats lower step for step, and the held-out CER after 3,000 steps from 0.46 to
  0.41. What it still gets wrong: a character that comes twice in a line. The query holds only the character just
  written, so at its second occurrence the pointer asks for what followed the first, and the model loops. The GPT's
  smear (`gpt.smear`, model/gpt.py) puts the last two characters into the first layer's query, and `reading_back=2`
  gives the keys the character two back (a third readout, `two_back`): on bench/reading_gpt.py's perfect codes the
  GPT then wrote the token after a doubled character right 0.64 of the time, against 0.31 (either alone: 0.44 and
  0.29).
- Places (`reading_place`) tell the pointer where it is. Its query knows which characters were just written, not
  where they were read: wherever those come again on the page, the pointer may rest there and read on from the
  wrong place, and the page model's errors are mostly such jumps, loops and repeated lines. `Places` adds to every
  vision token a code of its row and column, and to every answer token the code of the place its character was read
  from: where the pointer looked most when it was written (generation.py; training, `VLM.looked`, one step at a time
  from the true places),
  so the next character is also a lookup by place: a step to the right on the same row, or the start of a row
  below (README #places).

Classes are byte values of the UTF-8 text, whitespace removed (it has no ink).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ocr_vlm.model.gpt import GPT, IGNORE_INDEX, norm

CLASSES = 256
BACKGROUND = 0       # the class of a token centred on no character
NEWLINE, SPACE = ord("\n"), ord(" ")   # the `gap` readout's classes besides BACKGROUND
# what `ReadingHead.named` counts, as shares of the placed bytes (the predecessor's only with one)
ACCURACIES = ("head_accuracy", "head_previous_accuracy", "head_gap_accuracy", "head_predecessor_accuracy")
POINTER_LAYER = 0    # the GPT layer whose head POINTER_HEAD the pointer trains: the first (see above)
POINTER_HEAD = 0


class Reading(NamedTuple):
    """What a batch's pages say about their characters, for the training-only losses and the head's count."""
    targets: torch.Tensor                  # every page's `reading_targets`, concatenated
    gaps: torch.Tensor                     # each target's `reading_gaps`
    lengths: torch.Tensor                  # how many of them each page has
    cells: torch.Tensor | None = None      # each target's `reading_cells`
    predecessors: torch.Tensor | None = None   # each target's `reading_predecessors`
    pointer: torch.Tensor | None = None    # (P, 4): (row, position, vision position, page): the pointer's pairs


def inked(text: str) -> str:
    """The characters of a text that leave ink: all but whitespace."""
    return "".join(text.split())


def reading_targets(text: str) -> list[int]:
    """The bytes a page's reading head is trained on: its text's UTF-8 bytes without whitespace."""
    return list(inked(text).encode("utf-8"))


def reading_gaps(text: str) -> list[int]:
    """What separates each of `reading_targets(text)`'s bytes from the character before it, as the head's `gap`
    readout is trained on: a line break (its byte) where the whitespace in between holds one, else a space where
    there is whitespace, else BACKGROUND (also for a character's later bytes and the page's first)."""
    gaps, gap = [], BACKGROUND
    for char in text:
        if char.isspace():
            gap = NEWLINE if char == "\n" or gap == NEWLINE else SPACE
        else:
            gaps += [gap] + [BACKGROUND] * (len(char.encode("utf-8")) - 1)
            gap = BACKGROUND
    return gaps


def reading_cells(text: str, cells: list[int] | None) -> list[int]:
    """The token each of `reading_targets(text)`'s bytes is trained on: its character's `cells` entry (one per
    `inked` character) for the last of consecutive bytes on one token, -1 for the ones before it there (the token's
    `previous` and `two_back` readouts name those) and for every byte of a page without positions."""
    chars = inked(text)
    if cells is None:
        return [-1] * len(chars.encode("utf-8"))
    under = [cell for char, cell in zip(chars, cells) for _ in char.encode("utf-8")]
    return [-1 if cell == after else cell for cell, after in zip(under, under[1:] + [-1])]


def reading_predecessors(text: str, cells: list[int] | None) -> list[int]:
    """The token that `Predecessor` is trained to look at from each of `reading_targets(text)`'s bytes whose
    `reading_cells` entry is a token: the token of the closest character before it on another token, in reading
    order (the last one of the line above for a line's first), or the token itself for the page's first; -1 where
    `reading_cells` has -1."""
    chars = inked(text)
    if cells is None:
        return [-1] * len(chars.encode("utf-8"))
    under = [cell for char, cell in zip(chars, cells) for _ in char.encode("utf-8")]
    found, prior = [], None    # `prior`: the token of the closest byte on another token than the current one's
    for i, cell in enumerate(under):
        if i and under[i - 1] != cell:
            prior = under[i - 1]
        last = i + 1 == len(under) or under[i + 1] != cell
        found.append((cell if prior is None else prior) if last else -1)
    return found


def places(pages: list[tuple[str, list[int] | None]]) -> Reading:
    """Pages as (response, cells) -> the reading head's targets of all of them concatenated, what separates each
    from the one before, how many each page has, the token under each and the one before it in reading order (a
    `Reading` without the pointer)."""
    def concatenated(per_page) -> torch.Tensor:
        return torch.tensor([v for page in per_page for v in page], dtype=torch.long)
    targets = [reading_targets(text) for text, _ in pages]
    return Reading(concatenated(targets), concatenated(reading_gaps(text) for text, _ in pages),
                   torch.tensor([len(page) for page in targets], dtype=torch.long),
                   concatenated(reading_cells(text, cells) for text, cells in pages),
                   concatenated(reading_predecessors(text, cells) for text, cells in pages))


class Read(NamedTuple):
    """What `ReadingHead.read` makes of a grid of tokens, once per forward: the GPT's code, the losses and the
    counts all come from it."""
    logits: torch.Tensor          # (readouts, N, tokens, CLASSES): every token's logits from each readout, fp32
    log_attention: torch.Tensor | None   # (N, tokens, tokens): the predecessor's, with one


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
        """Normalise with the tracked statistics, in training too, after a training batch of real pages (more than
        one: a single page has no spread to measure) has moved them towards its own. Normalising training batches
        by their own statistics instead reads a page differently in training and in evaluation: the line set's
        model, 300 steps in, lost 0.20 nats on held-out pages given another page's image under batch statistics,
        0.01 under the tracked ones it is evaluated with."""
        x = tokens.float()
        if self.training and batch_statistics and len(x) > 1:
            with torch.no_grad():
                self.running_mean.lerp_(x.mean(0).to(self.running_mean.dtype), self.momentum)
                self.running_var.lerp_(x.var(0, unbiased=False).to(self.running_var.dtype), self.momentum)
        return ((x - self.running_mean.float()) * torch.rsqrt(self.running_var.float() + self.eps)).to(tokens.dtype)


class Predecessor(nn.Module):
    """Attention from every vision token to the token of the character before its own in reading order (`forward`:
    the log-attention), trained on where that character is (`reading_predecessors`), as the pointer trains the GPT's
    lookups. Within a line that is the next token to the left, but a line's first character follows the last one of
    the line above, anywhere across the page, and readouts of the token alone never learned to name it (after 2,900
    + 5,500 steps of `make read READ_SET=page`, the head named the character before 1% of the lines' first ones, 87%
    of those within a word). Its queries and keys see each token's content and its row and column, which is what
    "the last character of the line above" is made of."""

    def __init__(self, width: int, dim: int = 64, side: int = 64):
        super().__init__()
        self.query, self.key = nn.Linear(width, dim), nn.Linear(width, dim, bias=False)
        # (query, key) x place: a token's place is its row's embedding plus its column's, for grids up to `side`
        self.rows = nn.Parameter(torch.randn(2, side, dim) / math.sqrt(dim))
        self.cols = nn.Parameter(torch.randn(2, side, dim) / math.sqrt(dim))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, D) tokens of square grids, row-major -> (N, T, T) log-attention of each token over the grid, fp32."""
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1] or side > self.rows.shape[1]:
            raise ValueError(f"Predecessor: {tokens.shape[1]} tokens are not a square grid of at most "
                             f"{self.rows.shape[1]}x{self.rows.shape[1]}")
        place = (self.rows[:, :side, None] + self.cols[:, None, :side]).flatten(1, 2).to(tokens.dtype)
        x = norm(tokens)   # the projected tokens' scale is the towers' business; the attention's is set here
        q, k = self.query(x) + place[0], self.key(x) + place[1]
        return (q @ k.transpose(1, 2)).float().div(math.sqrt(q.shape[-1])).log_softmax(-1)


class Places(nn.Module):
    """Where on the page the pointer is (`reading_place`): every place of an image's layout (each grid row's
    tokens, then its newline; the view separator last, as the row after the grid) has a fixed code, sines and
    cosines of its row and column at periods of 4 to 64 tokens, and two maps of it into the GPT's width, both zero at
    first (a model given them starts where it was): `keys` is added to the vision token at each place, `told` to
    each answer token the place its character was read from. The pointer's query then knows where it is, not only
    the last two characters: the next character is a step to the right on the same row, or at the start of a row
    below, wherever the same characters come again on the page. Each token is told where the pointer looked most
    when it was written: in generation from the places it was told itself (generation.py), in training from the
    true ones (`VLM.looked`)."""

    PERIODS = (4, 8, 16, 32, 64)

    def __init__(self, grid: int, width: int):
        super().__init__()
        self.grid = grid
        self.key = nn.Parameter(torch.zeros(4 * len(self.PERIODS), width))
        self.query = nn.Parameter(torch.zeros(4 * len(self.PERIODS), width))

    def code(self, places: torch.Tensor) -> torch.Tensor:
        """Layout places (any shape) -> their fixed codes (..., 4 x periods), fp32."""
        row, col = places.div(self.grid + 1, rounding_mode="floor"), places.remainder(self.grid + 1)
        angles = torch.stack([row, col], -1).float().unsqueeze(-1) * (
            2 * math.pi / torch.tensor(self.PERIODS, device=places.device))
        return torch.cat([angles.sin(), angles.cos()], -1).flatten(-2)

    def keys(self, places: torch.Tensor) -> torch.Tensor:
        """What the vision tokens at `places` get added: (..., width)."""
        return self.code(places).to(self.key.dtype) @ self.key

    def told(self, places: torch.Tensor) -> torch.Tensor:
        """What an answer token read from each of `places` gets added: (..., width)."""
        return self.code(places).to(self.query.dtype) @ self.query


class ReadingHead(nn.Module):
    """Linear readouts of every vision token: the character under it (`proj`), the one before that in reading order
    (`previous`: the page's preceding non-whitespace character, BACKGROUND for its first), with `back=2` the one
    before that (`two_back`: keys that tell the two tokens following a `t` apart, for a query that knows the last
    two characters, the GPT's smear), and what separates its character from the previous one (`gap`: nothing, a
    space or a line break, `reading_gaps`). With a `predecessor`, all but the first read the token together with
    the one it attends to, and the one that one attends to. With `code`, also an embedding of what they name, which
    the GPT reads (`embed`)."""

    def __init__(self, width: int, code: bool = False, back: int = 1, predecessor: bool = False):
        super().__init__()
        self.proj = nn.Linear(width, CLASSES)
        self.predecessor = Predecessor(width) if predecessor else None
        context = (3 if predecessor else 1) * width   # the token (its predecessor and that one's)
        self.previous = nn.Linear(context, CLASSES)
        self.two_back = nn.Linear(context, CLASSES) if back == 2 else None
        self.gap = nn.Linear(context, CLASSES)
        self.code = nn.Linear((2 + back) * CLASSES, width, bias=False) if code else None
        if code:   # unit scale per channel, as the vision norm's tokens it joins
            nn.init.normal_(self.code.weight)

    def readouts(self) -> list[nn.Linear]:
        """The character under each token, the previous one (and the one before), and the gap before it."""
        return [self.proj, self.previous] + ([self.two_back] if self.two_back is not None else []) + [self.gap]

    @property
    def accuracies(self) -> tuple[str, ...]:
        """The names of the shares `named` counts, in its order."""
        return ACCURACIES if self.predecessor is not None else ACCURACIES[:3]

    def read(self, tokens: torch.Tensor) -> Read:
        """(N, tokens, D) -> every token's logits from each of `readouts` and the `predecessor`'s log-attention (None
        without one)."""
        if self.predecessor is None:
            return Read(torch.stack([readout(tokens) for readout in self.readouts()]).float(), None)
        log_attention = self.predecessor(tokens)
        attention = log_attention.exp().to(tokens.dtype)
        one_back = attention @ tokens
        context = torch.cat([tokens, one_back, attention @ one_back], -1)
        readouts = [self.proj(tokens)] + [readout(context) for readout in self.readouts()[1:]]
        return Read(torch.stack(readouts).float(), log_attention)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, tokens, D) -> (readouts, N, tokens, CLASSES): every token's logits from each of `readouts`, in fp32."""
        return self.read(tokens).logits

    def embed(self, logits: torch.Tensor) -> torch.Tensor:
        """(readouts, N, tokens, CLASSES) logits -> (N, tokens, D): the embedding of the readouts' distributions."""
        return self.code(torch.cat(list(logits.softmax(-1)), -1).to(self.code.weight.dtype))

    def named(self, read: Read, reading: Reading) -> torch.Tensor:
        """(own, previous, gap, [predecessor,] placed): of the bytes of a batch's pages (`reading`) whose token is
        known (`cells` >= 0, as `losses` takes them), how many each readout of that token names in `read` (the byte,
        the one before it, the gap before it), how often the `predecessor` attends most to the token before (with
        one), and how many there are (`accuracies` names the shares). Set against the CER of what the GPT writes,
        they say which side lags."""
        targets, lengths, cells = reading.targets, reading.lengths, reading.cells
        page, known = pages_of(lengths), cells >= 0
        readouts, log_attention = read
        pairs = [(readouts[0], targets), (readouts[1], before(targets, lengths)), (readouts[-1], reading.gaps)]
        if log_attention is not None:
            pairs.append((log_attention, reading.predecessors))
        named = [(scores[page[known], cells[known]].argmax(-1) == wanted[known]).sum() for scores, wanted in pairs]
        return torch.stack(named + [known.sum()])

    def losses(self, read: Read, reading: Reading) -> torch.Tensor:
        """(readouts [+ 1],): each of `readouts`' `byte_loss` of `read` over a batch's pages (`reading`), then, with
        one, the `predecessor`'s (`predecessor_loss`). Training takes their mean; the first alone (the character
        under each token) says whether the towers tell characters apart (diagnostics.towers_verdict)."""
        (readouts, log_attention), wanted = read, [reading.targets]
        while len(wanted) < len(readouts) - 1:
            wanted.append(before(wanted[-1], reading.lengths))
        wanted.append(reading.gaps)
        losses = [byte_loss(logits, w, reading.lengths, reading.cells) for logits, w in zip(readouts, wanted)]
        if log_attention is not None:
            losses.append(predecessor_loss(log_attention, reading))
        return torch.stack(losses)


def before(targets: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The byte before each of the pages' concatenated reading targets on its page; BACKGROUND for a page's first."""
    previous = targets.roll(1)
    previous[(lengths.cumsum(0) - lengths)[lengths > 0]] = BACKGROUND
    return previous


def pages_of(lengths: torch.Tensor) -> torch.Tensor:
    """The page of each of the pages' concatenated reading targets, from how many each page has."""
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths)


def byte_loss(logits: torch.Tensor, targets: torch.Tensor, lengths: torch.Tensor,
              cells: torch.Tensor | None) -> torch.Tensor:
    """Mean over the pages of each page's loss; logits (N, tokens, CLASSES). `targets` holds every page's bytes
    concatenated (its `reading_targets`, or the byte before each) and `cells` (aligned with it, or None) each byte's
    `reading_cells`. A page whose cells are known: the cross-entropy of each token to the bytes placed on it (or to
    BACKGROUND), averaged over its tokens with characters plus that over the rest. Any other page: the cross-entropy
    from its byte histogram to the pooled prediction; a page without characters adds zero."""
    n, device = len(lengths), targets.device
    page = pages_of(lengths)
    ones = torch.ones(len(targets), device=device)
    counts = torch.zeros(n, CLASSES, device=device).index_put_((page, targets), ones, accumulate=True)
    histogram = counts / lengths.clamp(min=1).unsqueeze(1)
    losses = -(histogram * logits.logsumexp(1).log_softmax(-1)).sum(-1)
    if cells is None or not (cells >= 0).any():
        return losses.mean()
    known = cells >= 0
    placed = torch.zeros(n, dtype=torch.bool, device=device).index_fill_(0, page[known], True)
    grid = torch.zeros(*logits.shape, device=device).index_put_(
        (page[known], cells[known], targets[known]), ones[known], accumulate=True)
    ink = grid.sum(-1) > 0
    grid[..., BACKGROUND] += (~ink).float()
    token_loss = -(grid / grid.sum(-1, keepdim=True) * logits.log_softmax(-1)).sum(-1)
    per_token = sum((token_loss * mask).sum(1) / mask.sum(1).clamp(min=1) for mask in (ink, ~ink))
    return torch.where(placed, per_token, losses).mean()


def predecessor_loss(log_attention: torch.Tensor, reading: Reading) -> torch.Tensor:
    """Minus the log of the attention `Predecessor` pays from each placed byte's token to its
    `reading_predecessors` token, averaged over each page's, then over the pages that have any (0 when none does)."""
    known = reading.predecessors >= 0
    if not known.any():
        return log_attention.sum() * 0.0
    pages = pages_of(reading.lengths)[known]
    per_byte = -log_attention[pages, reading.cells[known], reading.predecessors[known]]
    n = len(reading.lengths)
    counts = torch.zeros(n, device=pages.device).index_add_(0, pages, torch.ones_like(per_byte))
    per_page = torch.zeros(n, device=pages.device).index_add_(0, pages, per_byte)
    has = counts > 0
    return (per_page[has] / counts[has]).mean()


def pointer_loss(gpt: GPT, attended: tuple[torch.Tensor, torch.Tensor], targets: torch.Tensor, pairs: torch.Tensor,
                 n: int) -> torch.Tensor:
    """The pointer's loss over its `pairs` (P, 4) = (row, position, vision position, page), given its head's
    `one_head` over them (`attended`: the log-attention from each pair's query over its row, and its output). Per
    pair: minus the log of the attention paid to the token of the character being written (where the head looks),
    plus the cross-entropy of the token the position writes (its `targets`
    entry) from the head's output alone, through the final norm and lm_head (what it carries from there). Averaged
    over each page's pairs, then over the `n` pages that have any (0 when none does)."""
    log_attention, carried = attended
    log_attention = log_attention.gather(1, pairs[:, 2:3]).squeeze(1)
    rows, positions, pages = pairs[:, 0], pairs[:, 1], pairs[:, 3]
    carries = F.cross_entropy(gpt.logits(norm(carried)), targets[rows, positions], ignore_index=IGNORE_INDEX,
                              reduction="none")
    per_pair = carries - log_attention
    if not len(pages):
        return per_pair.sum()
    counts = torch.zeros(n, device=pages.device).index_add_(0, pages, torch.ones_like(per_pair))
    per_page = torch.zeros(n, device=pages.device).index_add_(0, pages, per_pair)
    has = counts > 0
    return (per_page[has] / counts[has]).mean()
