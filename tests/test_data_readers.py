"""Readers: every file type and image reference kind, the official formats, and the messages conventions checked
against the official packer's layout in the golden fixture."""
import base64
import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from conftest import FIX, NO_DROPOUT, fixture_samples, load_fixture, png, solid, word_tokenizer, words, write_jsonl

CASES, TENSORS, EXPECTED, META, SPECIAL = load_fixture()

TOK = word_tokenizer()


def build(src, row, seed=0, dropout=NO_DROPOUT, tok=TOK):
    gen = torch.Generator().manual_seed(seed)
    parts = src.read(row, gen)
    load = lambda ref: data.open_image(ref, src.folder, 2 ** 26)
    return data.build_sample(parts, load, tok, src.vae_size, src.vit_size, src.max_pixels, gen, dropout)


def side_for(vae_cells, vit_cells):
    """An image side that resizing without scaling rounds to vae_cells*16 and vit_cells*14 px (None: any)."""
    for x in range(1, 4096):
        if (vae_cells is None or max(16, round(x / 16) * 16) == 16 * vae_cells) and \
                (vit_cells is None or max(14, round(x / 14) * 14) == 14 * vit_cells):
            return x
    return None


def as_conversation(sample, tensors):
    """A fixture sample as conversation parts, images as their (VAE grid, ViT grid) needs; None where the messages
    format cannot say it (special-token losses, or images in arrangements the conventions never produce)."""
    def grid(it):
        x = tensors[it["latent"] if it["type"] == "vae_image" else it["pixels"]]
        return (x.shape[1] // 2, x.shape[2] // 2) if it["type"] == "vae_image" else (x.shape[1] // 14, x.shape[2] // 14)
    generates = any(it["type"] == "vae_image" and it["loss"] for it in sample)
    out, i = [], 0
    while i < len(sample):
        it, nxt = sample[i], sample[i + 1:i + 3]
        is_ = lambda j, kind, loss=False: len(nxt) > j and nxt[j]["type"] == kind and bool(nxt[j].get("loss")) == loss
        if it["type"] == "text" and not it["special_token_loss"]:
            out.append(("assistant" if it["loss"] else "user", "text", words(it["ids"])))
            i += 1
        elif it["type"] == "vit_image" and not generates:  # understood only
            out.append(("user", "image", (None, grid(it))))
            i += 1
        elif it["type"] == "vae_image" and not it["loss"] and generates and is_(0, "vit_image"):  # edit source
            out.append(("user", "image", (grid(it), grid(nxt[0]))))
            i += 2
        elif it["type"] == "vae_image" and it["loss"] and i == len(sample) - 1:  # final generated image
            out.append(("assistant", "image", (grid(it), None)))
            i += 1
        elif it["type"] == "vae_image" and it["loss"] and is_(0, "vae_image") and is_(1, "vit_image") and \
                grid(nxt[0]) == grid(it):  # generated, then its clean copy for later turns
            out.append(("assistant", "image", (grid(it), grid(nxt[1]))))
            i += 3
        else:
            return None
    return out


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["name"])
def test_messages_samples_match_fixture_layout(tmp_path, case):
    """Each fixture sample written as a messages-format row (parquet, messages as a JSON string; images by path,
    base64 data URL and raw bytes column in turn) gives the layout of the fixture's item list: splits and modes,
    positions, text ids, CE positions/labels/weights, MSE positions, ViT and latent grids and position ids."""
    with open(FIX / "special_tokens.json") as f:
        names = json.load(f)
    with open(FIX / "checkpoint" / "llm_config.json") as f:
        tok = word_tokenizer({k: v for k, v in names.items()}, json.load(f)["vocab_size"])
    samples = [(k, as_conversation(s, TENSORS)) for k, s in enumerate(case["samples"])]
    samples = [(k, conv) for k, conv in samples if conv is not None]
    if not samples:
        pytest.skip("no sample of this case can be written in the messages format")
    rows, n_images = [], 0
    for _, conv in samples:
        messages, images = [], []
        for role, kind, value in conv:
            if kind == "text":
                content = {"type": "text", "text": value}
            else:
                (gv, gt), n_images = value, n_images + 1
                h, w = side_for(gv and gv[0], gt and gt[0]), side_for(gv and gv[1], gt and gt[1])
                assert h and w, value
                blob = png(w, h, (40 * n_images % 256, 90, 200))
                if n_images % 3 == 0:
                    (tmp_path / f"{n_images}.png").write_bytes(blob)
                    content = {"type": "image_url", "image_url": {"url": f"{n_images}.png"}}
                elif n_images % 3 == 1:
                    content = {"type": "image_url",
                               "image_url": {"url": "data:image/png;base64," + base64.b64encode(blob).decode()}}
                else:
                    content = {"type": "image"}
                    images.append(blob)
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"].append(content)
            else:
                messages.append({"role": role, "content": [content]})
        rows.append({"messages": json.dumps(messages), "images": images})
    schema = pa.schema([("messages", pa.string()), ("images", pa.list_(pa.binary()))])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), str(tmp_path / "m.parquet"))
    src = data.Source(str(tmp_path / "m.parquet"), vae_size=(1, 1024), vit_size=(1, 980), max_pixels=10 ** 9)
    got = data.pack_samples([build(src, r, tok=tok) for r in range(len(rows))], tok.special)
    want = data.pack_samples([fixture_samples(case, TENSORS)[k] for k, _ in samples], SPECIAL)
    for name in ["sample_lens", "split_lens", "split_modes", "position_ids", "text_ids", "text_indexes",
                 "vit_indexes", "vit_pos_ids", "vit_lens", "vae_indexes", "latent_pos_ids", "vae_grids", "ce_indexes",
                 "ce_labels", "ce_weights", "mse_indexes"]:
        x, y = getattr(got, name), getattr(want, name)
        assert (torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y), name
    assert torch.equal(got.vae_timestep_raw.isinf(), want.vae_timestep_raw.isinf())
    if len(samples) == len(case["samples"]):  # the whole case: straight against the official packer's output
        assert torch.equal(got.position_ids, EXPECTED[case["name"] + ".position_ids"])
        starts = [0] + torch.tensor(got.split_lens).cumsum(0).tolist()[:-1]
        assert list(zip(starts, got.split_lens, got.split_modes)) == \
            [(s["start"], s["length"], s["mode"]) for s in META[case["name"]]["splits"]]


# ----------------------------------------------------------------------------------------------
# every file type x every way of giving an image

def reference_items(colour_a, colour_b):
    """An edit conversation, built from in-memory PIL images: what every reader below must reproduce."""
    src = data.Source("shapes", vae_size=(32, 64), vit_size=(28, 56))
    parts = [("user", "image", Image.new("RGB", (64, 48), colour_a)), ("user", "text", "w1 w2 w3"),
             ("assistant", "image", Image.new("RGB", (48, 64), colour_b)), ("assistant", "text", "w4 w5")]
    gen = torch.Generator().manual_seed(0)
    return data.build_sample(parts, lambda im: data.rgb(im), TOK, src.vae_size, src.vit_size, src.max_pixels, gen,
                             NO_DROPOUT)


def assert_same_items(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], torch.Tensor):
                assert torch.equal(x[k], y[k]), k
            else:
                assert x[k] == y[k], k


@pytest.mark.parametrize("ext,images", [(e, i) for e in ["jsonl", "json", "parquet", "arrow-file", "arrow-stream"]
                                        for i in ["paths", "bytes", "base64", "hf-cells"]
                                        if not (e.startswith("json") and i in ("bytes", "hf-cells"))])
def test_messages_readers(tmp_path, ext, images):
    a, b = (200, 30, 30), (30, 30, 200)
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png(64, 48, a))
    (tmp_path / "img" / "b.png").write_bytes(png(48, 64, b))
    url = {"paths": ["img/a.png", "img/b.png"],
           "base64": ["data:image/png;base64," + base64.b64encode(png(64, 48, a)).decode(),
                      "data:image/png;base64," + base64.b64encode(png(48, 64, b)).decode()]}.get(images)
    image = lambda k: {"type": "image_url", "image_url": {"url": url[k]}} if url else {"type": "image"}
    messages = [{"role": "user", "content": [image(0), {"type": "text", "text": "w1 w2 w3"}]},
                {"role": "assistant", "content": [image(1), {"type": "text", "text": "w4 w5"}]}]
    row = {"messages": json.dumps(messages) if ext in ("parquet", "arrow-file", "arrow-stream") else messages}
    if images == "bytes":
        row["images"] = [png(64, 48, a), png(48, 64, b)]
    if images == "hf-cells":  # Hugging Face Image feature cells: {"bytes", "path"}
        row["images"] = [{"bytes": None, "path": "img/a.png"}, {"bytes": png(48, 64, b), "path": None}]
    filler = {"messages": row["messages"], **({"images": row["images"]} if "images" in row else {})}
    rows = [filler, row]
    if ext == "jsonl":  # (raw bytes do not go in JSON)
        path = write_jsonl(tmp_path / "d.jsonl", rows)
    elif ext == "json":
        path = str(tmp_path / "d.json")
        (tmp_path / "d.json").write_text(json.dumps(rows))
    else:
        table = pa.Table.from_pylist(rows)
        if ext == "parquet":
            path = str(tmp_path / "d.parquet")
            pq.write_table(table, path, row_group_size=1)
        else:
            path = str(tmp_path / "d.arrow")
            with pa.OSFile(path, "wb") as f, (pa.ipc.new_file if ext == "arrow-file" else pa.ipc.new_stream)(
                    f, table.schema) as w:
                w.write_table(table)
    src = data.Source(path, vae_size=(32, 64), vit_size=(28, 56), data_folder=str(tmp_path))
    assert len(src) == 2
    assert_same_items(build(src, 1), reference_items(a, b))


def test_folder_of_files_is_one_source(tmp_path):
    (tmp_path / "d").mkdir()
    conv = lambda i: {"messages": [{"role": "user", "content": f"w{i}"}, {"role": "assistant", "content": "w9"}]}
    write_jsonl(tmp_path / "d" / "b.jsonl", [conv(3), conv(4)])
    write_jsonl(tmp_path / "d" / "a.jsonl", [conv(1), conv(2)])
    (tmp_path / "d" / "notes.txt").write_text("not data")
    src = data.Source(str(tmp_path / "d"))
    assert len(src) == 4
    assert [build(src, r)[0]["ids"] for r in range(4)] == [[1], [2], [3], [4]]
    assert src.where(2).endswith("b.jsonl row 0")


# ----------------------------------------------------------------------------------------------
# the official BAGEL formats

def test_official_t2i_parquet(tmp_path):
    rows = [{"image": png(80, 48, (0, 255, 0)), "captions": json.dumps({"short": "w7 w8", "long": "w7 w8 w9 w10"})}]
    path = str(tmp_path / "t2i.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = data.Source(path, format="t2i", vae_size=(32, 80))
    seen = set()
    for seed in range(20):
        text, vae = build(src, 0, seed=seed)
        assert text["type"] == "text" and not text["loss"]
        seen.add(tuple(text["ids"]))
        assert vae["type"] == "vae_image" and vae["loss"] and vae["pixels"].shape == (3, 48, 80)
        assert vae["noise"].shape == (16, 6, 10) and isinstance(vae["timestep_raw"], float)
        assert vae["pixels"][:, 0, 0].tolist() == [0, 255, 0]
    assert seen == {(7, 8), (7, 8, 9, 10)}  # one caption of the dict, chosen per sample


def test_t2i_blank_captions_are_drawn_as_officially(tmp_path):
    """Official T2IIterableDataset: random.choice over every caption value, a blank one included (an implicitly
    unconditional sample, 1 in 3 here); a row with no captions is captioned " "."""
    rows = [{"image": png(32, 32), "captions": json.dumps({"a": "w1", "b": "w2", "c": ""})},
            {"image": png(32, 32), "captions": json.dumps({})}]
    path = str(tmp_path / "t2i.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = data.Source(path, format="t2i", vae_size=(32, 32))
    n = 3000
    drawn = [src.read(0, torch.Generator().manual_seed(k))[0][2] for k in range(n)]
    for caption in ("w1", "w2", ""):
        assert abs(drawn.count(caption) / n - 1 / 3) < 4 * (2 / 9 / n) ** 0.5, caption
    assert src.read(1, torch.Generator())[0] == ("user", "text", " ")


def edit_windows(src, row, images, n):
    """Frequencies of (source image, instruction texts, target images) over n draws of the edit reader."""
    counts = {}
    for k in range(n):
        parts = src.read(row, torch.Generator().manual_seed(k))
        key = (images.index(parts[0][2]), tuple(v for _, kind, v in parts if kind == "text"),
               tuple(images.index(v) for role, kind, v in parts if role == "assistant"))
        counts[key] = counts.get(key, 0) + 1
    return {key: c / n for key, c in counts.items()}


def test_official_edit_windows(tmp_path):
    """Official UnifiedEditIterableDataset.parse_row: start ~ U{0..n-2}, end ~ U{start+1..min(start+2, n-1)}; a
    2-step window is, with probability 0.5, one instruction "a. b." (sic: "a.. b.." for instructions ending in
    ".") and only its last image, except that a window ending at the row's last image drops that step
    (end_idx -= 1: one step, text "a."). So a 3-image row never concatenates. Exact probabilities, against the
    frequencies of 4000 draws."""
    imgs = [png(32, 32, (60 * k, 0, 0)) for k in range(4)]
    rows = [{"image_list": imgs[:3], "instruction_list": [["w1"], ["w2."]]},
            {"image_list": imgs, "instruction_list": [["w1"], ["w2."], ["w3"]]}]
    path = str(tmp_path / "edit.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = data.Source(path, format="edit", vae_size=(32, 32), vit_size=(28, 28))
    n = 4000
    three = {(0, ("w1",), (1,)): 1 / 4, (0, ("w1.",), (1,)): 1 / 8, (0, ("w1", "w2."), (1, 2)): 1 / 8,
             (1, ("w2.",), (2,)): 1 / 2}
    four = {(0, ("w1",), (1,)): 1 / 6, (0, ("w1. w2..",), (2,)): 1 / 12, (0, ("w1", "w2."), (1, 2)): 1 / 12,
            (1, ("w2.",), (2,)): 1 / 6, (1, ("w2..",), (2,)): 1 / 12, (1, ("w2.", "w3"), (2, 3)): 1 / 12,
            (2, ("w3",), (3,)): 1 / 3}
    for row, want in [(0, three), (1, four)]:
        got = edit_windows(src, row, imgs, n)
        assert set(got) == set(want), row
        for key, p in want.items():
            assert abs(got[key] - p) < 4 * (p * (1 - p) / n) ** 0.5, (row, key, got[key], p)
    # the items of a 2-step window: the intermediate target is also a clean VAE + ViT condition
    items = next(s for s in (build(src, 1, seed=k) for k in range(50)) if len(s) == 8)
    assert [(it["type"], it.get("loss", False)) for it in items] == [
        ("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True),
        ("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True)]


def test_official_vlm_jsonl(tmp_path):
    (tmp_path / "a.png").write_bytes(png(56, 28))
    (tmp_path / "b.png").write_bytes(png(28, 28))
    row = {"image": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\nw1 w2 <image> w3"}, {"from": "gpt", "value": "w4 w5"},
        {"from": "human", "value": "w6"}, {"from": "gpt", "value": "w7"}]}
    src = data.Source(write_jsonl(tmp_path / "v.jsonl", [row]), format="vlm", vit_size=(28, 56))
    items = build(src, 0)
    assert [(it["type"], it.get("ids"), it.get("loss")) for it in items] == [
        ("vit_image", None, None), ("text", [1, 2], False), ("vit_image", None, None), ("text", [3], False),
        ("text", [4, 5], True), ("text", [6], False), ("text", [7], True)]
    assert items[0]["pixels"].shape == (3, 28, 56) and items[2]["pixels"].shape == (3, 28, 28)


def test_vlm_rows_read_as_officially(tmp_path):
    """Official SftJSONLIterableDataset.change_format: only human and gpt turns (system and unknown ones left out);
    a human turn without <image> kept as is, one with tags split there and each piece stripped; <image> tags
    beyond the row's images ignored, images beyond its tags unused (on main each of these rows was skipped)."""
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png(28, 28))
    turns = lambda human: [{"from": "system", "value": "w90"}, {"from": "human", "value": human},
                           {"from": "alien", "value": "w91"}, {"from": "gpt", "value": "w4"}]
    rows = [{"image": "a.png", "conversations": turns("  w1 w2 ")},                 # tag-less: kept unstripped
            {"image": "a.png", "conversations": turns("<image> w1 <image> w2")},    # a tag too many
            {"image": ["a.png", "b.png"], "conversations": turns(" w1 <image>")},  # an image too many
            {"conversations": turns("<image>w1")}]                                  # no images at all
    src = data.Source(write_jsonl(tmp_path / "v.jsonl", rows), format="vlm", vit_size=(28, 28))
    parts = lambda row: [(role, kind, v if kind == "text" else os.path.basename(v)) for role, kind, v, *_ in
                         src.read(row, torch.Generator())]
    assert parts(0) == [("user", "text", "  w1 w2 "), ("assistant", "text", "w4")]
    assert parts(1) == [("user", "image", "a.png"), ("user", "text", "w1"), ("user", "text", "w2"),
                        ("assistant", "text", "w4")]
    assert parts(2) == [("user", "text", "w1"), ("user", "image", "a.png"), ("assistant", "text", "w4")]
    assert parts(3) == [("user", "text", "w1"), ("assistant", "text", "w4")]
    assert [it["type"] for it in build(src, 2)] == ["text", "vit_image", "text"]


def test_vlm_images_share_the_vit_budget(tmp_path):
    """Official VLM transform(img, img_num=len(images)): max_pixels / img_num per image. With 2,007,040 / 3 =
    669,013 px: 602x798 (480,396 px) and 700x896 (627,200) stay; 1000x1000 -> 980x980 (960,400 px) is over, so
    scale 669,013.3 / 960,400 = 0.6966: 980 * 0.6966 = 682.7 -> 683 -> 686 (49 x 14). Alone it stays 980x980."""
    sizes = [(602, 798), (1000, 1000), (700, 896)]
    for k, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (k, 0, 0)).save(tmp_path / f"{k}.png")
    chat = [{"from": "human", "value": "<image><image><image>w1"}, {"from": "gpt", "value": "w2"}]
    rows = [{"image": [f"{k}.png" for k in range(3)], "conversations": chat},
            {"image": "1.png", "conversations": [{"from": "human", "value": "<image>w1"}, chat[1]]}]
    src = data.Source(write_jsonl(tmp_path / "v.jsonl", rows), format="vlm")
    assert [tuple(it["pixels"].shape[1:]) for it in build(src, 0)[:3]] == [(798, 602), (686, 686), (896, 700)]
    assert build(src, 1)[0]["pixels"].shape[1:] == (980, 980)


def test_messages_edits_take_the_edit_vit_size(tmp_path):
    """The official edit recipe's ViT transform is 224-518 (data/configs/example.yaml), the VLM one 378-980: an
    800x600 condition of a messages sample that generates is 518x392 (800 * 518/800, 600 * 0.6475 = 388.5 -> 392)
    = 1,036 patches; understood alone it is 798x602 (round(800/14) = 57, round(600/14) = 43 patches a side)."""
    Image.new("RGB", (800, 600), (9, 9, 9)).save(tmp_path / "a.png")
    Image.new("RGB", (32, 32), (9, 9, 9)).save(tmp_path / "b.png")
    image = lambda f: {"type": "image_url", "image_url": {"url": f}}
    rows = [{"messages": [{"role": "user", "content": [image("a.png"), {"type": "text", "text": "w1"}]},
                          {"role": "assistant", "content": [image("b.png")]}]},
            {"messages": [{"role": "user", "content": [image("a.png"), {"type": "text", "text": "w1"}]},
                          {"role": "assistant", "content": "w2"}]}]
    src = data.Source(write_jsonl(tmp_path / "m.jsonl", rows))
    edit, understand = build(src, 0), build(src, 1)
    assert [it["type"] for it in edit[:2]] == ["vae_image", "vit_image"]
    assert edit[1]["pixels"].shape[1:] == (392, 518) and understand[0]["pixels"].shape[1:] == (602, 798)


def test_video_rows(tmp_path):
    """Official VLM "video" rows: the clip's frames (FrameSampler, num_frames = frame_sampler_args) replace <video>
    as ViT images sharing the budget: 8 frames of 640x480 get 2,007,040 / 8 = 250,880 px each, so 644x476
    (306,544 px) scales by 0.8184: 527 -> 532, 390 -> 392. A messages video (LMMS video_url) gives frames too."""
    (tmp_path / "clip").mkdir()
    for k in range(20):
        Image.new("RGB", (640, 480), (k, 0, 0)).save(tmp_path / "clip" / f"f_{k}.png")
    turns = [{"from": "human", "value": "<video>\nw1"}, {"from": "gpt", "value": "w2"}]
    rows = [{"video": "clip", "conversations": turns},
            {"video": "clip", "conversations": [{"from": "human", "value": "w1"}, turns[1]]}]
    src = data.Source(write_jsonl(tmp_path / "v.jsonl", rows), format="vlm", num_frames=(8, 8))
    items = build(src, 0)
    assert [it["type"] for it in items] == ["vit_image"] * 8 + ["text", "text"]
    assert all(it["pixels"].shape[1:] == (392, 532) for it in items[:8])
    frames = [int(it["pixels"][0, 0, 0]) for it in items[:8]]
    assert frames == sorted(frames) and len(set(frames)) == 8
    with pytest.raises(data.BadSample, match="without a <video> tag"):
        build(src, 1)
    frames = [Image.new("RGB", (28, 28), (40 * k, 0, 0)) for k in range(3)]
    frames[0].save(tmp_path / "clip.png", save_all=True, append_images=frames[1:])
    row = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": "clip.png"}},
                                                     {"type": "text", "text": "w1"}]},
                        {"role": "assistant", "content": "w2"}]}
    items = build(data.Source(write_jsonl(tmp_path / "m.jsonl", [row]), vit_size=(28, 28)), 0)
    reds = [int(it["pixels"][0, 0, 0]) for it in items if it["type"] == "vit_image"]
    assert 8 <= len(reds) <= 12 and reds == [0, 40, 80] + [80] * (len(reds) - 3)


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, blob in members:
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return str(path)


def test_webdataset_tar_shards(tmp_path):
    """recA's data: webdataset .tar shards, read with the standard library. A row per key (the member path up to
    its name's first dot): the image member as "image", json members decoded (an object's fields become columns
    too), txt members as text; rows in member order, shards by name, any row read directly."""
    (tmp_path / "shards").mkdir()
    blobs = [png(32, 32, (k, 0, 0)) for k in range(5)]
    write_tar(tmp_path / "shards" / "b.tar", [("x/3.png", blobs[3]), ("x/4.tar.png", blobs[4])])
    write_tar(tmp_path / "shards" / "a.tar", [
        ("x/0.png", blobs[0]), ("x/0.json", json.dumps({"prompt": "w1"}).encode()), ("x/1.jpg", blobs[1]),
        ("x/1.txt", "w2 w3".encode()), ("x/2.png", blobs[2])])
    src = data.Source(str(tmp_path / "shards"), format="reca", **{"vae_size": (32, 32), "vit_size": (28, 28)})
    assert len(src) == 5 and src.where(3).endswith("b.tar row 0")
    for row in (4, 1, 3, 0, 2):
        assert src.rows[row]["image"] == blobs[row]
    assert src.rows[0]["prompt"] == "w1" and src.rows[0]["json"] == {"prompt": "w1"} and src.rows[1]["txt"] == "w2 w3"
    assert src.rows[4]["__key__"] == "x/4" and src.rows[4]["tar.png"] == blobs[4]
    items = build(src, 2)
    assert items[2]["pixels"][:, 0, 0].tolist() == [2, 0, 0]


def test_num_used_data(tmp_path):
    """Official num_used_data: the first N rows (a jsonl's first N lines), repeated when N is larger (parquet files
    are repeated up to N); one epoch of the source is N rows."""
    rows = [{"messages": [{"role": "user", "content": f"w{k}"}, {"role": "assistant", "content": "w9"}]}
            for k in range(5)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    for used, want in [(3, [1, 1, 1, 0, 0]), (12, [3, 3, 2, 2, 2])]:
        src = data.Source(path, num_used_data=used)
        loader = data.Loader([src], TOK, packing_length=64, dropout=NO_DROPOUT)
        epoch = [loader.order.next_key() for _ in range(used)]
        assert len(src) == used and loader.order.positions[0] == [1, 0]
        assert np.bincount([build(src, row)[0]["ids"][0] for _, _, row in epoch], minlength=5).tolist() == want
    with pytest.raises(ValueError, match="num_used_data"):
        data.Source(path, num_used_data=0)


def test_messages_conventions():
    """Roles decide everything: system/user text no loss, assistant text CE; a user image is ViT, plus a clean VAE
    condition first when the sample generates; an assistant image is a noised target, with a clean VAE + ViT copy
    when more follows; CFG dropout (all probabilities 1 here) hits only the conditions of generating samples."""
    img = lambda c: Image.new("RGB", (32, 32), c)
    src = data.Source("shapes", image_size=32)
    sign = lambda items: [(it["type"], it.get("loss"), bool(it.get("drop"))) for it in items]

    def items(parts, dropout):
        gen = torch.Generator().manual_seed(0)
        return sign(data.build_sample(parts, data.rgb, TOK, src.vae_size, src.vit_size, src.max_pixels, gen, dropout))
    understand = [("system", "text", "w1"), ("user", "image", img("red")), ("user", "text", "w2"),
                  ("assistant", "text", "w3")]
    assert items(understand, (1, 1, 1)) == [("text", False, False), ("vit_image", None, False),
                                            ("text", False, False), ("text", True, False)]
    multi = [("system", "text", "w1"), ("user", "image", img("red")), ("user", "text", "w2"),
             ("assistant", "image", img("blue")), ("assistant", "text", "w3"), ("user", "text", "w4"),
             ("assistant", "image", img("green"))]
    assert items(multi, (0, 0, 0)) == [
        ("text", False, False), ("vae_image", False, False), ("vit_image", None, False), ("text", False, False),
        ("vae_image", True, False), ("vae_image", False, False), ("vit_image", None, False),  # target + clean copy
        ("text", True, False), ("text", False, False), ("vae_image", True, False)]
    assert items(multi, (1, 1, 1)) == [
        ("text", False, False), ("vae_image", False, True), ("vit_image", None, True), ("text", False, True),
        ("vae_image", True, False), ("vae_image", False, True), ("vit_image", None, True),
        ("text", True, False), ("text", False, True), ("vae_image", True, False)]
