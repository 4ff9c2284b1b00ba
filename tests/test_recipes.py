"""The post-training recipes (configs/sft.py, irg_stage1/2.py, reca.py, unicot.py): their data formats item by item,
LoRA against float64 and its merge, and each recipe end to end through `python train.py configs/<recipe>.py` on a
tiny model and tiny files in the recipe's own format: exactly the intended parameters change (the rest stay
bit-identical), the intended losses are present and the others absent, the merged LoRA export computes what the
LoRA model computes."""
import ast
import base64
import io
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import convert
import data
import model as M
import train
from conftest import NO_DROPOUT, word_tokenizer, words

ROOT = Path(__file__).parent.parent
TOK = word_tokenizer()
SMALL = {"vae_size": (32, 32), "vit_size": (28, 28)}  # 2x2 latent tokens, 2x2 ViT patches: tiny packs
TINY = ["--model=tiny", "--init_from=", "--model_args={'vocab_size': 512, 'vae_kind': 'pooled'}", "--dtype=fp32",
        "--export_dtype=fp32", "--lr=1e-3", "--warmup_steps=0", "--log_every=1", "--save_steps=1000",
        "--packing_length=256", "--compile=False"]


def noise_png(seed, side=32):
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def b64(blob):
    return base64.b64encode(blob).decode()


def write_parquet(path, rows):
    columns = list(dict.fromkeys(k for r in rows for k in r))  # rows may leave columns out: null there
    pq.write_table(pa.Table.from_pylist([{k: r.get(k) for k in columns} for r in rows]), str(path))
    return str(path)


def build(src, row, seed=0, dropout=NO_DROPOUT, tok=TOK):
    gen = torch.Generator().manual_seed(seed)
    parts = src.read(row, gen)
    load = lambda ref: data.open_image(ref, src.folder, 2 ** 26)
    return data.build_sample(parts, load, tok, src.vae_size, src.vit_size, src.max_pixels, gen, dropout)


def layout(items):
    """(type, loss, dropped) per item."""
    return [(it["type"], bool(it.get("loss")), bool(it.get("drop"))) for it in items]


# ----------------------------------------------------------------------------------------------
# Data formats

def irg_row(k=0):
    """IRG's 'improving full' layout: prompt -> think1 (CE) -> image1 (target + clean VAE + ViT) -> reflection (no
    loss) -> image2 (target); a system turn, which IRG ignores."""
    return {"conversation": json.dumps([
        {"role": "system", "content": "w900 w901"},
        {"role": "user", "content": f"w{k + 1} w2"},
        {"role": "assistant", "content": [
            {"type": "text", "content": "w10 w11 w12"},
            {"type": "image", "content": b64(noise_png(k)), "need_loss": True, "need_vae": True, "need_vit": True},
            {"type": "text", "content": "w20", "need_loss": False},
            {"type": "image", "content": b64(noise_png(k + 100)), "need_loss": True}]}])}


def test_irg_conversation_flags(tmp_path):
    src = data.Source(write_parquet(tmp_path / "irg.parquet", [irg_row()]), format="irg", **SMALL)
    items = build(src, 0)
    assert layout(items) == [("text", False, False), ("text", True, False), ("vae_image", True, False),
                             ("vae_image", False, False), ("vit_image", False, False), ("text", False, False),
                             ("vae_image", True, False)]
    assert [words(it["ids"]) for it in items if it["type"] == "text"] == ["w1 w2", "w10 w11 w12", "w20"]
    assert items[2]["pixels"].shape == (3, 32, 32) and torch.equal(items[2]["pixels"], items[3]["pixels"])
    assert items[4]["pixels"].shape == (3, 28, 28)
    # IRG's dropouts: text 0, ViT 0, VAE 1.0 here: only the clean VAE copy goes; loss targets are never dropped
    assert [it.get("drop", False) for it in build(src, 0, dropout=(1.0, 0.0, 1.0))] == \
        [True, False, False, True, False, True, False]


def test_irg_bad_parts_are_left_out_not_the_row(tmp_path, caplog):
    """IRG's parse_row skips a bad *part*: an image that does not decode, an image with every flag false, a turn
    or part without content, a part of another type, a non-string user turn; the rest of the row trains. Its
    base64 decoder also takes line-wrapped base64 (base64.encodebytes)."""
    good, wrapped = noise_png(1), base64.encodebytes(noise_png(2)).decode()
    assert "\n" in wrapped
    row = {"conversation": json.dumps([
        {"role": "user", "content": "w1"}, {"role": "user", "content": ["w7"]}, {"role": "user", "content": ""},
        {"role": "assistant", "content": [
            {"type": "image", "content": "not base64!", "need_loss": True},
            {"type": "image", "content": b64(good)},                           # no flag set
            {"type": "image", "content": b64(b"not an image"), "need_vae": True},
            {"type": "video", "content": "x"}, {"type": "text", "content": ""},
            {"type": "text", "content": "w10"},
            {"type": "image", "content": wrapped, "need_loss": True}]}])}
    src = data.Source(write_parquet(tmp_path / "irg.parquet", [row]), format="irg", **SMALL)
    with caplog.at_level(logging.WARNING, logger="nanobagel.data"):
        items = build(src, 0)
    assert layout(items) == [("text", False, False), ("text", True, False), ("vae_image", True, False)]
    assert [words(it["ids"]) for it in items[:2]] == ["w1", "w10"]
    want = Image.open(io.BytesIO(noise_png(2))).resize((32, 32), Image.BICUBIC)
    assert torch.equal(items[2]["pixels"], torch.from_numpy(np.array(want)).permute(2, 0, 1))
    left = [m for m in caplog.messages if "left out a bad part" in m]
    assert len(left) == 3 and sum("bad_base64" in m for m in left) == 1 and sum("corrupt_image" in m for m in left) == 1
    # a row left with nothing to learn, and one that is not JSON, are still skipped whole
    rows = [{"conversation": json.dumps([{"role": "user", "content": "w1"}, {"role": "assistant", "content": [
        {"type": "image", "content": "@@", "need_loss": True}]}])}, {"conversation": "["}]
    src = data.Source(write_parquet(tmp_path / "bad.parquet", rows), format="irg", **SMALL)
    for row, reason in [(0, "no_targets"), (1, "malformed_json")]:
        with pytest.raises(data.BadSample) as e:
            build(src, row)
        assert e.value.reason == reason


def test_reca_sample(tmp_path):
    """The 224 px ViT view (never dropped), a prompt from the template list (the only condition dropped), the same
    image as the 512-1024 px generation target."""
    tok = data.tiny_tokenizer()
    src = data.Source(write_parquet(tmp_path / "r.parquet", [{"image": noise_png(0, 256), "captions": "ignored"}]),
                      format="reca")
    items = build(src, 0, tok=tok)
    assert layout(items) == [("vit_image", False, False), ("text", False, False), ("vae_image", True, False)]
    assert items[0]["pixels"].shape == (3, 224, 224) and items[2]["pixels"].shape == (3, 512, 512)
    assert tok.decode(items[1]["ids"]) in data.RECON_PROMPTS
    # dropout 10% of the prompts, never the ViT view; several different prompts drawn
    small = data.Source(write_parquet(tmp_path / "s.parquet", [{"image": noise_png(k)} for k in range(4)]),
                        format="reca", **SMALL)
    samples = [build(small, k % 4, seed=k, dropout=(0.1, 0.3, 0.3), tok=tok) for k in range(600)]
    assert not any(s[0].get("drop") or s[2].get("drop") for s in samples)
    dropped = sum(bool(s[1].get("drop")) for s in samples) / len(samples)
    assert 0.05 < dropped < 0.15, dropped
    assert len({tuple(s[1]["ids"]) for s in samples}) > 10


def test_reca_prompts_ask_for_a_description():
    """recA's ReconstructionDataset draws from description requests (BAGEL/data/consts.py: "describe" and
    "detail"-style, none saying copy, reproduce or regenerate): the image's ViT view plus a describe request is a
    dense caption, not a copy instruction. Dozens of distinct ones, drawn uniformly."""
    prompts = data.RECON_PROMPTS
    assert len(set(prompts)) == len(prompts) >= 36
    asks = ("describe", "description", "caption", "account of", "explain")
    copies = ("copy", "reproduc", "recreat", "regenerat", "redraw", "repeat", "same", "identical", "restore",
              "draw", "paint", "render", "generate", "reconstruct", "again")
    for p in prompts:
        assert any(a in p.lower() for a in asks) and not any(c in p.lower() for c in copies), p
    n = 200 * len(prompts)
    drawn = [data.read_reca({"image": None}, torch.Generator().manual_seed(k), None)[1][2] for k in range(n)]
    counts = np.array([drawn.count(p) for p in prompts])
    assert counts.min() > 200 - 4 * 200 ** 0.5 and counts.max() < 200 + 4 * 200 ** 0.5


def test_unicot_rows_and_think_drop(tmp_path):
    t2i = {"system_prompt": "w1", "prompt": "w2 w3", "think": "w4 w5", "image": noise_png(0)}
    edit = {"prompt": "w2", "think": "w6", "source_image": noise_png(1), "edit_instruction": "w7",
            "target_image": noise_png(2)}
    path = write_parquet(tmp_path / "u.parquet", [t2i, edit])
    src = data.Source(path, format="unicot", **SMALL)
    items = build(src, 0)
    assert layout(items) == [("text", False, False)] * 3 + [("vae_image", True, False)]
    assert [words(it["ids"]) for it in items[:3]] == ["w1", "w2 w3", "w4 w5"]
    items = build(src, 1)
    assert layout(items) == [("text", False, False)] * 2 + [("vae_image", False, False), ("vit_image", False, False),
                                                            ("text", False, False), ("vae_image", True, False)]
    assert [words(it["ids"]) for it in items if it["type"] == "text"] == ["w2", "w6", "w7"]
    gone = data.Source(path, format="unicot", think_drop=1.0, **SMALL)
    assert [words(it["ids"]) for it in build(gone, 0) if it["type"] == "text"] == ["w1", "w2 w3"]
    half = data.Source(path, format="unicot", think_drop=0.5, **SMALL)
    kept = sum(len(build(half, 0, seed=s)) == 4 for s in range(200))
    assert 70 < kept < 130, kept
    # the text objectives: a VLM jsonl "think" turn is learned (CE) or, with think_drop, left out
    (tmp_path / "a.png").write_bytes(noise_png(3))
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>w1"},
                                               {"from": "think", "value": "w8"}, {"from": "gpt", "value": "w9"}]}
    (tmp_path / "v.jsonl").write_text(json.dumps(row) + "\n")
    vlm = lambda drop: data.Source(str(tmp_path / "v.jsonl"), format="vlm", think_drop=drop, **SMALL)
    assert [(words(it["ids"]), it["loss"]) for it in build(vlm(0.0), 0) if it["type"] == "text"] == \
        [("w1", False), ("w8", True), ("w9", True)]
    assert [words(it["ids"]) for it in build(vlm(1.0), 0) if it["type"] == "text"] == ["w1", "w9"]


def test_unicot_decomposition_rows(tmp_path):
    images = [noise_png(k) for k in range(3)]
    rows = [{"task_type": task, "instruction_list": ["w1 w2", "w3", "w4"], "image_list": images}
            for task in ("step-1", "step-2", "step-3", "step-4", "step-5")]
    src = data.Source(write_parquet(tmp_path / "g.parquet", rows), format="unicot", **SMALL)
    text, cond, target = ("text", False, False), [("vae_image", False, False), ("vit_image", False, False)], \
        ("vae_image", True, False)
    learned = ("text", True, False)
    assert layout(build(src, 0)) == [text] + cond + [target]
    assert layout(build(src, 1)) == [text] + cond + cond + [target]
    assert layout(build(src, 2)) == [text] + cond + [learned, target]
    items = build(src, 3)
    assert layout(items) == [text] + cond + cond + [learned, target]
    assert [words(it["ids"]) for it in items if it["type"] == "text"] == ["w1 w2", "w4"]
    assert torch.equal(items[-1]["pixels"], build(src, 0)[-1]["pixels"])  # the last image of the list
    with pytest.raises(data.BadSample, match="task_type"):
        build(src, 4)


# ----------------------------------------------------------------------------------------------
# LoRA

def test_lora_targets_must_match():
    net = M.Bagel(M.bagel_tiny())
    upstream = ["layers.*.q_proj", "layers.*.gen.v_proj," "layers.*.gate_proj"]  # (sic) UniCoT's missing comma
    with pytest.raises(ValueError, match=r"matching no Linear layer: \['layers.\*.gen.v_proj,layers.\*.gate_proj'\]"):
        M.apply_lora(net, upstream, 4, 8)
    assert M.apply_lora(net, ["layers.*.gen.gate_proj", "vit.layers.*.v_proj"], 4, 8) == \
        ["layers.0.gen.gate_proj", "layers.1.gen.gate_proj", "vit.layers.0.v_proj", "vit.layers.1.v_proj"]


def test_lora_forward_and_merge_against_float64():
    torch.manual_seed(0)
    lin = torch.nn.Linear(24, 40)
    net = torch.nn.Sequential(lin)
    M.apply_lora(net, ["0"], rank=4, alpha=12.0)
    lora = net[0]
    x = torch.randn(7, 24)
    assert torch.equal(lora(x), lin(x))  # B starts at zero: the base model
    with torch.no_grad():
        lora.lora_B.weight.normal_()
    W, b, A, B = (t.detach().double() for t in (lora.weight, lora.bias, lora.lora_A.weight, lora.lora_B.weight))
    want = x.double() @ (W + 3.0 * B @ A).T + b
    torch.testing.assert_close(lora(x).double(), want, rtol=1e-5, atol=1e-5)
    merged = M.merge_lora(net.state_dict(), alpha=12.0)
    assert sorted(merged) == ["0.bias", "0.weight"]
    torch.testing.assert_close(merged["0.weight"].double(), W + 3.0 * B @ A, rtol=1e-6, atol=1e-6)
    plain = torch.nn.Linear(24, 40)
    plain.load_state_dict({k[2:]: v for k, v in merged.items()})
    torch.testing.assert_close(plain(x), lora(x), rtol=1e-5, atol=1e-5)


def peft_targets(names, target_modules):
    """PEFT's rule for a list target_modules: a module is adapted when its name is, or ends with "." + , an entry."""
    return {n for n in names if any(n == t or n.endswith("." + t) for t in target_modules)}


def test_unicot_lora_targets_as_torchumm_ran_them():
    """UniCoT's LoRA (train/pretrain_unified_navit_lora.py) gives PEFT the official module names ["q_proj", "v_proj",
    "q_proj_moe_gen", "v_proj_moe_gen," "gate_proj", "up_proj", "down_proj"]: the missing comma joins two entries
    into one that matches nothing. TorchUMM's run (the published numbers) thus adapted und q/v, gen q, up/down of
    both experts and SigLIP q/v (visual_und): 0.81 B adapter parameters at rank 256 on the 7B model. The intended
    list (the comma restored) adds gen v and both gates: 1.16 B. configs/unicot.py's lora_targets must be the first
    set, its documented alternative the second, each counted on the 7B model on the meta device."""
    upstream = ["q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen," "gate_proj", "up_proj", "down_proj"]  # (sic)
    intended = ["q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen", "gate_proj", "up_proj", "down_proj"]
    cfg = M.bagel_7b()
    official = {ours.removesuffix(".weight"): theirs.removesuffix(".weight")  # our Linear -> its official module
                for ours, theirs in convert.official_names(cfg).items() if ours.endswith(".weight")}
    text = (ROOT / "configs/unicot.py").read_text()
    lines = text[text.index("# Upstream's intended set"):].splitlines()[1:]  # the commented assignment after it
    alternative = " ".join(line[1:] for line in itertools.takewhile(lambda line: line.startswith("#"), lines))
    sets = {"effective": (train.load_config([str(ROOT / "configs/unicot.py")])["lora_targets"], upstream, 0.81),
            "intended": (ast.literal_eval(alternative.split("=", 1)[1].strip()), intended, 1.16)}
    for name, (patterns, modules, billions) in sets.items():
        with torch.device("meta"):
            net = M.Bagel(cfg)
        adapted = M.apply_lora(net, patterns, 256, 512.0)
        assert {official[n] for n in adapted} == peft_targets(official.values(), modules), name
        count = sum(p.numel() for n, p in net.named_parameters() if ".lora_" in n)
        assert round(count / 1e9, 2) == billions, (name, count)


# ----------------------------------------------------------------------------------------------
# Each recipe end to end

def run_recipe(config, out_dir, init_from, *args):
    """python train.py configs/<config>.py, shrunk by TINY and args; init_from None: a fresh init. -> metrics rows"""
    init = [f"--init_from={init_from}"] if init_from else []
    cmd = [sys.executable, "train.py", f"configs/{config}.py", *TINY, *init, f"--out_dir={out_dir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]


def changed(before, after):
    assert sorted(before) == sorted(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


def matching(keys, patterns):
    return {k for k in keys if any(fnmatch(k, p) for p in patterns)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny data in every recipe's format, and the "pretrained" checkpoint every run starts from: a fresh init
    (exported by a run of 0 steps) with a non-zero llm2vae, which a fresh init zeroes as the official code does
    (with it zero and frozen, as under LoRA, the image loss would send no gradient anywhere)."""
    d = tmp_path_factory.mktemp("recipes")
    say = lambda k: f"a picture number {k} of noise"
    write_parquet(d / "t2i.parquet", [{"image": noise_png(k), "captions": json.dumps({"a": say(k)})} for k in range(6)])
    write_parquet(d / "edit.parquet", [{"image_list": [noise_png(k), noise_png(k + 50)],
                                        "instruction_list": [["make it different"]]} for k in range(6)])
    for k in range(6):
        (d / f"{k}.png").write_bytes(noise_png(k + 200))
    vlm = [{"image": f"{k}.png", "conversations": [{"from": "human", "value": "<image>what is this?"},
                                                   {"from": "gpt", "value": say(k)}]} for k in range(6)]
    (d / "vlm.jsonl").write_text("".join(json.dumps(r) + "\n" for r in vlm))
    understand = {"conversation": json.dumps([{"role": "user", "content": "draw a square"}, {"role": "assistant",
                  "content": [{"type": "text", "content": "no loss here", "need_loss": False},
                              {"type": "image", "content": b64(noise_png(7)), "need_vae": True, "need_vit": True},
                              {"type": "text", "content": "it needs more noise"}]}])}
    write_parquet(d / "irg_full.parquet", [irg_row(k) for k in range(6)])
    write_parquet(d / "irg_und.parquet", [understand] * 4)
    write_parquet(d / "reca.parquet", [{"image": noise_png(k)} for k in range(6)])
    write_parquet(d / "unicot.parquet", [{"prompt": say(k), "think": "think first", "image": noise_png(k)}
                                         for k in range(3)] +
                  [{"prompt": say(k), "think": "then fix", "source_image": noise_png(k), "edit_instruction": "fix it",
                    "target_image": noise_png(k + 9)} for k in range(3)])
    src = lambda name, fmt, **kw: {"path": str(d / name), "format": fmt, **SMALL, **kw}
    sources = {
        "sft": [src("t2i.parquet", "t2i"), src("edit.parquet", "edit"), src("vlm.jsonl", "vlm")],
        "irg_stage1": [src("irg_full.parquet", "irg", weight=1.0), src("irg_und.parquet", "irg", weight=0.5)],
        "irg_stage2": [src("irg_full.parquet", "irg")],
        "reca": [src("reca.parquet", "reca")],
        "unicot": [src("unicot.parquet", "unicot", think_drop=0.3)],
    }
    run_recipe("sft", d / "fresh", None, "--max_steps=0", f"--sources={sources['sft']!r}")
    weights = load_file(str(d / "fresh/export/model.safetensors"))
    weights["llm2vae.weight"] = torch.randn(weights["llm2vae.weight"].shape, generator=torch.Generator().manual_seed(0))
    weights["llm2vae.weight"] *= 0.02
    base = d / "base"
    shutil.copytree(d / "fresh/export", base)
    for name in ("model.safetensors", "ema.safetensors"):
        save_file(weights, str(base / name))
    return d, sources, weights


def test_sft_trains_everything_with_both_losses(files):
    d, sources, initial = files
    rows = run_recipe("sft", d / "sft", d / "base", "--max_steps=3", f"--sources={sources['sft']!r}")
    final = load_file(str(d / "sft/export/model.safetensors"))
    assert changed(initial, final) == set(initial)
    assert all(r["n_ce"] > 0 and r["n_mse"] > 0 for r in rows)
    assert set(load_file(str(d / "sft/export/ema.safetensors"))) == set(initial)  # the EMA is the default


def test_irg_two_stages_and_schedules(files):
    d, sources, initial = files
    rows = run_recipe("irg_stage1", d / "irg1", d / "base", "--max_steps=3", f"--sources={sources['irg_stage1']!r}")
    stage1 = d / "irg1/export"
    assert changed(initial, load_file(str(stage1 / "model.safetensors"))) == set(initial)
    assert all(r["n_ce"] > 0 and r["n_mse"] > 0 for r in rows)
    # stage 2 starts from stage 1's EMA weights (init_from in the config; here the test's run) and trains them all
    rows = run_recipe("irg_stage2", d / "irg2", stage1, "--max_steps=3", f"--sources={sources['irg_stage2']!r}")
    start = load_file(str(stage1 / "ema.safetensors"))
    assert changed(start, load_file(str(d / "irg2/export/model.safetensors"))) == set(start)
    assert all(r["n_ce"] > 0 and r["n_mse"] > 0 for r in rows)
    # the optional schedules: ViT + connector frozen and CE switched off after the first step. Against a run of that
    # first step alone: they stopped there (switched off means no gradient: lm_head, reached by CE alone, stops too;
    # Adam's momentum would carry it on), the rest went on; the EMA of a stopped parameter is the parameter.
    schedules = ["--freeze_from_step={'vit.*': 1, 'connector.*': 1}", "--loss_off_from_step={'ce': 1}"]
    rows = run_recipe("irg_stage1", d / "irg_sched", d / "base", "--max_steps=3",
                      f"--sources={sources['irg_stage1']!r}", *schedules)
    run_recipe("irg_stage1", d / "irg_one", d / "base", "--max_steps=1", f"--sources={sources['irg_stage1']!r}",
               *schedules)
    final = load_file(str(d / "irg_sched/export/model.safetensors"))
    ema = load_file(str(d / "irg_sched/export/ema.safetensors"))
    one = load_file(str(d / "irg_one/export/model.safetensors"))
    stopped = matching(initial, ["vit.*", "connector.*", "lm_head.*"])
    assert stopped <= changed(initial, one) and not stopped & changed(one, final)
    assert all(torch.equal(ema[k], final[k]) for k in matching(initial, ["vit.*", "connector.*"]))
    assert matching(initial, ["layers.*.gen.*", "vae2llm.*", "llm2vae.*"]) <= changed(one, final)
    assert rows[0]["loss"] == pytest.approx(rows[0]["ce"] + rows[0]["mse"])
    assert all(r["n_ce"] > 0 and r["loss"] == pytest.approx(r["mse"]) for r in rows[1:])


def test_reca_trains_the_generation_path_on_image_loss_only(files):
    d, sources, initial = files
    rows = run_recipe("reca", d / "reca", d / "base", "--max_steps=3", f"--sources={sources['reca']!r}")
    final = load_file(str(d / "reca/export/model.safetensors"))
    assert changed(initial, final) == \
        matching(initial, ["layers.*.gen.*", "norm_gen.*", "time_embedder.*", "vae2llm.*", "llm2vae.*"])
    assert all(r["n_ce"] == 0 and r["n_mse"] > 0 for r in rows)
    # the raw weights are the default: export/ holds them alone, the EMA is apart
    assert not (d / "reca/export/ema.safetensors").exists()
    ema = load_file(str(d / "reca/export_ema/model.safetensors"))
    assert changed(final, ema) == changed(initial, final)


def test_unicot_lora_trains_adapters_only_and_merges(files):
    d, sources, initial = files
    out = d / "unicot"
    lora = [f"--sources={sources['unicot']!r}", "--lora_rank=4", "--lora_alpha=8", "--lr=1e-2"]
    rows = run_recipe("unicot", out, d / "base", "--max_steps=3", *lora)
    assert all(r["n_ce"] == 0 and r["n_mse"] > 0 for r in rows)
    targets = train.load_config([str(ROOT / "configs/unicot.py")])["lora_targets"]
    merged = load_file(str(out / "export/model.safetensors"))
    adapted = {f"{name}.weight" for name in matching({k.removesuffix(".weight") for k in initial}, targets)}
    # no text loss: the last layer's und queries, outputs and MLP reach no loss (only its keys and values do)
    last = max(int(k.split(".")[1]) for k in initial if k.startswith("layers."))
    idle = {f"layers.{last}.und.{p}.weight" for p in ("q_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}
    assert changed(initial, merged) == adapted - idle  # adapted weights only: biases and all else identical
    adapters = load_file(str(out / "export/lora.safetensors"))
    assert set(adapters) == {k.replace(".weight", f".{ab}.weight") for k in adapted for ab in ("lora_A", "lora_B")}
    # the LoRA model (initial weights + adapters) and the merged plain checkpoint compute the same losses on a pack
    base, vae, cfg = convert.load_checkpoint(str(d / "base"))
    with_lora, _, _ = convert.load_checkpoint(str(d / "base"))
    M.apply_lora(with_lora, targets, 4, 8.0)
    missing, unexpected = with_lora.load_state_dict(adapters, strict=False)
    assert not unexpected and not [k for k in missing if ".lora_" in k]
    plain, _, _ = convert.load_checkpoint(str(out / "export"))
    loader = data.Loader([data.Source(**sources["unicot"][0])], data.tiny_tokenizer(), packing_length=256,
                         dropout=NO_DROPOUT)
    pack = train.encode_images(vae, [loader.next_pack()], torch.float32)[0]
    with torch.no_grad():
        want, got, before = (m(pack)["mse"] for m in (with_lora, plain, base))
    assert want.numel() > 0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert (want - before).abs().max() > 100 * (got - want).abs().max()  # the adapters matter
    # the adapters are in the sharded checkpoints: stopped after 2 steps and resumed, the run ends the same
    run_recipe("unicot", d / "unicot_resumed", d / "base", "--max_steps=2", "--save_steps=2", *lora)
    run_recipe("unicot", d / "unicot_resumed", d / "base", "--max_steps=3", "--save_steps=2", *lora)
    resumed = load_file(str(d / "unicot_resumed/export/lora.safetensors"))
    assert all(torch.equal(resumed[k], adapters[k]) for k in adapters)


@pytest.mark.parametrize("recipe, want", [
    ("sft", dict(lr=2e-5, lr_schedule="constant", ema=0.9999, timestep_shift=1.0, init_weights="ema",
                 text_cond_dropout_prob=0.1, vit_cond_dropout_prob=0.3, vae_cond_dropout_prob=0.3)),
    ("irg_stage1", dict(lr=2e-5, lr_schedule="constant", warmup_steps=500, ema=0.995, timestep_shift=4.0,
                        text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.3,
                        freeze_from_step={}, loss_off_from_step={})),
    ("irg_stage2", dict(lr=2e-5, lr_schedule="constant", warmup_steps=0, ema=0.995, timestep_shift=4.0,
                        text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.3,
                        init_from="out/irg_stage1/export")),
    ("reca", dict(lr=4e-5, lr_schedule="constant", warmup_steps=1000, ema=0.9999, timestep_shift=1.0,
                  text_cond_dropout_prob=0.1, freeze_und=True, save_ema_as_default=False)),
    ("unicot", dict(lr=2e-5, lr_schedule="constant", warmup_steps=200, ema=0.0, lora_rank=256, lora_alpha=512.0,
                    text_cond_dropout_prob=0.0, vit_cond_dropout_prob=0.0, vae_cond_dropout_prob=0.0)),
])
def test_recipe_hyperparameters(recipe, want):
    """The published recipes' numbers (the runs above override them to fit a tiny CPU model)."""
    cfg = train.load_config([str(ROOT / f"configs/{recipe}.py")])
    assert {k: cfg[k] for k in want} == want
    assert cfg["model_args"]["max_latent_size"] == 64 and cfg["model"] == "7b"
    groups = {s["name"]: s["weight"] for s in cfg["sources"]} if recipe.startswith("irg") else {}
    if recipe == "irg_stage1":
        assert groups == {f"{a}_{b}_learning": (1.0 if b == "full" else 0.5) for a in ("initial", "improving")
                          for b in ("full", "thinking_generation", "thinking_understanding")}
    if recipe == "irg_stage2":
        assert groups == {"initial_full_learning": 1.0, "improving_full_learning": 1.0}
