"""Bulk manifests read from real files: formats, bad rows, templates, seeds, streaming."""

from __future__ import annotations

import itertools
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from farm.bulk.manifest import ManifestError, RowError, Sample, read_manifest
from farm.errors import InvalidInputError


@pytest.fixture(autouse=True)
def _isolated(farm_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Default farm bounds, and a `datasets` that stays offline with a private cache."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def read_all(path: Path, **kwargs: Any) -> tuple[list[Sample], list[RowError]]:
    errors: list[RowError] = []
    samples = list(read_manifest(path, on_error=errors.append, **kwargs))
    return samples, errors


def test_txt_manifest_skips_blanks_and_comments(tmp_path):
    path = write(tmp_path / "m.txt", "a red fox\n\n# a comment\n  a blue bird  \r\n")
    samples, errors = read_all(path, base_seed=7)
    assert errors == []
    assert [(s.index, s.row, s.prompt, s.seed) for s in samples] == [(0, 1, "a red fox", 7), (1, 4, "a blue bird", 8)]
    s = samples[0]
    assert s.template == "a red fox" and s.negative_prompt is None and s.extra == {}
    assert s.params["num_inference_steps"] == 6 and s.params["image_size"] == "square_hd"
    assert not {"prompt", "negative_prompt", "seed", "num_images", "request_id", "sync_mode"} & set(s.params)
    json.dumps(s.params)


def test_csv_manifest_with_overrides(tmp_path):
    path = write(tmp_path / "m.csv", (
        "prompt,negative_prompt,seed,image_size,num_inference_steps,guidance_scale,format,"
        "enable_safety_checker,caption\n"
        'a cat,blurry,42,"{""width"": 512, ""height"": 768}",4,1.5,png,false,tabby\n'
        "a dog,,,square,,,,,\n"
        '"a long\nprompt",,,,,,,,two lines\n'
    ))
    samples, errors = read_all(path, defaults={"num_inference_steps": 8, "negative_prompt": "ugly"})
    assert errors == []
    cat, dog, long = samples
    assert (cat.row, cat.seed, cat.negative_prompt) == (2, 42, "blurry")
    assert cat.params["image_size"] == {"width": 512, "height": 768}
    assert cat.params["num_inference_steps"] == 4 and cat.params["guidance_scale"] == 1.5
    assert cat.params["format"] == "png" and cat.params["enable_safety_checker"] is False
    assert cat.extra == {"caption": "tabby"}
    # empty cells are "not given": the defaults apply
    assert (dog.row, dog.seed, dog.negative_prompt) == (3, 1, "ugly")
    assert dog.params["image_size"] == "square" and dog.params["num_inference_steps"] == 8
    assert dog.params["format"] == "jpeg"
    # a quoted cell spanning two lines: the row is the line it starts on
    assert (long.row, long.prompt, long.extra) == (4, "a long\nprompt", {"caption": "two lines"})


def test_jsonl_manifest(tmp_path):
    lines = [
        {"prompt": "a cat", "seed": 5, "image_size": {"width": 640, "height": 512}, "tags": ["x", "y"]},
        {},
        {"prompt": "a dog", "negative_prompt": None, "guidance_scale": 2, "source": {"id": 3}},
    ]
    text = "\n".join("" if not obj else json.dumps(obj) for obj in lines) + "\n"
    samples, errors = read_all(write(tmp_path / "m.jsonl", text), images_per_prompt=2)
    assert errors == []
    assert [(s.row, s.prompt, s.seed) for s in samples] == [(1, "a cat", 5), (1, "a cat", 6), (3, "a dog", 2),
                                                            (3, "a dog", 3)]
    assert samples[0].params["image_size"] == {"width": 640, "height": 512}
    assert samples[0].extra == {"tags": ["x", "y"]}
    assert samples[2].params["guidance_scale"] == 2.0 and samples[2].extra == {"source": {"id": 3}}
    assert samples[2].negative_prompt is None


def test_parquet_manifest_streams_record_batches(tmp_path):
    n = 2500  # more than two record batches of 1,024
    table = pa.table({
        "prompt": [f"prompt {i}" for i in range(n)],
        "seed": pa.array([1000 + i if i % 2 else None for i in range(n)], pa.int64()),
        "image_size": ["square" if i % 3 else None for i in range(n)],
        "score": [i / 10 for i in range(n)],
    })
    path = tmp_path / "m.parquet"
    pq.write_table(table, path, row_group_size=700)
    samples, errors = read_all(path, base_seed=10)
    assert errors == [] and len(samples) == n
    assert [s.row for s in samples[:3]] == [1, 2, 3] and samples[-1].row == n
    assert [s.seed for s in samples[:4]] == [10, 1001, 12, 1003]
    assert samples[1].params["image_size"] == "square" and samples[0].params["image_size"] == "square_hd"
    assert samples[5].extra == {"score": 0.5}


@pytest.mark.parametrize(("name", "text", "bad"), [
    ("m.txt", "good one\na {broken\n\n__nowhere__ cat\ngood two\n",
     {2: "prompt: invalid template", 4: "prompt: unknown wildcard __nowhere__"}),
    ("m.csv", (
        "prompt,seed,image_size,num_images,model_name\n"
        "good one,,,,\n"
        'bad size,,"{""width"": 513, ""height"": 512}",,\n'
        "bad seed,abc,,,\n"
        "forbidden,,,4,\n"
        "unknown model,,,,no/such-model\n"
        " ,3,,,\n"
        "too,many,fields,here,x,y\n"
        "good two,,,,\n"
    ), {3: "image_size.width: must be a multiple of 8 (got 513)", 4: "seed: must be an integer (got 'abc')",
        5: "num_images: is set by the bulk job", 6: "model_name: unknown model 'no/such-model'",
        7: "prompt: must not be empty", 8: "input: 6 fields, but the header has 5"}),
    ("m.jsonl", (
        '{"prompt": "good one"}\n'
        '{"prompt": "bad json",\n'
        '["not", "an", "object"]\n'
        '{"prompt": ""}\n'
        '{"prompt": "steps", "num_inference_steps": 0}\n'
        '{"prompt": "seed", "seed": 1.5}\n'
        '{"negative_prompt": "no prompt"}\n'
        '{"prompt": "good two"}\n'
    ), {2: "input: invalid JSON", 3: "input: expected a JSON object, got list", 4: "prompt: must not be empty",
        5: "num_inference_steps: must be between 1 and 50 (got 0)", 6: "seed: must be an integer (got 1.5)",
        7: "prompt: missing"}),
])
def test_bad_rows_are_reported_with_their_line_and_skipped(tmp_path, name, text, bad):
    samples, errors = read_all(write(tmp_path / name, text))
    assert [e.row for e in errors] == sorted(bad)
    for error in errors:
        assert error.message.startswith(f"row {error.row}: {bad[error.row]}"), error.message
    # the good rows go on, with consecutive indices: a skipped row consumes none
    assert [(s.index, s.prompt) for s in samples] == [(0, "good one"), (1, "good two")]
    assert samples[1].seed == 1


def test_strict_raises_naming_the_row(tmp_path):
    path = write(tmp_path / "m.jsonl", '{"prompt": "fine"}\n\n{"prompt": "x", "image_size": {"width": 12}}\n')
    gen = read_manifest(path, strict=True)
    assert next(gen).prompt == "fine"
    with pytest.raises(ManifestError) as info:
        next(gen)
    assert str(info.value) == "row 3: image_size.width: must be a multiple of 8 (got 12)"
    assert info.value.row == 3 and isinstance(info.value, InvalidInputError)


def test_unreadable_manifests_are_manifest_errors(tmp_path):
    with pytest.raises(ManifestError, match=r"\.txt, \.csv, \.jsonl, \.parquet"):
        read_manifest(write(tmp_path / "m.yaml", "prompt: x\n"))
    with pytest.raises(ManifestError, match="no such manifest"):
        read_manifest(tmp_path / "missing.txt")
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        list(read_manifest(write(tmp_path / "m.csv", "text,seed\na cat,1\n")))
    with pytest.raises(ManifestError, match="empty CSV"):
        list(read_manifest(write(tmp_path / "e.csv", "\n")))
    pq.write_table(pa.table({"text": ["a cat"]}), tmp_path / "m.parquet")
    with pytest.raises(ManifestError, match="no 'prompt' column"):
        list(read_manifest(tmp_path / "m.parquet"))
    with pytest.raises(ManifestError, match="cannot read as Parquet"):
        list(read_manifest(write(tmp_path / "bad.parquet", "not parquet")))


def test_bad_defaults_fail_up_front_naming_the_field(tmp_path):
    path = write(tmp_path / "m.txt", "a cat\n")
    with pytest.raises(InvalidInputError) as info:
        read_manifest(path, defaults={"num_inference_steps": 0})
    assert info.value.field == "num_inference_steps"
    with pytest.raises(InvalidInputError) as info:
        read_manifest(path, defaults={"num_images": 4})
    assert info.value.field == "num_images"
    with pytest.raises(InvalidInputError) as info:
        read_manifest(path, defaults={"no_such_field": 1})
    assert info.value.field == "no_such_field"


def test_combinatorial_expansion(tmp_path):
    path = write(tmp_path / "m.txt", "a {red|green} {cat|dog}\nplain\n")
    samples, _ = read_all(path)
    assert [s.prompt for s in samples] == ["a red cat", "a red dog", "a green cat", "a green dog", "plain"]
    assert {s.template for s in samples[:4]} == {"a {red|green} {cat|dog}"}
    assert [s.index for s in samples] == [0, 1, 2, 3, 4] and [s.row for s in samples] == [1, 1, 1, 1, 2]
    capped, _ = read_all(path, max_combinations=3)
    assert [s.prompt for s in capped] == ["a red cat", "a red dog", "a green cat", "plain"]
    literal, _ = read_all(path, expand="none")
    assert [s.prompt for s in literal] == ["a {red|green} {cat|dog}", "plain"]


def test_random_expansion_is_deterministic(tmp_path):
    path = write(tmp_path / "m.txt", "{a|b|c|d|e|f|g|h} {1|2|3|4|5|6|7|8} {x|y|z|w}\nplain\n")

    def prompts(base_seed: int) -> list[str]:
        return [s.prompt for s in read_all(path, expand="random", variants=3, base_seed=base_seed)[0]]

    first = prompts(0)
    assert len(first) == 6 and first[3:] == ["plain"] * 3
    assert all(len(p.split()) == 3 for p in first[:3])
    assert prompts(0) == first
    assert prompts(1)[:3] != first[:3]


def test_wildcards_from_a_folder(tmp_path):
    folder = tmp_path / "wildcards"
    folder.mkdir()
    write(folder / "colors.txt", "red\nblue\n")
    path = write(tmp_path / "m.txt", "a __colors__ cat\na __sizes__ dog\n")
    samples, errors = read_all(path, wildcards=folder)
    assert sorted(s.prompt for s in samples) == ["a blue cat", "a red cat"]
    assert [(e.row, e.message) for e in errors] == [(2, "row 2: prompt: unknown wildcard __sizes__")]


def test_seed_rule(tmp_path):
    txt = write(tmp_path / "m.txt", "{a|b} cat\nplain\n")
    samples, _ = read_all(txt, images_per_prompt=2, base_seed=100)
    assert [(s.prompt, s.seed) for s in samples] == [
        ("a cat", 100), ("a cat", 101), ("b cat", 102), ("b cat", 103), ("plain", 104), ("plain", 105),
    ]
    csv_path = write(tmp_path / "m.csv", "prompt,seed\n{a|b} cat,7\nplain,\n")
    samples, _ = read_all(csv_path, images_per_prompt=2, base_seed=100)
    # a row's seed S: its j-th sample has S + j; otherwise base_seed + index
    assert [(s.prompt, s.seed, s.index) for s in samples] == [
        ("a cat", 7, 0), ("a cat", 8, 1), ("b cat", 9, 2), ("b cat", 10, 3), ("plain", 104, 4), ("plain", 105, 5),
    ]


def _open_offset(path: Path) -> int | None:
    """The read offset of this process's open file descriptor on ``path``, or None if it is not open."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target == str(path.resolve()):
            info = Path(f"/proc/self/fdinfo/{fd}").read_text()
            return int(next(line for line in info.splitlines() if line.startswith("pos:")).split()[1])
    return None


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="needs Linux /proc")
def test_manifest_is_streamed_not_read_whole(tmp_path):
    path = tmp_path / "huge.txt"
    with path.open("w") as fh:
        for i in range(200_000):
            fh.write(f"a photograph of object number {i} on a plain table, studio light\n")
    size = path.stat().st_size
    gen = read_manifest(path)
    first = list(itertools.islice(gen, 3))
    assert [s.prompt for s in first] == [f"a photograph of object number {i} on a plain table, studio light"
                                         for i in range(3)]
    offset = _open_offset(path)
    assert offset is not None, "the manifest is not open while the samples are being read"
    assert offset < size // 20, f"read {offset} of {size} bytes for 3 samples"
    gen.close()  # an abandoned read closes its file
    assert _open_offset(path) is None


def test_memory_stays_flat_over_a_long_manifest(tmp_path):
    path = tmp_path / "long.jsonl"
    with path.open("w") as fh:
        for i in range(30_000):
            fh.write(json.dumps({"prompt": f"a painting of a lighthouse, number {i}, " + "detail " * 20, "n": i}))
            fh.write("\n")
    size = path.stat().st_size
    list(read_manifest(write(tmp_path / "warm.jsonl", '{"prompt": "x"}\n')))  # one-time lazy setup, not counted
    tracemalloc.start()
    try:
        count = sum(1 for _ in read_manifest(path, expand="none"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == 30_000
    assert peak < size // 20, f"peak {peak} bytes for a {size}-byte manifest"


def test_csv_lines_and_rows_past_the_line_cap_are_rejected_unread(tmp_path):
    """A CSV row is capped like a .txt or .jsonl line (FARM_BULK_MAX_LINE_BYTES, 64 KiB by default): a line
    past it is skipped a block at a time, a quoted record spread over many short lines is measured whole,
    and the rows around them are read as usual."""
    long_line = "a wide " + "x" * (70 * 1024) + ",1\n"
    tall_record = '"' + "y\n" * (40 * 1024) + '",2\n'
    path = write(tmp_path / "m.csv", "prompt,seed\ngood one,5\n" + long_line + tall_record + "good two,6\n")
    samples, errors = read_all(path)
    assert [(s.prompt, s.seed) for s in samples] == [("good one", 5), ("good two", 6)]
    assert [e.row for e in errors] == [3, 4]
    assert "the line is longer than 65536 bytes (FARM_BULK_MAX_LINE_BYTES)" in errors[0].message
    assert "the row is longer than 65536 bytes" in errors[1].message
