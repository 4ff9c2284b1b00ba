"""Shared test helpers: the fixtures' files read as their own README and cases.json describe them, the tiny official
checkpoint, a forward that also returns the model's intermediate tensors (through hooks: the product has no test-only
arguments), and small data builders whose token ids can be read off the text."""
import io
import json
import os
import subprocess
import sys
from pathlib import Path

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
