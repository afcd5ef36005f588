"""Report on an exported model over shards: loss, greedy output and OCR metrics (metrics.py) per page and per sample
`type`, a vision-collapse check, and files people can look at: report.json, report.html (worst pages first, the raw
output beside its diff, pages in images/ opened full size on click), loss.png from the run's metrics.

    python -m ocr_vlm.report --checkpoint runs/demo/export --shards shards/tier1 --out runs/demo/eval \
        [--batch_size 8] [--limit N] [--casefold] [--strip_punctuation] [--mode=gundam]

Pages stream through batch by batch: memory holds one batch of images and the text of each row, whatever the count.
"""

from __future__ import annotations

import argparse
import base64
import html
import io
import itertools
import json
import math
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from rapidfuzz.distance import Levenshtein
from tqdm import tqdm

from ocr_vlm.data.loader import packed_reading
from ocr_vlm.data.sample import Example, iter_examples
from ocr_vlm.data.stream import ShardSet
from ocr_vlm.diagnostics import VisionShare, head_verdict, mismatched, verdict
from ocr_vlm.generation import Generator
from ocr_vlm.image import add_mode_arguments, apply_mode, stack_views
from ocr_vlm.metrics import Normalization, Totals, scores
from ocr_vlm.model.reading import ACCURACIES, places
from ocr_vlm.tokenizer import Tokenizer
from ocr_vlm.weights import load_export


def read_back(model, tokenizer: Tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 8) -> list[str]:
    """Greedy generation for each example's image and prompt."""
    generator, outputs = Generator(model, tokenizer), []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        pixels, tiles, grids = stack_views([e.views for e in chunk], model.cfg)
        outputs += generator.generate([e.prompt for e in chunk], pixels, max_new_tokens=max_new_tokens, tiles=tiles,
                                      grids=grids)
    return outputs


def example_loss(model, example: Example, pixels: torch.Tensor) -> float:
    """Mean cross-entropy of the example's response given `pixels` (1, 3, S, S) as its global view (Gundam tiles: the
    example's own, their count is fixed by its placeholders). A model told where its pointer reads
    (`reading_place`) is told, as in training, where the page's characters are."""
    _, tiles, grids = stack_views([example.views], model.cfg)
    told = model.reading_places is not None and example.pointer
    reading = packed_reading([(0, 0, example)]) if told else None
    loss = model(torch.tensor([example.inputs]), targets=torch.tensor([example.targets]), pixel_values=pixels,
                 tile_values=tiles, tile_grids=grids, reading=reading)
    return (loss[0] if told else loss).item()


@torch.no_grad()
def evaluate(model, tokenizer: Tokenizer, shards: str, max_new_tokens: int = 512, batch_size: int = 8,
             limit: int | None = None, norm: Normalization = Normalization(), images_dir: Path | None = None,
             progress: bool = False) -> dict:
    """Every page of `shards` (at most `limit`) read back and scored: {"summary": totals overall and per type, the
    reading check (with a reading head and pages that say where their characters are, also what the head names);
    "samples": one row per page}. With `images_dir`, each page's image is written there as it passes
    (the row names the file)."""
    model.eval()
    rejected, totals, rows, started = Counter(), Totals(), [], time.perf_counter()
    share = VisionShare(model.cfg.vision_grid ** 2, model.cfg.gpt.n_embd)
    head = model.reading_head
    named = torch.zeros(len(head.accuracies) + 1 if head is not None else 1, dtype=torch.long)   # the head's `named`
    expected = min(ShardSet.from_spec(shards).total, limit if limit is not None else math.inf)
    bar = tqdm(total=expected, desc="reading", unit="page", disable=not progress or None)
    examples, previous = iter_examples(shards, tokenizer, model.cfg, limit, rejected), None
    while batch := list(itertools.islice(examples, batch_size)):
        outputs = read_back(model, tokenizer, batch, max_new_tokens, batch_size)
        pixels = torch.stack([e.views.global_view for e in batch])
        projected = model.projected_tokens(pixels)
        tokens, read = model.read_tokens(projected, head=True)
        share.add(tokens)
        if head is not None:
            named += head.named(read, places([(e.response, e.cells) for e in batch]))
        # another page's image for each page (the next one; the last takes the previous batch's first)
        others = mismatched(pixels, previous) if previous is not None or len(batch) > 1 else None
        for i, (e, out) in enumerate(zip(batch, outputs)):
            row = {"key": e.key, "type": e.type, "prompt": e.prompt, "expected": e.response, "generated": out,
                   "loss": example_loss(model, e, pixels[i:i + 1]),
                   "loss_other_image": example_loss(model, e, others[i:i + 1]) if others is not None else math.nan,
                   **scores(out, e.response, norm)}
            if images_dir is not None:
                row["image_file"] = _save_image(e, len(rows), images_dir)
            totals.add(row, e.type)
            rows.append(row)
        previous = pixels
        bar.update(len(batch))
    bar.close()
    seconds = time.perf_counter() - started
    paired = [r for r in rows if not math.isnan(r["loss_other_image"])]
    gap = sum(r["loss_other_image"] - r["loss"] for r in paired) / len(paired) if paired else math.nan
    summary = {**totals.summary(), "normalization": norm.describe(),
               "mean_loss": sum(r["loss"] for r in rows) / max(1, len(rows)),
               "distinct_outputs": len({r["generated"] for r in rows}), "image_gap": gap,
               "vision_share": share.share(), "skipped": dict(rejected), "seconds": seconds,
               "seconds_per_1000_pages": 1000 * seconds / max(1, len(rows))}
    if named[-1]:
        summary.update(zip(head.accuracies, (named[:-1] / named[-1]).tolist()))
    return {"summary": summary, "samples": rows}


def _save_image(example: Example, index: int, images_dir: Path) -> str:
    """The page as stored in its shard (no re-encoding), named by its order; returns the path relative to the report."""
    images_dir.mkdir(parents=True, exist_ok=True)
    extension = (Image.open(io.BytesIO(example.image)).format or "bin").lower()   # reads the header only
    name = f"{index:06d}.{extension}"
    (images_dir / name).write_bytes(example.image)
    return f"{images_dir.name}/{name}"


# ----------------------------------------------------------------------------------------------------------------
# Reports.

def worst_first(rows: list[dict]) -> list[dict]:
    return sorted(rows, key=lambda r: (-r["cer"], r["key"]))


def table(result: dict, rows: int = 10) -> str:
    """The console summary: the worst pages, then the totals per type and overall."""
    lines = [f"{'worst pages':<28}{'type':<12}{'exact':>6}{'loss':>9}{'CER':>7}{'WER':>7}{'NED':>7}"]
    for r in worst_first(result["samples"])[:rows]:
        lines.append(f"{r['key']:<28}{r['type'] or '-':<12}{'yes' if r['exact'] else 'no':>6}{r['loss']:>9.4f}"
                     f"{r['cer']:>7.3f}{r['wer']:>7.3f}{r['ned']:>7.3f}")
    s = result["summary"]
    lines.append(f"{'type':<16}{'pages':>6}{'exact':>7}{'mean CER':>10}{'corpus CER':>12}{'mean WER':>10}{'NED':>7}")
    for name, g in [*s["by_type"].items(), ("all", s)]:
        lines.append(f"{name:<16}{g['samples']:>6}{g['exact_match']:>7}{g['mean_cer']:>10.3f}{g['corpus_cer']:>12.3f}"
                     f"{g['mean_wer']:>10.3f}{g['mean_ned']:>7.3f}")
    lines.append(f"distinct outputs {s['distinct_outputs']} | image-dependent share of vision tokens "
                 f"{s['vision_share']:.4f} | {s['seconds_per_1000_pages']:.0f} s per 1,000 pages | "
                 f"normalised: {s['normalization']}")
    lines.append(verdict(s["image_gap"]) + _head_clause(s))
    return "\n".join(lines)


def _head_clause(summary: dict) -> str:
    """What the reading head names, to follow the reading verdict; nothing for a model without one or pages that
    say not where their characters are."""
    if "head_accuracy" not in summary:
        return ""
    return "; " + head_verdict(*(summary[name] for name in ACCURACIES if name in summary))


def curves(metrics_jsonl: Path, out_dir: Path) -> list[str]:
    """Plots of the run's metrics: loss.png (train and val loss by step) and, when evaluations read pages back,
    reading.png (held-out CER and the image gap against training minutes and pages seen). Returns the files made."""
    if not metrics_jsonl.exists():
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines() if line.strip()]
    made = []
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["eval/loss"]) for r in records if "eval/loss" in r]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set(yscale="log", xlabel="step", ylabel="cross-entropy")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    made.append("loss.png")
    reads = [r for r in records if "eval/cer" in r]
    if reads:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for ax, (key, label, scale) in zip(axes, [("train_seconds", "training minutes", 60),
                                                  ("samples_seen", "pages seen", 1)]):
            x = [r[key] / scale for r in reads]
            ax.plot(x, [r["eval/cer"] for r in reads], "o-", label="held-out CER")
            ax.plot(x, [min(r["eval/image_gap"], 1.0) for r in reads], "s--", label="image gap (nats/token, ≤1 shown)")
            ax.set(xlabel=label, ylim=(0, max(1.05, *(r["eval/cer"] * 1.05 for r in reads))))   # CER can pass 1
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("CER")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out_dir / "reading.png", dpi=100)
        plt.close(fig)
        made.append("reading.png")
    return made


def diff_html(expected: str, generated: str) -> str:
    """The generated text with insertions and deletions against the expected text marked."""
    out = []
    for op in Levenshtein.opcodes(expected, generated):
        if op.tag in ("replace", "delete"):
            out.append(f"<del>{html.escape(expected[op.src_start:op.src_end])}</del>")
        if op.tag in ("replace", "insert"):
            out.append(f"<ins>{html.escape(generated[op.dest_start:op.dest_end])}</ins>")
        if op.tag == "equal":
            out.append(html.escape(generated[op.dest_start:op.dest_end]))
    return "".join(out)


def write_report(result: dict, out_dir: str | Path, metrics_jsonl: str | Path | None = None,
                 source: str = "") -> Path:
    """report.json (everything), report.html (worst first; `source` says which checkpoint and shards) and plots."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(result, indent=1))
    plots = curves(Path(metrics_jsonl), out) if metrics_jsonl else []
    curve = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
                    for name in plots)
    s = result["summary"]
    by_type = "".join(f"<tr><td>{html.escape(name)}</td><td>{g['samples']}</td><td>{g['exact_match']}</td>"
                      f"<td>{g['mean_cer']:.3f}</td><td>{g['corpus_cer']:.3f}</td><td>{g['mean_wer']:.3f}</td>"
                      f"<td>{g['corpus_wer']:.3f}</td><td>{g['mean_ned']:.3f}</td></tr>"
                      for name, g in [*s["by_type"].items(), ("all", s)])
    rows = "".join(
        "<tr><td>" + (f'<a href="{r["image_file"]}"><img src="{r["image_file"]}" loading="lazy"></a>'
                      if "image_file" in r else "") +
        f"</td><td><pre>{html.escape(r['expected'])}</pre></td><td><pre>{html.escape(r['generated'])}</pre></td>"
        f"<td><pre>{diff_html(r['expected'], r['generated'])}</pre></td>"
        f"<td>{html.escape(r['key'])}<br>{html.escape(r['type'])}<br>{'✓' if r['exact'] else '✗'}<br>loss "
        f"{r['loss']:.4f}<br>CER {r['cer']:.3f}<br>WER {r['wer']:.3f}<br>NED {r['ned']:.3f}</td></tr>"
        for r in worst_first(result["samples"]))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ocr_vlm report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:6px;
vertical-align:top}} pre{{margin:0;white-space:pre-wrap;max-width:40em}} ins{{background:#c8f7c5;text-decoration:none}}
del{{background:#f7c5c5}} td img{{width:360px}}</style></head><body><h1>ocr_vlm report</h1>
<p>{html.escape(source)}</p>
<p>exact match <b>{s['exact_match']}/{s['samples']}</b> · distinct outputs {s['distinct_outputs']} · mean loss
{s['mean_loss']:.4f} · image-dependent share of vision tokens {s['vision_share']:.4f} · texts normalised:
{html.escape(s['normalization'])} · {s['seconds_per_1000_pages']:.0f} s per 1,000 pages</p>
<p><b>{html.escape(verdict(s['image_gap']))}</b>{html.escape(_head_clause(s))}</p>
<table><tr><th>type</th><th>pages</th><th>exact</th><th>mean CER</th><th>corpus CER</th><th>mean WER</th>
<th>corpus WER</th><th>mean NED</th></tr>{by_type}</table>{curve}
<h2>pages, worst first (click a page for full size)</h2>
<table><tr><th>page</th><th>expected</th><th>generated</th><th>diff (<ins>added</ins> <del>missing</del>)</th>
<th>metrics</th></tr>
{rows}</table></body></html>"""
    (out / "report.html").write_text(page)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="an export directory (model.safetensors + config.json)")
    parser.add_argument("--shards", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--metrics", help="the run's metrics.jsonl for the loss curve (default: beside the export)")
    parser.add_argument("--max_new_tokens", type=int, default=512)
    parser.add_argument("--batch_size", type=int, default=8, help="pages generated together")
    parser.add_argument("--limit", type=int, help="read at most this many pages")
    parser.add_argument("--casefold", action="store_true", help="compare texts case-folded")
    parser.add_argument("--strip_punctuation", action="store_true", help="compare texts without punctuation")
    add_mode_arguments(parser, default=None)
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    model, tokenizer = load_export(checkpoint)
    model.cfg = apply_mode(model.cfg, args, parser)
    out = Path(args.out)
    result = evaluate(model, tokenizer, args.shards, args.max_new_tokens, args.batch_size, args.limit,
                      Normalization(args.casefold, args.strip_punctuation), images_dir=out / "images", progress=True)
    source = f"checkpoint {checkpoint.resolve()} · shards {args.shards}" + \
        (f" (first {args.limit} pages)" if args.limit is not None else "")
    result["summary"]["source"] = source
    write_report(result, out, args.metrics or checkpoint.parent / "metrics.jsonl", source)
    print(table(result))
    print(f"report: {out / 'report.html'}")


if __name__ == "__main__":
    main()
