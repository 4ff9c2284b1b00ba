"""train.py: world sizes and accumulation agree, kill + resume continues the curve, atomic checkpoints,
non-finite steps, config handling, and the FLOP count against torch's own counter."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import model as M
import train
from train_harness import synthetic_samples

ROOT = Path(__file__).parent.parent
HARNESS = str(Path(__file__).parent / "train_harness.py")
COMMON = ["--log_every=1", "--warmup_steps=2", "--ema=0.9", "--model_args={'vocab_size':512}", "--lr=1e-3"]


def run(out_dir, *args, nproc=1, env=None, check=True):
    cmd = [sys.executable, HARNESS] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), HARNESS]
    proc = subprocess.run(cmd + COMMON + [f"--out_dir={out_dir}", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def curve(out_dir):
    """{step: metrics}; a step logged twice (before a kill and after the resume) keeps its last entry."""
    rows = [json.loads(line) for line in open(Path(out_dir) / "metrics.jsonl")]
    return {r["step"]: r for r in rows}


def assert_same_curve(a, b, steps, exact=True):
    for s in steps:
        for key in ("loss", "ce", "mse", "grad_norm"):
            if exact:
                assert a[s][key] == b[s][key], (s, key, a[s][key], b[s][key])
            else:
                assert a[s][key] == pytest.approx(b[s][key], rel=2e-5, abs=1e-6), (s, key)


def test_two_processes_equal_one_process_with_accumulation(tmp_path):
    """1 process x 2 micro-steps and 2 processes (FSDP2 over gloo) x 1 see the same packs each step: the losses
    and gradient norms must agree. A rank-local mean or gloo's AVG-sums bug (pytorch#162338) breaks this."""
    run(tmp_path / "one", "--grad_accum=2", "--max_steps=4")
    run(tmp_path / "two", "--grad_accum=1", "--max_steps=4", nproc=2)
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert_same_curve(one, two, range(1, 5), exact=False)
    assert one[4]["loss"] != one[1]["loss"]  # it trained
    a = load_file(str(tmp_path / "one/export/ema.safetensors"))
    b = load_file(str(tmp_path / "two/export/ema.safetensors"))
    for k in a:
        # The ViT key bias adds a per-query constant to the scores, which softmax cancels: its true gradient is 0,
        # and Adam (eps 1e-15) turns the round-off left in it into full-size steps that differ by run.
        if not k.endswith("k_proj.bias") or not k.startswith("vit."):
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=lambda m: f"{k}: {m}")


def test_ce_loss_reweighting_is_global_too(tmp_path):
    """The official 1/sqrt(len) CE weighting: normalised by the global weight sum, so world sizes still agree;
    and the logged CE is the weighted mean, not the plain one."""
    run(tmp_path / "one", "--grad_accum=2", "--max_steps=2", "--ce_loss_reweighting=True")
    run(tmp_path / "two", "--grad_accum=1", "--max_steps=2", "--ce_loss_reweighting=True", nproc=2)
    run(tmp_path / "plain", "--grad_accum=2", "--max_steps=1")
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert_same_curve(one, two, [1, 2], exact=False)
    special = data.tiny_tokenizer().special  # step 1 sees the harness's packs 0 and 1
    packs = [data.pack_samples(synthetic_samples(g, 512), special) for g in (0, 1)]
    assert one[1]["n_ce"] == pytest.approx(sum(float(p.ce_weights.sum()) for p in packs))
    assert curve(tmp_path / "plain")[1]["n_ce"] == sum(p.ce_indexes.numel() for p in packs)
    assert one[1]["mse"] == curve(tmp_path / "plain")[1]["mse"]


def test_sigkill_and_crash_in_save_resume_the_same_curve(tmp_path):
    ref = tmp_path / "ref"
    run(ref, "--max_steps=6", "--save_steps=2")
    # SIGKILL at an arbitrary moment after the first checkpoint
    killed = tmp_path / "killed"
    cmd = [sys.executable, HARNESS] + COMMON + [f"--out_dir={killed}", "--max_steps=6", "--save_steps=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (killed / "checkpoints/latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run(killed, "--max_steps=6", "--save_steps=2")
    # a crash inside the second save: step_4 stays a .tmp, the resume starts from step 2
    crashed = tmp_path / "crashed"
    assert run(crashed, "--max_steps=6", "--save_steps=2", env={"CRASH_AT_SAVE": "2"}, check=False).returncode == 9
    assert (crashed / "checkpoints/step_0000004.tmp").exists()
    assert (crashed / "checkpoints/latest").read_text() == "step_0000002"
    run(crashed, "--max_steps=6", "--save_steps=2")
    want = curve(ref)
    for out in (killed, crashed):
        assert_same_curve(want, curve(out), range(1, 7))
        a, b = load_file(str(ref / "export/ema.safetensors")), load_file(str(out / "export/ema.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_on_a_different_world_size(tmp_path):
    """Save on 2 processes, resume on 1 with 2 micro-steps: model, optimiser and EMA reshard, the curve goes on."""
    run(tmp_path / "ref", "--grad_accum=1", "--max_steps=4", "--save_steps=2", nproc=2)
    run(tmp_path / "mix", "--grad_accum=1", "--max_steps=2", "--save_steps=2", nproc=2)
    run(tmp_path / "mix", "--grad_accum=2", "--max_steps=4", "--save_steps=2")
    assert_same_curve(curve(tmp_path / "ref"), curve(tmp_path / "mix"), range(1, 5), exact=False)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    proc = run(tmp_path / "a", "--max_steps=4", env={"NAN_STEPS": "1"})
    rows = curve(tmp_path / "a")
    assert rows[2]["skipped"] == 1 and rows[4]["skipped"] == 1 and "step skipped" in proc.stdout
    proc = run(tmp_path / "b", "--max_steps=6", "--max_bad_steps=3", env={"NAN_STEPS": "1,2,3"}, check=False)
    assert proc.returncode != 0 and "3 non-finite steps in a row" in proc.stdout + proc.stderr


def test_config_file_overrides_and_type_checks(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lr = 3e-4\nmax_steps = 7\nsources = [{'path': 'shapes'}]\n")
    cfg = train.load_config([str(path), "--max_steps=9", "--out_dir=x", "--lr=1"])
    assert (cfg["lr"], cfg["max_steps"], cfg["out_dir"]) == (1.0, 9, "x")
    with pytest.raises(SystemExit, match="unknown config key 'lrr'"):
        train.load_config(["--lrr=1"])
    with pytest.raises(SystemExit, match="max_steps must be int"):
        train.load_config(["--max_steps=1.5"])
    with pytest.raises(SystemExit, match="no config file"):
        train.load_config([str(tmp_path / "missing.py")])
    path.write_text("max_stepz = 3\n")
    with pytest.raises(SystemExit, match="unknown config key"):
        train.load_config([str(path)])


def test_flop_count_matches_torch_flop_counter():
    """Our formula against torch.utils.flop_counter on a real forward + backward. The counter sees the exact SDPA
    as dense L x L (and the ViT as all patches x all patches); we count visible pairs: both are computed here."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    tok = data.tiny_tokenizer()
    cfg = M.bagel_tiny(vocab_size=512)
    torch.manual_seed(0)
    bagel, vae = M.Bagel(cfg), M.build_vae(cfg)
    bagel.init_weights()
    pack = data.pack_samples(synthetic_samples(3, 512) + synthetic_samples(4, 512), tok.special)
    pack = train.encode_images(vae, pack, torch.float32)
    # the math SDPA backend runs attention as matmuls, which the counter counts (as dense L x L)
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        out = bagel(pack)
        (out["ce"].sum() + out["mse"].sum()).backward()
    counted = counter.get_total_flops()
    L, n_vit = pack.num_tokens, pack.vit_patches.shape[0]
    per_pair_llm, per_pair_vit = 12 * cfg.head_dim * cfg.num_heads, 12 * cfg.vit_hidden_size
    dense = cfg.num_layers * per_pair_llm * L * L + cfg.vit_num_layers * per_pair_vit * n_vit * n_vit
    visible = cfg.num_layers * per_pair_llm * train.visible_pairs(pack) + \
        cfg.vit_num_layers * per_pair_vit * sum(n * n for n in pack.vit_lens)
    everything = dict(und=True, gen=True, vit=True, connector=True, lm_head=True, latent=True)
    assert train.pack_flops(pack, cfg, everything) - visible == counted - dense
    mask = M.span_layout(pack.sample_lens, pack.split_lens, pack.split_modes).dense_mask()
    assert train.visible_pairs(pack) == int(mask.sum())


def test_tiny_config_learns(tmp_path):
    """README's first command, shortened: the tiny model on the built-in shapes clearly reduces its loss."""
    proc = subprocess.run([sys.executable, "train.py", "configs/tiny.py", "--max_steps=60", "--log_every=5",
                           "--sample_every=0", "--save_steps=60", f"--out_dir={tmp_path}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    first, last = rows[0], rows[-1]
    assert last["loss"] < 0.5 * first["loss"], (first, last)
    assert last["ce"] < 0.5 * first["ce"] and last["mse"] < first["mse"]
    assert (tmp_path / "export/ema.safetensors").exists() and (tmp_path / "export/tokenizer.json").exists()


def test_training_runs_with_nsa_attention(tmp_path):
    """attn_backend="nsa" end to end through FSDP2, checkpoint and export (CPU: NSA's torch reference)."""
    nsa = "{'block_size':16,'kernel_size':16,'kernel_stride':8,'topk':2,'init_blocks':1,'local_blocks':1,'window_size':8}"
    run(tmp_path, "--max_steps=3", "--save_steps=3", f"--model_args={{'vocab_size':512,'attn_backend':'nsa','nsa':{nsa}}}")
    rows = curve(tmp_path)
    assert all(r["loss"] == r["loss"] and r["skipped"] == 0 for r in rows.values())
    exported = load_file(str(tmp_path / "export/model.safetensors"))
    assert "layers.0.attn.gate.weight" in exported and exported["layers.0.attn.gate.weight"].abs().sum() > 0


def test_init_from_checkpoint_loads_sharded_exactly(tmp_path):
    """Start 2 processes from a finished run's export (each rank reads its own shards): with lr 0 the weights
    come out bit-identical, and the first loss equals a single process started from the same folder."""
    run(tmp_path / "a", "--max_steps=2")
    src = tmp_path / "a/export"
    args = (f"--init_from={src}", "--init_weights=model", "--lr=0.0", "--ema=0.0", "--max_steps=1")
    run(tmp_path / "b", *args, nproc=2)
    run(tmp_path / "c", "--grad_accum=2", *args)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "b/export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_curve(curve(tmp_path / "b"), curve(tmp_path / "c"), [1], exact=False)
