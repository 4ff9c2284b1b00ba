"""What a user sees: --help of every entry point, config mistakes caught before anything starts, the progress lines
and the files of a run (train.log, config.json, metrics.jsonl, metrics.png, captioned sample grids), validation on
fixed packs, wandb, and the measure that tells whether the tiny demo draws what it is asked."""
import json
import math
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image, ImageFilter

import bench
import convert
import data
import model as M
import sample
import train
from conftest import ROOT, drawing_report, draws_prompt, prompt_scene

TINY = "{'vocab_size':384,'hidden_size':64,'num_layers':2,'num_heads':2,'num_kv_heads':1,'intermediate_size':128," \
       "'vae_kind':'pooled'}"
VAL = "[{'path':'shapes','image_size':64,'num_rows':50,'seed':1}]"


def python(*args, env=None):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


# ----------------------------------------------------------------------------------------------
# Entry points and config mistakes

def test_train_help_lists_every_key_and_unknown_keys_get_a_suggestion(tmp_path, capsys):
    train.main(["configs/tiny.py", "--help"])  # prints and returns: nothing is built
    out = capsys.readouterr().out
    assert out.startswith(train.__doc__.strip().splitlines()[0])
    for key in train.DEFAULTS:
        assert f"--{key}=" in out, key
    assert re.search(r"--lora_rank=16 --lora_alpha=32.0 +adapter rank r and alpha", out)
    assert re.search(r"--eval_every=500 +validation every N steps", out)
    with pytest.raises(SystemExit, match="command line: unknown config key 'max_step' \\(did you mean 'max_steps'"):
        train.load_config(["--max_step=3"])
    (tmp_path / "c.py").write_text("learning_rate = 1e-3\n")
    with pytest.raises(SystemExit, match="unknown config key 'learning_rate'"):
        train.load_config([str(tmp_path / "c.py")])
    with pytest.raises(SystemExit, match="expected --key=value, got 'max_steps' \\(python train.py --help"):
        train.load_config(["--lr=1", "max_steps"])
    assert train.load_config(["--sample_settings={'num_timesteps': 8, 'cfg_interval': [0, 1]}"])["sample_settings"] \
        == {"num_timesteps": 8, "cfg_interval": (0, 1)}
    with pytest.raises(SystemExit, match="sample_settings: unknown key 'cfg_scale' \\(did you mean 'cfg_img_scale'"):
        train.load_config(["--sample_settings={'cfg_scale': 2.0}"])


def test_config_paths_are_checked_before_anything_starts(tmp_path):
    config = train.load_config(["configs/sft.py"])  # unedited: /path/to/...
    with pytest.raises(SystemExit, match="^init_from: '/path/to/BAGEL-7B-MoT' does not exist"):
        train.preflight(config)
    missing = str(tmp_path / "nope.jsonl")
    config = train.load_config([f"--sources=[{{'path': 'shapes'}}, {{'path': {missing!r}}}]"])
    with pytest.raises(SystemExit, match=re.escape(f"sources[1]['path']: {missing!r} does not exist")):
        train.preflight(config)
    config = train.load_config([f"--val_sources=[{{'path': 'shapes', 'data_folder': {missing!r}}}]"])
    with pytest.raises(SystemExit, match=re.escape("val_sources[0]['data_folder']")):
        train.preflight(config)
    proc = python("train.py", "configs/sft.py")  # the whole command: one line, no process group, no traceback
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["init_from: '/path/to/BAGEL-7B-MoT' does not exist (README: Weights "
                                                "and data)"]


def test_every_entry_point_has_help(capsys):
    bench.main(["--help"])
    out = capsys.readouterr().out
    assert all(f"--{k}=" in out for k in ("data", "steps", "warmup", "rows", "device")) and "bench.py nsa check" in out
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="bench.py needs a CUDA GPU"):  # before building BAGEL's width
            bench.main([])
    with pytest.raises(SystemExit, match="expected --key=value, got 'steps=3'"):
        bench.main(["steps=3"])
    with pytest.raises(SystemExit, match="did you mean 'full'"):  # train.py's value checks, before the 7B is built
        bench.main(["--device=cpu", "--activation_checkpointing=ful"])
    for main in (data.main, sample.main, convert.main):
        with pytest.raises(SystemExit) as e:
            main(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(f in out for f in data.READERS if f != "shapes")  # data.py names its formats
    proc = python("nsa.py")
    assert proc.returncode != 0 and "python bench.py nsa check" in proc.stderr and proc.stdout == ""


# ----------------------------------------------------------------------------------------------
# Progress

def test_bench_times_the_synthetic_and_the_real_pack_in_one_run(tmp_path):
    """`bench.py --device=cpu --data=synthetic,real,real:vlm`: the small model without being told (BAGEL's width would
    not fit this machine), one model, each kind's warm-up and measured steps logged, then a RESULT line per kind; the
    real packs come through data.Loader from the generated photos, the mixture's and then the VLM source's alone."""
    proc = python("bench.py", "--device=cpu", "--data=synthetic,real,real:vlm", "--rows=6", "--steps=1",
                  env={"BENCH_DATA": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^model: \d+ layers x (\d+) .*sdpa attention", proc.stdout, re.M).group(1) == str(
        M.PRESETS["tiny"]().hidden_size)
    results = re.findall(r"^RESULT (\S+) \|", proc.stdout, re.M)
    assert results == ["synthetic", "real", "real:vlm"]
    steps = re.findall(r"^step (\d+): .* \((\d+) ViT patches, (\d+) latent", proc.stdout, re.M)
    assert [int(s[0]) for s in steps] == [0, 1, 2, 3] * 3  # 3 warm-up and 1 measured step, for each kind
    synthetic, real, vlm = steps[:4], steps[4:8], steps[8:]
    assert len({s[1:] for s in synthetic}) == 1  # the fixed pack
    assert sum(int(s[1]) for s in real) > 0 and sum(int(s[2]) for s in real) > 0  # VLM and T2I/edit rows arrived
    assert all(int(s[1]) > 0 and int(s[2]) == 0 for s in vlm)  # ViT images, nothing to generate


def test_bench_long_packs_and_the_options_it_refuses():
    """--data=long:N: one sample within N positions whose noised 1024 px target is 64 x 64 latents (FLUX's 16x
    downsampling) and whose text keeps at least one CE position, down to the shortest length bench.py accepts; a
    shorter one is refused before any model is built, as is BENCH_PEAK under checkpointing (pytorch#179536)."""
    for n in (bench.LONG_MIN, 20000):
        pack = bench.long_pack(data.tiny_tokenizer(), n, seed=0)
        assert len(pack.sample_lens) == 1 and pack.num_tokens <= n
        assert pack.mse_indexes.numel() == (1024 // 16) ** 2 and pack.ce_indexes.numel() >= 1
    proc = python("bench.py", "--device=cpu", f"--data=long:{bench.LONG_MIN - 1}")
    assert proc.returncode != 0 and "too short" in proc.stderr and "model:" not in proc.stdout
    proc = python("bench.py", "--device=cpu", "--activation_checkpointing=full", env={"BENCH_PEAK": "4"})
    assert proc.returncode != 0 and "pytorch#179536" in proc.stderr and "model:" not in proc.stdout


def test_bench_leaves_out_the_steps_that_compiled(monkeypatch, capsys):
    """A timed step in which dynamo compiles (real packs bring new shapes to the compiled layers) says nothing of the
    steady speed: the RESULT line leaves it out of the step times and says so. The second of three timed steps
    compiles here (a graph counted, 3 s spent)."""
    step, calls = train.train_step, []

    def compiling_step(*args, **kwargs):
        calls.append(None)
        if len(calls) == 5:  # 3 warm-up steps, then the second timed one
            torch._dynamo.utils.counters["stats"]["unique_graphs"] += 1
            time.sleep(3.0)
        return step(*args, **kwargs)
    monkeypatch.setattr(train, "train_step", compiling_step)
    environ = dict(os.environ)
    try:
        bench.main(["--device=cpu", "--steps=3"])
    finally:  # the world of one that train.py set up for itself (its port), gone for the tests after this one
        os.environ.clear()
        os.environ.update(environ)
    out = capsys.readouterr().out
    times = [int(t) for t in re.findall(r"^step \d+: (\d+) ms", out, re.M)]
    result = re.search(r"^RESULT .*\| step (\d+) ms \(median (\d+), min (\d+), max (\d+); 1 of 3 compiled, "
                       r"left out\)", out, re.M)
    assert result, out[-2000:]
    kept = [times[3], times[5]]
    assert times[4] > 3000 and int(result.group(4)) == max(kept) and int(result.group(3)) == min(kept)
    assert abs(int(result.group(1)) - sum(kept) / 2) <= 1


def test_progress_reports_window_means_speed_and_eta(tmp_path, monkeypatch):
    """Three steps, one of them non-finite: the row holds the means of the finite ones, tokens over the time in
    train_step, s/step over the wall clock of the window, elapsed from the resumed checkpoint's, and the ETA."""
    clock = [1000.0]
    monkeypatch.setattr(train.time, "time", lambda: clock[0])
    lines = []
    config = dict(train.DEFAULTS, max_steps=10, out_dir=str(tmp_path))
    run = SimpleNamespace(config=config, device=torch.device("cpu"), world=1, master=True, log=lines.append)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        progress = train.Progress(run, elapsed_s=100.0)
        step = dict(ok=True, loss=3.0, ce=2.0, mse=1.0, grad_norm=0.5, n_ce=10, n_mse=20, tokens=300, flops=1)
        progress.add(step, 1.0)
        progress.add(dict(step, ok=False, loss=math.nan, ce=math.nan), 1.0)
        progress.add(dict(step, loss=5.0, ce=3.0, mse=2.0, grad_norm=1.5), 2.0)
        clock[0] += 60.0
        progress.report(3, 1e-3, 0.9, 1, dict(loss=4.5, ce=3.5, mse=1.0))
    finally:
        dist.destroy_process_group()
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert row == dict(step=3, time=1060.0, elapsed_s=160.0, lr=1e-3, loss=4.0, ce=2.5, mse=1.5, grad_norm=1.0,
                       n_ce=20, n_mse=40, tokens_per_s=900 / 4.0, s_per_step=20.0, skipped=1,
                       val_loss=4.5, val_ce=3.5, val_mse=1.0)  # no mfu and memory on a CPU
    assert lines == ["step 3/10 (30.0%) | loss 4.0000 | ce 2.5000 | mse 1.5000 | lr 1.00e-03 | grad 1.000 | 225 tok/s "
                     "| 20.00 s/step | 2m40s elapsed | ETA 2m20s | fill 90.0% | skipped 1",
                     "  validation (4 fixed packs) | loss 4.5000 | ce 3.5000 | mse 1.0000"]
    assert Image.open(tmp_path / "metrics.png").size == (800, 240 * 3)  # train.PLOT_SIZE, three panels
    assert [train.duration(s) for s in (45, 190, 7500)] == ["45s", "3m10s", "2h05m"]


WANDB_STUB = '''import json, os
def _write(call, **kw):
    with open(os.environ["WANDB_LOG"], "a") as f:
        f.write(json.dumps(dict(call=call, **kw)) + "\\n")
class util:
    generate_id = staticmethod(lambda: f"run{os.getpid()}")
class Image:
    def __init__(self, image, caption=None):
        self.size, self.caption = image.size, caption
def init(config, **kw):
    _write("init", config=sorted(config), **kw)
def log(row, step):
    _write("log", step=step, keys=sorted(row), images={k: [v.size, v.caption] for k, v in row.items() if isinstance(v, Image)})
def finish():
    _write("finish")
'''


def val_reference(export, packs=3):
    """Validation CE and MSE computed here: the exported weights on packs of a fresh loader of the val sources
    (seed 0, no condition dropout, one rank), per-token means over all packs."""
    bagel, vae, cfg = convert.load_checkpoint(str(export), ema=False)
    loader = data.Loader([data.Source("shapes", image_size=64, num_rows=50, seed=1)], data.tiny_tokenizer(), 256,
                         (0.0, 0.0, 0.0), max_latent_size=cfg.max_latent_size, vit_side=cfg.vit_max_patches_per_side)
    ce, mse = [], []
    with torch.no_grad():
        for _ in range(packs):
            out = bagel(train.encode_images(vae, [loader.next_pack()], torch.float32)[0])
            ce, mse = ce + [out["ce"]], mse + [out["mse"]]
    return torch.cat(ce).mean().item(), torch.cat(mse).mean().item()


def test_a_run_explains_itself(tmp_path):
    """A short run of configs/tiny.py (lr 0: the weights stay, so every validation must give the same numbers) and
    its resume: the console and train.log, config.json, metrics.jsonl rows with time and validation, the lines that
    say where each file went, the summary, wandb continuing the same run; a 2-process run validates alike."""
    out, stub = tmp_path / "run", tmp_path / "stub"
    stub.mkdir()
    (stub / "wandb.py").write_text(WANDB_STUB)
    env = {"PYTHONPATH": f"{stub}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "WANDB_LOG": str(tmp_path / "w")}
    args = ["train.py", "configs/tiny.py", f"--model_args={TINY}", "--packing_length=256", "--lr=0.0", "--lr_schedule=constant",
            "--warmup_steps=0", "--log_every=2", "--save_steps=2", "--sample_every=4",
            "--sample_settings={'num_timesteps':3,'cfg_text_scale':2.0}",
            f"--val_sources={VAL}", "--val_packs=3", "--eval_every=2", "--wandb_project=p", "--wandb_mode=offline",
            f"--out_dir={out}"]
    proc = python(*args, "--max_steps=4", env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    console = proc.stdout.splitlines()
    assert console[0].endswith(" ".join(["python", *args, "--max_steps=4"]))
    assert (out / "train.log").read_text() == proc.stdout + proc.stderr
    assert json.loads((out / "config.json").read_text()) == json.loads(json.dumps(train.load_config(
        args[1:] + ["--max_steps=4"])))
    progress = [line for line in console if line.startswith("step ")]
    assert [line.split(" | ")[0] for line in progress] == ["step 1/4 (25.0%)", "step 2/4 (50.0%)", "step 4/4 (100.0%)"]
    assert all(re.search(r"\| [\d.]+ s/step \| \d+s elapsed \| ETA \d+s \|", line) and "mfu" not in line and
               "GiB" not in line for line in progress)
    for line in (f"checkpoint: {out}/checkpoints/step_0000002", f"samples: {out}/samples/step_000004.png",
                 f"checkpoint: {out}/checkpoints/step_0000004"):
        assert line in console
    assert any(line.startswith(f"export: {out}/export (") and "ema.safetensors" in line for line in console)
    assert console[-1] == f'next: python sample.py --ckpt {out}/export --size 64 --prompts "a red circle" "a blue ' \
                          f'square" "a green triangle above a yellow circle" --out {out}/sample.png'
    assert any(line.startswith("done: 4 steps") for line in console)

    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert rows[0]["time"] < rows[1]["time"] < rows[2]["time"] and 0 < rows[0]["elapsed_s"] < rows[2]["elapsed_s"]
    assert all("mfu" not in r and "mem_gib" not in r for r in rows)
    assert "val_ce" not in rows[0] and rows[1]["val_ce"] == rows[2]["val_ce"] and rows[1]["val_mse"] == rows[2]["val_mse"]
    ce, mse = val_reference(out / "export")
    assert rows[2]["val_ce"] == pytest.approx(ce, rel=1e-5) and rows[2]["val_mse"] == pytest.approx(mse, rel=1e-5)
    assert rows[2]["val_loss"] == pytest.approx(rows[2]["val_ce"] + rows[2]["val_mse"], rel=1e-12)
    assert Image.open(out / "metrics.png").size == (800, 240 * 3)
    grid = Image.open(out / "samples/step_000004.png")
    assert grid.width == 3 * 256 + 2 * 4  # captioned, 64 px made 256
    bagel, vae, _ = sample.load(str(out / "export"), "model")  # lr 0: the weights the grid was drawn with
    want = sample.sample_grid(bagel, vae, data.tiny_tokenizer(), PROMPTS, image_size=(64, 64),
                              seed=train.DEFAULTS["seed"], captioned=True, num_timesteps=3, cfg_text_scale=2.0)
    assert np.abs(np.asarray(grid, dtype=int) - np.asarray(want, dtype=int)).max() <= 1  # sample_settings used

    proc = python(*args, "--max_steps=6", env=env)  # resume
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 4, 6] and rows[3]["elapsed_s"] > rows[2]["elapsed_s"]
    assert rows[3]["val_ce"] == rows[2]["val_ce"]
    assert (out / "train.log").read_text().count("python train.py configs/tiny.py") == 2
    calls = [json.loads(line) for line in open(tmp_path / "w")]
    inits = [c for c in calls if c["call"] == "init"]
    assert len(inits) == 2 and inits[0]["id"] == inits[1]["id"] == (out / "wandb_id").read_text()
    assert all(c["resume"] == "allow" and c["mode"] == "offline" and c["name"] == "run" and c["project"] == "p" and
               c["config"] == sorted(train.DEFAULTS) for c in inits)
    logged = {c["step"]: c for c in calls if c["call"] == "log" and "val_ce" in c["keys"]}
    assert sorted(logged) == [2, 4, 6] and "elapsed_s" in logged[6]["keys"]
    images = [c["images"]["samples"] for c in calls if c["call"] == "log" and c["images"]]
    assert images == [[[3 * 256 + 2 * 4, 256 + 4 + 18], "a red circle | a blue square | a green triangle above a "
                       "yellow circle"]]  # step 4's grid (one caption line of 18 px)
    assert [c["call"] for c in calls].count("finish") == 2

    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           *args[:-3], "--max_steps=1", "--sample_every=0", f"--out_dir={two}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = [json.loads(line) for line in open(two / "metrics.jsonl")]
    assert row["val_ce"] == pytest.approx(ce, rel=1e-5) and row["val_mse"] == pytest.approx(mse, rel=1e-5)
    assert proc.stdout.count("done: 1 steps") == 1  # rank 0 alone speaks


# ----------------------------------------------------------------------------------------------
# Plot and sample grids

def test_plot_draws_each_series_where_its_values_are(tmp_path, capsys):
    """ce at 2 and val_ce at 1 span the loss panel's log axis: ce's colour lies on its top edge, val_ce's on its
    bottom; tokens/s 100 then 200 on a linear axis from 0: the line rises from the middle to the top. A step logged
    twice (a resume) keeps its last row."""
    rows = [dict(step=s, ce=2.0, mse=1.5, lr=1e-3, tokens_per_s=100.0 if s <= 5 else 200.0) for s in range(1, 11)]
    rows[4].update(val_ce=1.0)
    rows[9].update(val_ce=1.0)
    rows.append(dict(rows[9], tokens_per_s=200.0))
    rows.insert(3, dict(rows[3], ce=50.0))  # step 4 logged before a crash, then again
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train.main([f"--plot={tmp_path}"])
    assert capsys.readouterr().out == f"wrote {tmp_path / 'metrics.png'}\n"
    pixels = np.asarray(Image.open(tmp_path / "metrics.png").convert("RGB"))
    (width, height), (left, right, top, bottom) = train.PLOT_SIZE, train.PLOT_MARGINS
    (_, ce), (_, mse), (_, val_ce), _ = train.PLOT_PANELS[0][1]
    bottom = height - bottom
    rows_of = lambda colour, y0, y1: sorted({int(y) for y in np.nonzero((pixels[y0:y1] == colour).all(-1))[0] + y0})
    assert set(rows_of(ce, top + 2, bottom + 2)) <= {top - 1, top, top + 1}  # never up at 50
    assert set(rows_of(val_ce, top + 2, bottom + 2)) <= {bottom - 1, bottom, bottom + 1}
    tok = train.PLOT_PANELS[1][1][0][1]
    y0, y1 = height + top, height + bottom
    at_left = np.nonzero((pixels[y0:y1 + 2, left + 5] == tok).all(-1))[0] + y0
    at_right = np.nonzero((pixels[y0:y1 + 2, width - right - 5] == tok).all(-1))[0] + y0
    assert abs(at_left.mean() - (y0 + y1) / 2) <= 1.5 and abs(at_right.mean() - y0) <= 1.5


def test_captioned_grid_enlarges_small_images_and_writes_prompts():
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (64, 64, 3), dtype=np.uint8)) for i in range(3)]
    captions = ["a red circle", "a blue square", "a green triangle above a yellow circle on a black background"]
    grid = np.asarray(sample.make_grid(images, captions=captions, min_side=200))  # 64 px x 4 = 256 >= 200
    assert grid.shape[1] == 3 * 256 + 2 * 4
    for i, im in enumerate(images):
        x = i * (256 + 4)
        assert np.array_equal(grid[:256, x:x + 256], np.asarray(im).repeat(4, 0).repeat(4, 1))
        text = grid[260:, x:x + 256]
        assert (text == 255).all(-1).sum() > 20 and not (text[:, :, 0] != text[:, :, 1]).any()  # white on black
    lines = lambda x: np.nonzero((grid[260:, x:x + 256] == 255).all(-1).any(1))[0]
    assert lines(2 * 260).max() > lines(0).max() + 10  # the long prompt wraps onto a second line
    assert sample.make_grid(images).size == (192, 64)  # plain: side by side, as they are


# ----------------------------------------------------------------------------------------------
# The tiny demo's measure (conftest.drawing_report): the dataset's own drawing passes, a wrong one does not

PROMPTS = ["a red circle", "a blue square", "a green triangle above a yellow circle"]


@pytest.mark.parametrize("prompt", PROMPTS + ["a white square left of a purple triangle"])
def test_the_demo_measure_passes_the_dataset_drawing_and_fails_wrong_ones(prompt):
    scene = prompt_scene(prompt)
    truth = data.draw_shapes(scene, 64)
    report = drawing_report(truth, prompt)
    assert report["hue"] == 1.0 and all(r["iou"] == 1.0 and r["area"] == 1.0 and r["offset"] < 1e-6
                                        for k, r in report.items() if k != "hue")
    ae = M.PooledAE(M.bagel_tiny(vae_kind="pooled"))  # configs/tiny.py's AE: the best its model can draw
    pixels = torch.tensor(np.asarray(truth), dtype=torch.float32).permute(2, 0, 1)[None] / 127.5 - 1
    decoded = ((ae.decode(ae.encode(pixels)) + 1) * 127.5).round().clamp(0, 255)[0].permute(1, 2, 0).byte().numpy()
    assert draws_prompt(drawing_report(Image.fromarray(decoded), prompt))
    assert draws_prompt(drawing_report(truth.resize((256, 256), Image.NEAREST), prompt))  # a grid's enlarged cell
    other = {"circle": "square", "square": "triangle", "triangle": "circle"}
    wrong = {
        "colour": [(s, "blue" if c == "red" else "red", p) for s, c, p in scene],
        "shape": [(other[s], c, p) for s, c, p in scene],
        "place": [(s, c, (x + 0.14, y)) for s, c, (x, y) in scene],
        "missing": scene[:1] if len(scene) == 2 else [],
        "swapped": [(s, c, p) for (s, c, _), (*_, p) in zip(scene, scene[::-1])] if len(scene) == 2 else [],
    }
    for what, drawn in wrong.items():
        image = data.draw_shapes(drawn, 64)
        assert not draws_prompt(drawing_report(image, prompt)), what
    smear = truth.filter(ImageFilter.GaussianBlur(8))  # colour where it should be, no shape
    assert not draws_prompt(drawing_report(smear, prompt))
