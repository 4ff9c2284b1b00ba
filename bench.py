"""Benchmarks on a GPU: train.py's own training step, and the NSA kernels.

    python bench.py                                    # the step: real width, 4 MoT layers, one 16k pack (1 GPU)
    python bench.py --activation_checkpointing=True    # any train.py key can be given
    torchrun --nproc_per_node=2 bench.py               # FSDP2 over 2 GPUs (one pack per GPU)
    python bench.py nsa check|layer|init|bench|breakdown|sweep [N] [KERNELS]   # NSA (nsa.py) on one GPU
    python bench.py memory                             # the full 7B's memory per GPU, by formula (README's table)

Options of the step benchmark (besides any train.py key: python train.py --help):
    --data=synthetic          the fixed pack below (default); real: configs/sft.py's mixture of generated photos in
                              the official formats, through data.Loader; real:t2i, real:edit, real:vlm: one of them;
                              long:N: one interleaved sample of N positions; several, comma-separated
                              (synthetic,real,real:vlm): timed one after the other on one model, MFU against the
                              first
    --steps=12                measured steps, after --warmup=3 warm-up steps (steps in which dynamo compiles are
                              left out of the times, and counted)
    --rows=200                rows per generated dataset (--data=real*), written once to $BENCH_DATA
                              (default /tmp/nanobagel_bench_data)
    --device=cpu              run on the CPU anyway, with a small model unless told otherwise: --model=tiny
                              --compile=False --model_args="{'attn_backend':'sdpa'}" --packing_length=4096
    BENCH_PROFILE=N           environment: also print torch.profiler's top N ops of two more steps
    BENCH_TRACE=FILE.json.gz  environment: with BENCH_PROFILE, write those two steps' timeline (chrome://tracing)
                              to FILE.KIND.json.gz
    BENCH_PEAK=N              environment: record one more step's allocations and print what is live at its peak,
                              by allocating line (the top N sites); not with activation checkpointing (pytorch#179536)

The step's pack: 3 text-to-image samples (60 caption ids + 2 wrappers, then a 512x512 target: 1,024 latent tokens + 2
markers) and chat samples (128-token question without loss, answer with CE) filling the rest. bf16 compute, fp32
master weights and AdamW state (FSDP2), the frozen VAE encoding included.
NSA, BAGEL's heads (28 query / 4 KV, head dim 128): check = bf16 kernels against the fp32 torch reference (and no host
sync in a layer); layer = one real-width decoder layer (both experts) on 32768 (or N) positions of the model's mixed
spans in several samples, bf16 with the kernels against fp32 with the reference: output and every gradient; init =
step-0 closeness to dense attention; bench = fwd+bwd against dense causal SDPA at 4k..64k;
breakdown = GPU time per kernel launch at 16k and 64k (or N); sweep = launch shapes (SWEEP) at N.
"""
import copy
import dataclasses
import io
import json
import os
import re
import statistics
import sys
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import data
import train
import model as M
from model import Rotary, span_layout

try:
    import nsa  # Triton: only `bench.py nsa ...` needs it
except ImportError:
    nsa = None

BENCH = dict(model="7b", model_args={"num_layers": 4, "attn_backend": "flex"}, packing_length=16384,
             ema=0.0, warmup_steps=0, lr=1e-5, compile=True, log_every=1)
CPU_BENCH = dict(model="tiny", compile=False, model_args={"attn_backend": "sdpa"}, packing_length=4096)  # --device=cpu


def photo(rng, w, h):
    """JPEG bytes of a photo-like picture: smooth colour fields (a coarse random grid, upsampled), a light gradient
    and sensor noise, so that it decodes and compresses like a photo."""
    coarse = Image.fromarray(rng.integers(0, 256, (max(2, h // 96), max(2, w // 96), 3), dtype=np.uint8))
    x = np.asarray(coarse.resize((w, h), Image.BICUBIC), dtype=np.float32)
    x += np.linspace(-30, 30, w, dtype=np.float32)[None, :, None] + rng.normal(0, 6, (h, w, 3)).astype(np.float32)
    buf = io.BytesIO()
    Image.fromarray(x.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_real_data(folder, rows, seed=0):
    """configs/sft.py's mixture in its official formats, from generated photos of 512-1280 px: a T2I parquet (image
    bytes, captions), an edit parquet (3-image rows, instructions) and a LLaVA jsonl (1-2 images on disk, a question,
    answers of 40-200 words). Returns the sources (weights 1:1:1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rng = np.random.default_rng(seed)
    size = lambda: (int(rng.integers(512, 1281)), int(rng.integers(512, 1281)))
    text = lambda n: " ".join(rng.choice(["a", "red", "house", "near", "the", "river", "with", "two", "trees", "under",
                                          "blue", "sky", "and", "people", "walking", "slowly"], n))
    os.makedirs(os.path.join(folder, "images"), exist_ok=True)
    if not os.path.exists(os.path.join(folder, "done")):
        pq.write_table(pa.table({"image": [photo(rng, *size()) for _ in range(rows)],
                                 "captions": [json.dumps({"short": text(12), "long": text(60)}) for _ in range(rows)]}),
                       os.path.join(folder, "t2i.parquet"), row_group_size=50)
        pq.write_table(pa.table({"image_list": [[photo(rng, *size()) for _ in range(3)] for _ in range(rows)],
                                 "instruction_list": [[[text(10)], [text(10)]] for _ in range(rows)]}),
                       os.path.join(folder, "edit.parquet"), row_group_size=50)
        with open(os.path.join(folder, "vlm.jsonl"), "w") as f:
            for r in range(rows):
                names = [f"{r}_{k}.jpg" for k in range(1 + r % 2)]
                for name in names:
                    with open(os.path.join(folder, "images", name), "wb") as img:
                        img.write(photo(rng, *size()))
                question = "<image>\n" * len(names) + text(20) + "?"
                f.write(json.dumps({"image": names, "conversations": [
                    {"from": "human", "value": question}, {"from": "gpt", "value": text(int(rng.integers(40, 201)))}]})
                        + "\n")
        open(os.path.join(folder, "done"), "w").close()
    return [{"path": os.path.join(folder, "t2i.parquet"), "format": "t2i"},
            {"path": os.path.join(folder, "edit.parquet"), "format": "edit"},
            {"path": os.path.join(folder, "vlm.jsonl"), "format": "vlm", "data_folder": os.path.join(folder, "images")}]


def bench_samples(tokenizer, length, g):
    """The step's synthetic samples (the module docstring): 3 text-to-image samples, then chat samples filling
    `length` positions; random draws from the generator g."""
    ids = lambda n: torch.randint(10, tokenizer.vocab_size, (n,), generator=g).tolist()
    text = lambda n, loss: {"type": "text", "ids": ids(n), "loss": loss, "special_token_loss": False,
                            "special_token_label": None}
    samples = []
    for _ in range(3):  # 62 + 1026 positions each
        target = {"type": "vae_image", "pixels": torch.rand(3, 512, 512, generator=g) * 2 - 1, "latent": None,
                  "loss": True, "timestep_raw": float(torch.randn(1, generator=g)),
                  "noise": torch.randn(16, 64, 64, generator=g), "posterior_eps": torch.randn(16, 64, 64, generator=g)}
        samples.append([text(60, False), target])
    left = length - 3 * 1088
    while left > 0:  # chat: 130 + answer
        answer = min(380, left - 130 - 2)
        if answer < 8:
            break
        samples.append([text(128, False), text(answer, True)])
        left -= 130 + answer + 2
    return samples


def bench_pack(tokenizer, length, seed):
    return data.pack_samples(bench_samples(tokenizer, length, torch.Generator().manual_seed(seed)), tokenizer.special)


class Phases:
    """GPU time per phase of train_step (VAE encode, ViT, forward, backward, optimizer), from CUDA events around the
    functions train_step calls; and the activation memory a forward leaves for its backward (memory allocated after
    minus before), in all, per decoder layer but the last (between the embedding's end and the last layer's start,
    before FSDP gathers its weights), and in the last, which train.py never checkpoints (to the final norm)."""

    def __init__(self, run):
        self.events, self.memory, self.num_layers = [], {}, len(run.model.layers)
        train.encode_images = self.timed("encode", train.encode_images)
        run.model.vit.forward = self.timed("vit", run.model.vit.forward)
        run.model.forward = self.timed("forward", run.model.forward, memory="activations")
        run.model.embed = self.timed(None, run.model.embed, memory="embedded")
        run.model.norm_und.register_forward_pre_hook(lambda *_: self.memory.update(
            layers=torch.cuda.memory_allocated() / 2**30) if torch.is_grad_enabled() else None)
        memory = self.memory

        class MeasuredLayers(type(run.model.layers)):  # eager, unlike a hook inside a compiled layer
            def __iter__(self):  # Bagel.forward's loop: the memory once every layer but the last has run
                *first, last = super().__iter__()
                yield from first
                if torch.is_grad_enabled():
                    memory["last layer"] = torch.cuda.memory_allocated() / 2**30
                yield last
        run.model.layers.__class__ = MeasuredLayers
        run.opt.step = self.timed("optimizer", run.opt.step)
        torch.autograd.backward = self.timed("backward", torch.autograd.backward)

    def timed(self, name, fn, memory=None):
        def wrapper(*args, **kwargs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            before = torch.cuda.memory_allocated()
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            if memory and torch.is_grad_enabled():
                self.memory[memory] = (torch.cuda.memory_allocated() - before) / 2**30
                self.memory[memory + " end"] = torch.cuda.memory_allocated() / 2**30
            if name:
                self.events.append((name, start, end))
            return out
        return wrapper

    def take(self):
        """{phase: ms} of the steps since the last call (call after a synchronize)."""
        ms = {}
        for name, start, end in self.events:
            ms[name] = ms.get(name, 0.0) + start.elapsed_time(end)
        self.events = []
        ms["forward"] = ms.get("forward", 0.0) - ms.get("vit", 0.0)  # the ViT runs inside the forward
        return ms


def step_main(argv):
    """--data=synthetic (the fixed pack above), real (configs/sft.py's mixture of generated photos through data.Loader)
    or real:t2i / real:edit / real:vlm (one kind), long:N (one interleaved sample of N positions, long_pack), or
    several, comma-separated, timed one after the other on the same model (then the MFU of each against the first);
    --steps=N measured steps after --warmup=3; any train.py key."""
    options, given = {"data": "synthetic", "steps": "12", "warmup": "3", "rows": "200"}, {}
    for arg in argv:  # the same --key=value overrides as train.py, and the bench's own options
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r} (python bench.py --help)")
        key, value = arg[2:].split("=", 1)
        if key in options:
            options[key] = value
        else:
            given[key] = value
    on_cpu = train.literal(given.get("device", "''")) == "cpu"
    base = {**BENCH, **CPU_BENCH} if on_cpu else BENCH  # BAGEL's width would not fit most machines' memory
    config = {**train.DEFAULTS, **base}
    for key, value in given.items():
        train.set_key(config, key, train.literal(value), "command line")
    config["model_args"] = {**base["model_args"], **config["model_args"]}
    if config["device"] != "cpu" and not torch.cuda.is_available():  # before building BAGEL's width (~27 GB)
        raise SystemExit("bench.py needs a CUDA GPU (--device=cpu runs it on the CPU, with a small model: --help)")
    kinds = list(dict.fromkeys(options["data"].split(",")))  # each kind once, in the order given
    known = re.compile(r"synthetic|real(:t2i|:edit|:vlm)?|long:\d+")
    if not all(known.fullmatch(k) for k in kinds):  # before any kind is timed
        raise SystemExit(f"--data: synthetic, real, real:t2i, real:edit, real:vlm or long:N, got {options['data']!r}")
    real = [k for k in kinds if k.startswith("real")]
    short = [k for k in kinds if k.startswith("long:") and int(k[5:]) < LONG_MIN]
    if short:
        raise SystemExit(f"--data: {short[0]} is too short: a long sample holds its noised 1024 px target and some "
                         f"text, {LONG_MIN} positions at least")
    if int(os.environ.get("BENCH_PEAK") or 0) and config["activation_checkpointing"] != "none":
        # torch 2.11+ (pytorch#179536): with allocations recorded, the backward of checkpointed layers that call
        # compiled code dies ("run_backward returned NULL"); the flex and the NSA step both did on the H100
        raise SystemExit("BENCH_PEAK: torch's allocation recorder breaks the checkpointed backward (pytorch#179536); "
                         "record with --activation_checkpointing=none")
    if real:  # every kind's sources; time_steps gives each real kind its own
        config["sources"] = write_real_data(os.environ.get("BENCH_DATA", "/tmp/nanobagel_bench_data"),
                                            int(options["rows"]))
    train.check_config(config)  # the values train.py would refuse, before the model is built
    if config["device"] != "cpu":  # a GPU, as checked above
        start_compile_workers()
    run = train.build(config)
    phases = Phases(run) if run.device.type == "cuda" else None
    mfu = {kind: time_steps(run, config, kind, int(options["steps"]), phases, int(options["warmup"]))
           for kind in kinds}
    if len(kinds) > 1 and mfu[kinds[0]]:  # (no MFU on a CPU)
        run.log(f"MFU against {kinds[0]}: " + ", ".join(f"{k} {mfu[k] / mfu[kinds[0]]:.2f}x" for k in kinds[1:]))
    torch.distributed.destroy_process_group()


def start_compile_workers():
    """Start inductor's compile workers (a process a core) now, while the model is built. Left to the first compile,
    they start during the timed steps when the cache holds every kernel, and their start-up slows the host that
    launches the step: the 16k eager step took 460-503 ms instead of 361-390 (H100, 16 cores)."""
    from torch._inductor.async_compile import AsyncCompile, maybe_warm_pool
    maybe_warm_pool()
    AsyncCompile.wait_pool_ready()


def time_steps(run, config, kind, steps, phases, warmup):
    """Time `steps` train_steps on `kind`'s packs after `warmup`; log each step, the phases and the RESULT line;
    return the honest MFU."""
    if not kind.startswith("real"):
        tokenizer = run.tokenizer if run.tokenizer.vocab_size > 1000 else BigVocab(run)
        pack = bench_pack(tokenizer, config["packing_length"], seed=run.rank) if kind == "synthetic" else \
            long_pack(tokenizer, int(kind.split(":")[1]), seed=run.rank)
        next_pack = lambda: pack
        run.log(f"pack: {pack.num_tokens} tokens, {len(pack.sample_lens)} samples, {pack.ce_indexes.numel()} CE, "
                f"{pack.mse_indexes.numel()} MSE")
        loader = None
    else:
        sources = [s for s in run.config["sources"] if kind == "real" or s["format"] == kind.split(":")[1]]
        loader = train.make_loader(dataclasses.replace(run, config={**run.config, "sources": sources}), config["seed"])
        next_pack = loader.next_pack
    peak = train.peak_flops(run.device, config["peak_tflops"])
    feed = train.Feed(run, next_pack, 1)
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    times, phase_ms, prepare_ms, step_tokens, step_flops, compiled, peaks = [], [], [], [], [], [], []
    for i in range(warmup + steps):
        sync(run)
        graphs_before = graphs()
        if run.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.time()
        packs, _ = feed.take()
        r = train.train_step(run, packs, config["lr"], prepare_next=feed.prepare)
        sync(run)
        times.append(time.time() - t0)
        compiled.append(graphs() > graphs_before)
        phase_ms.append({"data": feed.data_s * 1000, **(phases.take() if phases else {})})
        prepare_ms.append(feed.host_s * 1000)
        peaks.append(torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else 0.0)
        step_tokens.append(r["tokens"])
        step_flops.append(r["flops"])
        p = packs[0]  # what the pack holds, for the peak memory of each kind of pack
        run.log(f"step {i}: {times[-1] * 1000:.0f} ms (data {feed.data_s * 1000:.0f}, the next packs' prepare on the "
                f"host {feed.host_s * 1000:.0f}, their encode on the GPU {phase_ms[-1].get('encode', 0):.0f}), "
                f"{r['tokens']} tokens "
                f"({p.vit_patches.shape[0]} ViT patches, {p.vae_indexes.numel()} latent, {p.ce_indexes.numel()} CE), "
                f"loss {r['loss']:.4f}, peak {peaks[-1]:.1f} GiB")
    if os.environ.get("BENCH_PROFILE"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                train.train_step(run, feed.take()[0], config["lr"], prepare_next=feed.prepare)
            sync(run)
        run.log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=int(os.environ["BENCH_PROFILE"]),
                                          max_name_column_width=80))
        if os.environ.get("BENCH_TRACE"):  # one file a kind: NAME.KIND.json.gz
            prof.export_chrome_trace(re.sub(r"(\.json(\.gz)?)?$", "." + kind.replace(":", "_") + r"\1",
                                            os.environ["BENCH_TRACE"], count=1))
        if phases:
            phases.take()  # the profiled steps' events, not the next kind's
    if int(os.environ.get("BENCH_PEAK") or 0) and run.device.type == "cuda":
        before = torch.cuda.memory_allocated()
        torch.cuda.memory._record_memory_history(stacks="python")
        train.train_step(run, feed.take()[0], config["lr"], prepare_next=feed.prepare)
        sync(run)
        trace = torch.cuda.memory._snapshot()["device_traces"][run.device.index or 0]
        torch.cuda.memory._record_memory_history(enabled=None)
        peak, last, sites = peak_sites(trace, before, int(os.environ["BENCH_PEAK"]))
        run.log(f"peak {peak / 2**30:.2f} GiB, reached allocating at {last}; live then: " +
                "; ".join(f"{size / 2**30:.2f} GiB {where}" for size, where in sites))
    if loader:
        loader.close()  # its workers, before the next kind is timed
    # a step in which dynamo compiled (a new kind of pack for the compiled layers: real packs vary) tells nothing of
    # the steady speed: it is left out of the timing, on every rank if any rank compiled in it, and counted
    compiled_anywhere = train.all_sum([float(c) for c in compiled], run.device)
    timed = [i for i in range(warmup, warmup + steps) if not compiled_anywhere[i]] or \
        list(range(warmup, warmup + steps))
    recompiled = sum(1 for i in range(warmup, warmup + steps) if compiled_anywhere[i])
    timed_times = [times[i] for i in timed]
    dt = sum(timed_times)
    mean = lambda xs: sum(xs) / len(xs)
    per_phase = {k: mean([phase_ms[i].get(k, 0.0) for i in timed]) for k in phase_ms[-1]}
    tokens, flops = train.all_sum([sum(step_tokens[i] for i in timed), sum(step_flops[i] for i in timed)],
                                  run.device)
    mem, mfu = max(peaks), flops / dt / run.world / peak if peak else 0.0
    if phases:
        m = phases.memory
        per_layer = (m["last layer"] - m["embedded end"]) / max(phases.num_layers - 1, 1)
        act = layer_activation_bytes(run.model_cfg)
        counted = act[config["activation_checkpointing"]] * config["packing_length"] / 2 ** 30
        # the step's time in none of the main stream's phases: host gaps, and the wait for the side stream's encode
        outside = dt / len(timed) * 1000 - sum(v for k, v in per_phase.items() if k != "encode")
        run.log("phases (ms per step, mean): " + ", ".join(f"{k} {v:.1f}" for k, v in per_phase.items()) +
                f", outside them {outside:.1f} (encode: beside, on a side stream; the next packs' prepare on the host "
                f"{mean([prepare_ms[i] for i in timed]):.1f}) | activations after forward "
                f"{m['activations']:.2f} GiB, per decoder layer {per_layer:.3f} GiB, "
                f"the last (its gathered weights too) {m['layers'] - m['last layer']:.3f} GiB "
                f"(memory_gib's eager count: {counted:.3f} GiB at a full pack)")
    if run.latent_cache:
        run.log(f"latent cache: {run.latent_cache.hits} hits, {run.latent_cache.misses} misses")
    run.log(f"RESULT {kind} | world {run.world} | ac {config['activation_checkpointing']} | "
            f"compile {config['compile']} | "
            f"{tokens / dt:,.0f} tok/s ({tokens / dt / run.world:,.0f} per GPU) | step {dt / len(timed) * 1000:.0f} ms "
            f"(median {statistics.median(timed_times) * 1000:.0f}, min {min(timed_times) * 1000:.0f}, max "
            f"{max(timed_times) * 1000:.0f}; {recompiled} of {steps} compiled"
            f"{', left out' if len(timed) < steps else ''}) | "
            f"{flops / dt / run.world / 1e12:.0f} TFLOP/s per GPU | MFU {mfu:.3f} | "
            f"peak mem {mem:.1f} GiB | first step (compiles) {times[0]:.0f} s")
    if phases and kind == "synthetic" and config["checkpoint_every"] == 1 and not config["lora_targets"]:
        predicted = memory_gib(run.model_cfg, act, run.world, config["packing_length"],
                               config["activation_checkpointing"], config["ema"] > 0)
        run.log(f"memory_gib predicts {predicted:.1f} GiB peak (measured {mem:.1f})")
    return mfu


def sync(run):
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


def peak_sites(trace, before, top):
    """Replay a CUDA allocator trace (torch.cuda.memory._snapshot()'s device_traces entry) from `before` bytes
    allocated -> (the peak in bytes, the site of the allocation that reached it, the `top` sites of what is live at
    the peak as [(bytes, site)]). A site is the allocating call's two innermost frames in this repository (else its
    innermost frame); what was allocated before the recording is one site of its own."""
    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    freed = "free_completed" if any(e["action"] == "free_completed" for e in trace) else "free_requested"

    def site(frames):
        ours = [f for f in frames if f["filename"].startswith(here)][:2] or frames[:1]
        return " < ".join(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in ours) or \
            "(no Python frame: autograd's engine)"
    now, peak, peak_at = before, before, -1
    for i, e in enumerate(trace):  # first pass: where the peak is
        now += e["size"] if e["action"] == "alloc" else -e["size"] if e["action"] == freed else 0
        if now > peak:
            peak, peak_at = now, i
    live = {}
    for e in trace[:peak_at + 1]:  # second pass: what is live there
        if e["action"] == "alloc":
            live[e["addr"]] = (e["size"], site(e.get("frames", [])))
        elif e["action"] == freed:
            live.pop(e["addr"], None)
    by_site = {"(allocated before the recording)": peak - sum(size for size, _ in live.values())}
    for size, where in live.values():
        by_site[where] = by_site.get(where, 0) + size
    last = site(trace[peak_at].get("frames", [])) if peak_at >= 0 else "(before the recording)"
    return peak, last, sorted(((b, w) for w, b in by_site.items()), reverse=True)[:top]


def long_sample(tokenizer, length, g):
    """One interleaved sample of `length` positions: text of 1,500 ids, a 980 px image as ViT tokens and a 1024 px
    image as clean VAE latents, repeated, then a noised 1024 px target, and text to the end (NSA's case: long
    samples whose images are full spans and whose target is a noise span). Its items; draws from g."""
    ids = lambda n: torch.randint(10, tokenizer.vocab_size, (n,), generator=g).tolist()
    text = lambda n, loss: {"type": "text", "ids": ids(n), "loss": loss, "special_token_loss": False,
                            "special_token_label": None}
    vae = lambda loss: {"type": "vae_image", "pixels": torch.randint(0, 256, (3, 1024, 1024), generator=g,
                                                                     dtype=torch.uint8), "latent": None, "loss": loss}
    vit = {"type": "vit_image", "pixels": torch.randint(0, 256, (3, 980, 980), generator=g, dtype=torch.uint8)}
    items, left = [], length - LONG_TARGET
    while left > 1502 + 4902 + 4098 + 1000:
        items += [text(1500, True), dict(vit), vae(False)]
        left -= 1502 + 4902 + 4098
    items += [vae(True), text(left - 2, True)]
    return items


LONG_TARGET = 4098 + 8  # the noised target's 4,096 latents and 2 markers, and 8 positions to spare
LONG_MIN = LONG_TARGET + 3  # and a text of one id with its two wrappers


def long_pack(tokenizer, length, seed):
    g = torch.Generator().manual_seed(seed)
    return data.pack_samples([long_sample(tokenizer, length, g)], tokenizer.special, generator=g)


class BigVocab:
    """The built-in tokenizer's special ids with the model's full vocabulary for random text ids."""
    def __init__(self, run):
        self.special, self.vocab_size = run.tokenizer.special, run.model_cfg.vocab_size


# ----------------------------------------------------------------------------------------------
# NSA

def _rope(t, pos):
    """Qwen2's RoPE (theta 1e6), as the model applies it."""
    return Rotary(t.shape[-1], 1e6, pos, t.dtype)(t)


def _inputs(N, H=28, KH=4, D=128, hidden=3584, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(N, hidden, device="cuda", generator=g, dtype=dtype)
    q, k, v = (torch.randn(N, h, D, device="cuda", generator=g, dtype=dtype) for h in (H, KH, KH))
    return x, q, k, v


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CHECKS = [  # (sample lens, span lens, span modes, NSA pattern): the packs and patterns `nsa check` runs
    ([1500, 700], [300, 256, 200, 400, 344, 100, 256, 344],
     ["causal", "full", "causal", "noise", "causal", "causal", "full", "causal"], {}),
    # a long sample beside many short ones (shorter than the kernel, the block, one and two blocks), spans of all kinds
    ([2600, 5, 17, 31, 33, 64, 65, 100, 700], [600, 1024, 976, 5, 17, 31, 33, 64, 65, 100, 62, 512, 126],
     ["causal", "noise", "causal", "causal", "full", "causal", "noise", "causal", "causal", "causal", "causal", "full",
      "causal"], dict(compress_type="avgpool")),
    # another config: smaller blocks and kernels, more init and fewer local blocks, a short window, linear compression
    ([2500, 1200], [900, 600, 1000, 1200], ["causal", "full", "causal", "causal"],
     dict(block_size=32, kernel_size=16, kernel_stride=8, topk=8, init_blocks=2, local_blocks=1, window_size=128,
          compress_type="linear")),
]


def _compare(name, pairs):
    """Print the relative error of each (label, kernels' result, reference) and return the worst."""
    worst = 0.0
    for label, tri, ref in pairs:
        err = _rel(tri, ref)
        worst = max(worst, err)
        print(f"check {name:10s} bf16 triton vs fp32 reference  {label:24s} rel err {err:.2e}")
    return worst


@torch.no_grad()
def _trained_like(m, generator=None):
    """Trained-looking NSA parameters (weightedpool) rather than the near-dense init: selection is score-driven and
    every branch counts."""
    m.compress_key.normal_(1 / m.pattern["kernel_size"], 0.02, generator=generator)
    m.compress_value.normal_(1 / m.pattern["kernel_size"], 0.02, generator=generator)
    m.intra_block_pe.normal_(0, 0.1, generator=generator)
    m.gate.weight.normal_(0, 0.05, generator=generator)


def _check_module(sample_lens, span_lens, modes, pattern):
    """The whole module (compression kernels, RoPE, gate projection, attention) in bf16 against the torch backend
    in fp32 on the same inputs: outputs and every gradient."""
    H, KH, D = 28, 4, 128
    torch.manual_seed(0)
    layout = span_layout(sample_lens, span_lens, modes, device="cuda")
    x, q, k, v = _inputs(sum(sample_lens), hidden=256)
    do = torch.randn_like(q)
    m = nsa.NSA(256, H, KH, D, **pattern).cuda()
    _trained_like(m)
    res = {}
    for backend, dtype in (("torch", torch.float32), ("triton", torch.bfloat16)):
        m.backend = backend
        m.zero_grad()
        leaves = [t.to(dtype).clone().requires_grad_() for t in (x, q, k, v)]
        mm = m.to(dtype)
        o = mm.attend(*leaves, layout, _rope)
        (o * do.to(dtype)).sum().backward()
        res[backend] = [("o", o)] + [("d" + n, t.grad) for n, t in zip("xqkv", leaves)] + \
                       [("d" + n, p.grad.clone()) for n, p in mm.named_parameters()]
    # with the pack's plan built, a layer's forward and backward never wait for the GPU: a host sync in every layer
    # would drain the launch queue at each one
    torch.cuda.set_sync_debug_mode("error")
    try:
        fresh = [t.detach().clone().requires_grad_() for t in leaves]  # the compared grads stay as they are
        (m.attend(*fresh, layout, _rope) * do.to(dtype)).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("check module   no host sync in forward and backward")
    return _compare("module", [(a, t, r) for (a, r), (_, t) in zip(res["torch"], res["triton"])])


def _check_op(case, sample_lens, span_lens, modes, pattern):
    """The attention op (three branches and the gated sum) in bf16 against nsa.nsa_reference in fp32 on the same bf16
    q, k, v, compressed keys/values and gates: outputs and the gradients of all six. Both sides see the same
    compressed keys, so that block selection does not flip on near-ties between bf16 and fp32 compression (the module
    check above, fed one rounding apart, flips a few queries' blocks on such packs)."""
    H, KH, D = 28, 4, 128
    pattern = nsa.NSA(1, H, KH, D, **pattern).pattern  # the module's defaults filled in
    layout = span_layout(sample_lens, span_lens, modes, device="cuda")
    N = sum(sample_lens)
    _, q, k, v = _inputs(N, hidden=16, seed=case)
    g = torch.Generator(device="cuda").manual_seed(case)
    w = torch.randn(KH, pattern["kernel_size"], device="cuda", generator=g) * 0.02 + 1 / pattern["kernel_size"]
    args = (layout.cu_seqlens, pattern["kernel_size"], pattern["kernel_stride"], "weightedpool")
    ck, cv = (nsa.compress(t.float(), w, *args).to(torch.bfloat16) for t in (k, v))
    gate = torch.rand(N, H, 3, device="cuda", generator=g).to(torch.bfloat16)
    do = torch.randn(q.shape, device="cuda", generator=g).to(torch.bfloat16)
    scale = D ** -0.5
    tri = [t.clone().requires_grad_() for t in (q, k, v, ck, cv, gate)]
    o_t = nsa._NSAAttention.apply(*tri, nsa.get_plan(layout, pattern), pattern, scale)
    o_t.backward(do)
    ref = [t.float().requires_grad_() for t in (q, k, v, ck, cv, gate)]
    branches = nsa.nsa_reference(*ref[:5], layout, pattern, scale)
    o_r = sum(ref[5][..., b:b + 1] * o for b, o in enumerate(branches))
    o_r.backward(do.float())
    return _compare(f"op {case}", [("o", o_t, o_r)] + [("d" + n, t.grad, r.grad) for n, t, r in
                                                        zip(("q", "k", "v", "ck", "cv", "gate"), tri, ref)])


def nsa_check():
    """bf16 kernels vs the fp32 torch reference: the whole module on CHECKS[0], the attention op on every pack and
    config of CHECKS."""
    worst = _check_module(*CHECKS[0])
    for case, spec in enumerate(CHECKS):
        worst = max(worst, _check_op(case, *spec))
        torch.cuda.empty_cache()
    assert worst < 3e-2, f"bf16 kernels disagree with the reference (worst rel err {worst:.2e})"
    print("check OK")


def layer_pack(tokenizer, length, seed=0):
    """`nsa layer`'s pack of up to `length` positions, the model's spans in several samples: long_sample's interleaved
    sample in the first half (text; a ViT image and clean latents, full spans; a noised target, a noise span), then
    bench_samples' text-to-image (a noise span each) and chat samples."""
    g = torch.Generator().manual_seed(seed)
    samples = [long_sample(tokenizer, length // 2, g)] + bench_samples(tokenizer, length - length // 2, g)
    return data.pack_samples(samples, tokenizer.special, generator=g)


def check_layer(cfg, pack, fast=("triton", torch.bfloat16), seed=0):
    """One decoder layer (model.DecoderLayer: both MoT experts, NSA attention) on `pack` as Bagel.forward runs it, with
    NSA's `fast` (backend, dtype) against its torch backend in fp32 (nsa_reference over chunks of query rows), from the
    same weights, input and output gradient: the output and the gradients of the input and of every parameter. The
    floor: the same layer in fast's dtype with the torch backend (attention computed exactly, in fp32), the error
    that dtype makes by itself in the projections and norms. Prints both errors; returns the worst excess of the
    kernels' error over twice the floor (at most 0 where the kernels add no more than the dtype already does)."""
    device = pack.position_ids.device
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.device(device):
        ref = M.DecoderLayer(cfg)
    with torch.no_grad():  # Bagel.init_weights' scale, but no norm at exactly 1 and no bias at 0: all of them count
        for name, p in ref.named_parameters():
            mean, std = (1.0, 0.1) if "norm" in name else (0.0, 0.02)
            p.normal_(mean, std, generator=g)
    _trained_like(ref.attn, g)
    x = torch.randn(pack.num_tokens, cfg.hidden_size, device=device, generator=g)  # rows in the layer's order
    dout = torch.randn(x.shape, device=device, generator=g)
    res = []
    for backend, dtype in (fast, ("torch", fast[1]), ("torch", torch.float32)):
        layer = copy.deepcopy(ref).to(dtype)
        layer.attn.backend = backend
        n, ctx = M.layer_context(cfg, pack, dtype)
        x_in = x.to(dtype, copy=True).requires_grad_()
        out = layer(x_in, n, ctx)
        out.backward(dout.to(dtype))
        res.append([("out", out.detach()), ("dx", x_in.grad)] +
                   [("d" + name, p.grad) for name, p in layer.named_parameters()])
        del layer, out, x_in
    worst = -float("inf")
    for (label, t), (_, f), (_, r) in zip(*res):
        err, floor = _rel(t, r), _rel(f, r)
        worst = max(worst, err - 2 * floor)
        print(f"check layer  {fast[0]} {str(fast[1])[6:]} vs fp32 reference  {label:24s} rel err {err:.2e} "
              f"(floor {floor:.2e})")
    return worst


def nsa_layer(N=32768):
    """A real-width decoder layer on layer_pack(N) in bf16 with the kernels against fp32 with the reference, held to
    the floor of the same layer in bf16 with exact attention. Full (image) spans from N = 32k; below 8,216 there is
    no room for long_sample's 1024 px target."""
    if N < 8216:
        raise SystemExit("bench.py nsa layer: N must be at least 8216")
    pack = layer_pack(data.tiny_tokenizer(), N).to("cuda")
    spans = {m: pack.split_modes.count(m) for m in ("causal", "full", "noise")}
    print(f"layer: {pack.num_tokens} positions, {len(pack.sample_lens)} samples, spans {spans}", flush=True)
    excess = check_layer(M.bagel_7b(attn_backend="nsa"), pack)
    print(f"layer peak memory {torch.cuda.max_memory_allocated() / 2 ** 30:.1f} GiB")
    assert excess < 5e-3, f"bf16 kernels add error beyond twice bf16's own over a layer (worst excess {excess:.2e})"
    print("layer OK")


def nsa_init():
    """Step-0 NSA (near-dense init) vs dense attention with the exact mask, random bf16 inputs."""
    H, KH, D = 28, 4, 128
    for N in (513, 2048, 4096, 16384):
        layout = span_layout([N], [N], ["causal"], device="cuda")
        x, q, k, v = _inputs(N, hidden=256)
        m = nsa.NSA(256, H, KH, D).cuda().to(torch.bfloat16)
        with torch.no_grad():
            o = m.attend(x, q, k, v, layout, lambda t, p: t)
            dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                                   is_causal=True, enable_gqa=True).transpose(0, 1)
        print(f"init: causal N={N:6d}  rel err vs dense {_rel(o, dense):.3e}")
    lens = [300, 1000, 300, 448]  # text, image (full), text, noised latents: sample of 2048
    layout = span_layout([2048], lens, ["causal", "full", "causal", "noise"], device="cuda")
    x, q, k, v = _inputs(2048, hidden=256)
    mask = layout.dense_mask()
    with torch.no_grad():
        o = nsa.NSA(256, H, KH, D).cuda().to(torch.bfloat16).attend(x, q, k, v, layout, lambda t, p: t)
        dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                               attn_mask=mask, enable_gqa=True).transpose(0, 1)
    print(f"init: spans {lens}  rel err vs dense {_rel(o, dense):.3e}")


def _module_case(N):
    """A BAGEL-width NSA layer on one causal sample of N tokens: (dense fwd+bwd, NSA fwd, NSA fwd+bwd) closures."""
    H, KH, D = 28, 4, 128
    layout = span_layout([N], [N], ["causal"], device="cuda")
    x, q, k, v = _inputs(N, hidden=3584)
    m = nsa.NSA(3584, H, KH, D).cuda().to(torch.bfloat16)
    with torch.no_grad():  # trained-looking compression so that selection is score-driven
        m.compress_key.normal_(1 / 32, 0.02)
        m.compress_value.normal_(1 / 32, 0.02)
    leaves = [t.detach().requires_grad_() for t in (x, q, k, v)]
    qt, kt, vt = (t.detach().transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
    do = torch.randn_like(q)

    # gradients through torch.autograd.grad on both sides: no .grad accumulation (an extra read-add-write of every
    # gradient that a training step's first backward does not pay) is timed
    def dense_fb():  # SDPA's own choice of backend (cuDNN on an H100), GQA native
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True)
        torch.autograd.grad(o, (qt, kt, vt), do.transpose(0, 1)[None])

    def nsa_fwd():
        with torch.no_grad():
            return m.attend(*leaves, layout, lambda t, p: t)

    def nsa_fb():
        torch.autograd.grad(m.attend(*leaves, layout, lambda t, p: t), leaves + list(m.parameters()), do)

    return dense_fb, nsa_fwd, nsa_fb


def nsa_bench(lengths=(4096, 8192, 16384, 32768, 65536)):
    """NSA (the whole module minus the q/k/v/o projections) vs dense causal SDPA, fwd+bwd."""
    from triton.testing import do_bench
    rows = []
    for N in lengths:
        t = [do_bench(f, warmup=50, rep=300, return_mode="median") for f in _module_case(N)]
        rows.append((N, *t))
        print(f"bench N={N:6d} dense fwd+bwd {t[0]:8.2f} | nsa fwd {t[1]:8.2f} fwd+bwd {t[2]:8.2f} "
              f"| speedup fwd+bwd {t[0] / t[2]:.2f}x", flush=True)
        torch.cuda.empty_cache()
    print("\n| tokens | dense fwd+bwd ms | NSA fwd ms | NSA fwd+bwd ms | fwd+bwd speedup |")
    print("|---|---|---|---|---|")
    for N, a, b, c in rows:
        print(f"| {N} | {a:.2f} | {b:.2f} | {c:.2f} | {a / c:.2f}x |")


def nsa_breakdown(N=65536):
    """GPU time per kernel launch of one NSA fwd+bwd (torch.profiler, mean of 5); a kernel launched more than once
    per step is listed per launch in step order (band kernels: #0 compressed, #1 window)."""
    from torch.profiler import ProfilerActivity, profile
    _, _, nsa_fb = _module_case(N)
    for _ in range(3):
        nsa_fb()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            nsa_fb()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    launches = {}
    for e in kernels:
        launches.setdefault(e.name, []).append(e.time_range.elapsed_us() / 1e3)
    rows = []
    for name, ms in launches.items():
        per_step = max(1, len(ms) // 5)
        for i in range(per_step):
            rows.append((sum(ms[i::per_step]) / 5, name[:60] + (f" #{i}" if per_step > 1 else "")))
    for ms, name in sorted(rows, reverse=True):
        if ms > 0.01:
            print(f"breakdown N={N} {name:66s} {ms:8.3f} ms")
    print(f"breakdown N={N} total kernel time {sum(ms for ms, _ in rows):.2f} ms", flush=True)


SWEEP = {  # tile options tried by `nsa sweep`, one kernel at a time, the others at their defaults
    "cmp_fwd": [[128, 64, 8, 3, False], [128, 64, 8, 2, False], [128, 128, 8, 2, False], [128, 64, 8, 2, True],
                [128, 64, 8, 3, True], [128, 64, 8, 4, False]],
    "cmp_dq": [[64, 64, 4, 2, True], [128, 64, 8, 2, True], [128, 64, 8, 3, True], [64, 64, 4, 3, True]],
    "cmp_dkdv": [[64, 128, 8, 3, False], [32, 128, 8, 3, True], [64, 128, 8, 2, True], [64, 64, 4, 2, True],
                 [64, 128, 8, 3, True], [64, 128, 8, 4, False], [128, 128, 8, 2, False]],
    "swa_fwd": [[64, 64, 4, 2, False], [128, 64, 8, 2, False], [128, 128, 8, 2, False], [64, 128, 4, 2, False],
                [64, 64, 4, 3, False], [64, 64, 4, 2, True]],
    "swa_dq": [[64, 64, 4, 2, False], [64, 64, 4, 2, True], [128, 64, 8, 2, False], [64, 128, 8, 2, False],
               [64, 64, 4, 3, False]],
    "swa_dkdv": [[32, 64, 4, 3, False], [64, 64, 4, 3, False], [64, 128, 8, 3, False], [32, 128, 8, 3, False],
                 [64, 64, 8, 2, False]],
    "topk": [[1024, 1, 64, 32], [2048, 1, 64, 32], [4096, 2, 64, 32], [1024, 1, 64, 16], [1024, 1, 64, 64],
             [2048, 2, 64, 32], [512, 1, 64, 32]],
    "score": [[64, 4, 16, True], [64, 4, 16, False], [64, 8, 16, True], [128, 8, 16, True], [64, 4, 32, True]],
    "slc": [[64, 4, 3], [64, 4, 2], [64, 8, 3], [64, 8, 2], [32, 4, 3], [128, 8, 2]],
    "slc_bwd": [[128, 8, 2], [128, 8, 1], [64, 8, 2], [64, 4, 2], [64, 4, 3]],
    "slc_chunk": [1024, 512, 2048],
}


def nsa_sweep(N=65536, names=tuple(SWEEP)):
    """Module fwd+bwd ms for each tile option in SWEEP (via NSA_TILES) of the kernels named."""
    from triton.testing import do_bench
    _, _, nsa_fb = _module_case(N)
    for name in names:
        options = SWEEP[name]
        for opt in options:
            os.environ["NSA_TILES"] = json.dumps({name: opt})
            try:
                t = do_bench(nsa_fb, warmup=100, rep=500, return_mode="median")
                print(f"sweep N={N} {name:10s} {str(opt):18s} {t:8.2f} ms", flush=True)
            except Exception as e:  # a tile that does not fit (shared memory, registers) is reported, not fatal
                print(f"sweep N={N} {name:10s} {str(opt):18s} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)
    os.environ.pop("NSA_TILES")


def nsa_main(args):
    if nsa is None or not torch.cuda.is_available():
        raise SystemExit("bench.py nsa needs a CUDA GPU and triton")
    what, rest = args[0] if args else "", args[1:]
    if what == "check":
        nsa_check()
    elif what == "layer":
        nsa_layer(int(rest[0]) if rest else 32768)
    elif what == "init":
        nsa_init()
    elif what == "bench":
        nsa_bench()
    elif what == "breakdown":
        for N in ([int(rest[0])] if rest else [16384, 65536]):
            nsa_breakdown(N)
    elif what == "sweep":
        nsa_sweep(int(rest[0]) if rest else 65536, rest[1].split(",") if len(rest) > 1 else SWEEP)
    else:
        raise SystemExit(f"bench.py nsa: expected check, layer, init, bench, breakdown or sweep, got {what!r}\n"
                         + __doc__)


# ----------------------------------------------------------------------------------------------
# Memory of the full 7B: a formula whose per-layer activation term is counted on one real-width layer

class FlashSaves(torch.autograd.Function):
    """Attention as flash and flex attention keep it for backward (q, k, v, the output, the log-sum-exp); it outputs
    zeros: only the bytes are counted."""
    @staticmethod
    def forward(ctx, q, k, v):
        out, lse = torch.zeros_like(q), q.new_zeros(q.shape[:2], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out


class SavedOutputs(TorchDispatchMode):
    """Bytes of the outputs of the ops selective checkpointing keeps (train.SAVED_OPS)."""
    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.name() in train.SAVED_OPS:
            self.bytes += out.numel() * out.element_size()
        return out


def layer_activation_bytes(cfg, tokens=64):
    """Bytes per token one decoder layer keeps for its backward, per checkpointing mode (eager, bf16): what autograd
    saves on a real-width layer on the CPU (weights left out, each storage once), attention keeping what flash/flex
    keep. full: the layer input; selective: that and the outputs its policy saves (matmuls; attention's output and
    log-sum-exp). Counted for dense attention whatever cfg's backend (NSA's own saved tensors are not counted)."""
    layer = M.DecoderLayer(dataclasses.replace(cfg, attn_backend="sdpa")).to(torch.bfloat16)
    weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    ctx = SimpleNamespace(rope=Rotary(cfg.head_dim, cfg.rope_theta, torch.arange(tokens), torch.bfloat16),
                          attend=FlashSaves.apply)
    x = torch.randn(tokens, cfg.hidden_size, dtype=torch.bfloat16, requires_grad=True)
    kept = {}

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        layer.layer(x, tokens // 2, ctx)
    with SavedOutputs() as saved:
        layer.layer(x, tokens // 2, ctx)
    full = cfg.hidden_size * 2
    attention = cfg.num_heads * (cfg.head_dim * 2 + 4)
    return {"none": sum(kept.values()) / tokens, "selective": full + saved.bytes / tokens + attention, "full": full}


def memory_gib(cfg, act, world, tokens, mode, ema=True):
    """Peak GiB per GPU of a full fine-tune under FSDP2 over `world` GPUs, one pack of `tokens` per GPU: fp32
    weights, AdamW moments and EMA sharded (16 bytes a parameter, 12 without the EMA); then the larger of the
    forward's end (the activations it keeps, act: layer_activation_bytes, in every layer, plus what one checkpointed
    layer rebuilds in backward; the CE's 4k-row chunk of logits in bf16 and fp32; two layers' bf16 weights and
    gradients unsharded) and the backward's end (fp32 gradients, 4 bytes a parameter, sharded)."""
    with torch.device("meta"):
        model = M.Bagel(cfg)
    params = sum(p.numel() for p in model.parameters())
    layer = sum(p.numel() for p in model.layers[0].parameters())
    moments = params * (12 if ema else 8) / world  # AdamW's two moments and the EMA, all step long
    # a checkpointed layer's backward rebuilds what its mode did not keep
    activations = cfg.num_layers * tokens * act[mode] + tokens * (act["none"] - act[mode])
    # gradients are freed after each step: the forward's end holds the activations, the backward's end the gradients
    forward_end = activations + 4096 * cfg.vocab_size * 6 + 2 * layer * 2 * 2
    return (moments + params * 4 / world + max(forward_end, params * 4 / world)) / 2 ** 30


def memory_main():
    """The README's memory table: the full 7B, per GPU, by GPUs, pack length and checkpointing mode."""
    cfg = M.bagel_7b()
    act = layer_activation_bytes(cfg)
    print("activation bytes per token per decoder layer (eager, bf16): " +
          ", ".join(f"{mode} {v:,.0f}" for mode, v in act.items()))
    modes = ("none", "selective", "full")
    print("| GPUs | pack | " + " | ".join(f"AC {m} (GiB)" for m in modes) + " |\n|---|---|" + "---|" * len(modes))
    for world in (8, 16, 32):
        for tokens in (8192, 16384, 32768):
            print(f"| {world} | {tokens // 1024}k | " +
                  " | ".join(f"{memory_gib(cfg, act, world, tokens, m):.0f}" for m in modes) + " |")


def main(argv):
    if {"-h", "--help"} & set(argv):
        print(__doc__)
    elif argv[:1] == ["nsa"]:
        nsa_main(argv[1:])
    elif argv[:1] == ["memory"]:
        memory_main()
    else:
        step_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
