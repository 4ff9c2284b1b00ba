"""Train BAGEL with raw torch.distributed FSDP2.

    python train.py configs/tiny.py                       # one process (CPU or one GPU)
    python train.py configs/tiny.py --max_steps=50        # --key=value overrides, type-checked
    python train.py --help                                # every config key, its default and what it does
    python train.py --plot=out/tiny                       # out/tiny/metrics.jsonl -> out/tiny/metrics.png
    torchrun --nproc_per_node=8 train.py configs/sft.py   # one node
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py configs/sft.py

The same code path everywhere: even a single process runs as a world of one, so FSDP2, DCP checkpoints and
the loss normalisation are always the ones a cluster uses.
"""
import ast
import contextlib
import difflib
import fcntl
import functools
import hashlib
import importlib.util
import inspect
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import textwrap
import time
import typing
from dataclasses import asdict, dataclass
from fnmatch import fnmatch

from PIL import Image, ImageDraw, ImageFont
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

import convert
import data
import model as M
import sample

# ----------------------------------------------------------------------------------------------
# Config: defaults here; a config file is plain Python assignments; --key=value overrides. Every value is checked
# before a process group or a model exists: types, choices, ranges, and the keys inside model_args, data_args and
# sources (a typo must cost neither a cluster start nor a finished run).

DEFAULTS = dict(
    # model
    model="tiny",                 # the BagelConfig preset when init_from is empty
    model_args={},                # BagelConfig field overrides, e.g. {"num_layers": 4}
    init_from="",                 # checkpoint folder (official / HF / nanobagel layout) or "" for random init
    init_weights="ema",           # which weights of a nanobagel folder to start from
    tokenizer="",                 # folder with tokenizer.json; "" = the init checkpoint's, else the built-in one
    # data
    sources=[{"path": "shapes"}],  # data.Source keyword arguments, one dict per dataset (path, format, weight, ...)
    data_args={},                 # further data.Loader keyword arguments (open_packs, max_image_pixels, ...)
    latent_cache="",              # a folder for the VAE posterior moments of every image seen: later epochs skip the
                                  # encoder (LatentCache); "" = encode every time
    packing_length=4096,          # LLM positions per pack (per rank, per micro-step)
    text_cond_dropout_prob=0.1, vit_cond_dropout_prob=0.3, vae_cond_dropout_prob=0.3,  # CFG condition dropout
    seed=1234,
    resume_data_order=True,       # False: a resume restarts the data order from seed + step (after the data changed)
    val_sources=[],               # held-out data, as sources: validation CE and MSE on val_packs packs of it, made once
    val_packs=4,                  # (the same samples, timesteps and noise at every evaluation and in every run)
    # optimisation
    max_steps=1000, grad_accum=1,  # max_steps=0 exports the initial weights
    lr=1e-4, min_lr=1e-7, warmup_steps=100, lr_schedule="constant",
    beta1=0.9, beta2=0.95, eps=1e-15, weight_decay=0.0, max_grad_norm=1.0,
    ce_weight=1.0, mse_weight=1.0, timestep_shift=1.0,
    ce_loss_reweighting=False,    # official option: CE tokens weighted 1/sqrt(len) of their text (pack.ce_weights)
    max_bad_steps=5,              # non-finite loss or gradient: skip; this many in a row stops the run
    ema=0.9999,                   # EMA decay; 0 turns the EMA off
    # what trains
    freeze_vit=False, freeze_connector=False, freeze_llm=False, freeze_und=False,
    visual_und=True,              # False: ViT and connector frozen and never run; ViT tokens zero vectors (official)
    visual_gen=True,              # False: the generation side frozen, and the data must have no generation target
    freeze=[],                    # extra fnmatch patterns of parameter names to freeze
    train_only=[],                # if not empty: only parameters matching these patterns train
    lora_targets=[],              # fnmatch patterns of Linear layers given LoRA adapters; then only adapters train
    lora_rank=16, lora_alpha=32.0,  # adapter rank r and alpha (scale alpha / r); no dropout, no bias
    freeze_from_step={},          # {fnmatch pattern: step}: those parameters stop training at that step (IRG)
    loss_off_from_step={},        # {"ce" | "mse": step}: that loss is switched off at that step (IRG)
    # systems
    device="auto",
    dtype="auto",                 # compute dtype; "auto": bf16 on GPU, fp32 on CPU
    reshard_after_forward=True,
    fsdp_shard_size=0,            # 0: shard over every rank (FSDP); N: shard inside groups of N ranks (one node) and
                                  # replicate across the groups (HSDP, for 16-64 GPUs over slower inter-node links)
    activation_checkpointing="none",  # "full": recompute each layer in backward | "selective": keep the matmul and
                                      # attention outputs, recompute norms, RoPE and activations; never the last
                                      # decoder layer, whose backward follows the forward at once
    checkpoint_every=1,           # checkpoint every k-th decoder layer only (layers 0, k, 2k, ...); the ViT's all
    compile=False,
    peak_tflops=0.0,              # per device, for MFU; 0 = look it up (0 on CPU: no MFU)
    # output
    out_dir="out/run", log_every=10, save_steps=500, keep_checkpoints=3,
    eval_every=500,               # validation every N steps and at the last (with val_sources)
    wandb_project="",             # also log to wandb (must be installed; not a dependency) when set
    wandb_name="",                # the wandb run's name; "" = out_dir's last folder
    wandb_mode="online",          # "online" | "offline" (synced later with `wandb sync`)
    export_dtype="fp32",          # final consolidated safetensors
    save_ema_as_default=True,     # export/ has ema.safetensors, which sample.py and --init_from prefer; False: export/
                                  # holds the raw weights alone, the EMA goes to export_ema/ (recA wants the raw ones)
    sample_every=0, sample_prompts=[], sample_size=512,  # grids in out_dir/samples, drawn as sample.py draws
    sample_settings={},           # overrides of sample.py's text-to-image settings (sample.T2I: num_timesteps,
                                  # timestep_shift, cfg_text_scale, cfg_interval, ...)
)

CHOICES = dict(model=tuple(M.PRESETS), init_weights=("ema", "model"), lr_schedule=("constant", "cosine"),
               device=("auto", "cpu", "cuda"), dtype=("auto", "bf16", "fp32"),
               activation_checkpointing=("none", "full", "selective"), export_dtype=("fp32", "bf16"),
               wandb_mode=("online", "offline"))

RANGES = [  # (keys, test, what the test says)
    (("grad_accum", "packing_length", "max_bad_steps", "checkpoint_every", "lora_rank", "log_every", "save_steps",
      "keep_checkpoints", "val_packs", "eval_every", "sample_size"), lambda v: v >= 1, ">= 1"),
    (("max_steps", "fsdp_shard_size", "lr", "min_lr", "warmup_steps", "eps", "weight_decay", "max_grad_norm",
      "ce_weight", "mse_weight", "peak_tflops", "sample_every"), lambda v: v >= 0, ">= 0"),
    (("timestep_shift", "lora_alpha"), lambda v: v > 0, "> 0"),
    (("ema", "beta1", "beta2"), lambda v: 0 <= v < 1, "in [0, 1)"),
    (("text_cond_dropout_prob", "vit_cond_dropout_prob", "vae_cond_dropout_prob"), lambda v: 0 <= v <= 1, "in [0, 1]"),
]
LOADER_ARGS_SET_HERE = ("sources", "tokenizer", "packing_length", "dropout", "max_latent_size", "vit_side", "seed",
                        "rank", "world_size")  # data.Loader arguments main() passes itself: not for data_args


def load_config(argv):
    """DEFAULTS <- config file (plain Python) <- --key=value overrides, each checked against the defaults' type; then
    every value checked (check_config)."""
    config = dict(DEFAULTS)
    args = list(argv)
    if args and not args[0].startswith("--"):
        path = args.pop(0)
        if not os.path.isfile(path):
            raise SystemExit(f"no config file {path!r} (usage: train.py CONFIG.py [--key=value ...])")
        scope = {"__file__": path}  # a config may build on another one next to it
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), scope)
        for key, value in scope.items():
            if key.startswith("_") or callable(value) or isinstance(value, type(sys)):
                continue
            set_key(config, key, value, path)
    for arg in args:
        if not arg.startswith("--") or "=" not in arg:
            raise SystemExit(f"expected --key=value, got {arg!r} (python train.py --help lists the keys)")
        key, text = arg[2:].split("=", 1)
        set_key(config, key, literal(text), "command line")
    check_config(config)
    return config


def literal(text):
    """A Python literal, or else the string itself (--out_dir=runs/a)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def set_key(config, key, value, where):
    if key not in DEFAULTS:
        raise SystemExit(f"{where}: unknown config key {key!r}{did_you_mean(key, DEFAULTS)}")
    config[key] = typed(f"{where}: {key}", value, type(DEFAULTS[key]))


def typed(what, value, want):
    """value as a `want` (ints pass as floats and lists as tuples; bools never as ints), or a SystemExit naming
    `what`."""
    if want is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if want is tuple and isinstance(value, list):
        return tuple(value)
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        raise SystemExit(f"{what} must be {getattr(want, '__name__', want)}, got {value!r}")
    return value


def did_you_mean(word, options):
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_config(config):
    """Values, not just types: CHOICES, RANGES, finite floats, and the keys and types inside model_args (BagelConfig's
    fields), data_args (data.Loader's arguments), sources and val_sources (data.Source's arguments) and
    sample_settings (sample.T2I's)."""
    for key, choices in CHOICES.items():
        if config[key] not in choices:
            raise SystemExit(f"{key} must be one of {', '.join(choices)}; got {config[key]!r}"
                             f"{did_you_mean(config[key], choices)}")
    for keys, ok, text in RANGES:
        for key in keys:
            if not ok(config[key]):
                raise SystemExit(f"{key} must be {text}, got {config[key]!r}")
    for key, value in config.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise SystemExit(f"{key} must be finite, got {value}")
    if config["lr_schedule"] == "cosine" and config["min_lr"] > config["lr"]:
        raise SystemExit(f"min_lr {config['min_lr']} > lr {config['lr']}: the cosine schedule would rise")
    for key in ("freeze", "train_only", "lora_targets", "sample_prompts"):
        for i, item in enumerate(config[key]):
            typed(f"{key}[{i}]", item, str)
    for key in ("freeze_from_step", "loss_off_from_step"):
        for name, step in config[key].items():
            if key == "loss_off_from_step" and name not in ("ce", "mse"):
                raise SystemExit(f"loss_off_from_step: the losses are 'ce' and 'mse', got {name!r}")
            if typed(f"{key}[{name!r}]", step, int) < 0:
                raise SystemExit(f"{key}[{name!r}] must be a step >= 0, got {step}")
    config["model_args"] = checked_args("model_args", config["model_args"], typing.get_type_hints(M.BagelConfig))
    config["sample_settings"] = checked_args("sample_settings", config["sample_settings"],
                                             {k: type(v) for k, v in sample.T2I.items()})
    default_types = lambda fn: {k: object if p.default is None else type(p.default)  # None: any
                                for k, p in inspect.signature(fn).parameters.items()}
    config["data_args"] = checked_args("data_args", config["data_args"], {
        k: t for k, t in default_types(data.Loader).items() if k not in LOADER_ARGS_SET_HERE})
    if not config["sources"]:
        raise SystemExit("sources is empty: no data to train on")
    source = default_types(data.Source)
    for key in ("sources", "val_sources"):
        config[key] = [checked_args(f"{key}[{i}]", typed(f"{key}[{i}]", src, dict), source)
                       for i, src in enumerate(config[key])]
        for i, src in enumerate(config[key]):
            if src.get("format") is not None and src["format"] not in data.READERS:
                raise SystemExit(f"{key}[{i}]: format must be one of {', '.join(data.READERS)}; got "
                                 f"{src['format']!r}{did_you_mean(src['format'], data.READERS)}")


def checked_args(what, args, types):
    """Keyword arguments checked against {name: type}: unknown names (with a close match) and wrong types stop here."""
    for key in args:
        if key not in types:
            raise SystemExit(f"{what}: unknown key {key!r}{did_you_mean(key, types)}; known: {', '.join(types)}")
    return {k: typed(f"{what}[{k!r}]", v, types[k]) for k, v in args.items()}


def usage():
    """--help: the docstring, then every config key with its default and the comment beside it in DEFAULTS, section
    by section (read from this file: the help is the defaults' own documentation)."""
    with open(__file__) as f:
        block = f.read().split("\nDEFAULTS = dict(\n", 1)[1].split("\n)\n", 1)[0]
    show = lambda v: (v or '""') if isinstance(v, str) else repr(v)
    lines = [__doc__.strip(), "", "Config keys and their defaults (a config file assigns them; --key=value overrides):"]
    for line in block.splitlines():
        code, _, comment = line.partition("#")
        if code.strip():
            keys = " ".join(f"--{k}={show(DEFAULTS[k])}" for k in re.findall(r"(\w+)=", code))
            wide = len(keys) > 40 and comment  # its comment on a line of its own
            lines.append(f"  {keys:<40} {'' if wide else comment.strip()}".rstrip())
            lines += [" " * 43 + comment.strip()] if wide else []
        elif line.startswith("    # "):  # a section
            lines += ["", comment.strip()]
        else:  # the comment above goes on
            lines.append(" " * 43 + comment.strip())
    return "\n".join(lines)


def preflight(config):
    """What can fail before a process group starts, one line naming the config key: every path the config names,
    and wandb when asked for (an unedited configs/sft.py must not cost a cluster start)."""
    paths = [("init_from", config["init_from"]), ("tokenizer", config["tokenizer"])]
    for key in ("sources", "val_sources"):
        for i, src in enumerate(config[key]):
            paths += [(f"{key}[{i}]['{k}']", src[k]) for k in ("path", "data_folder")
                      if src.get(k) not in (None, "shapes")]
    for key, path in paths:
        if path and not os.path.exists(path):
            raise SystemExit(f"{key}: {path!r} does not exist (README: Weights and data)")
    if config["wandb_project"] and importlib.util.find_spec("wandb") is None:
        raise SystemExit("wandb_project is set but wandb is not installed (pip install wandb)")


# ----------------------------------------------------------------------------------------------
# Distributed setup: always a process group (a world of one without torchrun), always an explicit mesh.

def setup_distributed(device_kind, shard_size=0):
    """(rank, world, device, mesh). The mesh is 1-D ("shard": FSDP over every rank) or, with shard_size = N < world,
    2-D ("replicate", "shard"): parameters sharded inside groups of N ranks (a node) and replicated across the
    groups (HSDP), so that the per-layer all-gathers stay on the fast links inside a node."""
    if "RANK" not in os.environ:  # plain `python train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    rank, local_rank, world = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    use_cuda = device_kind == "cuda" or (device_kind == "auto" and torch.cuda.is_available())
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    if shard_size and shard_size < world:
        if world % shard_size:
            raise SystemExit(f"fsdp_shard_size={shard_size} does not divide the world of {world} processes")
        mesh = init_device_mesh(device.type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    return rank, world, device, mesh


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_sum(values, device):
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------------
# What trains

def trainable_mask(names, config):
    """{param name: trains?} from the freeze switches and patterns."""
    frozen = list(config["freeze"])
    if config["freeze_vit"] or not config["visual_und"]:
        frozen += ["vit.*"]
    if config["freeze_connector"] or not config["visual_und"]:
        frozen += ["connector.*"]
    if config["freeze_llm"]:
        frozen += ["embed_tokens.*", "layers.*", "norm_und.*", "norm_gen.*", "lm_head.*"]
    if not config["visual_gen"]:
        frozen += ["layers.*.gen.*", "norm_gen.*", "time_embedder.*", "vae2llm.*", "llm2vae.*"]
    train = {}
    for name in names:
        ok = not any(fnmatch(name, p) for p in frozen)
        if config["train_only"]:
            ok = ok and any(fnmatch(name, p) for p in config["train_only"])
        if config["lora_targets"]:  # LoRA: every base weight frozen
            ok = ".lora_A." in name or ".lora_B." in name
        train[name] = ok
    return train


# ----------------------------------------------------------------------------------------------
# FLOPs: an honest count of the model's matmul work for one pack (fwd + bwd as actually needed).
#
# A matmul of a [n, a] input with an [a, b] weight costs 2nab forward (mult() below counts in units of nab).
# Backward costs 2nab for the input gradient (when anything before it trains) and 2nab for the weight gradient (when
# the weight trains). So a trainable layer costs 6nab, a frozen layer that gradient flows through 4nab, a frozen
# leaf 2nab.
# Attention costs 4·D·H per visible (query, key) pair forward (QK^T and PV), 8·D·H backward. Counted:
# each expert's projections and MLP for the tokens it serves; attention by each sample's real visible pairs
# (from its spans, not L^2); lm_head only at CE positions, llm2vae only at MSE positions; the ViT and connector
# on ViT tokens, the latent input projections on latent tokens. Not counted: the frozen VAE encoder (a data
# transform), norms, RoPE, softmax and other elementwise work. Activation-checkpoint recompute is not counted.

def visible_pairs(pack):
    """Visible (query, key) pairs of a pack under the BAGEL mask, from its spans."""
    pairs, spans = 0, iter(zip(pack.split_lens, pack.split_modes))
    for sample_len in pack.sample_lens:
        earlier, used = 0, 0  # earlier: keys visible from later spans (noise spans excluded)
        while used < sample_len:
            n, mode = next(spans)
            pairs += n * earlier + (n * (n + 1) // 2 if mode == "causal" else n * n)
            earlier += 0 if mode == "noise" else n
            used += n
    return pairs


def pack_flops(pack, c: M.BagelConfig, trains, vit_runs=True):
    """trains: {"und", "gen", "vit", "connector", "lm_head", "latent"} -> bool (weights of that group train);
    vit_runs: False when the ViT is not run (visual_und off: its tokens are zeros).
    Exact for the matmuls when everything trains; when parts are frozen, the first decoder layer may count an
    input gradient that is not needed."""
    C, D, F_, V = c.hidden_size, c.head_dim, c.intermediate_size, c.vocab_size
    mult = lambda weight_trains, grad_flows: 2 + (2 if grad_flows else 0) + (2 if weight_trains else 0)
    llm_grad = any(trains.values())  # gradient flows back through the decoder stack to something trainable
    per_token = C * (c.num_heads * D) + 2 * C * (c.num_kv_heads * D) + (c.num_heads * D) * C + 3 * C * F_
    n_gen = pack.vae_indexes.numel()
    n_und = pack.num_tokens - n_gen
    flops = c.num_layers * per_token * (n_und * mult(trains["und"] and not c.freeze_und,
                                                        llm_grad and not c.freeze_und)
                                           + n_gen * mult(trains["gen"], llm_grad))
    flops += c.num_layers * 4 * D * c.num_heads * visible_pairs(pack) * (3 if llm_grad else 1)
    flops += pack.ce_indexes.numel() * C * V * mult(trains["lm_head"], llm_grad)
    flops += pack.mse_indexes.numel() * C * c.latent_dim * mult(trains["latent"], llm_grad)
    flops += n_gen * (c.latent_dim * C + 256 * C) * mult(trains["latent"], False)  # vae2llm, time mlp.0
    flops += n_gen * C * C * mult(trains["latent"], trains["latent"])             # time mlp.2
    Cv, n_vit, vit = c.vit_hidden_size, pack.vit_patches.shape[0] if vit_runs else 0, trains["vit"]
    flops += n_vit * 3 * c.vit_patch_size ** 2 * Cv * mult(vit, False)
    flops += c.vit_num_layers * n_vit * (4 * Cv * Cv + 2 * Cv * c.vit_intermediate_size) * mult(vit, vit)
    flops += c.vit_num_layers * 4 * Cv * sum(n * n for n in pack.vit_lens) * (3 if vit else 1) * vit_runs
    flops += n_vit * Cv * C * mult(trains["connector"], vit) + n_vit * C * C * mult(
        trains["connector"], vit or trains["connector"])
    return flops


def peak_flops(device, configured_tflops):
    """Per-device dense bf16 peak (the datasheet number MFU is quoted against)."""
    if configured_tflops:
        return configured_tflops * 1e12
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    for key, tflops in (("H100", 989), ("H200", 989), ("H800", 989), ("A100", 312), ("B200", 2250)):
        if key in name:
            return tflops * 1e12
    return 0.0


# ----------------------------------------------------------------------------------------------
# Checkpoints: DCP for the sharded state, one small file per rank for its loader and RNG state, the tokenizer, and
# the manifest, train_state.json (step, world size, config, model config, every file's size and sha256), written last.
# A save fills step_N.tmp and renames it step_N once the manifest is in, so a step_N folder is complete unless its
# files stopped matching the manifest.
# Resume takes the newest step_N whose files match (each rank hashes a share) and falls back past damaged ones,
# naming the bad file: a crash at any point of a save, or a full disk, leaves the earlier checkpoints usable.
# DCP's pickles are read through allow-lists (convert.CheckpointReader): a crafted file is refused, never run.
# One trainer per out_dir (lock_out_dir), so what killed saves left (.tmp, .del) is cleared at the next save.

STEP_DIR = re.compile(r"step_(\d+)")
MANIFEST = convert.MANIFEST

def lock_out_dir(out_dir):
    """One trainer per out_dir: an exclusive flock on out_dir/train.lock, held by rank 0 alone (every write to
    out_dir is rank 0's or follows a collective with it) until its process ends, however it ends. Returns the open
    lock file: it must stay open."""
    os.makedirs(out_dir, exist_ok=True)
    lock = open(os.path.join(out_dir, "train.lock"), "a+")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        raise SystemExit(f"{out_dir} is in use by another trainer ({lock.read().strip() or 'holder unknown'}): one "
                         f"trainer per out_dir; stop that one or choose another out_dir")
    except OSError as e:
        raise SystemExit(f"cannot lock {lock.name}: {e} (the out_dir's filesystem must support flock)")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    return lock


def rng_state(device):
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def save_checkpoint(run, ckpt_dir, step, extra):
    """ckpt_dir/step_N, written by all ranks together. A failure on any rank (disk full, quota, I/O error) stops
    every rank with one message that says which checkpoint is kept; the partial folder is removed."""
    final = os.path.join(ckpt_dir, f"step_{step:07d}")
    tmp = final + ".tmp"
    ready = [""]
    if run.master:
        try:
            for name in os.listdir(ckpt_dir):
                if name.endswith((".tmp", ".del")):  # what killed saves left
                    shutil.rmtree(os.path.join(ckpt_dir, name))
            os.makedirs(tmp)
        except OSError as e:
            ready = [cause(e)]
    dist.broadcast_object_list(ready, src=0)  # and no rank writes into tmp before it is made
    error, files = ready[0], {}
    try:
        if not error:
            model_sd, optim_sd = get_state_dict(run.model, run.opt)
            dcp.save({"model": model_sd, "optim": optim_sd, "ema": run.ema}, checkpoint_id=tmp)  # fsyncs its files
            with open(os.path.join(tmp, f"rank_{run.rank:05d}.pt"), "wb") as f:
                torch.save(extra, f)
                durable(f)
            if run.master:  # so that convert.py, sample.py and --init_from read a step_N folder on its own
                run.tokenizer.tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    except (Exception, CheckpointException) as e:
        error = cause(e)
    dist.barrier()  # all files written before any is hashed
    try:
        files = {} if error else hash_files(tmp, run.rank, run.world)
    except OSError as e:
        error = cause(e)
    shares = [None] * run.world
    dist.all_gather_object(shares, (error, files))
    errors = [e for e, _ in shares if e]
    if run.master and not errors:
        files = {k: v for _, f in shares for k, v in sorted(f.items())}
        manifest = {"step": step, "world_size": run.world, "config": run.config,
                    "model_config": asdict(run.model_cfg), "files": files}
        try:
            commit(tmp, final, manifest, run.config["keep_checkpoints"])
        except OSError as e:
            errors = [cause(e)]
    outcome = [errors]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0]:
        if run.master:
            shutil.rmtree(tmp, ignore_errors=True)  # give back the space it took
        kept = max((d for d in os.listdir(ckpt_dir) if STEP_DIR.fullmatch(d)), key=step_of, default=None)
        raise SystemExit(f"saving {final} failed: {outcome[0][0]} ({shutil.disk_usage(ckpt_dir).free / 2**30:.2f} "
                         f"GiB free there). Kept: {os.path.join(ckpt_dir, kept) if kept else 'no checkpoint'}; "
                         f"the same command resumes from it once the cause is fixed")
    return final


def commit(tmp, final, manifest, keep):
    """Rank 0 makes a written step_N.tmp the checkpoint step_N: the manifest last (the mark of a complete folder),
    then the rename. An existing step_N (a damaged one that resume passed over) is set aside first. Then the `keep`
    newest checkpoints up to this step stay; later ones are ones resume found damaged."""
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, default=str)
        durable(f)
    if os.path.isdir(final):
        os.replace(final, final + ".del")
    os.replace(tmp, final)
    ckpt_dir = os.path.dirname(final)
    durable(ckpt_dir)  # the new checkpoint is on disk before any older one is deleted
    steps = sorted((d for d in os.listdir(ckpt_dir) if STEP_DIR.fullmatch(d)), key=step_of)
    older = [d for d in steps if step_of(d) <= manifest["step"]]
    for d in older[:-keep] + [d for d in steps if d not in older]:
        os.replace(os.path.join(ckpt_dir, d), os.path.join(ckpt_dir, d + ".del"))  # atomic; the rmtree may not be
    for d in os.listdir(ckpt_dir):
        if d.endswith(".del"):
            shutil.rmtree(os.path.join(ckpt_dir, d))


def step_of(name):
    return int(STEP_DIR.fullmatch(name)[1])


def durable(f):
    """fsync an open file, or a folder's renames by its path (where the filesystem can)."""
    if isinstance(f, str):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError:  # some network filesystems refuse fsync on a folder
            pass
        os.close(fd)
    else:
        f.flush()
        os.fsync(f.fileno())


def cause(e):
    if isinstance(e, CheckpointException):  # DCP's: {rank: (exception, traceback)}; the first says what happened
        e = next(iter(e.failures.values()))[0]
    return f"{type(e).__name__}: {e}"


def hashed_by(name, world):
    """The rank that hashes a checkpoint file: the one that wrote it (DCP's __R_i.distcp, our rank_R.pt, likely still
    in its page cache), else rank 0. So hashing is spread like writing, and on resume like the files."""
    m = re.fullmatch(r"__(\d+)_\d+\.distcp|rank_(\d+)\.pt", name)
    return int(m[1] or m[2]) % world if m else 0


def hash_files(folder, rank, world):
    """{name: [bytes, sha256]} of this rank's share of a folder's files. sha256: the fastest cryptographic hash in
    the standard library on CPUs with SHA-NI (~1 GB/s a core), and `sha256sum` checks a manifest by hand; its cost
    against the save: notes/checkpoints.md."""
    return {n: [os.path.getsize(os.path.join(folder, n)), sha256(os.path.join(folder, n))]
            for n in sorted(os.listdir(folder)) if hashed_by(n, world) == rank}


def sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def damage(folder, rank, world):
    """What is wrong with this rank's share of a checkpoint's files ("" if they match the manifest)."""
    try:
        with open(os.path.join(folder, MANIFEST)) as f:
            manifest = json.load(f)
        if "files" not in manifest:
            return f"{MANIFEST} lists no files (a checkpoint from before manifests: it cannot be verified)"
        files = {name: (int(size), str(digest)) for name, (size, digest) in manifest["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{MANIFEST} unreadable ({type(e).__name__}: {e})"
    for name, (size, digest) in sorted(files.items()):
        path = os.path.join(folder, name)
        if hashed_by(name, world) != rank:
            continue
        if not os.path.isfile(path):
            return f"{name} is missing"
        if os.path.getsize(path) != size:
            return f"{name} has {os.path.getsize(path)} bytes, the manifest says {size}"
        if sha256(path) != digest:
            return f"{name} does not match its sha256 in the manifest"
    return ""


def find_checkpoint(ckpt_dir, log):
    """The newest checkpoint in ckpt_dir whose files match its manifest, or None if there is none at all. Damaged
    ones are named and passed over; if every one is damaged the run stops rather than start over them."""
    listing = [sorted(os.listdir(ckpt_dir))]
    dist.broadcast_object_list(listing, src=0)  # one view of the folder on every rank
    for name in listing[0]:
        if name.endswith(".tmp"):
            log(f"{os.path.join(ckpt_dir, name)}: a save that did not finish (killed or failed), ignored")
    problems = []
    for name in sorted((n for n in listing[0] if STEP_DIR.fullmatch(n)), key=step_of, reverse=True):
        folder = os.path.join(ckpt_dir, name)
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, damage(folder, dist.get_rank(), dist.get_world_size()))
        problem = next((p for p in found if p), "")
        if not problem:
            return folder
        log(f"{folder} is damaged: {problem}; falling back to the checkpoint before it")
        problems.append(f"{name}: {problem}")
    if problems:
        raise SystemExit(f"no intact checkpoint in {ckpt_dir} ({'; '.join(problems)}); move the folder away to start "
                         f"from scratch")
    return None


def load_checkpoint(path, run):
    """Model, optimiser and EMA from a checkpoint, resharded to this world; returns (step, this rank's loader and RNG
    state, or None when the world size changed)."""
    model_sd, optim_sd = get_state_dict(run.model, run.opt)
    state = {"model": model_sd, "optim": optim_sd, "ema": run.ema}
    try:
        dcp.load(state, storage_reader=convert.CheckpointReader(path), planner=convert.CheckpointPlanner())
    except (Exception, CheckpointException) as e:
        raise SystemExit(f"cannot load {path}: {cause(e)}")
    set_state_dict(run.model, run.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    with open(os.path.join(path, MANIFEST)) as f:
        saved = json.load(f)
    extra_path = os.path.join(path, f"rank_{run.rank:05d}.pt")
    extra = torch.load(extra_path, weights_only=True) if saved["world_size"] == run.world else None
    return saved["step"], extra


def trim_metrics(path, step):
    """metrics.jsonl keeps its rows up to `step`, the step resumed from: later steps are done again and logged again.
    A row cut short by a kill (no newline) goes too."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(kept)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------------------
# Build: the FSDP2 recipe as named steps (torchtitan's order): setup -> model (meta) -> shard -> weights ->
# optimiser and EMA. Each returns what the next needs; `Run` holds what the loop needs.

@dataclass
class Run:
    config: dict                  # the resolved training config (DEFAULTS <- file <- overrides)
    rank: int
    world: int
    device: torch.device
    dtype: torch.dtype            # compute dtype (parameters stay fp32 masters)
    log: object                   # print on rank 0, silent elsewhere
    model: M.Bagel                # FSDP2-sharded
    vae: torch.nn.Module          # frozen, replicated, compute dtype
    model_cfg: M.BagelConfig
    tokenizer: data.TextTokenizer
    params: list                  # the trainable parameters, in model order
    param_names: list             # and their names
    groups: dict                  # which weight groups train (for pack_flops)
    opt: torch.optim.Optimizer
    ema: dict                     # {name: sharded fp32 EMA} of the trainable parameters; {} without EMA
    latent_cache: object = None   # LatentCache, or None

    @property
    def master(self):
        return self.rank == 0


def build(config):
    """Everything a training step needs, as the distributed recipe makes it (also used by bench.py)."""
    rank, world, device, mesh = setup_distributed(config["device"], config["fsdp_shard_size"])
    log = print if rank == 0 else (lambda *a, **k: None)
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
             "bf16": torch.bfloat16, "fp32": torch.float32}[config["dtype"]]
    torch.manual_seed(config["seed"] + rank)
    random.seed(config["seed"] + rank)
    model_cfg, fresh = model_config(config, rank == 0, device)
    tokenizer = load_tokenizer(config, model_cfg)
    model = meta_model(config, model_cfg, log)
    trains = trainable_mask([n for n, _ in model.named_parameters()], config)
    freeze(model, trains, dtype)
    shard(model, mesh, dtype, config)
    vae = load_weights(model, model_cfg, config, fresh, device, log)
    vae.requires_grad_(False).eval().to(dtype)  # frozen, outside FSDP, no_grad
    params = [p for p in model.parameters() if p.requires_grad]
    param_names = [n for n, p in model.named_parameters() if p.requires_grad]
    c = model_cfg
    log(f"model: {c.num_layers} layers x {c.hidden_size} ({c.num_heads} heads, {c.num_kv_heads} KV), ffn "
        f"{c.intermediate_size}, vocab {c.vocab_size}, ViT {c.vit_num_layers} x {c.vit_hidden_size}, {c.vae_kind} AE, "
        f"{c.attn_backend} attention | {sum(p.numel() for p in model.parameters()):,} parameters "
        f"({sum(p.numel() for p in params):,} trainable) | world {world}, {device}, {dtype}")
    opt, ema = optimizer_and_ema(model, params, config, device)
    cache = LatentCache(config["latent_cache"], vae) if config["latent_cache"] else None
    return Run(config, rank, world, device, dtype, log, model, vae, model_cfg, tokenizer, params, param_names,
               weight_groups(trains), opt, ema, cache)


def model_config(config, master, device):
    """The BagelConfig (from init_from's folder, or the preset with model_args), the same on every rank; and, for a
    fresh CPU init, rank 0's freshly initialised (model, vae), broadcast later so that the initial weights are the
    same whatever the world size (a fresh init on GPUs runs sharded, through DTensor's random ops)."""
    cfg, fresh = None, None
    if config["init_from"]:
        cfg = convert.checkpoint_config(config["init_from"])
    elif master:
        base = M.PRESETS[config["model"]]()
        cfg = M.BagelConfig(**{**asdict(base), **config["model_args"]})
        if device.type != "cuda":
            fresh = (M.Bagel(cfg), M.build_vae(cfg))
            fresh[0].init_weights()
    shared = [cfg]
    dist.broadcast_object_list(shared, src=0)
    return M.BagelConfig(**{**asdict(shared[0]), **config["model_args"], "freeze_und": config["freeze_und"]}), fresh


def load_tokenizer(config, model_cfg):
    folder = config["tokenizer"] or config["init_from"]
    tokenizer = data.load_tokenizer(folder) if folder else data.tiny_tokenizer()
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.vocab_size} tokens, the model only {model_cfg.vocab_size}")
    return tokenizer


def meta_model(config, model_cfg, log):
    """The model on the meta device, with LoRA adapters, activation checkpointing and per-layer compile applied."""
    with torch.device("meta"):
        model = M.Bagel(model_cfg)
    if config["lora_targets"]:  # before sharding: FSDP2 shards the adapters like the rest
        adapted = M.apply_lora(model, config["lora_targets"], config["lora_rank"], config["lora_alpha"])
        log(f"LoRA rank {config['lora_rank']} alpha {config['lora_alpha']} on {len(adapted)} Linear layers")
    if config["activation_checkpointing"] != "none":
        args = checkpoint_args(config["activation_checkpointing"])
        # not the last decoder layer: its backward comes first, right after the forward, and would rebuild at once
        # what it dropped; the peak (in the first layers' backward) stays where it was
        for layer in list(model.layers)[:-1][::config["checkpoint_every"]] + list(model.vit.layers):
            layer.checkpoint = args
    # Past dynamo's default of 8 graphs a code object, later kinds of input run eager. The VAE's compiled norm
    # (model.GroupNorm) needs 8 in the encoder alone: three channel counts with SiLU and one without, each for one
    # image and for several. Every decoder layer runs one code object, so its cache holds one graph per kind:
    # checkpointed or not (the last layer), with or without generation tokens, and the size thresholds inductor
    # guards on.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    if config["compile"]:
        # dynamic from the first pack: real packs differ in length, and each new length recompiled static layers
        # (11-13 s at real width)
        for layer in model.layers:
            layer.compile(dynamic=True)
    return model


# the ops whose outputs selective checkpointing keeps, by name: the ViT's varlen attention (model.vit_attention) is a
# custom op, which the policy sees whole, and importing it to name it imports Triton (before test_nsa's interpreter)
SAVED_OPS = {"aten::mm", "aten::addmm",  # the linear layers
             "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
             "aten::_scaled_dot_product_cudnn_attention", "flex_attention", "torch_attn::_varlen_attn"}


def checkpoint_args(mode):
    """The torch.utils.checkpoint arguments of an activation checkpointing mode: "full" recomputes the whole layer
    (no context_fn: torch.compile refuses the default one passed explicitly); "selective" saves what the matmuls and
    attention produce and recomputes only the cheap elementwise work."""
    if mode == "full":
        return {}
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op.name() in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE
    return {"context_fn": functools.partial(create_selective_checkpoint_contexts, policy)}


def freeze(model, trains, dtype):
    """requires_grad as `trains` says, and frozen weights stored in the compute dtype (on the meta device, before they
    exist): only what trains needs an fp32 master (a LoRA run keeps its 14B base weights in bf16)."""
    for prefix, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if trains[f"{prefix}.{name}" if prefix else name]:
                p.requires_grad_(True)
            else:
                setattr(module, name, torch.nn.Parameter(p.to(dtype), requires_grad=False))


def shard(model, mesh, dtype, config):
    """FSDP2: every decoder layer its own unit, the ViT one unit, then the root; bf16 compute, fp32 gradient reduction.
    The ViT's 26 layers are small (15 M parameters each; all of them, 0.8 GB in bf16, are one decoder layer's size):
    one unit gathers and reduces them in one collective each, with one round of hooks instead of 26. A VLM pack's
    step took 661 ms against 711 on an H100 (notes/speed.md, eleventh session)."""
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    kw = dict(mesh=mesh, mp_policy=mp, reshard_after_forward=config["reshard_after_forward"])
    for unit in list(model.layers)[:-1] + [model.vit]:
        fully_shard(unit, **kw)
    # the root and the last decoder layer are needed again at once by the backward: not resharded after forward
    fully_shard(model.layers[-1], **{**kw, "reshard_after_forward": False})
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    if mesh.device_type == "cpu":  # gloo's AVG reduce-scatter sums (pytorch#162338): force SUM, then divide
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_force_sum_reduction_for_comms(True)


def load_weights(model, model_cfg, config, fresh, device, log):
    """Materialise the sharded model and fill it: from init_from (safetensors: every rank reads only its own shards
    from the memory-mapped files; a DCP checkpoint: each tensor whole, one at a time, then its shard), a fresh init on
    the GPU (the same seed on every rank), or rank 0's fresh CPU init (broadcast). Returns the VAE, with its weights."""
    model.to_empty(device=device)
    vae = M.build_vae(model_cfg).to(device)
    master = dist.get_rank() == 0
    if config["init_from"] or device.type == "cuda":
        torch.manual_seed(config["seed"])
        model.init_weights()
        for m in model.modules():
            if isinstance(m, M.LoRALinear):
                m.reset_lora()
        if config["init_from"]:  # parameters no checkpoint holds (NSA, LoRA) keep their fresh init
            started = convert.load_into_sharded(model, config["init_from"], ema=config["init_weights"] == "ema",
                                                vae=vae)
            log(f"loaded {config['init_from']} ({config['init_weights']} weights); freshly initialised: {len(started)}")
    else:
        model.init_buffers()
        if master and config["lora_targets"]:  # the initial adapters, seeded
            with torch.random.fork_rng():
                torch.manual_seed(config["seed"])
                M.apply_lora(fresh[0], config["lora_targets"], config["lora_rank"], config["lora_alpha"])
        full = fresh[0].state_dict() if master else {}
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    if not config["init_from"]:  # the fresh VAE (the pooled stand-in has no weights), rank 0's
        vae_state = [(fresh[1] if master and fresh else vae).state_dict()]
        dist.broadcast_object_list(vae_state, src=0)
        vae.load_state_dict(vae_state[0])
    return vae


def weight_groups(trains):
    """{"und", "gen", "vit", "connector", "lm_head", "latent", "lora"} -> whether weights of that group train.
    LoRA: the base weights take no weight gradient, but gradient flows through them (the adapters' own small
    matmuls are not counted: MFU errs low)."""
    groups = {g: any(t for n, t in trains.items() if ".lora_" not in n and fnmatch(n, pat))
              for g, pat in [("und", "layers.*.und.*"), ("gen", "layers.*.gen.*"), ("vit", "vit.*"),
                             ("connector", "connector.*"), ("lm_head", "lm_head.*"), ("latent", "vae2llm.*")]}
    groups["lora"] = any(t for n, t in trains.items() if ".lora_" in n)
    return groups


def optimizer_and_ema(model, params, config, device):
    """Fused AdamW over the local shards of the trainable parameters (fp32 masters: FSDP2 keeps the sharded parameters
    in fp32); the EMA a sharded fp32 copy of them."""
    opt = torch.optim.AdamW(params, lr=config["lr"], betas=(config["beta1"], config["beta2"]), eps=config["eps"],
                            weight_decay=config["weight_decay"], fused=True)
    ema = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad} if config["ema"] else {}
    return opt, ema


def lr_at(config, step):
    if step < config["warmup_steps"]:  # as the official schedule: step k of the warm-up at lr * k / W
        return config["lr"] * step / config["warmup_steps"]
    if config["lr_schedule"] == "cosine":
        progress = (step - config["warmup_steps"]) / max(1, config["max_steps"] - config["warmup_steps"])
        return config["min_lr"] + 0.5 * (config["lr"] - config["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))
    return config["lr"]


def train_step(run, packs, lr, step=0, stop_votes=lambda: 0, prepare_next=None):
    """One optimiser step over this rank's micro-step packs (on the device, their images encoded: Feed.take).
    Losses are normalised by the GLOBAL CE and MSE token counts (all ranks, all micro-steps), so N processes compute
    the gradient one process would over the same packs. A non-finite loss or gradient skips the update (returned as
    ok=False). `step` drives the schedules; stop_votes() (this rank's pending signals), asked after the backward,
    rides the loss sums' all-reduce: r["stop"] says whether any rank has one. prepare_next() (Feed.prepare: the next
    packs) runs once the backward is queued, so its GPU work overlaps the backward's end and the optimiser. The step
    reads the GPU once, at its end, after the optimiser step."""
    config, world, model = run.config, run.world, run.model
    off = [k for k, s in config["loss_off_from_step"].items() if step >= s]
    ce_w, mse_w = (0.0 if k in off else config[k + "_weight"] for k in ("ce", "mse"))
    frozen = [pat for pat, s in config["freeze_from_step"].items() if step >= s]
    for g in run.opt.param_groups:
        g["lr"] = lr
    # one collective: global CE and MSE token counts, and which micro-steps have ViT images on any rank
    reweight = config["ce_loss_reweighting"]
    ce_count = (lambda p: float(p.ce_weights.sum())) if reweight else (lambda p: p.ce_indexes.numel())
    counts = all_sum([sum(ce_count(p) for p in packs), sum(p.mse_indexes.numel() for p in packs)] +
                     [len(p.vit_lens) for p in packs], run.device)
    n_ce, n_mse, vit_images = counts[0], counts[1], counts[2:]
    ce_sum = mse_sum = torch.zeros((), device=run.device)
    tokens = flops = 0
    for pack, images in zip(packs, vit_images):
        out = model(pack, timestep_shift=config["timestep_shift"], run_vit=images > 0 and config["visual_und"],
                    ce_weights=pack.ce_weights if reweight else None)
        # FSDP averages gradients over ranks; x world turns that into a sum, / global count into the mean
        ce_tokens = out["ce"] * pack.ce_weights if reweight else out["ce"]
        ce = ce_tokens.sum() * world / (n_ce or 1)
        mse = out["mse"].sum() * world / (n_mse or 1)
        objective = sum(w * term for w, term in ((ce_w, ce), (mse_w, mse)) if w)  # a loss switched off: no gradient
        if torch.is_tensor(objective):
            objective.backward()
        ce_sum, mse_sum = ce_sum + ce_tokens.detach().sum(), mse_sum + out["mse"].detach().sum()
        tokens += pack.num_tokens
        flops += pack_flops(pack, run.model_cfg, run.groups, vit_runs=config["visual_und"])
    stopped = frozen_mask(tuple(run.param_names), tuple(frozen))
    for p, stop in zip(run.params, stopped):
        if stop:  # scheduled freezing: no gradient, so AdamW leaves it
            p.grad = None
    grad_norm = torch.nn.utils.get_total_norm([p.grad for p in run.params if p.grad is not None], foreach=True)
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    # the stop votes as late as the step allows (a signal during the backward still stops after this step), made on
    # the device with a fill, not copied from the host: no wait for the queued work
    votes = torch.full((1,), float(stop_votes()), dtype=torch.float64, device=run.device)
    if prepare_next:  # after the votes: a signal while the next packs load stops after the step they are for
        prepare_next()
    sums = torch.cat([torch.stack([ce_sum, mse_sum]).double(), votes])
    dist.all_reduce(sums)
    finite = torch.isfinite(grad_norm) & torch.isfinite(sums[:2]).all()
    # Clipping and skipping happen inside the fused AdamW kernel: it divides the gradients by grad_scale, and where
    # found_inf is set it leaves parameters and state as they were. No pass over the gradients, no host sync.
    max_norm = config["max_grad_norm"]
    run.opt.grad_scale = (grad_norm / max_norm).clamp(min=1.0).float() if max_norm else None
    run.opt.found_inf = (~finite).float()
    run.opt.step()
    if run.ema:
        with torch.no_grad():  # on the local shards: the EMA is sharded exactly like its parameter
            ema, params = [local(e) for e in run.ema.values()], [local(p) for p in run.params]
            torch._foreach_lerp_(ema, params, (1 - config["ema"]) * finite.float())  # a skipped step moves nothing
            for e, p, stop in zip(ema, params, stopped):
                if stop:  # frozen by its schedule: its EMA becomes the parameter itself (as IRG)
                    e.copy_(p)
    run.opt.zero_grad(set_to_none=True)
    ce_tot, mse_tot, votes, grad_norm, ok = torch.cat([sums, grad_norm.double()[None], finite.double()[None]]).tolist()
    ce_mean, mse_mean = ce_tot / (n_ce or 1), mse_tot / (n_mse or 1)
    return dict(ok=bool(ok), loss=ce_w * ce_mean + mse_w * mse_mean, ce=ce_mean, mse=mse_mean, grad_norm=grad_norm,
                n_ce=n_ce, n_mse=n_mse, tokens=tokens, flops=flops, stop=votes > 0)


@functools.lru_cache(maxsize=4)
def frozen_mask(names, patterns):
    """Which parameters the freeze_from_step patterns in force match (made once per set of patterns, not per step)."""
    return tuple(any(fnmatch(name, pat) for pat in patterns) for name in names)


@torch.no_grad()
def evaluate(run, packs):
    """Validation CE and MSE (per-token means over all the packs) and their weighted sum, of the weights as they are.
    Pack i runs on rank i % world; a rank short of a pack runs pack 0 again, uncounted: FSDP needs every rank in
    every forward."""
    config, world = run.config, run.world
    run_vit = config["visual_und"] and any(p.vit_lens for p in packs)
    sums = torch.zeros(4, dtype=torch.float64, device=run.device)
    for i in range(run.rank, -(-len(packs) // world) * world, world):
        out = run.model(packs[i % len(packs)], timestep_shift=config["timestep_shift"], run_vit=run_vit)
        if i < len(packs):
            sums[:2] += torch.stack([out["ce"].sum(), out["mse"].sum()]).double()
            sums[2:] += torch.tensor([out["ce"].numel(), out["mse"].numel()], device=run.device)
    dist.all_reduce(sums)
    ce_sum, mse_sum, n_ce, n_mse = sums.tolist()
    ce, mse = ce_sum / (n_ce or 1), mse_sum / (n_mse or 1)
    return dict(loss=config["ce_weight"] * ce + config["mse_weight"] * mse, ce=ce, mse=mse)


def make_loader(run, seed, validation=False):
    """This rank's data.Loader over the config's sources; validation=True: the val_sources' loader, the same on every
    rank and without condition dropout."""
    config = run.config
    dropout = [0.0 if validation else config[k + "_cond_dropout_prob"] for k in ("text", "vit", "vae")]
    sources = config["val_sources" if validation else "sources"]
    rank, world, data_args = (0, 1, {**config["data_args"], "prefetch": 0}) if validation else \
        (run.rank, run.world, config["data_args"])
    return data.Loader([data.Source(**src) for src in sources], run.tokenizer, config["packing_length"], dropout,
                       max_latent_size=run.model_cfg.max_latent_size, vit_side=run.model_cfg.vit_max_patches_per_side,
                       seed=seed, rank=rank, world_size=world, **data_args)


def validation_packs(run):
    """val_packs packs of val_sources, made once and encoded by the VAE. Their loader's seed is fixed (0) and it
    seeds every draw by the sample, so the samples, timesteps and noise are the same at every evaluation and in
    every run over these val_sources, whatever the training seed or world size."""
    loader = make_loader(run, 0, validation=True)
    packs = encode_images(run.vae, [loader.next_pack().to(run.device) for _ in range(run.config["val_packs"])],
                          run.dtype, run.latent_cache)
    loader.close()
    if run.latent_cache:
        run.latent_cache.write()
    return packs


def main(argv):
    """Train as the config and --key=value overrides say; ends the process when done (finish_distributed), so run
    it as a script or a subprocess, not inside a Python session you want to keep. SIGTERM or SIGINT (a cluster's
    preemption, Ctrl-C) on any rank: every rank finishes the step, saves, and exits 0."""
    if {"-h", "--help"} & set(argv):
        print(usage())
        return
    if argv and argv[0].startswith("--plot="):  # a run's out_dir or its metrics.jsonl
        path = argv[0].split("=", 1)[1]
        path = os.path.join(path, "metrics.jsonl") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise SystemExit(f"no metrics file {path}")
        png = os.path.join(os.path.dirname(path), "metrics.png")
        plot_metrics(path, png)
        print(f"wrote {png}")
        return
    master = os.environ.get("RANK", "0") == "0"
    try:
        config = load_config(argv)
        preflight(config)
    except SystemExit as e:  # a mistake in the config: said once (by rank 0), not by every rank of a torchrun
        raise SystemExit(e.code if master else 1)
    if master:
        out_lock = lock_out_dir(config["out_dir"])  # held to the end
        keep_console(config, argv)
    run = build(config)
    log, device = run.log, run.device

    loader = make_loader(run, config["seed"])
    val_packs = validation_packs(run) if config["val_sources"] else []

    # --- resume: the newest intact checkpoint in out_dir, if any ---
    ckpt_dir = os.path.join(config["out_dir"], "checkpoints")
    os.makedirs(ckpt_dir, exist_ok=True)
    step, bad_in_row, skipped, elapsed = 0, 0, 0, 0.0
    resume = find_checkpoint(ckpt_dir, log)
    if resume:
        step, extra = load_checkpoint(resume, run)
        if extra is not None:
            set_rng_state(extra["rng"], device)
            bad_in_row, skipped, elapsed = extra["bad_in_row"], extra["skipped"], extra.get("elapsed_s", 0.0)
        if extra is None or not config["resume_data_order"]:
            why = "resume_data_order=False" if extra is not None else "world size changed: model, optimiser and EMA " \
                "resharded (per-rank loader states do not map across world sizes)"
            log(f"{why}: the data order restarts from seed {config['seed'] + step}")
            loader.close()
            loader = make_loader(run, config["seed"] + step)
        else:
            resume_data(loader, extra, resume)
        log(f"resumed from {resume} at step {step}")

    if master:
        trim_metrics(os.path.join(config["out_dir"], "metrics.jsonl"), step)
    feed = Feed(run, loader.next_pack, config["grad_accum"], loader.state_dict)
    progress = Progress(run, elapsed)
    signals = []  # while training (not while building or exporting), a signal asks the loop to save and stop
    default = {sig: signal.signal(sig, lambda number, frame: signals.append(signal.Signals(number).name))
               for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while step < config["max_steps"]:
            t0 = time.time()
            packs, data_state = feed.take()
            for pack in packs:
                if not config["visual_gen"] and pack.mse_indexes.numel():
                    raise SystemExit("visual_gen is off but the data has generation targets")
            lr = lr_at(config, step)
            # a signal on any rank: all stop after this step; the last step prepares no next packs
            r = train_step(run, packs, lr, step, lambda: len(signals), feed.prepare if step + 1 < config["max_steps"]
                           else None)
            if r["ok"]:
                bad_in_row = 0
            else:
                bad_in_row, skipped = bad_in_row + 1, skipped + 1
                log(f"step {step}: non-finite loss {r['loss']} or grad norm {r['grad_norm']}: step skipped "
                    f"({bad_in_row} in a row)")
                if bad_in_row >= config["max_bad_steps"]:
                    raise SystemExit(non_finite_report(run, r, bad_in_row))
            step += 1
            progress.add(r, time.time() - t0)  # train_step's host read has waited for the GPU

            last = step == config["max_steps"]
            val = evaluate(run, val_packs) if val_packs and (step % config["eval_every"] == 0 or last) else None
            if step == 1 or step % config["log_every"] == 0 or val or last:
                progress.report(step, lr, loader.stats["fill"], skipped, val)
            if config["sample_every"] and step % config["sample_every"] == 0 and config["sample_prompts"]:
                progress.image(step, write_samples(run, step))
            if step % config["save_steps"] == 0 or last or r["stop"]:
                extra = {"loader": data_state, "rng": rng_state(device), "bad_in_row": bad_in_row,
                         "skipped": skipped, "data": data_rows(loader), "elapsed_s": progress.elapsed()}
                log(f"checkpoint: {save_checkpoint(run, ckpt_dir, step, extra)}")
            if r["stop"]:
                log(f"{' '.join(signals) or 'a signal on another rank'}: saved step {step} and stopped; the same "
                    f"command resumes")
                break
    finally:  # the plot of the last lines however the loop ends: done, a signal, the non-finite stop, an error
        if run.master:
            progress.plot()
    for sig, handler in default.items():
        signal.signal(sig, handler)
    complete = step >= config["max_steps"]
    if complete:
        export(run)
    loader.close()  # its worker processes, before os._exit skips every clean-up
    progress.finish(step, complete)
    finish_distributed()


def data_rows(loader):
    return {src.name: len(src) for src in loader.sources}


def resume_data(loader, extra, path):
    """The loader goes on exactly where the checkpoint's stopped, or one message: what changed in the data, and
    how to go on anyway."""
    then, now = extra["data"], data_rows(loader)
    problem = "; ".join(f"source {name}: {then.get(name, 'absent')} -> {now.get(name, 'absent')} rows"
                        for name in sorted(set(then) | set(now)) if then.get(name) != now.get(name))
    if not problem:
        try:
            return loader.load_state_dict(extra["loader"])
        except (ValueError, RuntimeError) as e:  # a source renamed, a buffered row that no longer reads
            problem = str(e)
    raise SystemExit(f"the data changed since {path} ({problem}), so its data order cannot continue. To train on "
                     f"the data as it is now, resume with --resume_data_order=False: the order restarts from seed + "
                     f"step (rows already seen may come again, others not at all)")


def non_finite_report(run, r, steps):
    """Why training stops: which quantities were not finite, and the first non-finite weight if any (a skipped step
    changes no weight, so one came in with the weights, or from the last finite update)."""
    terms = [f"{k} {r[k]}" for k in ("ce", "mse", "grad_norm") if not math.isfinite(r[k])]
    tensors = list(run.model.named_parameters()) + [("vae." + n, p) for n, p in run.vae.named_parameters()]
    mine = next((n for n, p in tensors if not torch.isfinite(local(p)).all()), None)
    found = [None] * run.world
    dist.all_gather_object(found, mine)
    weight = next((n for n in found if n), None)
    if weight:
        hint = f"weight {weight} is not finite: check the checkpoint the run started or resumed from"
    elif any(t.startswith(("ce", "mse")) for t in terms):
        hint = "the weights are finite: check these steps' data (`python data.py PATH` checks a dataset)"
    else:
        hint = "the losses and weights are finite but the gradient is not: an overflow in backward (fp32? lower lr?)"
    return f"{steps} non-finite steps in a row (the last: {', '.join(terms)}): stopping. {hint}"


# ----------------------------------------------------------------------------------------------
# What the user sees: rank 0's console (kept in out_dir/train.log), progress lines, metrics.jsonl and its plot, wandb

class Tee:
    """A console stream that also writes to a file."""

    def __init__(self, stream, file):
        self.stream, self.file = stream, file

    def write(self, text):
        self.file.write(text)
        return self.stream.write(text)

    def flush(self):
        self.file.flush()
        self.stream.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding, ...: the console's
        return getattr(self.stream, name)


def keep_console(config, argv):
    """Rank 0's console also goes to out_dir/train.log (appended: a resume adds to it) and the resolved config to
    out_dir/config.json; then the run's first lines: the command, where its files go, the config in brief."""
    out = config["out_dir"]
    os.makedirs(out, exist_ok=True)
    log_file = open(os.path.join(out, "train.log"), "a", buffering=1)
    sys.stdout, sys.stderr = Tee(sys.stdout, log_file), Tee(sys.stderr, log_file)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1, default=str)
    changed = ", ".join(f"{k}={v!r}" for k, v in config.items() if v != DEFAULTS[k])
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} python train.py {' '.join(argv)}\n"
          f"out_dir {out}: train.log, config.json (the full config), metrics.jsonl and metrics.png, samples/, "
          f"checkpoints/, export/")
    print(textwrap.fill(f"config (--help lists every key): {changed or 'the defaults'}", 120, subsequent_indent="  "))


def duration(seconds):
    """3m10s, 2h05m, 45s."""
    s = int(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def start_wandb(config):
    """wandb (asked for by wandb_project): the run named wandb_name (default: out_dir's folder name), online or
    offline; its id is kept in out_dir/wandb_id, so that a resumed training goes on in the same wandb run."""
    import wandb
    id_file = os.path.join(config["out_dir"], "wandb_id")
    if not os.path.exists(id_file):
        with open(id_file, "w") as f:
            f.write(wandb.util.generate_id())
    with open(id_file) as f:
        run_id = f.read().strip()
    wandb.init(project=config["wandb_project"], id=run_id, resume="allow", mode=config["wandb_mode"], config=config,
               name=config["wandb_name"] or os.path.basename(os.path.abspath(config["out_dir"])),
               dir=config["out_dir"])
    return wandb


class Progress:
    """What the loop reports, from rank 0: a line at step 1, every log_every steps, at each validation and at the end,
    with the means over the steps since the last line (the window), s/step, elapsed time and ETA; the same numbers
    as a row of metrics.jsonl, drawn in metrics.png; wandb when asked. Every rank calls report (it sums over
    ranks)."""

    def __init__(self, run, elapsed_s):
        self.run, self.config = run, run.config
        self.started = time.time() - elapsed_s  # a resume goes on counting from the checkpoint's elapsed time
        self.peak = peak_flops(run.device, self.config["peak_tflops"])
        self.metrics = os.path.join(self.config["out_dir"], "metrics.jsonl")
        if run.master:  # there from the start, even for a run of 0 steps
            open(self.metrics, "a").close()
        self.wandb = start_wandb(self.config) if run.master and self.config["wandb_project"] else None
        self.row, self.plotted = None, 0.0
        self.new_window()

    def new_window(self):
        self.window_start = time.time()
        self.window = dict.fromkeys(("steps", "ok", "loss", "ce", "mse", "grad_norm", "n_ce", "n_mse", "tokens",
                                     "flops", "busy"), 0)

    def elapsed(self):
        return time.time() - self.started

    def add(self, r, seconds):
        """One train_step's result and the seconds it took (the non-finite steps' losses are left out)."""
        w = self.window
        w["steps"], w["busy"], w["tokens"], w["flops"] = (w["steps"] + 1, w["busy"] + seconds,
                                                          w["tokens"] + r["tokens"], w["flops"] + r["flops"])
        if r["ok"]:
            w["ok"] += 1
            for k in ("loss", "ce", "mse", "grad_norm", "n_ce", "n_mse"):
                w[k] += r[k]

    def report(self, step, lr, fill, skipped, val=None):
        run, w, total = self.run, self.window, self.config["max_steps"]
        tokens, flops = all_sum([w["tokens"], w["flops"]], run.device)
        s_per_step, elapsed = (time.time() - self.window_start) / w["steps"], self.elapsed()
        mean = {k: w[k] / w["ok"] if w["ok"] else math.nan for k in ("loss", "ce", "mse", "grad_norm")}
        row = dict(step=step, time=time.time(), elapsed_s=elapsed, lr=lr, **mean, n_ce=w["n_ce"], n_mse=w["n_mse"],
                   tokens_per_s=tokens / w["busy"], s_per_step=s_per_step, skipped=skipped)
        gpu = ""
        if run.device.type == "cuda":  # MFU and memory only where they mean something
            row["mfu"] = flops / w["busy"] / (self.peak * run.world) if self.peak else 0.0
            row["mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
            gpu = f" | mfu {row['mfu']:.3f} | mem {row['mem_gib']:.1f} GiB"
        run.log(f"step {step}/{total} ({step / total:.1%}) | loss {mean['loss']:.4f} | ce {mean['ce']:.4f} | "
                f"mse {mean['mse']:.4f} | lr {lr:.2e} | grad {mean['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s"
                f"{gpu} | {s_per_step:.2f} s/step | {duration(elapsed)} elapsed | "
                f"ETA {duration(s_per_step * (total - step))} | fill {fill:.1%} | skipped {skipped}")
        if val:
            row.update({f"val_{k}": v for k, v in val.items()})
            run.log(f"  validation ({self.config['val_packs']} fixed packs) | loss {val['loss']:.4f} | "
                    f"ce {val['ce']:.4f} | mse {val['mse']:.4f}")
        if run.master:
            with open(self.metrics, "a") as f:
                f.write(json.dumps(row) + "\n")
            if time.time() - self.plotted >= PLOT_EVERY_S:
                self.plot()
            if self.wandb:
                self.wandb.log(row, step=step)
        self.row = row
        self.new_window()

    def plot(self):
        plot_metrics(self.metrics, os.path.join(self.config["out_dir"], "metrics.png"))
        self.plotted = time.time()

    def image(self, step, grid):
        if self.wandb:
            self.wandb.log({"samples": self.wandb.Image(grid, caption=" | ".join(self.config["sample_prompts"]))},
                           step=step)

    def finish(self, step, complete):
        """The end: how it went, where everything is, and what to run next (after a signal: main said it)."""
        config, out, r = self.config, self.config["out_dir"], self.row or {}
        val = f" | validation loss {r['val_loss']:.4f}" if "val_loss" in r else ""
        self.run.log(f"{'done' if complete else 'stopped'}: {step} steps, {duration(self.elapsed())} | last loss "
                     f"{r.get('loss', math.nan):.4f} (ce {r.get('ce', math.nan):.4f}, mse {r.get('mse', math.nan):.4f})"
                     f"{val}\n  {out}/metrics.png: the losses, tok/s and lr of metrics.jsonl; {out}/train.log: this "
                     f"console")
        if complete:
            prompts = " ".join(f'"{p}"' for p in (config["sample_prompts"] or ["a red circle"]))
            self.run.log(f"next: python sample.py --ckpt {out}/export --size {config['sample_size']} --prompts "
                         f"{prompts} --out {out}/sample.png")
        if self.wandb:
            self.wandb.finish()


# metrics.jsonl as a PNG with Pillow alone (no plotting library to install): the train and validation losses (log
# scale), tokens/s and lr against the step, redrawn at a log line once PLOT_EVERY_S have passed (a long run's file
# takes ~0.3 s to draw at 30k lines, which every rank would wait for), at the end, and by `python train.py --plot=DIR`.

PLOT_PANELS = [  # (title, [(metrics key, colour)], log scale)
    ("loss", [("ce", (31, 119, 180)), ("mse", (255, 127, 14)), ("val_ce", (44, 160, 44)), ("val_mse", (214, 39, 40))],
     True),
    ("tokens/s", [("tokens_per_s", (148, 103, 189))], False),
    ("lr", [("lr", (140, 86, 75))], False),
]
PLOT_EVERY_S = 60.0
PLOT_SIZE = (800, 240)            # pixels: the image's width, each panel's height
PLOT_MARGINS = (70, 20, 28, 30)   # a panel's left, right, top and bottom margins: the axes' labels, the title


def read_metrics(path):
    """The rows of a metrics.jsonl; a step logged again after a resume keeps its last row."""
    rows = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def ticks(lo, hi, log):
    """Round tick values in [lo, hi]: 1, 2, 3 and 5 times powers of ten (log scale), or 3 to 6 even steps."""
    if log:
        return [m * 10 ** e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                for m in (1, 2, 3, 5) if lo <= m * 10 ** e <= hi]
    raw = (hi - lo) / 5
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if raw <= step * m)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def plot_metrics(path, out):
    """Draw the metrics of `path` (metrics.jsonl) into the PNG `out`, one panel per PLOT_PANELS entry."""
    (width, height), (left, right, top_margin, bottom_margin) = PLOT_SIZE, PLOT_MARGINS
    rows = read_metrics(path)
    image = Image.new("RGB", (width, height * len(PLOT_PANELS)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default(size=12)
    steps = [r["step"] for r in rows]
    x0, x1 = min(steps, default=0), max(steps, default=1)
    x_of = lambda s: left + (s - x0) / ((x1 - x0) or 1) * (width - left - right)
    for p, (title, series, log) in enumerate(PLOT_PANELS):
        top, bottom = p * height + top_margin, (p + 1) * height - bottom_margin
        draw.rectangle([left, top, width - right, bottom], outline=(160, 160, 160))
        draw.text((left, top - 16), title, fill="black", font=font)
        drawn = lambda v: isinstance(v, (int, float)) and math.isfinite(v) and (v > 0 or not log)
        values = [r[k] for r in rows for k, _ in series if drawn(r.get(k))]
        if not values:
            continue
        lo, hi = min(values + ([] if log else [0])), max(values)  # a linear axis from 0
        if lo == hi:  # a flat line in the middle
            lo, hi = (lo / 2, hi * 2) if log else (lo - abs(lo) / 2 - 1e-12, hi + abs(hi) / 2 + 1e-12)
        scale = math.log10 if log else (lambda v: v)
        y_of = lambda v: bottom - (scale(v) - scale(lo)) / (scale(hi) - scale(lo)) * (bottom - top)
        for v in ticks(lo, hi, log):
            draw.line([left - 4, y_of(v), left, y_of(v)], fill="black")
            draw.text((left - 6, y_of(v)), f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}", fill="black", font=font,
                      anchor="rm")
        for s in ticks(x0, x1, False) if x1 > x0 else [x0]:
            draw.line([x_of(s), bottom, x_of(s), bottom + 4], fill="black")
            draw.text((x_of(s), bottom + 6), f"{s:g}", fill="black", font=font, anchor="ma")
        legend = left + 60
        for key, colour in series:
            points = [(x_of(r["step"]), y_of(r[key])) for r in rows if drawn(r.get(key))]
            if not points:
                continue
            draw.line(points, fill=colour, width=2)
            for x, y in points[:1] if len(points) == 1 else []:  # one row: a dot
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
            if len(series) > 1:
                draw.text((legend, top - 16), key, fill=colour, font=font)
                legend += int(draw.textlength(key, font=font)) + 16
    image.save(out)


def finish_distributed():
    """Tear the process group down on all ranks together (rank 0 may still be writing: gloo aborts otherwise), then
    end the process without the interpreter's teardown: a gloo worker thread can still be releasing a finished
    collective (its saved thread-local state holds a Python object) while Python finalizes, and dies in
    std::terminate: SIGABRT after a complete run in ~3% of 2-rank CPU runs (torch 2.13)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


# ----------------------------------------------------------------------------------------------
# The frozen VAE: encoded on the GPU, or the posterior moments from a cache

class LatentCache:
    """Each image's posterior moments (mean, log-variance: what the encoder computes before the random draw) on disk
    as safetensors, one file per image named by the hash of its pixels (its content after the transform), in a folder
    per VAE (a fingerprint of its weights). A later epoch draws its posterior sample from the moments: the same math,
    no encoder. A file that does not hold what its name says (another image, a torn write) is made again."""

    def __init__(self, folder, vae):
        h = hashlib.blake2b(digest_size=8)
        for name, t in sorted(vae.state_dict().items()):
            h.update(name.encode() + str(tuple(t.shape)).encode() + t.detach().cpu().contiguous().view(-1).view(
                torch.uint8).numpy().tobytes())
        h.update(type(vae).__name__.encode())
        self.folder = os.path.join(folder, h.hexdigest())
        self.hits = self.misses = 0
        self.unwritten = {}  # key: moments still on the device; write() saves them when the step has read the GPU

    def path(self, key):
        return os.path.join(self.folder, key[:2], key + ".safetensors")

    def get(self, key, device):
        if key in self.unwritten:
            self.hits += 1
            return self.unwritten[key]
        try:
            with safe_open(self.path(key), "pt", device=str(device)) as f:
                if f.metadata().get("key") == key:
                    self.hits += 1
                    return f.get_tensor("mean"), f.get_tensor("logvar")
        except (OSError, SafetensorError):
            pass
        self.misses += 1
        return None

    def put(self, key, mean, logvar):  # no copy to the host here: that would wait for the GPU
        self.unwritten[key] = mean, logvar

    def write(self):
        for key, (mean, logvar) in self.unwritten.items():
            path = self.path(key)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.{os.getpid()}.tmp"  # ranks may write the same image: each its own temporary, a rename
            save_file({"mean": mean.contiguous(), "logvar": logvar.contiguous()}, tmp, metadata={"key": key})
            os.replace(tmp, path)
        self.unwritten = {}


# Pixels per encoder call: its activations took ~2.4 GiB a megapixel (six 1024 px images at once: 14.9 GiB on an
# H100), the Feed runs it while the gradients are alive, and the side stream's allocator pool keeps that memory
# cached for itself. An image larger than this goes alone. (Most of the 2.4 GiB was the mid-block attention's fp32
# score matrix, 1 GiB a 1024 px image, which the fused kernel that runs it now never forms: not measured since.)
ENCODE_PIXELS = 2 ** 20


@torch.no_grad()
def encode_images(vae, packs, dtype, cache=None):
    """Fill the packs' latents of pixel images: from the cached posterior moments, or with the frozen VAE (compute
    dtype, NCHW: cuDNN's convolutions and the compiled norm ran channels-last 1.3-2.0x slower on an H100, 29-38 ms a
    megapixel in NCHW; batches of one image size over all the packs, up to ENCODE_PIXELS: never padded - the
    official pad-to-largest batching lets padding leak into the latents of smaller images), whose moments then go
    into the cache. Returns the packs."""
    by_size = {}
    for pack in packs:
        for i, z in enumerate(pack.vae_latents):
            if z is not None:
                continue
            moments = cache.get(pack.vae_keys[i], pack.vae_posterior_eps[i].device) if cache else None
            if moments:
                pack.vae_latents[i] = vae.latent(*moments, pack.vae_posterior_eps[i].to(dtype)).float()
            else:
                by_size.setdefault(tuple(pack.vae_pixels[i].shape), []).append((pack, i))
    for size, same in by_size.items():
        per_call = max(1, ENCODE_PIXELS // (size[-2] * size[-1]))
        for group in (same[j:j + per_call] for j in range(0, len(same), per_call)):
            pixels = data.unit_pixels(torch.stack([pack.vae_pixels[i] for pack, i in group])).to(dtype)
            mean, logvar = vae.moments(pixels)
            eps = torch.stack([pack.vae_posterior_eps[i] for pack, i in group]).to(dtype)
            for (pack, i), z, m, lv in zip(group, vae.latent(mean, logvar, eps).float(), mean, logvar):
                pack.vae_latents[i] = z
                if cache:
                    cache.put(pack.vae_keys[i], m, lv)
    return packs


class Feed:
    """This rank's packs a step ahead, on the device with their images encoded. prepare() (train_step's prepare_next)
    fetches the next step's packs and runs the frozen VAE on them on a side stream, which the GPU overlaps with the
    backward still queued and the optimiser: the encoder is off the critical path. take() hands out a step's packs
    and the loader state just after them (what a checkpoint of that step saves). The packs' memory belongs to the
    side stream and is freed only after the step that reads it has read the GPU at its end, so the side stream never
    reuses memory the main stream still reads."""

    def __init__(self, run, next_pack, count, data_state=lambda: None):
        self.run, self.next_pack, self.count, self.data_state = run, next_pack, count, data_state
        self.stream = torch.cuda.Stream(run.device) if run.device.type == "cuda" else None
        # host seconds the last prepare waited for the loader (data_s) and took in all, with the copies and the
        # encoder's launches (host_s)
        self.ahead, self.data_s, self.host_s = None, 0.0, 0.0

    def prepare(self):
        t0 = time.perf_counter()
        packs = [self.next_pack() for _ in range(self.count)]
        self.data_s = time.perf_counter() - t0
        run, state = self.run, self.data_state()
        with torch.cuda.stream(self.stream) if self.stream else contextlib.nullcontext():
            packs = encode_images(run.vae, [p.to(run.device) for p in packs], run.dtype, run.latent_cache)
            self.ahead = packs, state, self.stream.record_event() if self.stream else None
        self.host_s = time.perf_counter() - t0

    def take(self):
        if self.ahead is None:  # the first step, or after a step that prepared none
            self.prepare()
        (packs, state, encoded), self.ahead = self.ahead, None
        if encoded is not None:
            torch.cuda.current_stream(self.run.device).wait_event(encoded)
        if self.run.latent_cache:
            self.run.latent_cache.write()
        return packs, state


def write_samples(run, step):
    """out_dir/samples/step_N.png: the sample prompts drawn with the same noise at every call, each written under
    its image; returns the grid."""
    config = run.config
    size = (config["sample_size"], config["sample_size"])
    grid = sample.sample_grid(run.model, run.vae, run.tokenizer, config["sample_prompts"], image_size=size,
                              seed=config["seed"], captioned=True, **config["sample_settings"])
    if run.master:
        path = os.path.join(config["out_dir"], "samples", f"step_{step:06d}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path)
        run.log(f"samples: {path}")
    return grid


def export(run):
    """Consolidated safetensors (raw and EMA) for sample.py and convert.py; every rank takes part in the gathers
    (one tensor at a time), rank 0 writes. LoRA: the adapters alone in lora.safetensors, and merged weights
    (W + alpha/r B A) that load without LoRA code. save_ema_as_default=False: the EMA goes to export_ema/."""
    config = run.config
    folder = os.path.join(config["out_dir"], "export")
    model_sd = run.model.state_dict()
    ema_sd = {**model_sd, **run.ema} if run.ema else None  # frozen parameters are their own EMA
    adapters = {k: v for k, v in model_sd.items() if ".lora_" in k}
    if adapters:
        model_sd = M.merge_lora(model_sd, config["lora_alpha"])
        ema_sd = M.merge_lora(ema_sd, config["lora_alpha"]) if ema_sd else None
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[config["export_dtype"]]
    vae_sd = {k: v.float() for k, v in run.vae.state_dict().items()}
    folders = [folder]
    if ema_sd is not None and not config["save_ema_as_default"]:
        folders.append(os.path.join(config["out_dir"], "export_ema"))
        convert.save_nanobagel(folders[-1], ema_sd, vae_sd, run.model_cfg, dtype=dtype)
        ema_sd = None
    convert.save_nanobagel(folder, model_sd, vae_sd, run.model_cfg, ema_sd, dtype=dtype)
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v
    entries = [(k, tuple(v.shape), v.dtype, lambda v=v: full(v)) for k, v in adapters.items()]
    if adapters and run.master:
        meta = {"format": "pt", "lora_rank": str(config["lora_rank"]), "lora_alpha": str(config["lora_alpha"]),
                "lora_targets": json.dumps(config["lora_targets"])}
        convert.write_safetensors(os.path.join(folder, "lora.safetensors"), entries, meta)
    elif adapters:
        for *_, get in entries:  # take part in each gather, in rank 0's order
            get()
    if run.master:
        for out in folders:
            run.tokenizer.tokenizer.save(os.path.join(out, "tokenizer.json"))
            run.log(f"export: {out} ({', '.join(sorted(os.listdir(out)))})")


if __name__ == "__main__":
    main(sys.argv[1:])
