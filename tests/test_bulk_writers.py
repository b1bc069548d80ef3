"""Bulk shards written to real folders and a real S3 server, and loaded back with webdataset and datasets."""

from __future__ import annotations

import io
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from farm.bulk.writers import (
    FORMATS,
    LocalDestination,
    S3Destination,
    ShardSample,
    open_destination,
    sample_key,
    write_shard,
    write_stats,
)
from farm.config import Settings
from farm.errors import InvalidInputError


@pytest.fixture(autouse=True)
def _isolated(farm_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default farm bounds, and a `datasets` that stays offline with a private cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


SIZES = [(8, 8), (16, 8), (8, 24)]


def png(size: tuple[int, int], color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def shard_samples(shard: int) -> list[ShardSample]:
    out = []
    for i, size in enumerate(SIZES):
        seed = shard * 10 + i
        meta = {
            "prompt": f"prompt {shard}-{i}", "negative_prompt": "", "seed": seed, "model": "farm/hold",
            "params": {"image_size": {"width": size[0], "height": size[1]}, "num_inference_steps": 4},
            "nsfw": i == 1, "render_seconds": 0.25, "row": seed + 1,
        }
        out.append(ShardSample(sample_key(shard, i), png(size, (40 * i, 100, 200)), "png", meta))
    return out[::-1]  # out of order: writers sort by key


def write_two_shards(root: Path, fmt: str) -> list[dict[str, Any]]:
    dest = LocalDestination(root)
    return [write_shard(dest, fmt, shard, shard_samples(shard), failed=shard) for shard in (0, 1)]


def expected_keys() -> list[str]:
    return [sample_key(shard, i) for shard in (0, 1) for i in range(3)]


def test_sample_keys():
    assert sample_key(3, 42) == "000030042"
    assert sample_key(0, 9999) == "000009999"
    with pytest.raises(InvalidInputError):
        sample_key(0, 10_000)


@pytest.mark.parametrize("fmt", FORMATS)
def test_shard_stats(tmp_path, fmt):
    stats = write_two_shards(tmp_path, fmt)
    assert stats[1] | {"files": None} == {
        "shard": 1, "count": 3, "successes": 3, "failed": 1, "nsfw": 1, "render_seconds": 0.75, "format": fmt,
        "files": None,
    }
    for s in stats:
        assert s["files"][-1] == f"{s['shard']:05d}_stats.json"
        assert all((tmp_path / name).is_file() for name in s["files"])
        assert json.loads((tmp_path / s["files"][-1]).read_text()) == s
    assert not list(tmp_path.rglob(".tmp-*"))
    write_stats(LocalDestination(tmp_path), {"shards": 2, "count": 6})
    assert json.loads((tmp_path / "_stats.json").read_text()) == {"shards": 2, "count": 6}


def _load(builder: str, cache: Path, **kwargs: Any) -> Any:
    import datasets

    return datasets.load_dataset(builder, split="train", cache_dir=str(cache), **kwargs)


def test_webdataset_shards_load_with_webdataset_and_datasets(tmp_path):
    import webdataset as wds

    root = tmp_path / "ds"
    stats = write_two_shards(root, "webdataset")
    assert stats[0]["files"] == ["00000.tar", "00000.parquet", "00000_stats.json"]
    tars = [str(root / f"{shard:05d}.tar") for shard in (0, 1)]

    got = list(wds.WebDataset(tars, shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in got] == expected_keys()
    for s in got:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["params"]["num_inference_steps"] == 4
        size = Image.open(io.BytesIO(s["png"])).size
        assert size == (meta["params"]["image_size"]["width"], meta["params"]["image_size"]["height"])

    ds = _load("webdataset", tmp_path / "cache", data_files={"train": tars})
    assert ds.num_rows == 6 and ds["__key__"] == expected_keys()
    assert [im.size for im in ds["png"]] == SIZES * 2
    assert [j["seed"] for j in ds["json"]] == [0, 1, 2, 10, 11, 12]

    meta = pq.read_table(root / "00001.parquet").to_pylist()
    assert [m["key"] for m in meta] == expected_keys()[3:]
    assert json.loads(meta[0]["params"]) == {"image_size": {"width": 8, "height": 8}, "num_inference_steps": 4}
    assert meta[1]["nsfw"] is True

    # reproducible bytes: the same samples make the same tar
    again = tmp_path / "again"
    write_two_shards(again, "webdataset")
    assert (again / "00001.tar").read_bytes() == (root / "00001.tar").read_bytes()


def test_imagefolder_shards_load_with_datasets(tmp_path):
    root = tmp_path / "ds"
    stats = write_two_shards(root, "imagefolder")
    assert stats[1]["files"] == [
        "00001/000010000.png", "00001/000010001.png", "00001/000010002.png", "00001/metadata.jsonl", "00001_stats.json",
    ]
    lines = [json.loads(line) for line in (root / "00000" / "metadata.jsonl").read_text().splitlines()]
    assert lines[0]["file_name"] == "000000000.png" and lines[0]["key"] == "000000000"

    ds = _load("imagefolder", tmp_path / "cache", data_dir=str(root))
    assert ds.num_rows == 6
    assert {"image", "key", "prompt", "seed", "nsfw", "render_seconds", "params"} <= set(ds.column_names)
    rows = sorted(ds, key=lambda r: r["key"])
    assert [r["key"] for r in rows] == expected_keys()
    assert [r["image"].size for r in rows] == SIZES * 2
    assert [r["prompt"] for r in rows][:2] == ["prompt 0-0", "prompt 0-1"]
    assert json.loads(rows[4]["params"])["image_size"] == {"width": 16, "height": 8}


def test_parquet_shards_load_with_datasets(tmp_path):
    root = tmp_path / "ds"
    write_two_shards(root, "parquet")
    schema = pq.read_schema(root / "00000.parquet")
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])

    ds = _load("parquet", tmp_path / "cache", data_files={"train": [str(root / "00000.parquet"),
                                                                   str(root / "00001.parquet")]})
    assert ds.num_rows == 6 and ds["key"] == expected_keys()
    assert type(ds.features["image"]).__name__ == "Image"
    assert [im.size for im in ds["image"]] == SIZES * 2
    assert ds["seed"] == [0, 1, 2, 10, 11, 12] and ds["nsfw"] == [False, True, False] * 2


def test_local_destination_refuses_names_outside_its_root(tmp_path):
    dest = LocalDestination(tmp_path / "root")
    dest.put("a/b/c.txt", b"x")
    assert dest.exists("a/b/c.txt") and dest.get("a/b/c.txt") == b"x"
    for name in ("../x", "a/../../x", "/etc/x", ""):
        with pytest.raises(InvalidInputError):
            dest.put(name, b"x")
    assert not (tmp_path / "x").exists()
    assert isinstance(open_destination(str(tmp_path / "other")), LocalDestination)
    assert isinstance(open_destination((tmp_path / "third").as_uri()), LocalDestination)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_shards_follow_the_umask(tmp_path, fmt, umask):
    # what open() would give (0666 less the umask), not mkstemp's 0600: another account may read them
    before = os.umask(umask)
    try:
        stats = write_two_shards(tmp_path, fmt)
        write_stats(LocalDestination(tmp_path), {"shards": 2})
    finally:
        os.umask(before)
    files = [tmp_path / name for s in stats for name in s["files"]] + [tmp_path / "_stats.json"]
    assert {oct(stat.S_IMODE(f.stat().st_mode)) for f in files} == {oct(0o666 & ~umask)}


def test_a_failed_write_leaves_no_partial_shard(tmp_path):
    dest = LocalDestination(tmp_path)
    (tmp_path / "00000.tar" / "in-the-way").mkdir(parents=True)  # a folder where the tar goes: os.replace fails
    with pytest.raises(OSError):
        write_shard(dest, "webdataset", 0, shard_samples(0))
    assert not dest.exists("00000_stats.json")  # the shard is not complete
    assert not list(tmp_path.rglob(".tmp-*"))  # and no half-written file is left behind
    assert (tmp_path / "00000.tar").is_dir()

    (tmp_path / "00001.png").write_bytes(b"old")
    dest.put("00001.png", b"new")  # an ordinary rewrite replaces the file whole
    assert dest.get("00001.png") == b"new"


def test_s3_destination_on_a_real_server(s3_server, tmp_path):
    bucket = f"t-{uuid.uuid4().hex[:8]}"
    settings = Settings(s3_endpoint=s3_server.url, s3_access_key="testing", s3_secret_key="testing",
                        data_dir=tmp_path)
    dest = open_destination(f"s3://{bucket}/datasets/run1", settings)
    assert isinstance(dest, S3Destination) and dest.url == f"s3://{bucket}/datasets/run1"
    assert not dest.exists("00000_stats.json")
    stats = write_shard(dest, "parquet", 0, shard_samples(0))
    assert dest.exists("00000_stats.json") and json.loads(dest.get("00000_stats.json")) == stats
    table = pq.read_table(io.BytesIO(dest.get("00000.parquet")))
    assert table.column("key").to_pylist() == [sample_key(0, i) for i in range(3)]
    with pytest.raises(InvalidInputError):
        dest.put("../escape", b"x")
