"""Shard writing: tier-1 regenerates byte-identically, manifests round-trip through webdataset, bad records are named."""

import json
import subprocess
from pathlib import Path

import pytest
import webdataset as wds

from ocr_vlm.data import render
from ocr_vlm.data.shards import main as shards_main

TIER1 = Path(__file__).resolve().parents[1] / "shards" / "tier1"


def test_tier1_regenerates_byte_identically(tmp_path):
    render.write_tier1(tmp_path)
    for name in ("tier1-000000.tar", "index.json"):
        assert (tmp_path / name).read_bytes() == (TIER1 / name).read_bytes(), name


def test_tier1_members_and_content():
    listing = subprocess.run(["tar", "tf", str(TIER1 / "tier1-000000.tar")], capture_output=True, text=True,
                             check=True).stdout.split()
    kinds = ["receipt"] * 4 + ["chart"] * 3 + ["sign"] * 3
    expected = []
    for i, kind in enumerate(kinds):
        image = "jpg" if kind == "sign" else "png"
        expected += sorted([f"tier1_{i:02d}_{kind}.json", f"tier1_{i:02d}_{kind}.{image}"])
    assert listing == expected
    samples = list(wds.WebDataset(str(TIER1 / "tier1-000000.tar"), shardshuffle=False))
    responses = [json.loads(s["json"])["response"] for s in samples]
    assert len(set(responses)) == 10                       # ten distinct texts
    assert responses[0].split("\n")[0] == responses[1].split("\n")[0] == "CORNER MARKET"   # same layout, new content


@pytest.fixture()
def manifest(tmp_path):
    synth = render.write_synth(12, seed=3, out_dir=tmp_path / "synth")
    return synth / "manifest.jsonl", synth / "conversations.jsonl"


def test_manifest_round_trip_with_max_count(tmp_path, manifest):
    pages, chats = manifest
    shards_main(["write", "--manifest", str(pages), "--conversations", str(chats), "--out", str(tmp_path / "out"),
                 "--max-count", "5"])
    index = json.loads((tmp_path / "out" / "index.json").read_text())
    assert index["total"] == 24 and (index["vision"], index["text"]) == (12, 12)
    assert list(index["shards"].values()) == [5, 5, 5, 5, 4]
    urls = [str(tmp_path / "out" / name) for name in index["shards"]]
    read = {s["__key__"]: s for s in wds.WebDataset(urls, shardshuffle=False)}
    for line in pages.read_text().splitlines():
        record = json.loads(line)
        sample = read[record["id"]]
        meta = json.loads(sample["json"])
        assert meta["response"] == record["answer"] and meta["prompt"] == record["prompt"]
        image = pages.parent / record["image"]
        assert sample[image.suffix[1:]] == image.read_bytes()          # original bytes, not re-encoded
    # Deterministic: writing again gives identical bytes.
    shards_main(["write", "--manifest", str(pages), "--conversations", str(chats), "--out", str(tmp_path / "again"),
                 "--max-count", "5"])
    for name in index["shards"]:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "again" / name).read_bytes()


def test_bad_records_are_named_or_skipped_and_counted(tmp_path, manifest):
    pages, _ = manifest
    lines = pages.read_text().splitlines()
    broken = [json.loads(line) for line in lines[:4]]
    del broken[0]["prompt"]                                # missing field
    broken[1]["image"] = "images/nowhere.png"              # missing image
    broken[2]["id"] = "has.dot"                            # would split the tar key
    (pages.parent / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    broken[3]["image"] = "images/corrupt.png"
    bad = pages.parent / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(b) for b in broken) + "\n{oops\n" + "\n".join(lines[4:]) + "\n")

    with pytest.raises(SystemExit, match=r"bad\.jsonl:1: field 'prompt' missing"):
        shards_main(["write", "--manifest", str(bad), "--out", str(tmp_path / "strict")])
    shards_main(["write", "--manifest", str(bad), "--out", str(tmp_path / "lenient"), "--skip-bad"])
    index = json.loads((tmp_path / "lenient" / "index.json").read_text())
    assert index["total"] == 8
    assert index["skipped"] == {"bad_fields": 2, "bad_image": 1, "bad_json": 1, "missing_image": 1}
