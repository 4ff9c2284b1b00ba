"""Every checkpoint is usable: train.py's DCP checkpoints (out_dir/checkpoints/step_N) convert and sample, raw or EMA,
LoRA merged, each equal to what the run's own export holds (recA's raw-weight export and a LoRA export sample like any
other folder); the model config, AE and tokenizer come with them; NaN or Inf weights stop every reader (convert.py,
sample.py, init_from's sharded load) with the tensor and its file named."""
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

import convert
import data
import sample
import train
from conftest import FIX, load_tiny

ROOT = Path(__file__).parent.parent
HARNESS = str(Path(__file__).parent / "train_harness.py")
CKPT = FIX / "checkpoint"
RUNS = {  # train_harness.py runs of 2 steps, a DCP checkpoint at step 2, then the export
    "plain": [],
    # LoRA (adapters only train: every other parameter is its own EMA), exported as recA exports: the raw weights
    # in export/, the EMA in export_ema/
    "lora_raw_export": ["--lora_targets=['layers.*.gen.q_proj','layers.*.und.v_proj']", "--lora_rank=2",
                        "--lora_alpha=4.0", "--save_ema_as_default=False"],
}


def train_run(out_dir, *args):
    cmd = [sys.executable, HARNESS, "--log_every=1", "--warmup_steps=1", "--lr=1e-2", "--ema=0.5", "--max_steps=2",
           "--save_steps=2", "--model_args={'vocab_size':512}", f"--out_dir={out_dir}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out_dir / "checkpoints" / "step_0000002"


def assert_same_tensors(a, b):
    a, b = load_file(a), load_file(b)
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def draw(folder, weights=None):
    model, vae, _ = sample.load(str(folder), weights)
    return np.asarray(sample.generate_image(model, vae, data.tiny_tokenizer(), "a red circle", image_size=(32, 32),
                                            num_timesteps=3))


@pytest.mark.parametrize("run", RUNS)
def test_dcp_checkpoint_converts_and_samples_like_the_export(tmp_path, run):
    """The last step's DCP checkpoint and the export written after it hold the same state, so converting the
    checkpoint must give the export's tensors bit for bit: the EMA by default, the raw weights on request (LoRA merged
    as the export merges them), the AE and the tokenizer too; and sample.py must draw the same image from either
    folder (a raw-weight export, as recA's, like any other)."""
    out = tmp_path / run
    step = train_run(out, *RUNS[run])
    raw_export = run == "lora_raw_export"
    convert.convert(str(step), str(tmp_path / "ema"), "nanobagel")  # the EMA where the checkpoint has one
    convert.convert(str(step), str(tmp_path / "raw"), "nanobagel", ema=False)
    assert_same_tensors(tmp_path / "ema/model.safetensors",
                        out / ("export_ema/model.safetensors" if raw_export else "export/ema.safetensors"))
    assert_same_tensors(tmp_path / "raw/model.safetensors", out / "export/model.safetensors")
    assert_same_tensors(tmp_path / "raw/vae.safetensors", out / "export/vae.safetensors")  # the seeded fresh AE
    assert (tmp_path / "raw/tokenizer.json").read_bytes() == (out / "export/tokenizer.json").read_bytes()
    config = json.loads((out / "export/config.json").read_text())
    assert json.loads((tmp_path / "raw/config.json").read_text()) == config
    raw, ema = (load_file(tmp_path / d / "model.safetensors") for d in ("raw", "ema"))
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)  # the two sets differ: each comparison means something
    if raw_export:  # export/ holds the raw weights alone: sample.py takes them
        assert np.array_equal(draw(step, "model"), draw(out / "export"))
        return
    image = draw(step)
    assert np.array_equal(image, draw(out / "export"))
    convert.convert(str(step), str(tmp_path / "official"), "official")  # the run's FLUX-shaped AE reaches it too
    assert np.array_equal(image, draw(tmp_path / "official"))
    # train.py starts from the checkpoint (its EMA, as from any folder): at lr 0 the export is that EMA
    train_run(tmp_path / "again", f"--init_from={step}", f"--tokenizer={tmp_path / 'raw'}", "--lr=0.0", "--max_steps=1")
    assert_same_tensors(tmp_path / "again/export/model.safetensors", tmp_path / "ema/model.safetensors")


def write_dcp(folder, state, config, model_config=None):
    """A train.py-style checkpoint written by the test: DCP state, train_state.json (model_config: what train.py
    is to write)."""
    with warnings.catch_warnings():  # it warns that there is no process group: none is wanted
        warnings.filterwarnings("ignore", "torch.distributed is disabled")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    train_state = {"step": 1, "world_size": 1, "config": config}
    if model_config is not None:
        train_state["model_config"] = model_config
    (folder / "train_state.json").write_text(json.dumps(train_state))


def test_dcp_config_ae_from_init_from_and_errors(tmp_path):
    """A checkpoint of a run that started from the fixture: the model config from train_state.json, the AE from the
    init_from folder, the weights as saved; then every kind of bad checkpoint named."""
    bagel, vae, cfg = load_tiny()
    state = {k: v + 0.5 for k, v in bagel.state_dict().items()}
    config = {**train.DEFAULTS, "init_from": str(CKPT), "ema": 0.0}
    write_dcp(tmp_path / "step", {"model": state, "ema": {}}, config, asdict(cfg))
    loaded, loaded_vae, loaded_cfg = convert.load_checkpoint(str(tmp_path / "step"))
    assert loaded_cfg == cfg
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    assert all(torch.equal(v, vae.state_dict()[k]) for k, v in loaded_vae.state_dict().items())
    assert convert.tokenizer_source(str(tmp_path / "step")) == str(CKPT)  # train.py took init_from's tokenizer
    with pytest.raises(convert.CheckpointError, match="no EMA weights .*ema=0"):
        convert.load_checkpoint(str(tmp_path / "step"), ema=True)
    key = "layers.1.gen.down_proj.weight"
    state[key] = state[key].clone()
    state[key][3, 5] = float("inf")
    write_dcp(tmp_path / "bad", {"model": state, "ema": {}}, config, asdict(cfg))
    with pytest.raises(convert.CheckpointError, match=rf"bad: model\.{re.escape(key)} holds NaN or Inf"):
        convert.convert(str(tmp_path / "bad"), str(tmp_path / "out"), "nanobagel")
    (tmp_path / "bad" / "train_state.json").unlink()  # as a checkpoint killed mid-write (step_N.tmp) is
    with pytest.raises(convert.CheckpointError, match="without train_state.json: not a complete train.py checkpoint"):
        convert.load_checkpoint(str(tmp_path / "bad"))
    write_dcp(tmp_path / "moved", {"model": state, "ema": {}}, {**config, "init_from": str(tmp_path / "gone")})
    with pytest.raises(convert.CheckpointError, match=r"train_state.json: the run started from .*gone: .*not a folder"):
        convert.load_checkpoint(str(tmp_path / "moved"))


def test_nan_weights_stop_every_reader(tmp_path):
    """convert.py, sample.py and init_from's sharded load each stop at a NaN or Inf weight, naming it and its file."""
    src = tmp_path / "src"
    shutil.copytree(CKPT, src)
    ema = load_file(CKPT / "ema.safetensors")
    key = sorted(k for k in ema if k.endswith("mlp.down_proj.weight"))[-1]
    ema[key][0, 1] = float("nan")
    save_file(ema, src / "ema.safetensors")
    named = rf"{src}/ema.safetensors: {re.escape(key)} holds NaN or Inf values"
    with pytest.raises(convert.CheckpointError, match=named):
        convert.convert(str(src), str(tmp_path / "out"), "hf")
    with pytest.raises(SystemExit, match="error: " + named):
        convert.main([str(src), str(tmp_path / "out2")])
    with pytest.raises(SystemExit, match="error: " + named):
        sample.main(["--ckpt", str(src), "--prompt", "x", "--tokenizer", "tiny", "--size", "32", "--steps", "2"])
    bagel, vae, _ = load_tiny()
    with pytest.raises(convert.CheckpointError, match=named):
        convert.load_into_sharded(bagel, str(src))
    save_file(load_file(CKPT / "ema.safetensors"), src / "ema.safetensors")
    ae = load_file(CKPT / "ae.safetensors")
    ae["decoder.conv_out.bias"][0] = float("-inf")
    save_file(ae, src / "ae.safetensors")
    with pytest.raises(convert.CheckpointError, match=rf"{src}/ae.safetensors: decoder\.conv_out\.bias holds NaN"):
        convert.load_into_sharded(bagel, str(src), vae=vae)
