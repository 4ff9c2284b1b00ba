"""Shared test helpers: the fixtures' files read as their own README and cases.json describe them, the tiny official
checkpoint, a forward that also returns the model's intermediate tensors (through hooks: the product has no test-only
arguments), and small data builders whose token ids can be read off the text."""
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers

import convert
import data
import model
import train

FIX = Path(__file__).parent / "fixtures" / "bagel_tiny"
NSA_FIX = Path(__file__).parent / "fixtures" / "nsa_reference"
ACT = dict(atol=1e-4, rtol=1e-4)      # activations, ViT, mse_pred, VAE (fixture README)
LOSS = dict(atol=2e-5, rtol=1e-5)     # per-token and mean losses
GRAD = dict(atol=1e-6, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# tests/fixtures/bagel_tiny

def load_fixture():
    cases = json.loads((FIX / "cases.json").read_text())
    tensors = load_file(str(FIX / cases["tensors_file"]))
    expected = load_file(str(FIX / cases["expected_file"]))
    meta = json.loads((FIX / "expected_meta.json").read_text())
    names = json.loads((FIX / cases["special_tokens_file"]).read_text())
    special = {"im_start": names["<|im_start|>"], "im_end": names["<|im_end|>"],
               "vision_start": names["<|vision_start|>"], "vision_end": names["<|vision_end|>"]}
    return cases, tensors, expected, meta, special


def fixture_samples(case, tensors):
    """cases.json items with tensor names replaced by the tensors."""
    out = []
    for sample in case["samples"]:
        items = []
        for it in sample:
            it = dict(it)
            for key in ("pixels", "latent", "noise"):
                if isinstance(it.get(key), str):
                    it[key] = tensors[it[key]]
            items.append(it)
        out.append(items)
    return out


def case_names():
    return [c["name"] for c in json.loads((FIX / "cases.json").read_text())["cases"]]


def fixture_config_overrides():
    """The BagelConfig fields the official release files do not carry, from fixture_config.json (its README)."""
    fc = json.loads((FIX / "fixture_config.json").read_text())
    v, b = fc["vae"], fc["bagel"]
    return dict(vae_ch=v["ch"], vae_ch_mult=tuple(v["ch_mult"]), vae_num_res_blocks=v["num_res_blocks"],
                vae_scale_factor=v["scale_factor"], vae_shift_factor=v["shift_factor"],
                latent_patch_size=b["latent_patch_size"], max_latent_size=b["max_latent_size"],
                vit_max_patches_per_side=b["vit_max_num_patch_per_side"])


def load_tiny(folder=FIX / "checkpoint", device="cpu", dtype=torch.float32, **kw):
    """(Bagel, AutoEncoder, cfg) of the fixture's official checkpoint (its EMA weights, as released)."""
    if convert.detect_layout(str(folder)) != "official":
        raise ValueError(f"{folder} is not an official-layout checkpoint")
    return convert.load_checkpoint(str(folder), device, dtype, ema=True, **{**fixture_config_overrides(), **kw})


# ----------------------------------------------------------------------------------------------
# The model's intermediate tensors

def inspect_forward(bagel, pack, timestep_shift=1.0, **kw):
    """bagel(pack) plus, in pack order: input_embeds, layer_outs (every decoder layer), hidden (after the final
    norms), and embed's vit_out, t, x_t, target, and mse_pred (llm2vae's output). Taken by wrapping embed and by
    forward hooks, so the forward itself is the one training runs."""
    seen, layer_outs = {}, []
    embed, patched = bagel.embed, bagel.__dict__.get("embed")  # a caller may have swapped embed out already

    def capture_embed(*a, **k):
        x, aux = embed(*a, **k)
        seen.update(aux, input_embeds=x)
        return x, aux
    bagel.embed = capture_embed
    hooks = [layer.register_forward_hook(lambda m, args, out: layer_outs.append(out)) for layer in bagel.layers]
    hooks.append(bagel.llm2vae.register_forward_hook(lambda m, args, out: seen.update(mse_pred=out.float())))
    try:
        out = bagel(pack, timestep_shift, **kw)
    finally:
        bagel.__dict__.pop("embed")
        if patched is not None:
            bagel.embed = patched
        for h in hooks:
            h.remove()
    is_gen = torch.zeros(pack.num_tokens, dtype=torch.bool, device=pack.position_ids.device)
    is_gen[pack.vae_indexes] = True
    _, where = model.expert_order(is_gen)
    n = pack.num_tokens - pack.vae_indexes.numel()
    seen["layer_outs"] = [x[where] for x in layer_outs]
    seen["hidden"] = bagel.final_norm(layer_outs[-1], n)[where]
    return {**out, **seen}


# ----------------------------------------------------------------------------------------------
# Data builders

SPECIAL_IDS = {"<|im_start|>": 1000, "<|im_end|>": 1001, "<|vision_start|>": 1008, "<|vision_end|>": 1009}
NO_DROPOUT = (0.0, 0.0, 0.0)
DEFAULT_DROPOUT = tuple(train.DEFAULTS[k + "_cond_dropout_prob"] for k in ("text", "vit", "vae"))  # (text, vit, vae)


def word_tokenizer(special_ids=SPECIAL_IDS, vocab_size=1024):
    """'w17 w3.' -> [17, 3, <id of .>]: a word-level tokenizer whose ids can be read off the text, so token counts
    and ids in the tests are known without the code under test. Every id below vocab_size that is not a special
    token is a word; "." and the unknown token come after."""
    vocab = {f"w{i}": i for i in range(vocab_size) if i not in special_ids.values()}
    vocab.update(special_ids)
    vocab.update({".": vocab_size, "<unk>": vocab_size + 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return data.TextTokenizer(tok)


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def png(w, h, colour=(255, 0, 128), mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (w, h), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def solid(colour):
    """The [-1, 1] value of a uint8 channel value, computed independently of data.py."""
    return [(c / 255 - 0.5) / 0.5 for c in colour]


# ----------------------------------------------------------------------------------------------
# Training runs (tests/train_harness.py: fixed synthetic packs, so world sizes and accumulation see the same packs)

ROOT = Path(__file__).parent.parent
HARNESS = str(Path(__file__).parent / "train_harness.py")
COMMON = ["--log_every=1", "--warmup_steps=2", "--ema=0.9", "--model_args={'vocab_size':512}", "--lr=1e-3"]


def run_training(out_dir, *args, nproc=1, env=None, check=True):
    """tests/train_harness.py in a subprocess (torchrun for nproc > 1) with COMMON settings."""
    cmd = [sys.executable, HARNESS] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), HARNESS]
    proc = subprocess.run(cmd + COMMON + [f"--out_dir={out_dir}", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def curve(out_dir):
    """{step: metrics}. Each step has one row: a resume replaces the rows of the steps it does again."""
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    steps = [r["step"] for r in rows]
    assert len(set(steps)) == len(steps), steps
    return {r["step"]: r for r in rows}


# ----------------------------------------------------------------------------------------------
# The tiny demo's measure: does an image draw its prompt? Against the built-in dataset's own renderer of the scene.

PLACES = {None: [(0.5, 0.5)], "above": [(0.5, 0.27), (0.5, 0.73)], "below": [(0.5, 0.73), (0.5, 0.27)],
          "left of": [(0.27, 0.5), (0.73, 0.5)], "right of": [(0.73, 0.5), (0.27, 0.5)]}  # data.shapes_parts' cells


def prompt_scene(prompt):
    """'a red circle' or 'a green triangle above a yellow circle' -> the scene data.draw_shapes draws for it."""
    found = re.fullmatch(r"a (\w+) (\w+)(?: (above|below|left of|right of) a (\w+) (\w+))?", prompt)
    c1, s1, relation, c2, s2 = found.groups()
    return list(zip([s1, s2][:len(PLACES[relation])], [c1, c2], PLACES[relation]))


def colour_masks(image):
    """{palette colour: [16, 16] coverage in [0, 1]} at the pooled AE's resolution (means of 1/16 of the side: what
    configs/tiny.py's AE can draw). A cell goes to its nearest palette colour by hue (the angle between RGB vectors)
    and covers the share of that colour its brightness along it makes; under 15%, it is background."""
    x = torch.tensor(np.asarray(image.convert("RGB")), dtype=torch.float32).permute(2, 0, 1)
    cells = torch.nn.functional.avg_pool2d(x[None], image.width // 16)[0].flatten(1).T  # [256, 3]
    palette = torch.tensor(list(data.COLOURS.values()), dtype=torch.float32)
    nearest = (torch.nn.functional.normalize(cells, dim=1) @ torch.nn.functional.normalize(palette, dim=1).T).argmax(1)
    coverage = ((cells * palette[nearest]).sum(1) / palette[nearest].pow(2).sum(1)).clamp(0, 1)
    coverage = torch.where(coverage < 0.15, 0.0, coverage)
    return {name: torch.where(nearest == i, coverage, 0.0).reshape(16, 16) for i, name in enumerate(data.COLOURS)}


def drawing_report(image, prompt):
    """How an image draws its prompt, cell by cell against data.draw_shapes' image of the prompt's scene: hue (the
    share of the drawn colour that is in the prompt's colours) and, per shape, its colour's soft IoU with the shape
    asked for and the best of the other two shapes drawn in its place, its area and how far its centre is from the
    shape asked for's (in image sides)."""
    masks, side = colour_masks(image), image.width
    report = {"hue": float(sum(masks[c].sum() for _, c, _ in prompt_scene(prompt)) /
                           max(sum(m.sum() for m in masks.values()), 1e-9))}
    grid = (torch.arange(16) + 0.5) / 16
    centre = lambda m: torch.stack([(m.sum(0) * grid).sum(), (m.sum(1) * grid).sum()]) / max(m.sum(), 1e-9)
    for shape, colour, place in prompt_scene(prompt):
        got = masks[colour]
        want = {s: colour_masks(data.draw_shapes([(s, colour, place)], side))[colour] for s in data.SHAPES}
        iou = {s: float(torch.minimum(got, w).sum() / torch.maximum(got, w).sum()) for s, w in want.items()}
        report[f"{colour} {shape}"] = dict(
            iou=iou[shape], other=max(v for s, v in iou.items() if s != shape),
            area=float(got.sum() / want[shape].sum()), offset=float((centre(got) - centre(want[shape])).norm()))
    return report


def draws_prompt(report):
    """The bounds of a recognisable drawing: 80% of the colour in the prompt's colours; each shape at least 0.7 IoU
    with the shape asked for and 0.05 more than with either other shape (a circle and a square of one size and
    place have 0.78), 0.7-1.4 times its area, its centre within 0.06 of a side from the one asked for."""
    shapes = [r for k, r in report.items() if k != "hue"]
    return report["hue"] >= 0.8 and all(r["iou"] >= 0.7 and r["iou"] >= r["other"] + 0.05 and 0.7 <= r["area"] <= 1.4
                                        and r["offset"] <= 0.06 for r in shapes)
