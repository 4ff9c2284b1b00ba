"""train.py: world sizes and accumulation agree; kill, a crash at any point of a save, a damaged checkpoint, a full
disk and a preempting signal all resume to the uninterrupted curve; one trainer per out_dir; crafted checkpoint
pickles are refused; a changed dataset and non-finite steps are explained; config values are checked; the FLOP
count against torch's own counter."""
import errno
import hashlib
import json
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file
from torch.distributed.checkpoint.api import CheckpointException

import convert
import data
import model as M
import train
from conftest import COMMON, HARNESS, NO_DROPOUT, ROOT, curve, run_training
from train_harness import synthetic_samples

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
    run_training(tmp_path / "one", "--grad_accum=2", "--max_steps=4")
    run_training(tmp_path / "two", "--grad_accum=1", "--max_steps=4", nproc=2)
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
    run_training(tmp_path / "one", "--grad_accum=2", "--max_steps=2", "--ce_loss_reweighting=True")
    run_training(tmp_path / "two", "--grad_accum=1", "--max_steps=2", "--ce_loss_reweighting=True", nproc=2)
    run_training(tmp_path / "plain", "--grad_accum=2", "--max_steps=1")
    one, two = curve(tmp_path / "one"), curve(tmp_path / "two")
    assert_same_curve(one, two, [1, 2], exact=False)
    special = data.tiny_tokenizer().special  # step 1 sees the harness's packs 0 and 1
    packs = [data.pack_samples(synthetic_samples(g, 512), special) for g in (0, 1)]
    assert one[1]["n_ce"] == pytest.approx(sum(float(p.ce_weights.sum()) for p in packs))
    assert curve(tmp_path / "plain")[1]["n_ce"] == sum(p.ce_indexes.numel() for p in packs)
    assert one[1]["mse"] == curve(tmp_path / "plain")[1]["mse"]


SAVE_EVERY_STEP = ("--max_steps=6", "--save_steps=1", "--keep_checkpoints=2")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted run (saving every step, keeping 2), the curve the interrupted runs must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run_training(out, *SAVE_EVERY_STEP)
    return out


def assert_reproduces(reference, out):
    """The same curve, bit for bit, one metrics row per step, and the same exported EMA."""
    assert_same_curve(curve(reference), curve(out), range(1, 7))
    a, b = load_file(str(reference / "export/ema.safetensors")), load_file(str(out / "export/ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def resumed_from(proc):
    return re.search(r"resumed from \S*(step_\d+) at step", proc.stdout)[1]


def test_sigkill_resumes_the_same_curve(tmp_path, reference):
    """SIGKILL at an arbitrary moment after the first checkpoint; the restart also takes the out_dir's lock, which the
    OS released with the killed process."""
    killed = tmp_path / "killed"
    cmd = [sys.executable, HARNESS] + COMMON + [f"--out_dir={killed}", "--max_steps=6", "--save_steps=2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (killed / "checkpoints/step_0000002").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_training(killed, "--max_steps=6", "--save_steps=2")
    assert_reproduces(reference, killed)


def test_a_crash_at_any_point_of_a_save_resumes_the_same_curve(tmp_path, reference):
    """The process dies (os._exit) right after each point of a save in turn, resuming each time. Every resume takes
    the newest intact checkpoint (what a pointer file said no longer matters: `renamed` is where the old `latest`
    lagged), a damaged checkpoint is passed over with its bad file named, a step saved again replaces its old folder,
    and in the end the curve and the export are the uninterrupted run's."""
    out, ckpt = tmp_path / "x", tmp_path / "x/checkpoints"
    complete = sorted(os.listdir(reference / "checkpoints/step_0000006"))
    dcp_files = [f for f in complete if f.endswith(".distcp") or f == ".metadata"]
    partial = lambda name: sorted(os.listdir(ckpt / name))
    chain = [  # crash point, the step it resumed from, what the crash left
        ("tmp_made@2", None, lambda: partial("step_0000002.tmp") == []),
        ("dcp_saved@2", "step_0000001", lambda: partial("step_0000002.tmp") == dcp_files),
        ("rank_file_saved@2", "step_0000001", lambda: partial("step_0000002.tmp") == sorted(
            dcp_files + [f"rank_{0:05d}.pt"])),
        ("manifest_written@2", "step_0000001", lambda: partial("step_0000002.tmp") == complete),
        ("renamed@2", "step_0000001", lambda: sorted(os.listdir(ckpt)) == ["step_0000001", "step_0000002"]),
        ("pruning@3", "step_0000002", lambda: sorted(os.listdir(ckpt)) == [
            "step_0000001.del", "step_0000002", "step_0000003"]),
        ("set_aside@3", "step_0000002", lambda: sorted(os.listdir(ckpt)) == [
            "step_0000002", "step_0000003.del", "step_0000003.tmp"] and partial("step_0000003.tmp") == complete),
    ]
    for fault, resumed, left in chain:
        if fault.startswith("set_aside"):  # damage the newest checkpoint: one flipped bit in its DCP data
            data_file = ckpt / "step_0000003" / dcp_files[-1]
            raw = bytearray(data_file.read_bytes())
            raw[len(raw) // 2] ^= 1
            data_file.write_bytes(bytes(raw))
        proc = run_training(out, *SAVE_EVERY_STEP, env={"CRASH_AT": fault}, check=False)
        assert proc.returncode == 9, (fault, proc.stdout[-2000:] + proc.stderr[-2000:])
        assert (resumed_from(proc) if resumed else re.search("resumed from", proc.stdout)) == resumed, fault
        assert left(), (fault, sorted(os.listdir(ckpt)))
        if fault.startswith("set_aside"):
            assert f"step_0000003 is damaged: {dcp_files[-1]} does not match its sha256" in proc.stdout
    proc = run_training(out, *SAVE_EVERY_STEP)
    assert resumed_from(proc) == "step_0000002"
    assert sorted(os.listdir(ckpt)) == ["step_0000005", "step_0000006"]
    assert_reproduces(reference, out)


def test_disk_full_during_a_save_says_which_checkpoint_is_kept(tmp_path, reference):
    proc = run_training(tmp_path, "--max_steps=6", "--save_steps=2", env={"DISK_FULL_AT": "4"}, check=False)
    assert proc.returncode != 0
    message = proc.stderr.strip().splitlines()[-1]
    assert message.startswith(f"saving {tmp_path}/checkpoints/step_0000004 failed: OSError: [Errno {errno.ENOSPC}] ")
    assert f"Kept: {tmp_path}/checkpoints/step_0000002;" in message and "GiB free" in message
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000002"]  # the partial save is gone
    assert resumed_from(run_training(tmp_path, "--max_steps=6", "--save_steps=2")) == "step_0000002"
    assert_reproduces(reference, tmp_path)


def test_sigterm_finishes_the_step_saves_and_exits_0(tmp_path, reference):
    """A real SIGTERM, sent while step 3's data loads (inside step 2: the packs load a step ahead): step 3 completes,
    is saved, the process exits 0 without an export; the same command resumes to the uninterrupted curve."""
    proc = run_training(tmp_path, "--max_steps=6", "--save_steps=100", env={"SIGNAL_AT": "SIGTERM@3"})
    assert "SIGTERM: saved step 3 and stopped" in proc.stdout
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["step_0000003"] and not (tmp_path / "export").exists()
    assert max(curve(tmp_path)) == 3
    assert resumed_from(run_training(tmp_path, "--max_steps=6", "--save_steps=100")) == "step_0000003"
    assert_reproduces(reference, tmp_path)
    # sent during step 2's compute (after its first collective): step 2 still completes and is the one saved
    late = tmp_path / "late"
    proc = run_training(late, "--max_steps=6", "--save_steps=100", env={"SIGNAL_AT": "SIGTERM@2@0@compute"})
    assert "SIGTERM: saved step 2 and stopped" in proc.stdout and max(curve(late)) == 2


def test_sigint_on_one_of_two_ranks_stops_both_after_the_same_step(tmp_path):
    """Ctrl-C reaches rank 1 only: the all-reduced stop flag makes rank 0 stop after the same step, both save their
    shards and exit 0 (torchrun's exit code is its workers'), and the resume continues the 2-process curve."""
    run_training(tmp_path / "ref", "--max_steps=4", "--save_steps=100", nproc=2)
    out = tmp_path / "stopped"
    proc = run_training(out, "--max_steps=4", "--save_steps=100", nproc=2, env={"SIGNAL_AT": "SIGINT@2@1"})
    assert "a signal on another rank: saved step 2 and stopped" in proc.stdout
    assert sorted(f for f in os.listdir(out / "checkpoints/step_0000002") if f.startswith("rank_")) == [
        f"rank_{r:05d}.pt" for r in range(2)]
    assert resumed_from(run_training(out, "--max_steps=4", "--save_steps=100", nproc=2)) == "step_0000002"
    assert_same_curve(curve(tmp_path / "ref"), curve(out), range(1, 5))


def test_a_second_trainer_on_the_same_out_dir_stops_at_once(tmp_path):
    """The first trainer takes out_dir's lock before anything else; a second one stops before building anything,
    naming the holder. (The OS releases the lock of a killed trainer: test_sigkill_resumes_the_same_curve restarts in
    the killed one's out_dir.)"""
    cmd = [sys.executable, HARNESS] + COMMON + [f"--out_dir={tmp_path}", "--max_steps=1000"]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.time() + 120
        while not (tmp_path / "train.lock").exists() or not (tmp_path / "train.lock").read_text().endswith("\n"):
            assert first.poll() is None and time.time() < deadline
            time.sleep(0.05)
        second = run_training(tmp_path, "--max_steps=2", check=False)
        assert second.returncode != 0 and " parameters (" not in second.stdout
        assert f"{tmp_path} is in use by another trainer (pid {first.pid} on {socket.gethostname()})" in second.stderr
        assert first.poll() is None  # untouched
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_resume_on_a_different_world_size(tmp_path):
    """Save on 2 processes, resume on 1 with 2 micro-steps: model, optimiser and EMA reshard, the curve goes on."""
    run_training(tmp_path / "ref", "--grad_accum=1", "--max_steps=4", "--save_steps=2", nproc=2)
    run_training(tmp_path / "mix", "--grad_accum=1", "--max_steps=2", "--save_steps=2", nproc=2)
    run_training(tmp_path / "mix", "--grad_accum=2", "--max_steps=4", "--save_steps=2")
    assert_same_curve(curve(tmp_path / "ref"), curve(tmp_path / "mix"), range(1, 5), exact=False)


def test_non_finite_steps_are_skipped_then_stop(tmp_path):
    proc = run_training(tmp_path / "a", "--max_steps=4", env={"NAN_STEPS": "1"})
    rows = curve(tmp_path / "a")
    assert rows[2]["skipped"] == 1 and rows[4]["skipped"] == 1 and "step skipped" in proc.stdout
    # poisoned data: the message names the non-finite loss term and says the weights are finite
    proc = run_training(tmp_path / "b", "--max_steps=6", "--max_bad_steps=3", env={"NAN_STEPS": "1,2,3"}, check=False)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and message.startswith("3 non-finite steps in a row (the last: ")
    assert "mse nan" in message.split("):")[0]
    assert "the weights are finite: check these steps' data" in message
    train.plot_metrics(tmp_path / "b/metrics.jsonl", tmp_path / "b.png")  # the plot was redrawn at the stop
    assert (tmp_path / "b.png").read_bytes() == (tmp_path / "b/metrics.png").read_bytes()
    # a NaN weight (as a NaN checkpoint would bring): named
    weight = next(k for k in load_file(str(tmp_path / "a/export/model.safetensors")) if k.startswith("layers."))
    proc = run_training(tmp_path / "c", "--max_steps=6", "--max_bad_steps=2", env={"NAN_WEIGHT": weight}, check=False)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and message.startswith("2 non-finite steps in a row")
    assert f"weight {weight} is not finite" in message


def test_config_file_overrides_and_type_checks(tmp_path):
    path = tmp_path / "c.py"
    path.write_text("lr = 3e-4\nmax_steps = 7\nsources = [{'path': 'shapes'}]\n")
    cfg = train.load_config([str(path), "--max_steps=9", "--out_dir=x", "--lr=1"])
    assert (cfg["lr"], cfg["max_steps"], cfg["out_dir"]) == (1.0, 9, "x")
    with pytest.raises(SystemExit, match="unknown config key 'lrr' \\(did you mean 'lr'\\?\\)"):
        train.load_config(["--lrr=1"])
    with pytest.raises(SystemExit, match="max_steps must be int"):
        train.load_config(["--max_steps=1.5"])
    with pytest.raises(SystemExit, match="no config file"):
        train.load_config([str(tmp_path / "missing.py")])
    path.write_text("max_stepz = 3\n")
    with pytest.raises(SystemExit, match="unknown config key"):
        train.load_config([str(path)])
    for recipe in sorted((ROOT / "configs").glob("*.py")):  # every shipped config passes the value checks
        train.load_config([str(recipe)])


@pytest.mark.parametrize("arg, message", [
    # the values the issue found accepted silently, or failing only late
    ("--lr_schedule=cosinus", "lr_schedule must be one of constant, cosine; got 'cosinus' (did you mean 'cosine'?)"),
    ("--device=tpu", "device must be one of auto, cpu, cuda; got 'tpu'"),
    ("--grad_accum=0", "grad_accum must be >= 1, got 0"),
    ("--ema=2.0", "ema must be in [0, 1), got 2.0"),
    ("--init_weights=emma", "init_weights must be one of ema, model; got 'emma' (did you mean 'ema'?)"),
    ("--export_dtype=fp16", "export_dtype must be one of fp32, bf16; got 'fp16'"),
    ("--dtype=fp16", "dtype must be one of auto, bf16, fp32; got 'fp16'"),
    ("--save_steps=0", "save_steps must be >= 1, got 0"),
    ("--log_every=0", "log_every must be >= 1, got 0"),
    ("--activation_checkpointing=ful", "activation_checkpointing must be one of none, full, selective; got 'ful' "
     "(did you mean 'full'?)"),
    ("--lr=-0.1", "lr must be >= 0, got -0.1"),
    ("--vit_cond_dropout_prob=1.5", "vit_cond_dropout_prob must be in [0, 1], got 1.5"),
    ("--loss_off_from_step={'cee': 3}", "loss_off_from_step: the losses are 'ce' and 'mse', got 'cee'"),
    ("--freeze_from_step={'vit.*': -1}", "freeze_from_step['vit.*'] must be a step >= 0, got -1"),
    ("--lora_targets=['*q_proj', 3]", "lora_targets[1] must be str, got 3"),
    # inside model_args, data_args and sources: names against BagelConfig, data.Loader and data.Source
    ("--model_args={'hiden_size': 64}", "model_args: unknown key 'hiden_size' (did you mean 'hidden_size'?)"),
    ("--model_args={'num_layers': 2.5}", "model_args['num_layers'] must be int, got 2.5"),
    ("--data_args={'prefetch': '4'}", "data_args['prefetch'] must be int, got '4'"),
    ("--data_args={'seed': 1}", "data_args: unknown key 'seed'"),  # set by train.py itself
    ("--sources=[{'paht': 'x.jsonl'}]", "sources[0]: unknown key 'paht' (did you mean 'path'?)"),
    ("--sources=[{'path': 'x', 'weight': 'high'}]", "sources[0]['weight'] must be float, got 'high'"),
    ("--sources=[{'path': 'x', 'format': 'parquet'}]", "sources[0]: format must be one of "),
    ("--sources=[]", "sources is empty"),
])
def test_bad_config_values_stop_before_anything_starts(arg, message):
    """load_config is main()'s first call: these stop before the lock, the process group or the model exist."""
    with pytest.raises(SystemExit, match=re.escape(message)):
        train.load_config([arg])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # DCP without a process group: one process
def test_crafted_checkpoint_pickles_are_refused_not_run(tmp_path):
    """DCP reads .metadata with pickle.load and non-tensor values with torch.load(weights_only=False): either runs
    code a crafted file names. Through CheckpointReader and CheckpointPlanner (what resume, convert.py and sample.py
    use) both are refused;
    the payloads are live (plain pickle / DCP's defaults run them), so the test can fail."""
    marker = tmp_path / "ran"
    payload = pickle.dumps(Payload(f"touch {marker}"))
    state = {"w": torch.arange(6.0).view(2, 3), "hp": {"lr": 0.5, "betas": (0.9, 0.95), "params": ["w"]}}
    dcp.save(state, checkpoint_id=str(tmp_path / "ok"))
    back = {"w": torch.zeros(2, 3), "hp": {"lr": 0.0, "betas": (0.0, 0.0), "params": []}}
    dcp.load(back, storage_reader=convert.CheckpointReader(str(tmp_path / "ok")), planner=convert.CheckpointPlanner())
    assert torch.equal(back["w"], state["w"]) and back["hp"] == state["hp"]  # a real checkpoint passes

    (tmp_path / "ok/.metadata").write_bytes(payload)
    with pytest.raises(pickle.UnpicklingError, match="posix.system is not allowed in a checkpoint's .metadata"):
        convert.CheckpointReader(str(tmp_path / "ok")).read_metadata()
    assert not marker.exists()
    (tmp_path / "ok/train_state.json").write_text(json.dumps({"step": 1}))  # convert.py / sample.py read it too
    with pytest.raises(convert.CheckpointError, match="posix.system is not allowed"):
        convert.DCPWeights(str(tmp_path / "ok"), ema=None, lora_alpha=1.0)
    assert not marker.exists()
    pickle.loads(payload)
    assert marker.exists()
    marker.unlink()

    dcp.save({"hp": {"lr": Payload(f"touch {marker}")}}, checkpoint_id=str(tmp_path / "bytes"))
    with pytest.raises(CheckpointException, match="checkpoint value hp.lr is not plain data"):
        dcp.load({"hp": {"lr": 0.0}}, storage_reader=convert.CheckpointReader(str(tmp_path / "bytes")),
                 planner=convert.CheckpointPlanner())
    assert not marker.exists()
    dcp.load({"hp": {"lr": 0.0}}, checkpoint_id=str(tmp_path / "bytes"))
    assert marker.exists()


class Payload:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_changed_dataset_on_resume_says_what_changed(tmp_path, reference):
    """The checkpoint's loader state is for 10,000 shapes rows; resuming on 500 says so and how to go on, and
    --resume_data_order=False then does (the order restarts from seed + step)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    rows = len(data.Source(**train.DEFAULTS["sources"][0]))
    fewer = f"--sources=[{{'path': 'shapes', 'num_rows': {rows // 20}}}]"
    proc = run_training(out, "--max_steps=8", fewer, check=False)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and message.startswith(
        f"the data changed since {out}/checkpoints/step_0000006 (source shapes: {rows} -> {rows // 20} rows)")
    assert "resume with --resume_data_order=False" in message
    proc = run_training(out, "--max_steps=8", fewer, "--resume_data_order=False")
    assert f"resume_data_order=False: the data order restarts from seed {train.DEFAULTS['seed'] + 6}" in proc.stdout
    assert sorted(curve(out)) == list(range(1, 9))


def test_resume_data_turns_a_shrunk_dataset_into_one_message():
    """With the real loader: a source that shrank under a saved data order ends in an IndexError deep in the source
    order at the first pack; resume_data says what changed before that, and how to go on."""
    tok = data.tiny_tokenizer()
    loader = lambda rows: data.Loader([data.Source(num_rows=rows)], tok, 1024, NO_DROPOUT)
    before = loader(20)
    for _ in range(3):
        before.next_pack()
    saved = {"loader": before.state_dict(), "data": train.data_rows(before)}
    assert saved["loader"]["positions"][0][1] >= 10  # the cursor is past the end of a 10-row source
    shrunk = loader(10)
    shrunk.load_state_dict(saved["loader"])
    with pytest.raises(IndexError):
        shrunk.next_pack()
    with pytest.raises(SystemExit, match=re.escape("the data changed since ckpt (source shapes: 20 -> 10 rows)")):
        train.resume_data(loader(10), saved, "ckpt")
    same = loader(20)
    train.resume_data(same, saved, "ckpt")
    assert same.state_dict() == saved["loader"]


def test_commit_replaces_a_step_saved_again_and_prunes(tmp_path):
    """commit, rank 0's end of a save, on folders alone: the step saved again (over a damaged folder that resume
    passed over) replaces it; the `keep` newest up to this step stay, older ones and later (damaged) ones go."""
    for step in range(1, 5):
        (tmp_path / f"step_{step:07d}").mkdir()
        (tmp_path / f"step_{step:07d}/old").write_text("")
    tmp = tmp_path / "step_0000003.tmp"
    tmp.mkdir()
    (tmp / "new").write_text("")
    manifest = {"step": 3, "files": {"new": [0, hashlib.sha256(b"").hexdigest()]}}
    train.commit(str(tmp), str(tmp_path / "step_0000003"), manifest, keep=2)
    assert sorted(os.listdir(tmp_path)) == ["step_0000002", "step_0000003"]
    assert sorted(os.listdir(tmp_path / "step_0000003")) == sorted(["new", train.MANIFEST])
    assert json.loads((tmp_path / "step_0000003" / train.MANIFEST).read_text()) == manifest
    assert train.damage(str(tmp_path / "step_0000003"), 0, 1) == ""


def test_damage_names_the_bad_file(tmp_path):
    """A checkpoint's files against its manifest: intact, then each kind of damage named with its file."""
    files = {"__0_0.distcp": os.urandom(5000), "rank_00000.pt": os.urandom(300), ".metadata": os.urandom(700)}
    for name, raw in files.items():
        (tmp_path / name).write_bytes(raw)
    manifest = train.hash_files(str(tmp_path), 0, 1)
    assert manifest == {n: [len(raw), hashlib.sha256(raw).hexdigest()] for n, raw in files.items()}
    (tmp_path / train.MANIFEST).write_text(json.dumps({"files": manifest}))
    assert train.damage(str(tmp_path), 0, 1) == ""
    assert train.damage(str(tmp_path), 1, 2) == ""  # rank 1 of 2 has no file of rank 0's
    raw = bytearray(files["__0_0.distcp"])
    raw[1234] ^= 0x10
    (tmp_path / "__0_0.distcp").write_bytes(bytes(raw))
    assert train.damage(str(tmp_path), 0, 1) == "__0_0.distcp does not match its sha256 in the manifest"
    (tmp_path / "__0_0.distcp").write_bytes(files["__0_0.distcp"][:4096])  # a write cut short
    assert train.damage(str(tmp_path), 0, 1) == "__0_0.distcp has 4096 bytes, the manifest says 5000"
    (tmp_path / "__0_0.distcp").unlink()
    assert train.damage(str(tmp_path), 0, 1) == "__0_0.distcp is missing"
    (tmp_path / train.MANIFEST).write_text('{"files": {"x": ')
    assert train.damage(str(tmp_path), 0, 1).startswith(f"{train.MANIFEST} unreadable (JSONDecodeError")
    (tmp_path / train.MANIFEST).write_text(json.dumps({"step": 7}))  # an older checkpoint's manifest
    assert train.damage(str(tmp_path), 0, 1) == f"{train.MANIFEST} lists no files (a checkpoint from before " \
                                                "manifests: it cannot be verified)"


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
    pack = train.encode_images(vae, [pack], torch.float32)[0]
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
    run_training(tmp_path, "--max_steps=3", "--save_steps=3",
                 f"--model_args={{'vocab_size':512,'attn_backend':'nsa','nsa':{nsa}}}")
    rows = curve(tmp_path)
    assert all(r["loss"] == r["loss"] and r["skipped"] == 0 for r in rows.values())
    exported = load_file(str(tmp_path / "export/model.safetensors"))
    assert "layers.0.attn.gate.weight" in exported and exported["layers.0.attn.gate.weight"].abs().sum() > 0


def test_init_from_checkpoint_loads_sharded_exactly(tmp_path):
    """Start 2 processes from a finished run's export (each rank reads its own shards): with lr 0 the weights
    come out bit-identical, and the first loss equals a single process started from the same folder."""
    run_training(tmp_path / "a", "--max_steps=2")
    src = tmp_path / "a/export"
    args = (f"--init_from={src}", "--init_weights=model", "--lr=0.0", "--ema=0.0", "--max_steps=1")
    run_training(tmp_path / "b", *args, nproc=2)
    run_training(tmp_path / "c", "--grad_accum=2", *args)
    a, b = load_file(str(src / "model.safetensors")), load_file(str(tmp_path / "b/export/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert_same_curve(curve(tmp_path / "b"), curve(tmp_path / "c"), [1], exact=False)
