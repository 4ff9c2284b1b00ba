"""convert.py: round trips between the official, hf and nanobagel layouts are bit-identical, an exported
checkpoint still reproduces the official golden outputs (tests/fixtures/bagel_tiny), layouts are detected,
and every kind of bad input gets a CheckpointError that names the problem."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert
import data
import model
import train
from conftest import ACT, FIX, LOSS, fixture_samples, inspect_forward, load_fixture, load_tiny

CKPT = FIX / "checkpoint"


def make_hf(folder, dtype=torch.float32, shards=3):
    """An hf-layout (lmms-engine) folder written independently of convert.py, from the fixture's official files:
    the official keys plus vae_model.* in shards listed by an index, a nested config.json."""
    folder.mkdir()
    tensors = {k: v.to(dtype) for k, v in load_file(CKPT / "ema.safetensors").items()}
    tensors |= {"vae_model." + k: v for k, v in load_file(CKPT / "ae.safetensors").items()}
    keys, weight_map = list(tensors), {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i * len(keys) // shards:(i + 1) * len(keys) // shards]
        save_file({k: tensors[k] for k in part}, folder / name, metadata={"format": "pt"})
        weight_map |= {k: name for k in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    fc = json.loads((FIX / "fixture_config.json").read_text())
    llm = json.loads((CKPT / "llm_config.json").read_text()) | fc["bagel"]["llm_overrides"]
    llm["torch_dtype"] = str(dtype).removeprefix("torch.")
    vit = json.loads((CKPT / "vit_config.json").read_text())
    vit["num_hidden_layers"] -= 1  # lmms-engine stores the built layer count
    b = fc["bagel"]
    config = {"model_type": "bagel", "visual_gen": True, "visual_und": True, "llm_config": llm, "vit_config": vit,
              "vae_config": fc["vae"], "latent_patch_size": b["latent_patch_size"],
              "max_latent_size": b["max_latent_size"], "vit_max_num_patch_per_side": b["vit_max_num_patch_per_side"],
              "connector_act": b["connector_act"], "interpolate_pos": b["interpolate_pos"], "timestep_shift": 1.0,
              "torch_dtype": llm["torch_dtype"]}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def official_copy(folder, dtype=torch.float32):
    """The fixture checkpoint, with the Bagel weights cast to dtype (bf16 like the release; the AE stays fp32)."""
    shutil.copytree(CKPT, folder)
    if dtype != torch.float32:
        save_file({k: v.to(dtype) for k, v in load_file(CKPT / "ema.safetensors").items()},
                  folder / "ema.safetensors", metadata={"format": "pt"})
    return folder


def tensors_of(folder, pattern="*.safetensors"):
    out = {}
    for path in sorted(folder.glob(pattern)):
        part = load_file(path)
        assert not set(part) & set(out), path
        out |= part
    return out


def assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        x, y = a[k].reshape(-1), b[k].reshape(-1)
        if not torch.equal(x.view(torch.uint8), y.view(torch.uint8)):
            bad = (x.view(torch.uint8).view(-1, x.element_size()) != y.view(torch.uint8).view(-1, x.element_size()))
            i = bad.any(1).nonzero()[:, 0]
            raise AssertionError(f"{k}: {len(i)} of {x.numel()} elements differ, first at {i[0].item()}: "
                                 f"{x[i[0]].item()!r} vs {y[i[0]].item()!r}")


# ----------------------------------------------------------------------------------------------
# Round trips

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_official_to_nanobagel_to_official_is_bit_identical(tmp_path, dtype):
    src = official_copy(tmp_path / "src", dtype)
    convert.convert(str(src), str(tmp_path / "nano"), "nanobagel")
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "back"), "official")
    for name in ("ema.safetensors", "ae.safetensors"):
        assert_bit_identical(tensors_of(src, name), tensors_of(tmp_path / "back", name))
    assert convert.official_config(str(tmp_path / "back")) == convert.official_config(str(src))
    # the written configs say what the fixture's do, field for field, where both have the field
    for name in ("llm_config.json", "vit_config.json"):
        ours, theirs = (json.loads((d / name).read_text()) for d in (tmp_path / "back", src))
        common = set(ours) & set(theirs) - {"torch_dtype"}  # our torch_dtype says what the weights are
        assert {k: ours[k] for k in common} == {k: theirs[k] for k in common}
    written = json.loads((tmp_path / "back" / "llm_config.json").read_text())
    assert written["torch_dtype"] == str(dtype).removeprefix("torch.")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_to_nanobagel_to_hf_is_bit_identical(tmp_path, dtype):
    src = make_hf(tmp_path / "src", dtype)
    convert.convert(str(src), str(tmp_path / "nano"), "nanobagel")
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "back"), "hf", shard_bytes=2_000_000)
    back = tmp_path / "back"
    assert_bit_identical(tensors_of(src), tensors_of(back))
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    for shard in set(index["weight_map"].values()):
        with safe_open(back / shard, "pt") as f:
            assert {k for k, s in index["weight_map"].items() if s == shard} == set(f.keys())
            assert f.metadata() == {"format": "pt"}  # transformers' from_pretrained requires it
    assert convert.hf_config(str(back)) == convert.hf_config(str(src))
    config, theirs = (json.loads((d / "config.json").read_text()) for d in (back, src))
    for k in theirs:
        if isinstance(theirs[k], dict):
            assert {f: v for f, v in theirs[k].items() if f in config[k]} == \
                   {f: v for f, v in config[k].items() if f in theirs[k]}, k
        else:
            assert config[k] == theirs[k], k


def test_official_and_hf_convert_into_each_other(tmp_path):
    convert.convert(str(make_hf(tmp_path / "hf")), str(tmp_path / "off"), "official")
    for name in ("ema.safetensors", "ae.safetensors"):
        assert_bit_identical(tensors_of(CKPT, name), tensors_of(tmp_path / "off", name))
    convert.convert(str(tmp_path / "off"), str(tmp_path / "hf2"), "hf")
    assert (tmp_path / "hf2" / "model.safetensors").is_file()  # under the shard size: one file, no index
    assert_bit_identical(tensors_of(tmp_path / "hf"), tensors_of(tmp_path / "hf2"))


def test_fixed_tables_may_be_missing_and_are_written_exactly(tmp_path):
    """Official training code pops the two sin-cos tables before loading; exports always carry them."""
    src = official_copy(tmp_path / "src")
    ema = load_file(CKPT / "ema.safetensors")
    save_file({k: v for k, v in ema.items() if not k.endswith("pos_embed.pos_embed")}, src / "ema.safetensors")
    convert.convert(str(src), str(tmp_path / "hf"), "hf")
    assert_bit_identical(tensors_of(tmp_path / "hf"), tensors_of(make_hf(tmp_path / "ref")))


def test_raw_and_ema_weights_export_the_ema_by_default(tmp_path):
    bagel, vae, cfg = load_tiny()
    ema = {k: v + 1.0 for k, v in bagel.state_dict().items()}
    convert.save_nanobagel(str(tmp_path / "nano"), bagel, vae, cfg, ema_state=ema)
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "raw"), "official", ema=False)
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "ema"), "official")
    names = convert.official_names(cfg)
    raw, exported_ema = (load_file(tmp_path / d / "ema.safetensors") for d in ("raw", "ema"))
    fixture = load_file(CKPT / "ema.safetensors")
    for ours, key in names.items():
        assert torch.equal(raw[key], fixture[key]), key
        assert torch.equal(exported_ema[key], fixture[key] + 1.0), key
    _, _, src = convert.read_checkpoint(str(tmp_path / "nano"), ema=True)
    assert src["lm_head.weight"][0].label.endswith("ema.safetensors")


def test_pooled_vae_model_saved_from_state_dicts(tmp_path):
    """The built-in tiny run: a parameter-free AE stand-in; train.py hands over state dicts."""
    cfg = model.bagel_tiny(vae_kind="pooled")
    torch.manual_seed(0)
    bagel = model.Bagel(cfg)
    bagel.init_weights()
    state = bagel.state_dict()
    convert.save_nanobagel(str(tmp_path / "nano"), state, model.build_vae(cfg).state_dict(), cfg,
                           dtype=torch.bfloat16)
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "nano" / "model.safetensors").values())
    loaded, vae, cfg2 = convert.load_checkpoint(str(tmp_path / "nano"))
    assert cfg2 == cfg and isinstance(vae, model.PooledAE)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k].to(torch.bfloat16).float()), k
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "copy"), "nanobagel")
    assert_bit_identical(tensors_of(tmp_path / "nano"), tensors_of(tmp_path / "copy"))
    with pytest.raises(convert.CheckpointError, match="vae_kind pooled .* exists only in the nanobagel layout; the "
                                                      "official layout needs a FLUX AE"):
        convert.convert(str(tmp_path / "nano"), str(tmp_path / "off"), "official")


def test_nsa_parameters_start_fresh_and_never_drop_silently(tmp_path):
    bagel, _, cfg = convert.load_checkpoint(str(CKPT), attn_backend="nsa")
    fixture, names = load_file(CKPT / "ema.safetensors"), convert.official_names(cfg)
    nsa = [n for n, _ in bagel.named_parameters() if n not in names]
    assert nsa and all(".attn." in n for n in nsa)
    assert all(torch.equal(p, fixture[names[n]]) for n, p in bagel.named_parameters() if n in names)
    assert convert.load_into_sharded(bagel, str(CKPT)) == nsa  # the names left as they were
    convert.save_nanobagel(str(tmp_path / "nano"), bagel, model.build_vae(cfg), cfg)
    with pytest.raises(convert.CheckpointError, match=r"official layout has no place for layers\.0\.attn\."):
        convert.convert(str(tmp_path / "nano"), str(tmp_path / "off"), "official")
    plain, _, _ = convert.load_checkpoint(str(CKPT))
    with pytest.raises(convert.CheckpointError, match=r"no parameter layers\.0\.attn\..*built from another config"):
        convert.load_into_sharded(plain, str(tmp_path / "nano"))


def test_bf16_export_rounds_each_weight_once(tmp_path):
    convert.convert(str(CKPT), str(tmp_path / "nano"), "nanobagel")
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "off"), "official", dtype=torch.bfloat16)
    out, fixture = load_file(tmp_path / "off" / "ema.safetensors"), load_file(CKPT / "ema.safetensors")
    for k, v in fixture.items():
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], v.to(torch.bfloat16)), k
    ae = load_file(tmp_path / "off" / "ae.safetensors")
    assert all(v.dtype == torch.float32 for v in ae.values())  # the AE keeps its dtype, as in the release
    assert json.loads((tmp_path / "off" / "llm_config.json").read_text())["torch_dtype"] == "bfloat16"


# ----------------------------------------------------------------------------------------------
# An exported checkpoint still gives the official numbers

def assert_reproduces_fixture(bagel, vae, cfg):
    cases, tensors, E, _, special = load_fixture()
    for case in cases["cases"]:
        name = case["name"]
        pack = data.pack_samples(fixture_samples(case, tensors), special, cfg.max_latent_size,
                                 cfg.vit_max_patches_per_side)
        with torch.no_grad():
            out = inspect_forward(bagel, pack, case["timestep_shift"])
        torch.testing.assert_close(out["hidden"], E[f"{name}.hidden"], **ACT)
        torch.testing.assert_close(out["ce"], E[f"{name}.ce_per_token"], **LOSS)
        if f"{name}.mse" in E:
            torch.testing.assert_close(out["mse"], E[f"{name}.mse_per_token"], **LOSS)
    vc = cases["vae_case"]
    with torch.no_grad():
        latent = vae.encode(tensors[vc["image"]], tensors[vc["posterior_eps"]])
    torch.testing.assert_close(latent, E["vae.latent"], **ACT)


def test_exported_official_and_hf_reproduce_the_fixture(tmp_path):
    bagel, vae, cfg = load_tiny()
    convert.save_nanobagel(str(tmp_path / "nano"), bagel, vae, cfg)
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "off"), "official")
    convert.convert(str(tmp_path / "nano"), str(tmp_path / "hf"), "hf", shard_bytes=1_000_000)
    # the official folder alone, without the fixture's overrides: the AE shape is read off ae.safetensors
    assert_reproduces_fixture(*convert.load_checkpoint(str(tmp_path / "off")))
    assert_reproduces_fixture(*convert.load_checkpoint(str(tmp_path / "hf")))
    assert convert.checkpoint_config(str(tmp_path / "hf")) == cfg


# ----------------------------------------------------------------------------------------------
# Layout detection, tokenizer files, the CLI

def test_layout_detection(tmp_path):
    convert.convert(str(CKPT), str(tmp_path / "nano"), "nanobagel")
    assert convert.detect_layout(str(CKPT)) == "official"
    assert convert.detect_layout(str(make_hf(tmp_path / "hf"))) == "hf"
    assert convert.detect_layout(str(tmp_path / "nano")) == "nanobagel"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(convert.CheckpointError, match="not a BAGEL checkpoint"):
        convert.detect_layout(str(tmp_path / "other"))
    with pytest.raises(convert.CheckpointError, match="not a folder"):
        convert.detect_layout(str(CKPT / "ema.safetensors"))


def write_tokenizer(folder, n):
    from tokenizers import Tokenizer, models
    vocab = {f"w{i}": i for i in range(n)}
    Tokenizer(models.WordLevel(vocab, unk_token="w0")).save(str(folder / "tokenizer.json"))


def test_tokenizer_files_are_checked_and_copied(tmp_path):
    src = official_copy(tmp_path / "src")
    rows = json.loads((CKPT / "llm_config.json").read_text())["vocab_size"]
    write_tokenizer(src, rows - 4)  # + BAGEL's 4 special tokens: every row used, none missing
    (src / "tokenizer_config.json").write_text('{"model_max_length": 32768}')
    convert.convert(str(src), str(tmp_path / "out"), "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (src / name).read_bytes()
    write_tokenizer(src, rows - 3)
    with pytest.raises(convert.CheckpointError, match=f"needs {rows + 1} embedding rows, the weights have {rows}"):
        convert.convert(str(src), str(tmp_path / "out2"), "hf")
    (src / "tokenizer.json").write_text("{not json")
    with pytest.raises(convert.CheckpointError, match="tokenizer.json is not a readable tokenizer"):
        convert.convert(str(src), str(tmp_path / "out3"), "hf")


def test_cli(tmp_path, capsys):
    convert.main([str(CKPT), str(tmp_path / "nano")])  # official -> nanobagel by default
    convert.main([str(tmp_path / "nano"), str(tmp_path / "off"), "--dtype", "bf16"])  # nanobagel -> official
    assert "(nanobagel) ->" in capsys.readouterr().out
    assert load_file(tmp_path / "off" / "ema.safetensors")["vae2llm.bias"].dtype == torch.bfloat16
    with pytest.raises(SystemExit, match="error: .*ema.safetensors"):
        convert.main([str(tmp_path / "nano"), str(tmp_path / "x"), "--weights", "ema", "--to", "hf"])
    with pytest.raises(SystemExit, match="error: .* exists and is not an empty folder"):
        convert.main([str(CKPT), str(tmp_path / "off")])


def test_writer_matches_safetensors_library(tmp_path):
    ts = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.tensor(2.5),
          "d": torch.zeros(0, 4), "e": torch.randn(2, 3).half()}
    convert.write_safetensors(str(tmp_path / "x.safetensors"),
                              [(k, tuple(v.shape), v.dtype, lambda v=v: v) for k, v in ts.items()])
    assert_bit_identical(load_file(tmp_path / "x.safetensors"), ts)
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------------------------------------
# Every kind of bad input names its problem

def test_errors_missing_files_and_wrong_folders(tmp_path):
    src = official_copy(tmp_path / "off")
    (src / "ae.safetensors").unlink()
    with pytest.raises(convert.CheckpointError, match="missing .*off/ae.safetensors"):
        convert.load_checkpoint(str(src))
    (src / "ema.safetensors").unlink()
    with pytest.raises(convert.CheckpointError, match="missing .*off/ema.safetensors"):
        convert.load_checkpoint(str(src))
    (src / "vit_config.json").unlink()
    with pytest.raises(convert.CheckpointError, match="missing .*vit_config.json"):
        convert.official_config(str(src))
    convert.convert(str(CKPT), str(tmp_path / "nano"), "nanobagel")
    with pytest.raises(convert.CheckpointError, match="missing .*nano/ema.safetensors"):
        convert.load_checkpoint(str(tmp_path / "nano"), ema=True)
    hf = make_hf(tmp_path / "hf")
    with pytest.raises(convert.CheckpointError, match="one set of weights"):
        convert.load_checkpoint(str(hf), ema=True)
    cfg = json.loads((hf / "config.json").read_text())
    del cfg["vae_config"]["z_channels"]
    (hf / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(convert.CheckpointError, match="vae_config: no field z_channels"):
        convert.load_checkpoint(str(hf))
    (hf / "config.json").write_text("{")
    with pytest.raises(convert.CheckpointError, match="config.json is not valid JSON"):
        convert.load_checkpoint(str(hf))
    with pytest.raises(convert.CheckpointError, match="unknown layout"):
        convert.convert(str(CKPT), str(tmp_path / "out"), "diffusers")


def edit_config(path, section, **fields):
    cfg = json.loads(path.read_text())
    (cfg[section] if section else cfg).update(fields)
    path.write_text(json.dumps(cfg))


def test_errors_config_does_not_match_tensors(tmp_path):
    """Each mismatch is named by its first key, in model order; the expected shapes come from the fixture config."""
    llm, vit = (json.loads((CKPT / n).read_text()) for n in ("llm_config.json", "vit_config.json"))
    L, H, I = llm["num_hidden_layers"], llm["hidden_size"], llm["intermediate_size"]
    hf = make_hf(tmp_path / "hf")
    edit_config(hf / "config.json", "llm_config", num_hidden_layers=L + 1)
    with pytest.raises(convert.CheckpointError, match=rf"missing key language_model\.model\.layers\.{L}\."
                       rf"input_layernorm\.weight \({2 * len(convert.LLM_LAYER)} missing\)"):
        convert.load_checkpoint(str(hf))
    edit_config(hf / "config.json", "llm_config", num_hidden_layers=L - 1)
    with pytest.raises(convert.CheckpointError, match=rf"unexpected key language_model\.model\.layers\.{L - 1}\."):
        convert.load_checkpoint(str(hf))
    edit_config(hf / "config.json", "llm_config", num_hidden_layers=L, intermediate_size=I + 8)
    with pytest.raises(convert.CheckpointError, match=rf"language_model\.model\.layers\.0\.mlp\.gate_proj\.weight "
                       rf"has shape \[{I}, {H}\], the config expects \[{I + 8}, {H}\]"):
        convert.load_checkpoint(str(hf))
    edit_config(hf / "config.json", "llm_config", intermediate_size=I, layer_module="Qwen2DecoderLayer")
    with pytest.raises(convert.CheckpointError, match="MoT layers only"):
        convert.load_checkpoint(str(hf))
    edit_config(hf / "config.json", "llm_config", layer_module="Qwen2MoTDecoderLayer")
    edit_config(hf / "config.json", None, visual_und=False)
    with pytest.raises(convert.CheckpointError, match="visual_und must both be true"):
        convert.load_checkpoint(str(hf))
    convert.convert(str(CKPT), str(tmp_path / "nano"), "nanobagel")
    V, P = vit["hidden_size"], 3 * vit["patch_size"] ** 2
    edit_config(tmp_path / "nano" / "config.json", None, vit_hidden_size=V + vit["num_attention_heads"])
    with pytest.raises(convert.CheckpointError, match=rf"vit\.patch_embed\.weight has shape \[{V}, {P}\]"):
        convert.load_checkpoint(str(tmp_path / "nano"))
    edit_config(tmp_path / "nano" / "config.json", None, vit_hidden_size=V, hidden_act="relu")
    with pytest.raises(convert.CheckpointError, match="unknown field hidden_act"):
        convert.load_checkpoint(str(tmp_path / "nano"))
    ch = json.loads((FIX / "fixture_config.json").read_text())["vae"]["ch"]
    with pytest.raises(convert.CheckpointError, match=rf"ae\.safetensors: encoder\.conv_in\.weight has shape "
                       rf"\[{ch}, 3, 3, 3\], the config expects \[{2 * ch}, 3, 3, 3\]"):
        convert.load_checkpoint(str(CKPT), vae_ch=2 * ch)
    with pytest.raises(convert.CheckpointError, match="does not describe a buildable model"):
        convert.load_checkpoint(str(CKPT), vae_ch=ch + 1)  # GroupNorm(32) cannot split it
    with pytest.raises(convert.CheckpointError, match="unknown field vae_channels"):
        convert.load_checkpoint(str(CKPT), vae_channels=ch)


def test_errors_broken_files(tmp_path):
    hf = make_hf(tmp_path / "hf")
    index = json.loads((hf / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[1]
    data_ = (hf / shard).read_bytes()
    (hf / shard).write_bytes(data_[:-100])
    with pytest.raises(convert.CheckpointError, match=f"{shard} is not a readable safetensors file"):
        convert.load_checkpoint(str(hf))
    (hf / shard).unlink()
    with pytest.raises(convert.CheckpointError, match=f"names the shard {shard}, which is missing"):
        convert.load_checkpoint(str(hf))
    (hf / shard).write_bytes(data_)
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = shard
    (hf / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(convert.CheckpointError, match="index.json does not list"):
        convert.load_checkpoint(str(hf))
    src = official_copy(tmp_path / "off")
    ema = load_file(CKPT / "ema.safetensors")
    ema["vit_pos_embed.pos_embed"] = ema["vit_pos_embed.pos_embed"] + 0.1
    save_file(ema, src / "ema.safetensors")
    with pytest.raises(convert.CheckpointError, match="vit_pos_embed.pos_embed is not the fixed 2D sin-cos table"):
        convert.load_checkpoint(str(src))


# ----------------------------------------------------------------------------------------------
# Loading into FSDP2: each rank reads only its own shards

def test_load_into_sharded_and_save_from_shards_two_ranks(tmp_path):
    """2 processes, FSDP2 over gloo: the sharded model holds exactly the checkpoint and gives the official
    numbers, while each rank read only about half of the Bagel tensors; saving it back gathers tensor by tensor."""
    hf, saved = make_hf(tmp_path / "hf"), tmp_path / "saved"
    root = Path(__file__).parent.parent
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           __file__, str(hf), str(saved)], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{root}:{root / 'tests'}"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("sharded load ok") == 2
    # ... and saved it back from the shards, one gathered tensor at a time: raw weights, and an EMA of 2x them
    fixture = load_file(CKPT / "ema.safetensors")
    for weights, scale in (("model", 1), ("ema", 2)):
        bagel, _, cfg = convert.load_checkpoint(str(saved), ema=weights == "ema")
        for ours, key in convert.official_names(cfg).items():
            assert torch.equal(bagel.state_dict()[ours], scale * fixture[key]), (weights, ours)
    assert_bit_identical(load_file(saved / "vae.safetensors"), load_file(CKPT / "ae.safetensors"))


def sharded_worker(folder, out):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    cfg = convert.checkpoint_config(folder)
    with torch.device("meta"):  # as train.py: meta init, activation checkpointing, shard per block, then the root
        bagel = model.Bagel(cfg)
    for block in bagel.layers:
        block.checkpoint = torch.utils.checkpoint.noop_context_fn
    for block in [*bagel.layers, *bagel.vit.layers]:
        fully_shard(block, mesh=mesh)
    fully_shard(bagel, mesh=mesh)
    bagel.to_empty(device="cpu")
    vae = model.build_vae(cfg)
    read, real_get = [0], convert.Tensors.get

    def counting_get(self, key, index=()):
        t = real_get(self, key, index)
        read[0] += t.numel() if not key.startswith("vae_model.") else 0
        return t
    convert.Tensors.get = counting_get
    assert convert.load_into_sharded(bagel, folder, vae=vae) == []
    convert.Tensors.get = real_get
    total = sum(p.numel() for p in bagel.parameters())
    assert read[0] <= total / world + 1e4, (read[0], total)  # its own rows (uneven splits: a row or so more)
    fixture = load_file(CKPT / "ema.safetensors")
    names = convert.official_names(cfg)
    for name, p in bagel.named_parameters():
        assert torch.equal(p.full_tensor(), fixture[names[name]]), name
    assert_reproduces_fixture(bagel, vae, cfg)
    ema = {n: 2 * p.detach() for n, p in bagel.named_parameters()}  # train.py's EMA: DTensors
    convert.save_nanobagel(out, bagel, vae, cfg, ema_state=ema)
    print(f"sharded load ok: rank {rank} read {read[0]:,} of {total:,} values", flush=True)
    train.finish_distributed()


def write_random_checkpoint(folder, size="7b"):
    """An official-layout checkpoint with random bf16 weights of a model size's real shapes, streamed to disk."""
    cfg = {"7b": model.bagel_7b, "tiny": model.bagel_tiny}[size]()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes, names = convert.expected_shapes(cfg), convert.name_maps("official", cfg)

    def random(ours, dtype):
        if ours in convert.FIXED_TABLES:
            return convert.fixed_table(cfg, ours)
        return torch.randn(shapes[ours], device=device, dtype=dtype) * 0.02
    os.makedirs(folder)
    for file, role, dtype in (("ema.safetensors", "weights", torch.bfloat16), ("ae.safetensors", "vae", torch.float32)):
        convert.write_safetensors(os.path.join(folder, file), [
            (key, shapes[ours], dtype, lambda ours=ours, dtype=dtype: random(ours, dtype))
            for ours, key in names[role].items()])
    convert.write_json(os.path.join(folder, "llm_config.json"), convert.llm_config_json(cfg, torch.bfloat16))
    convert.write_json(os.path.join(folder, "vit_config.json"), convert.vit_config_json(cfg, cfg.vit_num_layers + 1))


def measure_sharded_load(folder, broadcast=False):
    """Seconds and peak host RAM per rank to load folder into an FSDP2 model on the GPUs (NCCL; gloo on CPU).
    broadcast: instead, rank 0 loads the whole model and broadcasts the shards (set_model_state_dict)."""
    import resource
    import time
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    dist.barrier()
    start = time.time()
    cfg = convert.checkpoint_config(folder)
    with torch.device("meta"):
        bagel = model.Bagel(cfg)
    for block in [*bagel.layers, *bagel.vit.layers]:
        fully_shard(block, mesh=mesh)
    fully_shard(bagel, mesh=mesh)
    bagel.to_empty(device=device)
    if broadcast:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        full = convert.load_checkpoint(folder)[0].state_dict() if dist.get_rank() == 0 else {}
        set_model_state_dict(bagel, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        del full
    else:
        convert.load_into_sharded(bagel, folder, vae=model.build_vae(cfg).to(device))
    dist.barrier()
    seconds = time.time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    status = dict(line.split(":") for line in open("/proc/self/status"))
    now = {k: int(status[k].split()[0]) / 2**20 for k in ("RssAnon", "RssFile")}  # GiB; file pages: page cache
    print(f"rank {dist.get_rank()}: loaded {sum(p.numel() for p in bagel.parameters()):,} parameters in "
          f"{seconds:.1f} s{' (rank 0 + broadcast)' if broadcast else ''}; host RSS peak {peak:.2f} GiB, "
          f"now {now['RssAnon']:.2f} GiB anonymous + {now['RssFile']:.2f} GiB mapped file pages", flush=True)
    train.finish_distributed()


if __name__ == "__main__":
    # torchrun --nproc_per_node=2 tests/test_convert.py FOLDER OUT: the worker of test_load_into_sharded_two_ranks.
    # python tests/test_convert.py --random 7b FOLDER, then
    # torchrun --nproc_per_node=2 tests/test_convert.py --measure[-broadcast] FOLDER: the full-size load on GPUs.
    if sys.argv[1] == "--random":
        write_random_checkpoint(sys.argv[3], sys.argv[2])
    elif sys.argv[1].startswith("--measure"):
        measure_sharded_load(sys.argv[2], broadcast=sys.argv[1] == "--measure-broadcast")
    else:
        sharded_worker(sys.argv[1], sys.argv[2])
