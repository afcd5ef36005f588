"""Documents -> Records, one per page: PDFs rendered with pypdfium2, multi-page TIFF scans read with Pillow.

    python -m ocr_vlm.data.shards write --documents papers/ scan.tif [--dpi 144] [--prompt ...] --out shards/docs

A born-digital PDF page's response is its text layer (as olmOCR bootstraps its data). A sidecar next to the
document, NAME.pages.json holding a JSON list with one string per page, gives the texts instead; a TIFF, which has no
text layer, needs one. Pages with no text (blank, or a scan without a text layer) are left out and counted as
`empty_page`; a document that cannot be read counts once as `bad_document`. Directories are searched for .pdf,
.tif and .tiff files, in path order. Keys are NAME-PAGE (page numbers from 1).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from PIL import Image, ImageSequence

from ocr_vlm.data.shards import Record, Source, derived_key, png_bytes
from ocr_vlm.rejected import Rejected

SUFFIXES = (".pdf", ".tif", ".tiff")
POINTS_PER_INCH = 72                # PDF user space units


def document_records(paths: Iterable[Path], dpi: float, prompt: str) -> Source:
    if dpi <= 0:
        raise Rejected("bad_file", f"--dpi {dpi} must be positive")
    for path in document_files(paths):
        try:
            texts = sidecar_texts(path)
            pages = pdf_pages(path, dpi, texts) if path.suffix.lower() == ".pdf" else tiff_pages(path, texts)
            for number, text, image in pages:
                where = f"{path} page {number}"
                if not text:
                    yield Rejected("empty_page", f"{where}: no text (blank or image-only page)")
                    continue
                key = derived_key(path.stem, number)
                yield Record(key, {"id": key, "prompt": prompt, "response": text}, png_bytes(image), "png", where)
        except Rejected as e:
            yield e


def document_files(paths: Iterable[Path]) -> list[Path]:
    files = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        elif path.is_file() and path.suffix.lower() in SUFFIXES:
            files.append(path)
        else:
            raise Rejected("bad_file", f"{path}: not a directory nor a {'/'.join(SUFFIXES)} file")
    return files


def sidecar_texts(path: Path) -> list[str | None] | None:
    """NAME.pages.json's per-page texts (null: a page with no text), or None without a sidecar."""
    sidecar = path.with_name(path.stem + ".pages.json")
    if not sidecar.exists():
        return None
    try:
        texts = json.loads(sidecar.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise Rejected("bad_document", f"{sidecar}: cannot read ({e})") from None
    if not isinstance(texts, list) or not all(t is None or isinstance(t, str) for t in texts):
        raise Rejected("bad_document", f"{sidecar}: expected a JSON list of page texts (strings or null)")
    return texts


def page_texts(path: Path, pages: int, texts: list[str | None] | None) -> list[str | None] | None:
    if texts is not None and len(texts) != pages:
        raise Rejected("bad_document", f"{path}: {pages} pages but its sidecar holds {len(texts)} texts")
    return texts


def clean(text: str | None) -> str:
    """Page text with line ends unified (pdfium writes CRLF) and trailing blanks dropped; "" for no text."""
    return "\n".join(line.rstrip() for line in (text or "").splitlines()).strip()


def pdf_pages(path: Path, dpi: float, texts: list[str | None] | None) -> Iterator[tuple[int, str, Image.Image | None]]:
    """(page number, text, page image) per page; a page is rendered only if it has text."""
    import pypdfium2 as pdfium                     # loaded only for this input

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        raise Rejected("bad_document", f"{path}: not a readable PDF ({e})") from None
    try:
        texts = page_texts(path, len(pdf), texts)
        for i in range(len(pdf)):
            page = pdf[i]
            text = clean(texts[i] if texts is not None else page.get_textpage().get_text_range())
            yield i + 1, text, page.render(scale=dpi / POINTS_PER_INCH).to_pil() if text else None
    except pdfium.PdfiumError as e:
        raise Rejected("bad_document", f"{path}: cannot render ({e})") from None
    finally:
        pdf.close()


def tiff_pages(path: Path, texts: list[str | None] | None) -> Iterator[tuple[int, str, Image.Image | None]]:
    """(page number, sidecar text, page image) per frame of a (multi-page) TIFF."""
    if texts is None:
        raise Rejected("bad_document", f"{path}: a TIFF has no text layer; give its page texts in "
                                        f"{path.with_name(path.stem + '.pages.json')}")
    try:
        with Image.open(path) as image:
            texts = page_texts(path, getattr(image, "n_frames", 1), texts)
            for i, frame in enumerate(ImageSequence.Iterator(image)):
                text = clean(texts[i])
                yield i + 1, text, frame.copy() if text else None      # copy(): the frame's pixels, loaded now
    except (OSError, SyntaxError) as e:             # Pillow's errors for unreadable or truncated files
        raise Rejected("bad_document", f"{path}: not a readable TIFF ({e})") from None
