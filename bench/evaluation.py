"""Evaluation time per 1,000 pages spent on scoring and the report's diff, before and after rapidfuzz.

    previous  this project's report before metrics.py: a pure-Python Levenshtein run twice per page (CER, NED),
              word recall, and difflib's SequenceMatcher (autojunk off) for the HTML diff
    current   metrics.scores (CER, WER, NED, exact, recall on the normalised texts) + report.diff_html (rapidfuzz)

Pages are random words with `--error` of their characters substituted, deleted or inserted, `--chars` long (3,000:
a dense A4 page). Generation is not timed: it is the same model call either way. The previous side runs on
`--previous_pages` pages (seconds each at 3,000 characters) and both are scaled to 1,000 pages.
"""

from __future__ import annotations

import difflib
import html
import random
import statistics

from harness import alternate, fix_threads, parser, ratios, seconds, summary

from ocr_vlm.metrics import scores
from ocr_vlm.report import diff_html


def previous_edit_distance(a: str, b: str) -> int:
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def previous_page(prediction: str, reference: str) -> None:
    previous_edit_distance(prediction, reference) / max(1, len(reference))                               # CER
    previous_edit_distance(prediction, reference) / max(1, len(prediction), len(reference))              # NED
    words = set(reference.lower().split())
    len(words & set(prediction.lower().split())) / max(1, len(words))                                    # recall
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, reference, prediction, autojunk=False).get_opcodes():
        html.escape(reference[a0:a1]), html.escape(prediction[b0:b1])                                    # the diff


def current_page(prediction: str, reference: str) -> None:
    scores(prediction, reference)
    diff_html(reference, prediction)


def page_pair(rng: random.Random, chars: int, error: float) -> tuple[str, str]:
    words = ["TOTAL", "invoice", "12.47", "the", "of", "Grand", "rue", "2026-10-28", "tax", "page", "Straße", "qty"]
    reference = ""
    while len(reference) < chars:
        reference += rng.choice(words) + rng.choice([" ", " ", " ", "\n"])
    reference, prediction = reference[:chars], []
    for c in reference:
        roll = rng.random()
        if roll < error / 3:
            continue                                              # deletion
        prediction.append(rng.choice("abcxyz0123") if roll < 2 * error / 3 else c)   # substitution or kept
        if 2 * error / 3 <= roll < error:
            prediction.append(rng.choice("abcxyz0123"))          # insertion
    return "".join(prediction), reference


def main() -> None:
    p = parser(__doc__, threads=1)
    p.add_argument("--chars", type=int, default=3000)
    p.add_argument("--error", type=float, default=0.05)
    p.add_argument("--previous_pages", type=int, default=3)
    p.add_argument("--current_pages", type=int, default=1000)
    args = p.parse_args()
    fix_threads(args.threads)
    rng = random.Random(0)
    pairs = [page_pair(rng, args.chars, args.error) for _ in range(max(args.previous_pages, args.current_pages))]
    per_1000 = alternate({
        "previous": lambda: 1000 * seconds(lambda: [previous_page(*x) for x in pairs[:args.previous_pages]])
        / args.previous_pages,
        "current": lambda: 1000 * seconds(lambda: [current_page(*x) for x in pairs[:args.current_pages]])
        / args.current_pages}, args.repeats)
    print(f"previous: {summary(per_1000['previous'], '.1f', ' s')} per 1,000 pages of {args.chars} characters")
    print(f"current:  {summary(per_1000['current'], '.3f', ' s')} per 1,000 pages")
    speedup = ratios(per_1000["previous"], per_1000["current"])
    print(f"previous / current: {summary(speedup, '.0f', 'x')}")
    print(f"headline: scoring + diff of 1,000 pages of {args.chars} characters ({args.error:.0%} errors) takes "
          f"{statistics.median(per_1000['current']):.2f} s, was {statistics.median(per_1000['previous']) / 60:.1f} min "
          f"({statistics.median(speedup):,.0f}x faster)")


if __name__ == "__main__":
    main()
