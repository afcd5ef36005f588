"""Hugging Face datasets (`Dataset.save_to_disk` directories) and parquet files -> Records, one per row.

    python -m ocr_vlm.data.shards write --hf_dataset DIR|FILE.parquet --image_column image --text_column text \\
        [--prompt "<image>\\nFree OCR."] --out shards/hf

The image column holds what `datasets.Image` stores (a {bytes, path} struct; a path alone is read relative to the
dataset), raw image bytes, or a one-element list of those; the text column a string, the response. Rows are read
as Arrow data: nothing is decoded by `datasets` nor unpickled. A directory without a saved dataset's state.json is
read as its *.parquet files (the layout of a dataset repository), in name order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from ocr_vlm.data.shards import Record, Source, converted, derived_key, image_member, read_image
from ocr_vlm.rejected import Rejected

BATCH_ROWS = 256                  # rows per Arrow batch: images stay in memory only a batch at a time


def hf_records(path: Path, image_column: str, text_column: str, prompt: str) -> Source:
    name = path.stem if path.is_file() else path.name
    rows = enumerate(table_rows(path, [image_column, text_column]))

    def make(where: str, row: object) -> Record:
        number, values = row
        key = derived_key(name, number)
        data, ext = row_image(where, values[image_column], path if path.is_dir() else path.parent)
        text = values[text_column]
        if not isinstance(text, str) or not text.strip():
            raise Rejected("bad_fields", f"{where}: column '{text_column}' is not a non-empty string")
        return Record(key, {"id": key, "prompt": prompt, "response": text}, data, ext, where)

    return converted(((f"{path}[row {n}]", (n, values)) for n, values in rows), make)


def table_rows(path: Path, columns: list[str]) -> Iterator[dict]:
    """The rows of a saved dataset or parquet file(s) as {column: Python value}, only the named columns."""
    if path.is_dir() and (path / "dataset_dict.json").exists():
        splits = sorted(p.name for p in path.iterdir() if p.is_dir())
        raise Rejected("bad_file", f"{path}: a DatasetDict with splits {splits}; give one split's directory "
                                    f"({path}/SPLIT)")
    if path.is_dir() and (path / "state.json").exists():
        import datasets                         # heavy; loaded only for this input

        dataset = datasets.load_from_disk(str(path))
        check_columns(path, dataset.column_names, columns)
        batches = dataset.select_columns(columns).with_format("arrow").iter(batch_size=BATCH_ROWS)
    else:
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files or not all(f.is_file() for f in files):
            raise Rejected("bad_file", f"{path}: neither a saved dataset (state.json) nor parquet file(s)")
        batches = parquet_batches(files, columns)
    for batch in batches:
        yield from batch.to_pylist()


def parquet_batches(files: list[Path], columns: list[str]) -> Iterator:
    import pyarrow as pa
    import pyarrow.parquet as pq

    for file in files:
        try:
            table = pq.ParquetFile(file)
        except (OSError, pa.ArrowException) as e:
            raise Rejected("bad_file", f"{file}: not a readable parquet file ({e})") from None
        check_columns(file, table.schema_arrow.names, columns)
        yield from table.iter_batches(batch_size=BATCH_ROWS, columns=columns)


def check_columns(path: Path, have: list[str], wanted: list[str]) -> None:
    missing = [c for c in wanted if c not in have]
    if missing:
        raise Rejected("bad_file", f"{path}: no column {', '.join(map(repr, missing))}; columns: {have}")


def row_image(where: str, value: object, root: Path) -> tuple[bytes, str]:
    """A row's image cell as shard member bytes (`image_member`)."""
    if isinstance(value, list):
        if len(value) != 1:
            raise Rejected("multi_image" if value else "missing_image",
                            f"{where}: {len(value)} images; a sample holds one image")
        value = value[0]
    if isinstance(value, dict):                 # datasets.Image's storage: embedded bytes, else a path
        if value.get("bytes"):
            return image_member(value["bytes"], f"{where}: image")
        value = value.get("path")
    if isinstance(value, bytes) and value:
        return image_member(value, f"{where}: image")
    if isinstance(value, str) and value:
        return read_image(where, root / value)
    raise Rejected("missing_image", f"{where}: no image (cell holds {type(value).__name__})")
