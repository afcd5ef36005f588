"""Report on an exported model over shards: loss, greedy output and OCR metrics per page, a vision-collapse check,
and files people can look at (report.json, a self-contained report.html, loss.png from the run's metrics).

    python -m ocr_vlm.report --checkpoint runs/demo/export --shards shards/tier1 --out runs/demo/eval [--mode=gundam]
"""

from __future__ import annotations

import argparse
import base64
import difflib
import html
import io
import json
from pathlib import Path

import torch
from tqdm import tqdm

from ocr_vlm.data.sample import Example, read_examples
from ocr_vlm.diagnostics import VisionShare, verdict
from ocr_vlm.generation import Generator
from ocr_vlm.image import add_mode_arguments, apply_mode, load_image, stack_views
from ocr_vlm.tokenizer import Tokenizer
from ocr_vlm.weights import load_export


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance over characters, one row at a time."""
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def cer(prediction: str, reference: str) -> float:
    """Character error rate: edits per reference character."""
    return edit_distance(prediction, reference) / max(1, len(reference))


def ned(prediction: str, reference: str) -> float:
    """Normalised edit distance as OmniDocBench reports it: edits / the longer length (0 = identical, 1 = disjoint)."""
    return edit_distance(prediction, reference) / max(1, len(prediction), len(reference))


def word_recall(prediction: str, reference: str) -> float:
    """Share of the reference's distinct words that the prediction contains (case-folded)."""
    words = set(reference.lower().split())
    return len(words & set(prediction.lower().split())) / max(1, len(words))


def read_back(model, tokenizer: Tokenizer, examples: list[Example], max_new_tokens: int, batch_size: int = 8,
              progress: bool = False) -> list[str]:
    """Greedy generation for each example's image and prompt."""
    generator, outputs = Generator(model, tokenizer), []
    for start in tqdm(range(0, len(examples), batch_size), desc="reading", unit="batch", disable=not progress or None):
        chunk = examples[start:start + batch_size]
        pixels, tiles, grids = stack_views([e.views for e in chunk], model.cfg)
        outputs += generator.generate([e.prompt for e in chunk], pixels, max_new_tokens=max_new_tokens, tiles=tiles,
                                      grids=grids)
    return outputs


def example_loss(model, example: Example, pixels: torch.Tensor) -> float:
    """Mean cross-entropy of the example's response given `pixels` (1, 3, S, S) as its global view (Gundam tiles: the
    example's own, their count is fixed by its placeholders)."""
    _, tiles, grids = stack_views([example.views], model.cfg)
    return model(torch.tensor([example.inputs]), targets=torch.tensor([example.targets]), pixel_values=pixels,
                 tile_values=tiles, tile_grids=grids).item()


@torch.no_grad()
def evaluate(model, tokenizer: Tokenizer, shards: str, max_new_tokens: int = 512, batch_size: int = 8,
             limit: int | None = None) -> dict:
    """Every page of `shards` read back and scored: {"summary": means and the reading check, "samples": per page}."""
    model.eval()
    examples, rejected = read_examples(shards, tokenizer, model.cfg, limit)
    outputs = read_back(model, tokenizer, examples, max_new_tokens, batch_size, progress=True)
    share = VisionShare(model.cfg.vision_grid ** 2, model.cfg.gpt.n_embd)
    for start in range(0, len(examples), batch_size):
        share.add(model.vision_tokens(torch.stack([e.views.global_view for e in examples[start:start + batch_size]])))
    rows = []
    for i, (e, out) in enumerate(zip(examples, outputs)):
        other = examples[(i + 1) % len(examples)].views.global_view   # the next page's image: same text, wrong page
        rows.append({"key": e.key, "prompt": e.prompt, "expected": e.response, "image": e.image, "generated": out,
                     "loss": example_loss(model, e, e.views.global_view[None]),
                     "loss_other_image": example_loss(model, e, other[None]) if len(examples) > 1 else float("nan"),
                     "exact": out == e.response, "cer": cer(out, e.response), "ned": ned(out, e.response),
                     "word_recall": word_recall(out, e.response)})
    n = max(1, len(rows))
    mean = {key: sum(r[key] for r in rows) / n for key in ("loss", "loss_other_image", "cer", "ned", "word_recall")}
    summary = {"samples": len(rows), "exact_match": sum(r["exact"] for r in rows),
               "mean_loss": mean["loss"], "mean_cer": mean["cer"], "mean_ned": mean["ned"],
               "mean_word_recall": mean["word_recall"], "distinct_outputs": len({r["generated"] for r in rows}),
               "image_gap": mean["loss_other_image"] - mean["loss"], "vision_share": share.share(),
               "skipped": dict(rejected)}
    return {"summary": summary, "samples": rows}


# ----------------------------------------------------------------------------------------------------------------
# Reports.

def table(result: dict) -> str:
    lines = [f"{'sample':<24}{'exact':>6}{'loss':>9}{'CER':>7}{'NED':>7}{'recall':>8}"]
    for r in result["samples"]:
        lines.append(f"{r['key']:<24}{'yes' if r['exact'] else 'no':>6}{r['loss']:>9.4f}{r['cer']:>7.3f}"
                     f"{r['ned']:>7.3f}{r['word_recall']:>8.2f}")
    s = result["summary"]
    lines.append(f"exact match {s['exact_match']}/{s['samples']} | distinct outputs {s['distinct_outputs']} | "
                 f"mean CER {s['mean_cer']:.3f} | image-dependent share of vision tokens {s['vision_share']:.4f}")
    lines.append(verdict(s["image_gap"]))
    return "\n".join(lines)


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
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
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
    reads = [r for r in records if "val_cer" in r]
    if reads:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5), sharey=True)
        for ax, (key, label, scale) in zip(axes, [("train_seconds", "training minutes", 60),
                                                  ("samples_seen", "pages seen", 1)]):
            x = [r[key] / scale for r in reads]
            ax.plot(x, [r["val_cer"] for r in reads], "o-", label="held-out CER")
            ax.plot(x, [min(r["image_gap"], 1.0) for r in reads], "s--", label="image gap (nats/token, ≤1 shown)")
            ax.set(xlabel=label, ylim=(0, max(1.05, *(r["val_cer"] * 1.05 for r in reads))))   # CER can pass 1
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("CER")
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out_dir / "reading.png", dpi=100)
        plt.close(fig)
        made.append("reading.png")
    return made


def _diff(expected: str, generated: str) -> str:
    """The generated text with insertions and deletions against the expected text marked."""
    out = []
    for op, a0, a1, b0, b1 in difflib.SequenceMatcher(None, expected, generated, autojunk=False).get_opcodes():
        if op in ("replace", "delete"):
            out.append(f"<del>{html.escape(expected[a0:a1])}</del>")
        if op in ("replace", "insert"):
            out.append(f"<ins>{html.escape(generated[b0:b1])}</ins>")
        if op == "equal":
            out.append(html.escape(generated[b0:b1]))
    return "".join(out)


def _thumbnail(image_bytes: bytes) -> str:
    image = load_image(image_bytes)
    image.thumbnail((220, 220))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(result: dict, out_dir: str | Path, metrics_jsonl: str | Path | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(
        {"summary": result["summary"], "samples": [{k: v for k, v in r.items() if k != "image"}
                                                   for r in result["samples"]]}, indent=1))
    plots = curves(Path(metrics_jsonl), out) if metrics_jsonl else []
    curve = "".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode((out / name).read_bytes()).decode()}">'
                    for name in plots)
    rows = "".join(
        f"<tr><td><img src=\"data:image/png;base64,{_thumbnail(r['image'])}\"></td>"
        f"<td><pre>{html.escape(r['expected'])}</pre></td><td><pre>{_diff(r['expected'], r['generated'])}</pre></td>"
        f"<td>{'✓' if r['exact'] else '✗'}<br>loss {r['loss']:.4f}<br>CER {r['cer']:.3f}<br>NED {r['ned']:.3f}"
        f"<br>recall {r['word_recall']:.2f}</td></tr>" for r in result["samples"])
    s = result["summary"]
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>ocr_vlm report</title><style>
body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:6px;
vertical-align:top}} pre{{margin:0;white-space:pre-wrap}} ins{{background:#c8f7c5;text-decoration:none}}
del{{background:#f7c5c5}}</style></head><body><h1>ocr_vlm report</h1>
<p>exact match <b>{s['exact_match']}/{s['samples']}</b> · distinct outputs {s['distinct_outputs']} · mean loss
{s['mean_loss']:.4f} · mean CER {s['mean_cer']:.3f} · mean NED {s['mean_ned']:.3f} · word recall
{s['mean_word_recall']:.2f} · image-dependent share of vision tokens {s['vision_share']:.4f}</p>
<p><b>{html.escape(verdict(s['image_gap']))}</b></p>{curve}
<table><tr><th>image</th><th>expected</th><th>generated (<ins>added</ins> <del>missing</del>)</th><th>metrics</th></tr>
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
    add_mode_arguments(parser, default=None)
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint)
    model, tokenizer = load_export(checkpoint)
    model.cfg = apply_mode(model.cfg, args, parser)
    result = evaluate(model, tokenizer, args.shards, args.max_new_tokens)
    write_report(result, args.out, args.metrics or checkpoint.parent / "metrics.jsonl")
    print(table(result))
    print(f"report: {Path(args.out) / 'report.html'}")


if __name__ == "__main__":
    main()
