"""Bad input: each kind is a counted, logged skip naming the reason and the row; systemic problems fail at start."""
import base64
import json
import logging

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from conftest import DEFAULT_DROPOUT, png, word_tokenizer, write_jsonl

TOK = word_tokenizer()


def good(i):
    return {"messages": [{"role": "user", "content": f"w{i}"}, {"role": "assistant", "content": "w1 w2"}]}


def with_image(url, role="user"):
    return {"messages": [{"role": role, "content": [{"type": "image_url", "image_url": {"url": url}}]},
                         {"role": "assistant", "content": "w3"}]}


BAD = {  # reason -> a row that has exactly that problem
    "corrupt_image": with_image("corrupt.png"),
    "missing_file": with_image("nowhere.png"),
    "malformed_json": '{"messages": [{"role": "user", "content": "w1"}',
    "empty_messages": {"messages": []},
    "unknown_content_type": {"messages": [{"role": "user", "content": [{"type": "audio", "audio": "x.wav"}]},
                                          {"role": "assistant", "content": "w1"}]},
    "unknown_role": {"messages": [{"role": "narrator", "content": "w1"}, {"role": "assistant", "content": "w2"}]},
    "oversized_image": with_image("bomb.png"),
    "too_long": {"messages": [{"role": "user", "content": " ".join(["w5"] * 300)},
                              {"role": "assistant", "content": "w1"}]},
    "bad_base64": with_image("data:image/png;base64,@@@not base64@@@"),
    "no_targets": {"messages": [{"role": "user", "content": "w1"}]},
    "missing_image": {"messages": [{"role": "user", "content": [{"type": "image"}]},
                                   {"role": "assistant", "content": "w1"}]},
    "malformed_row": {"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "w1"}]},
}


@pytest.mark.parametrize("workers", [0, 2])  # a bad row met in a worker process is counted and logged the same
def test_every_bad_input_kind_is_counted_and_logged(tmp_path, caplog, workers):
    (tmp_path / "corrupt.png").write_bytes(png(32, 32)[:40] + b"\x00garbage" * 10)  # a PNG header, then junk
    Image.new("1", (4000, 4000)).save(tmp_path / "bomb.png")  # 16M pixels in a few kB
    rows = [good(i) for i in range(30)]
    bad_rows = {}
    for k, (reason, row) in enumerate(BAD.items()):
        bad_rows[reason] = 2 + 2 * k
        rows.insert(bad_rows[reason], row)
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="nanobagel.data"):
        loader = data.Loader([data.Source(path)], TOK, packing_length=256, max_image_pixels=4_000_000, seed=0,
                             dropout=DEFAULT_DROPOUT, workers=workers)
        while loader.stats["epochs"][path] < 1:  # exactly one epoch, row by row
            loader.next_sample()
    assert loader.stats["skipped"] == {reason: 1 for reason in BAD}
    for reason, row in bad_rows.items():
        assert sum(f"d.jsonl row {row} " in m and reason in m for m in caplog.messages) == 1, reason
    assert loader.order.draws == len(rows)


def test_bad_rows_of_the_official_formats(tmp_path):
    pq.write_table(pa.Table.from_pylist([
        {"image_list": [png(32, 32)] * 2, "instruction_list": [["w1"]]},
        {"image_list": [png(32, 32)] * 3, "instruction_list": [["w1"]]},  # one instruction list short
        {"image_list": [png(32, 32)], "instruction_list": []},             # nothing to edit
    ]), tmp_path / "e.parquet")
    pq.write_table(pa.Table.from_pylist([
        {"image": png(32, 32), "captions": json.dumps({"a": "w1"})},
        {"image": png(32, 32), "captions": "{broken"},
        {"image": b"not an image", "captions": json.dumps({"a": "w1"})},
    ]), tmp_path / "t.parquet")
    (tmp_path / "a.png").write_bytes(png(28, 28))
    write_jsonl(tmp_path / "v.jsonl", [
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> w1"}, {"from": "gpt", "value": "w2"}]},
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> w1"}]},  # nothing to learn
        {"video": "a.mp4", "conversations": [{"from": "human", "value": "<video>"}, {"from": "gpt", "value": "w2"}]},
        {"image": "a.png", "conversations": "not a list"},
    ])
    expect = {"e.parquet": ("edit", {"malformed_row": 2}),
              "t.parquet": ("t2i", {"malformed_json": 1, "corrupt_image": 1}),
              "v.jsonl": ("vlm", {"no_targets": 1, "missing_file": 1, "malformed_row": 1})}
    for name, (fmt, skipped) in expect.items():
        src = data.Source(str(tmp_path / name), format=fmt, vae_size=(32, 32), vit_size=(28, 28))
        loader = data.Loader([src], TOK, packing_length=256, seed=0, dropout=DEFAULT_DROPOUT)
        while loader.stats["epochs"][src.name] < 1:
            loader.next_sample()
        assert loader.stats["skipped"] == skipped, name


def test_image_paths_stay_inside_the_data_folder(tmp_path, caplog):
    """A row may not read files outside its source's data folder: "..", an absolute path, file://, a symlink out.
    Each is a counted skip (unsafe_path) naming the row; Source(allow_absolute_paths=True) opts out."""
    (tmp_path / "outside.png").write_bytes(png(28, 28))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "in.png").write_bytes(png(28, 28))
    (data_dir / "link.png").symlink_to(tmp_path / "outside.png")
    (data_dir / "inner").mkdir()
    escapes = ["../outside.png", str(tmp_path / "outside.png"), "/proc/self/environ", "file:///etc/passwd",
               "link.png", "inner/../../outside.png"]
    fine = ["in.png", "inner/../in.png", "file://in.png", str(data_dir / "in.png")]
    path = write_jsonl(data_dir / "d.jsonl", [with_image(u) for u in fine + escapes])
    with caplog.at_level(logging.WARNING, logger="nanobagel.data"):
        loader = data.Loader([data.Source(path, vit_size=(28, 28))], TOK, packing_length=256, seed=0,
                             dropout=DEFAULT_DROPOUT)
        kept = 0
        while loader.stats["epochs"][path] < 1:
            kept += loader.next_sample() is not None
    assert loader.stats["skipped"] == {"unsafe_path": len(escapes)} and kept == len(fine)
    for row in range(len(fine), len(fine) + len(escapes)):
        assert sum(f"d.jsonl row {row} " in m and "unsafe_path" in m for m in caplog.messages) == 1, row
    anywhere = data.Source(path, allow_absolute_paths=True)
    for row in (4, 5, 8):  # ../outside.png, its absolute path, the symlink: readable when allowed
        parts = anywhere.read(row, torch.Generator())
        assert parts[0][2] == str(tmp_path / "outside.png") and data.open_image(parts[0][2], None, 10 ** 6)


def test_systemic_problems_fail_at_start(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.Source(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .*files"):
        data.Source(str(tmp_path / "empty"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(ValueError, match="not valid JSON"):
        data.Source(str(tmp_path / "broken.json"))
    (tmp_path / "dict.json").write_text('{"messages": []}')
    with pytest.raises(ValueError, match="list of rows"):
        data.Source(str(tmp_path / "dict.json"))
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(ValueError, match="cannot read .*junk.parquet"):
        data.Source(str(tmp_path / "junk.parquet"))
    pq.write_table(pa.Table.from_pylist([{"picture": b"x", "captions": "{}"}]), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"missing column\(s\) \['image'\]"):
        data.Source(str(tmp_path / "t.parquet"), format="t2i")
    with pytest.raises(ValueError, match="unknown source format"):
        data.Source(str(tmp_path / "t.parquet"), format="webdataset")
    # every sample bad: a clear error listing the rows and reasons, before any training
    path = write_jsonl(tmp_path / "allbad.jsonl", [with_image(f"gone{i}.png") for i in range(20)])
    with pytest.raises(ValueError, match=r"first 8 samples are all bad:\n.*allbad.jsonl row \d+: missing_file"):
        data.Loader([data.Source(path)], TOK, dropout=DEFAULT_DROPOUT, packing_length=16384)
    # going bad later (e.g. a mount disappears): an error after max_bad_streak, not an endless loop
    rows = [good(i) for i in range(8)] + [with_image(f"gone{i}.png") for i in range(40)]
    loader = data.Loader([data.Source(write_jsonl(tmp_path / "late.jsonl", rows))], TOK, max_bad_streak=30, seed=0, dropout=DEFAULT_DROPOUT, packing_length=16384)
    with pytest.raises(RuntimeError, match="30 bad samples in a row"):
        for _ in range(100):
            loader.next_pack()
    # more ranks than rows; images larger than the position tables; duplicate names
    small = data.Source(write_jsonl(tmp_path / "two.jsonl", [good(1), good(2)]))
    with pytest.raises(ValueError, match="leave rank"):
        data.Loader([small], TOK, rank=0, world_size=4, dropout=DEFAULT_DROPOUT, packing_length=16384)
    with pytest.raises(ValueError, match="exceed the position tables"):
        data.Loader([data.Source(small.path, vae_size=(512, 2048))], TOK, dropout=DEFAULT_DROPOUT, packing_length=16384)
    with pytest.raises(ValueError, match="unique"):
        data.Loader([small, data.Source(small.path)], TOK, dropout=DEFAULT_DROPOUT, packing_length=16384)
