"""Throughput of reading + decoding + packing on one CPU core (printed; run with -s to see it).

Data: official T2I parquet rows (JPEG photos-like images, long side 600..1600 px, resized to 512-1024) and VLM jsonl
chats (JPEG files, long side 400..1200 px, resized to 378-980), half and half; packing_length 32768."""
import io
import json
import os
import random
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

import data
from conftest import DEFAULT_DROPOUT, word_tokenizer, words, write_jsonl


def jpeg(w, h, rng):
    """A smooth random picture with some texture, JPEG quality 90 (decodes like a photo, unlike a flat colour)."""
    small = rng.integers(0, 256, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
    noise = rng.integers(-12, 13, (h, w, 3))
    img = Image.fromarray(np.clip(np.asarray(img, dtype=np.int16) + noise, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def test_read_decode_pack_throughput(tmp_path):
    rng, prng = np.random.default_rng(0), random.Random(0)
    aspects = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16)]

    def size(lo, hi):
        a, b = prng.choice(aspects)
        long = prng.randint(lo, hi)
        return (long, long * b // a) if a >= b else (long * a // b, long)
    pictures = {k: [jpeg(*size(600, 1600), rng) for _ in range(12)] for k in ("t2i", "vlm")}
    t2i = [{"image": prng.choice(pictures["t2i"]), "captions": json.dumps({"c": words(range(prng.randint(8, 77)))})}
           for _ in range(400)]
    pq.write_table(pa.Table.from_pylist(t2i), str(tmp_path / "t2i.parquet"), row_group_size=100)
    for i, blob in enumerate(pictures["vlm"]):
        (tmp_path / f"{i}.jpg").write_bytes(blob)
    vlm = [{"image": f"{prng.randrange(12)}.jpg", "conversations": [
        {"from": "human", "value": "<image>\n" + words(range(prng.randint(5, 40)))},
        {"from": "gpt", "value": words(range(prng.randint(1, 200)))}]} for _ in range(400)]
    sources = [data.Source(str(tmp_path / "t2i.parquet"), format="t2i"),
               data.Source(write_jsonl(tmp_path / "vlm.jsonl", vlm), format="vlm")]
    threads, cpus = torch.get_num_threads(), os.sched_getaffinity(0)
    torch.set_num_threads(1)
    os.sched_setaffinity(0, {min(cpus)})  # one core (Linux)
    try:
        loader = data.Loader(sources, word_tokenizer(), packing_length=32768, seed=0, dropout=DEFAULT_DROPOUT)
        loader.next_pack()  # warm up (file handles, first row groups)
        s0, t0 = loader.stats["samples"], time.perf_counter()
        n = 8
        for _ in range(n):
            loader.next_pack()
        dt = time.perf_counter() - t0
    finally:
        torch.set_num_threads(threads)
        os.sched_setaffinity(0, cpus)
    samples = loader.stats["samples"] - s0
    print(f"\ndata throughput on one core: {samples / dt:.1f} samples/s, {n / dt:.2f} packs/s "
          f"of 32768 positions ({loader.stats['fill']:.1%} full), {samples} samples in {dt:.1f} s")
    assert samples / dt > 1.0  # a floor that only catches something badly wrong
