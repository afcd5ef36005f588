"""Data on-ramps: each input `shards write` takes (LLaVA/ShareGPT/messages conversations, Hugging Face datasets and
parquet, PDFs and TIFFs) and remote shards, on files the tests build; bad records named, or skipped and counted;
then a real DeepSpeed step on shards of every on-ramp, read through `pipe:`."""

import functools
import http.server
import io
import json
import threading
from pathlib import Path

import datasets
import pytest
import webdataset as wds
from PIL import Image, ImageDraw

from ocr_vlm.config import DataConfig
from ocr_vlm.data.loader import Loader
from ocr_vlm.data.sample import decode
from ocr_vlm.data.shards import image_member
from ocr_vlm.data.shards import main as shards_main
from ocr_vlm.data.stream import ShardSet
from ocr_vlm.model.gpt import IGNORE_INDEX
from ocr_vlm.tokenizer import MINI_TOKENIZER
from pdf import tiny_pdf
from test_loader import TOK, VLM, responses_in
from test_train import deepspeed, losses


def page_image(text: str, size=(160, 60)) -> Image.Image:
    image = Image.new("RGB", size, "white")
    ImageDraw.Draw(image).text((8, 8), text, fill="black")
    return image


def png(text: str) -> bytes:
    buf = io.BytesIO()
    page_image(text).save(buf, format="PNG")
    return buf.getvalue()


def write(*args: str) -> dict:
    shards_main(["write", *args])
    out = Path(args[args.index("--out") + 1])
    return json.loads((out / "index.json").read_text())


def samples(directory: Path) -> dict[str, dict]:
    """key -> (decoded JSON, raw sample) of every sample in a shard set."""
    return {s["__key__"]: s for s in wds.WebDataset(ShardSet.from_spec(str(directory)).urls, shardshuffle=False)}


def supervised(sample: dict) -> tuple[str, int]:
    """What a sample trains on (decoded targets) and how many <|image|> placeholders it holds."""
    example = decode(sample, TOK, VLM)
    return TOK.decode([t for t in example.targets if t != IGNORE_INDEX]), example.inputs.count(TOK.image_id)


# ----------------------------------------------------------------------------------------------------------------
# Inputs, built once: each on-ramp's file with good and bad records.

TURNS = [("<image>\nWhich store?", "CORNER MARKET"), ("And the total?", "TOTAL 12.47")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "images").mkdir()
    for name in ("receipt", "sign", "chart"):
        (root / "images" / f"{name}.png").write_bytes(png(name.upper()))
    human_gpt = [t for q, a in TURNS for t in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
    conversations = [
        {"id": "llava_multi", "image": "receipt.png", "conversations": human_gpt},
        {"id": "llava_single", "image": "sign.png", "conversations": [{"from": "human", "value": "Read the sign."},
                                                                     {"from": "gpt", "value": "EXIT"}]},
        {"id": "messages_multi", "images": ["chart.png"], "messages": [
            {"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Title?"},
            {"role": "assistant", "content": "Q3 SALES"}, {"role": "user", "content": "Bars?"},
            {"role": "assistant", "content": "4"}]},
        {"id": 7, "conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
        {"id": "two_images", "images": ["receipt.png", "sign.png"], "conversations": human_gpt},
        {"id": "dropped_image", "messages": [{"role": "user", "content": "<image>\nRead."},
                                             {"role": "assistant", "content": "x"}]},
        {"id": "no_file", "image": "gone.png", "conversations": human_gpt},
        {"id": "bad_speaker", "conversations": [{"from": "bot", "value": "hi"}]},
    ]
    (root / "llava.json").write_text(json.dumps(conversations))

    rows = {"image": [page_image(t) for t in ("ROW ZERO", "ROW ONE", "ROW TWO")],
            "text": ["ROW ZERO", "ROW ONE", "  "]}               # the last has no text: skipped, counted
    table = datasets.Dataset.from_dict(rows, features=datasets.Features(image=datasets.Image(),
                                                                        text=datasets.Value("string")))
    table.save_to_disk(str(root / "saved"))
    table.to_parquet(str(root / "table.parquet"))
    datasets.DatasetDict(train=table).save_to_disk(str(root / "dict"))

    docs = root / "docs"
    docs.mkdir()
    (docs / "invoice.pdf").write_bytes(tiny_pdf([["INVOICE 42", "TOTAL (12.50)"], None, "image", ["THANK YOU"]]))
    (docs / "letter.pdf").write_bytes(tiny_pdf([["ignored text layer"], ["second page"]]))
    (docs / "letter.pages.json").write_text(json.dumps(["Dear reader,", None]))     # the sidecar wins
    frames = [page_image("SCAN ONE").convert("1"), page_image("SCAN TWO").convert("1")]
    frames[0].save(docs / "scan.tif", save_all=True, append_images=frames[1:], compression="group4")
    (docs / "scan.pages.json").write_text(json.dumps(["SCAN ONE", "SCAN TWO"]))
    return root


@pytest.fixture(scope="module")
def written(inputs, tmp_path_factory):
    """Each on-ramp's shards, bad records skipped (or, for pages without text, always) and counted."""
    out = tmp_path_factory.mktemp("shards")
    indexes = {
        "conversations": write("--conversations", str(inputs / "llava.json"), "--images_root",
                               str(inputs / "images"), "--out", str(out / "conversations"), "--skip_bad"),
        "saved": write("--hf_dataset", str(inputs / "saved"), "--out", str(out / "saved"), "--skip_bad"),
        "parquet": write("--hf_dataset", str(inputs / "table.parquet"), "--image_column", "image",
                         "--text_column", "text", "--prompt", "<image>\nRead the row.", "--out", str(out / "parquet"),
                         "--skip_bad"),
        "documents": write("--documents", str(inputs / "docs"), "--dpi", "144", "--out", str(out / "documents")),
    }
    return out, indexes


# ----------------------------------------------------------------------------------------------------------------

def test_conversations_keep_their_image_and_train_every_assistant_turn(inputs, written):
    out, indexes = written
    index = indexes["conversations"]
    assert (index["vision"], index["text"]) == (3, 1)
    assert index["skipped"] == {"bad_fields": 2, "missing_image": 1, "multi_image": 1}
    read = samples(out / "conversations")
    assert set(read) == {"llava_multi", "llava_single", "messages_multi", "7"}
    assert supervised(read["llava_multi"]) == ("CORNER MARKET<|assistant_end|>TOTAL 12.47<|assistant_end|>",
                                               VLM.image_tokens)
    assert supervised(read["messages_multi"]) == ("Q3 SALES<|assistant_end|>4<|assistant_end|>", VLM.image_tokens)
    assert supervised(read["7"]) == ("4<|assistant_end|>", 0)
    single = json.loads(read["llava_single"]["json"])          # one exchange: the manifest's schema
    assert (single["prompt"], single["response"]) == ("Read the sign.", "EXIT") and "png" in read["llava_single"]
    assert read["llava_multi"]["png"] == (inputs / "images" / "receipt.png").read_bytes()   # stored as supplied


@pytest.mark.parametrize("index, message", [
    (4, "2 images; a sample holds one image"),
    (5, "a message holds <image> but the record names no image"),
    (6, "image .*gone\\.png does not exist"),
    (7, r"conversations\[0\]: 'from' 'bot' is not one of"),
])
def test_a_bad_conversation_is_named(inputs, tmp_path, index, message):
    records = json.loads((inputs / "llava.json").read_text())
    bad = tmp_path / "llava.json"
    bad.write_text(json.dumps(records[:4] + [records[index]]))          # four good records, then the bad one
    for name in ("receipt", "sign", "chart"):
        (tmp_path / f"{name}.png").write_bytes((inputs / "images" / f"{name}.png").read_bytes())
    with pytest.raises(SystemExit, match=r"llava\.json\[4\]: " + message):
        write("--conversations", str(bad), "--out", str(tmp_path / "out"))


def test_hf_datasets_and_parquet_become_vision_samples(inputs, written, tmp_path):
    out, indexes = written
    for name, prompt in (("saved", "<image>\nFree OCR."), ("parquet", "<image>\nRead the row.")):
        assert indexes[name]["vision"] == 2 and indexes[name]["skipped"] == {"bad_fields": 1}
        read = samples(out / name)
        assert sorted(read) == [f"{'saved' if name == 'saved' else 'table'}-{i:06d}" for i in range(2)]
        metas = [json.loads(s["json"]) for s in read.values()]
        assert [m["response"] for m in metas] == ["ROW ZERO", "ROW ONE"] and {m["prompt"] for m in metas} == {prompt}
    with pytest.raises(SystemExit, match=r"a DatasetDict with splits \['train'\]; give one split's directory"):
        write("--hf_dataset", str(inputs / "dict"), "--out", str(tmp_path / "x"))
    with pytest.raises(SystemExit, match=r"table\.parquet: no column 'page'; columns: \['image', 'text'\]"):
        write("--hf_dataset", str(inputs / "table.parquet"), "--image_column", "page", "--out", str(tmp_path / "x"))


def test_pdf_and_tiff_pages_become_samples_and_textless_pages_are_counted(inputs, written, tmp_path):
    out, indexes = written
    index = indexes["documents"]
    assert index["skipped"] == {"empty_page": 3}          # invoice's blank and image-only pages, letter's page 2
    read = samples(out / "documents")
    responses = {k: json.loads(s["json"])["response"] for k, s in read.items()}
    assert responses == {"invoice-000001": "INVOICE 42\nTOTAL (12.50)", "invoice-000004": "THANK YOU",
                         "letter-000001": "Dear reader,", "scan-000001": "SCAN ONE", "scan-000002": "SCAN TWO"}
    assert Image.open(io.BytesIO(read["invoice-000001"]["png"])).size == (400, 200)      # 200 x 100 pt at 144 dpi
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 not really")
    (tmp_path / "bare.tif").write_bytes((inputs / "docs" / "scan.tif").read_bytes())    # no sidecar
    with pytest.raises(SystemExit, match=r"broken\.pdf: not a readable PDF"):
        write("--documents", str(tmp_path / "broken.pdf"), "--out", str(tmp_path / "x"))
    index = write("--documents", str(tmp_path), "--out", str(tmp_path / "lenient"), "--skip_bad")
    assert index["total"] == 0 and index["skipped"] == {"bad_document": 2}


def test_a_failed_write_leaves_the_previous_set(inputs, written, tmp_path):
    out = tmp_path / "docs"
    write("--documents", str(inputs / "docs"), "--out", str(out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    (tmp_path / "broken.pdf").write_bytes(b"garbage")
    with pytest.raises(SystemExit):
        write("--documents", str(inputs / "docs"), str(tmp_path / "broken.pdf"), "--out", str(out))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


@pytest.fixture()
def http_server(written):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(written[0]))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_shards_open_through_webdataset_with_their_index(written, http_server, tmp_path):
    out, _ = written
    local = ShardSet.from_spec(str(out / "documents"))
    pipe = ShardSet.from_spec(f"pipe:cat {out}/documents/shard-{{000000..000000}}.tar")
    listed = ShardSet.from_spec(f"pipe:cat {out}/documents/index.json")          # every shard the index lists
    web = ShardSet.from_spec(f"{http_server}/documents/shard-000000.tar")
    assert pipe.counts == listed.counts == web.counts == local.counts == [5]
    assert web.urls == [f"{http_server}/documents/shard-000000.tar"]
    explicit = tmp_path / "index.json"                      # counts given by hand for shards with no index beside them
    explicit.write_text(json.dumps({"shards": {f"pipe:cat {out}/documents/shard-000000.tar": 5}}))
    assert ShardSet.from_spec(str(explicit)).counts == [5]
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "index.json").write_text(json.dumps({"shards": {"pipe:rm -rf ~": 1}}))
    with pytest.raises(ValueError, match="lists a shard that is not a file name beside it"):
        ShardSet.from_spec(f"pipe:cat {tmp_path}/served/index.json")
    data = DataConfig(shards=f"{http_server}/documents/shard-000000.tar", seq_len=400, num_workers=1,
                      shuffle_buffer=0)
    read = [r for batch in Loader(data, VLM, MINI_TOKENIZER, finite=True) for r in responses_in(batch)]
    assert sorted(read) == sorted(json.loads(s["json"])["response"] for s in samples(out / "documents").values())


@pytest.mark.slow
def test_every_onramp_trains_from_pipe_shards(written, tmp_path):
    out, _ = written
    spec = "::".join(f"pipe:cat {out / name}/index.json" for name in ("conversations", "saved", "parquet", "documents"))
    deepspeed(tmp_path, "--steps=2", f"--data.shards={spec}", ranks=1)
    trace = losses(tmp_path)
    assert sorted(trace) == [1, 2] and all(0 < loss < 20 for loss in trace.values())


EXAMPLES = Path(__file__).resolve().parents[1] / "shards" / "examples"


@pytest.mark.parametrize("args, counts", [
    (["--manifest", "manifest.jsonl"], (1, 0, {})),
    (["--conversations", "llava.json"], (2, 1, {})),
    (["--conversations", "messages.jsonl"], (1, 1, {})),
    (["--hf_dataset", "table.parquet", "--image_column", "image", "--text_column", "text"], (2, 0, {})),
    (["--documents", "invoice.pdf", "scan.tif"], (3, 0, {"empty_page": 1})),
])
def test_the_shipped_examples_convert(args, counts, tmp_path):
    """shards/README.md's example files, one per format, as its commands write them."""
    args = [str(EXAMPLES / a) if (EXAMPLES / a).exists() else a for a in args]
    index = write(*args, "--out", str(tmp_path / "out"))
    assert (index["vision"], index["text"], index["skipped"]) == counts


def test_images_in_other_formats_are_stored_as_png_and_frames_count_as_images():
    bmp, tiff = io.BytesIO(), io.BytesIO()
    page_image("BMP").save(bmp, format="BMP")
    page_image("ONE").save(tiff, format="TIFF", save_all=True, append_images=[page_image("TWO")])
    data, ext = image_member(bmp.getvalue(), "x")
    assert ext == "png" and Image.open(io.BytesIO(data)).tobytes() == page_image("BMP").tobytes()   # lossless
    assert image_member(png("P"), "x") == (png("P"), "png")                                         # as supplied
    with pytest.raises(ValueError, match="x has 2 frames; a sample holds one image") as e:
        image_member(tiff.getvalue(), "x")
    assert e.value.reason == "multi_image"
