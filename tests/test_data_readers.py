"""Readers: every file type and image reference kind, the official formats, and the messages conventions checked
against the official packer's layout in the golden fixture."""
import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.ipc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from test_data_pack import CASES, EXPECTED, META, token_tables
from test_data_util import png, solid, word_tokenizer, words, write_jsonl

TOK = word_tokenizer()
NO_DROP = (0.0, 0.0, 0.0)


def build(src, row, seed=0, dropout=NO_DROP):
    gen = torch.Generator().manual_seed(seed)
    parts = src.read(row, gen)
    load = lambda ref: data.open_image(ref, src.folder, 2 ** 26)
    return data.build_sample(parts, load, TOK, src.vae_size, src.vit_size, src.max_pixels, gen, dropout)


def test_messages_sample_matches_fixture_layout(tmp_path):
    """The fixture's `mm` case written as three messages-format rows (T2I; understanding with a base64 image;
    editing with image paths) gives the official layout: positions, token kinds and ids, splits and modes,
    CE positions/labels/weights, MSE positions, ViT and latent position ids."""
    case = next(c for c in CASES["cases"] if c["name"] == "mm")
    s0, s1, s2 = case["samples"]
    (tmp_path / "t2i.png").write_bytes(png(48, 32))     # VAE 48x32 px -> latent [16, 4, 6] as mm.s0.i1
    (tmp_path / "src.png").write_bytes(png(28, 42))     # ViT 28x42 -> 3x2 patches (mm.s2.i1), VAE 32x32 (mm.s2.i0)
    (tmp_path / "tgt.png").write_bytes(png(32, 32))     # VAE 32x32 -> [16, 4, 4] as mm.s2.i3
    b64 = "data:image/png;base64," + base64.b64encode(png(42, 28)).decode()  # ViT 3x2 patches as mm.s1.i0
    text = lambda t: {"type": "text", "text": t}
    image = lambda u: {"type": "image_url", "image_url": {"url": u}}
    rows = [
        {"messages": [{"role": "user", "content": [text(words(s0[0]["ids"]))]},
                      {"role": "assistant", "content": [image("t2i.png")]}]},
        {"messages": [{"role": "user", "content": [image(b64), text(words(s1[1]["ids"]))]},
                      {"role": "assistant", "content": words(s1[2]["ids"])}]},
        {"messages": json.dumps([{"role": "user", "content": [image("src.png"), text(words(s2[2]["ids"]))]},
                                 {"role": "assistant", "content": [image("tgt.png")]}])},
    ]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    # per-row image sizes chosen so that the official resize rule lands on the fixture's grids
    sources = [data.Source(path, vae_size=(16, 48)), data.Source(path, vit_size=(14, 42)),
               data.Source(path, vae_size=(16, 38), vit_size=(28, 42))]
    samples = [build(src, row) for row, src in enumerate(sources)]
    pack = data.pack_samples(samples, TOK.special)
    exp = {k[3:]: v for k, v in EXPECTED.items() if k.startswith("mm.")}
    assert pack.sample_lens == META["mm"]["sample_lens"]
    assert torch.equal(pack.position_ids, exp["position_ids"])
    kind, tid, sample, item = token_tables(pack)
    for got, name in [(kind, "token_kind"), (tid, "token_id"), (sample, "token_sample"), (item, "token_item")]:
        assert torch.equal(got, exp[name]), name
    starts = [0] + torch.tensor(pack.split_lens).cumsum(0).tolist()[:-1]
    assert list(zip(starts, pack.split_lens, pack.split_modes)) == \
        [(s["start"], s["length"], s["mode"]) for s in META["mm"]["splits"]]
    for name in ["ce_indexes", "ce_labels", "mse_indexes", "vit_pos_ids", "latent_pos_ids"]:
        assert torch.equal(getattr(pack, name), exp[name]), name
    assert torch.equal(pack.ce_weights, exp["ce_loss_weights"])
    # pixels: solid colour images, no resize needed, so every value is the colour in [-1, 1]
    r, g, b = solid((255, 0, 128))
    assert torch.allclose(pack.vit_patches.view(-1, 3), torch.tensor([r, g, b]).expand(pack.vit_patches.numel() // 3, 3),
                          atol=1e-6)
    assert [tuple(p.shape) for p in pack.vae_pixels] == [(3, 32, 48), (3, 32, 32), (3, 32, 32)]
    assert [tuple(e.shape) for e in pack.vae_posterior_eps] == [(16, 4, 6), (16, 4, 4), (16, 4, 4)]
    assert torch.isinf(pack.vae_timestep_raw).tolist() == [False, True, False]


# ----------------------------------------------------------------------------------------------
# every file type x every way of giving an image

def reference_items(colour_a, colour_b):
    """An edit conversation, built from in-memory PIL images: what every reader below must reproduce."""
    src = data.Source("shapes", vae_size=(32, 64), vit_size=(28, 56))
    parts = [("user", "image", Image.new("RGB", (64, 48), colour_a)), ("user", "text", "w1 w2 w3"),
             ("assistant", "image", Image.new("RGB", (48, 64), colour_b)), ("assistant", "text", "w4 w5")]
    gen = torch.Generator().manual_seed(0)
    return data.build_sample(parts, lambda im: data.rgb(im), TOK, src.vae_size, src.vit_size, src.max_pixels, gen,
                             NO_DROP)


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
        assert torch.allclose(vae["pixels"][:, 0, 0], torch.tensor(solid((0, 255, 0))))
    assert seen == {(7, 8), (7, 8, 9, 10)}  # one caption of the dict, chosen per sample


def test_official_edit_parquet(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows = [{"image_list": [png(32, 32, c) for c in colours], "instruction_list": [["w1"], ["w2", "w2 w2"]]}]
    path = str(tmp_path / "edit.parquet")
    pq.write_table(pa.Table.from_pylist(rows), path)
    src = data.Source(path, format="edit", vae_size=(32, 32), vit_size=(28, 28))
    plans = set()
    colour_of = lambda px: [c for c in colours if torch.allclose(px[:, 0, 0], torch.tensor(solid(c)))]
    for seed in range(60):
        items = build(src, 0, seed=seed)
        plan = tuple((it["type"], it.get("loss", False)) for it in items)
        plans.add((plan, tuple(tuple(it["ids"]) for it in items if it["type"] == "text")))
        # the first image is a clean source (VAE + ViT), the last one the noised target 1 or 2 steps later
        assert plan[:2] == (("vae_image", False), ("vit_image", False)) and plan[-1] == ("vae_image", True)
        [a], [b] = colour_of(items[0]["pixels"]), colour_of(items[-1]["pixels"])
        assert 1 <= colours.index(b) - colours.index(a) <= 2
    one_step = (("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True))
    two_steps = one_step + (("vae_image", False), ("vit_image", False), ("text", False), ("vae_image", True))
    dot = TOK.encode(".")[0]
    # every window: 0->1, 1->2, 0->2 in two steps (with the clean intermediate), 0->2 as one concatenated instruction
    assert {p for p, _ in plans} == {one_step, two_steps}
    assert {ids for _, ids in plans} == {((1,),), ((2,),), ((2, 2),), ((1,), (2,)), ((1,), (2, 2)),
                                         ((1, dot, 2, dot),), ((1, dot, 2, 2, dot),)}


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
