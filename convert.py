"""Checkpoint layouts in and out of nanobagel.

The same BAGEL weights come in three folder layouts:
  official   ByteDance-Seed/BAGEL-7B-MoT: ema.safetensors (the Bagel module; official training checkpoints also
             hold the raw weights in model.safetensors), ae.safetensors (FLUX AE), llm_config.json (Qwen2 fields),
             vit_config.json (SigLIP fields, one layer more than built).
  hf         lmms-lab/BAGEL-7B-MoT-ver.LE: config.json with nested llm_config / vit_config / vae_config, weights in
             model.safetensors or in shards listed by model.safetensors.index.json; the official key names plus
             the AE under vae_model.*.
  nanobagel  config.json (BagelConfig fields), model.safetensors (our names), optional ema.safetensors (EMA),
             vae.safetensors (FLUX names).
and are read from a fourth: train.py's checkpoints (dcp: out_dir/checkpoints/step_N, torch DCP, raw and EMA weights;
the model config, AE and tokenizer as the run's train_state.json says), so a run stopped at any step has weights.
Tokenizer files (tokenizer.json, vocab.json, ...) travel along, checked against the embedding rows.

    python convert.py FOLDER OUT [--to official|hf|nanobagel] [--dtype bf16|fp32] [--weights ema|model]
    python convert.py --from-parts LLM_DIR VIT_DIR AE_FILE OUT [--dtype bf16|fp32]

FOLDER's layout is detected; --to defaults to nanobagel, or to official for a nanobagel FOLDER. A conversion
carries one set of weights: the EMA where FOLDER has one, or as --weights says. The official layout writes it to
ema.safetensors (the file its loaders read), the nanobagel layout to model.safetensors, the hf layout to ≤ 5 GB
shards plus an index. --dtype casts the Bagel weights (default: keep); the AE keeps its dtype. Tensors stream one
at a time from memory-mapped files (or the DCP files) to the output, so a 29 GB checkpoint is never held in memory.
--from-parts builds BAGEL as the official pre-training does, from a Qwen2/Qwen2.5 LLM, a SigLIP NaViT and the FLUX
AE in their own Hugging Face layouts (assemble), and writes a nanobagel folder to train from.
NaN or Inf in any tensor read stops with an error naming it and its file.

In code: load_checkpoint(folder) -> (model, vae, cfg) for any layout; convert(folder, out, to); save_nanobagel
from modules or (sharded) state dicts; load_into_sharded(model, folder) fills an FSDP2 model, each rank
reading only its own shards; assemble(llm_dir, vit_dir, ae_file, out).
"""
import argparse
import json
import math
import os
import pickle
import re
import shutil
import struct
import sys
import warnings
from dataclasses import asdict, fields, replace

import torch
from safetensors import safe_open
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element

from model import PRESETS, Bagel, BagelConfig, build_vae, merge_lora, sincos_2d


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be read as asked; the message names the file and the first problem."""

# ----------------------------------------------------------------------------------------------
# Weight names: ours -> official. {i}: layer index; an expert's official names carry a suffix.

EXPERT_SUFFIX = {"und": "", "gen": "_moe_gen"}
LLM_LAYER = {  # our name inside layers.{i}.{expert}. -> official name inside language_model.model.layers.{i}.
    "attn_norm.weight": "input_layernorm{g}.weight",
    "q_proj.weight": "self_attn.q_proj{g}.weight", "q_proj.bias": "self_attn.q_proj{g}.bias",
    "k_proj.weight": "self_attn.k_proj{g}.weight", "k_proj.bias": "self_attn.k_proj{g}.bias",
    "v_proj.weight": "self_attn.v_proj{g}.weight", "v_proj.bias": "self_attn.v_proj{g}.bias",
    "o_proj.weight": "self_attn.o_proj{g}.weight",
    "q_norm.weight": "self_attn.q_norm{g}.weight", "k_norm.weight": "self_attn.k_norm{g}.weight",
    "mlp_norm.weight": "post_attention_layernorm{g}.weight",
    "gate_proj.weight": "mlp{g}.gate_proj.weight", "up_proj.weight": "mlp{g}.up_proj.weight",
    "down_proj.weight": "mlp{g}.down_proj.weight",
}
VIT_LAYER = {  # inside vit.layers.{i}. -> inside vit_model.vision_model.encoder.layers.{i}.
    "norm1": "layer_norm1", "norm2": "layer_norm2", "fc1": "mlp.fc1", "fc2": "mlp.fc2",
    "q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
    "out_proj": "self_attn.out_proj",
}
GLOBAL = {
    "embed_tokens.weight": "language_model.model.embed_tokens.weight",
    "norm_und.weight": "language_model.model.norm.weight",
    "norm_gen.weight": "language_model.model.norm_moe_gen.weight",
    "lm_head.weight": "language_model.lm_head.weight",
    "time_embedder.mlp.0.weight": "time_embedder.mlp.0.weight", "time_embedder.mlp.0.bias": "time_embedder.mlp.0.bias",
    "time_embedder.mlp.2.weight": "time_embedder.mlp.2.weight", "time_embedder.mlp.2.bias": "time_embedder.mlp.2.bias",
    "vae2llm.weight": "vae2llm.weight", "vae2llm.bias": "vae2llm.bias",
    "llm2vae.weight": "llm2vae.weight", "llm2vae.bias": "llm2vae.bias",
    "connector.fc1.weight": "connector.fc1.weight", "connector.fc1.bias": "connector.fc1.bias",
    "connector.fc2.weight": "connector.fc2.weight", "connector.fc2.bias": "connector.fc2.bias",
    "vit.patch_embed.weight": "vit_model.vision_model.embeddings.patch_embedding.weight",
    "vit.patch_embed.bias": "vit_model.vision_model.embeddings.patch_embedding.bias",
    "vit.pos_embed.weight": "vit_model.vision_model.embeddings.position_embedding.weight",
    "vit.post_norm.weight": "vit_model.vision_model.post_layernorm.weight",
    "vit.post_norm.bias": "vit_model.vision_model.post_layernorm.bias",
}
# The fixed sin-cos tables: buffers we rebuild, tensors the official and hf files carry (official inference
# loads them from the file), always written as the exact table.
FIXED_TABLES = {"vit_pos_table": "vit_pos_embed.pos_embed", "latent_pos_table": "latent_pos_embed.pos_embed"}
HF_VAE_PREFIX = "vae_model."
LAYOUTS = ("official", "hf", "nanobagel")


def official_names(cfg: BagelConfig):
    """{our parameter name: official key} for every trainable tensor of a config."""
    names = dict(GLOBAL)
    for i in range(cfg.num_layers):
        for expert, g in EXPERT_SUFFIX.items():
            for ours, theirs in LLM_LAYER.items():
                names[f"layers.{i}.{expert}.{ours}"] = f"language_model.model.layers.{i}." + theirs.format(g=g)
    for i in range(cfg.vit_num_layers):
        for ours, theirs in VIT_LAYER.items():
            for p in ("weight", "bias"):
                names[f"vit.layers.{i}.{ours}.{p}"] = f"vit_model.vision_model.encoder.layers.{i}.{theirs}.{p}"
    return names


def meta_modules(cfg):
    try:
        with torch.device("meta"):
            return Bagel(cfg), build_vae(cfg)
    except (ValueError, AssertionError, TypeError) as e:  # e.g. a width GroupNorm(32) cannot split
        raise CheckpointError(f"the config does not describe a buildable model: {e}") from e


def name_maps(layout, cfg):
    """{file role: {ours: key in that file}} of a layout. Ours: Bagel parameter and table names, and
    "vae.<FLUX name>" for the AE. Roles: "weights" and "vae" (hf keeps both in its one set of files, dcp none)."""
    bagel, vae = meta_modules(cfg)
    ae = {f"vae.{k}": k for k, _ in vae.named_parameters()}
    if layout == "dcp":  # the AE: dcp_vae
        return {"weights": {k: k for k in bagel.state_dict()}}
    if layout == "nanobagel":
        return {"weights": {k: k for k in bagel.state_dict()}, "vae": ae}
    official = {**official_names(cfg), **FIXED_TABLES}
    if layout == "official":
        return {"weights": official, "vae": ae}
    return {"weights": {**official, **{ours: HF_VAE_PREFIX + k for ours, k in ae.items()}}}


def expected_shapes(cfg):
    bagel, vae = meta_modules(cfg)
    shapes = {k: tuple(v.shape) for k, v in [*bagel.named_parameters(), *bagel.named_buffers()]}
    return shapes | {f"vae.{k}": tuple(v.shape) for k, v in vae.named_parameters()}


def fixed_table(cfg, name):
    side = {"vit_pos_table": cfg.vit_max_patches_per_side, "latent_pos_table": cfg.max_latent_size}[name]
    return sincos_2d(cfg.hidden_size, side)


# ----------------------------------------------------------------------------------------------
# Reading: safetensors files, configs, layout detection

def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {path}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}") from e


def need(d, key, where):
    if key not in d:
        raise CheckpointError(f"{where}: no field {key}")
    return d[key]


def open_safetensors(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {path}")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(f"{path} is not a readable safetensors file (truncated?): {e}") from e


DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def finite(t, key, where):
    """t, after checking that it holds no NaN or Inf: a broken tensor stops the load, named with its file."""
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise CheckpointError(f"{where}: {key} holds NaN or Inf values")
    return t


class Tensors:
    """One or more memory-mapped safetensors files seen as one store; tensors are read one at a time."""
    def __init__(self, folder, files, index=None):
        self.folder, self.label = folder, os.path.join(folder, index or files[0])
        self.file_of, self.name_of = {}, {}
        for name in files:
            f = open_safetensors(os.path.join(folder, name))
            for key in f.keys():
                if key in self.file_of:
                    raise CheckpointError(f"{folder}: {key} is in both {self.name_of[key]} and {name}")
                self.file_of[key], self.name_of[key] = f, name

    def keys(self):
        return self.file_of.keys()

    def shape(self, key):
        return tuple(self.file_of[key].get_slice(key).get_shape())

    def dtype(self, key):
        return DTYPES[self.file_of[key].get_slice(key).get_dtype()]

    def get(self, key, index=()):
        """The tensor, or only its part index (a tuple of slices) read from the file."""
        t = self.file_of[key].get_slice(key)[index] if index else self.file_of[key].get_tensor(key)
        return finite(t, key, os.path.join(self.folder, self.name_of[key]))


# DCP folders (train.py's checkpoints) hold pickles: they are read through allow-lists, so that a crafted file is
# refused, never run. The trust boundary: train.py's own out_dir; foreign weights come as safetensors only.

class MetadataUnpickler(pickle.Unpickler):
    """DCP's .metadata is a pickle, and DCP reads it with pickle.load, which calls whatever a crafted file names. This
    resolves only what the metadata holds: the classes of DCP's metadata module, its file index, torch's Size, dtypes
    and layouts, and the checkpoint path."""
    ALLOWED = {("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
               ("pathlib._local", "PosixPath")}

    def find_class(self, module, name):
        obj = getattr(dcp_metadata, name, None) if module == dcp_metadata.__name__ else None
        metadata_class = isinstance(obj, type) and obj.__module__ == module
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if not (metadata_class or dtype or (module, name) in self.ALLOWED):
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a checkpoint's .metadata: refusing a "
                                         f"crafted or foreign file")
        return super().find_class(module, name)


class CheckpointReader(FileSystemReader):
    """DCP's file reader with .metadata read through MetadataUnpickler, once (dcp.load asks for it at every call)."""
    def read_metadata(self, *args, **kwargs):
        if getattr(self, "metadata", None) is None:
            with open(os.path.join(self.path, ".metadata"), "rb") as f:
                self.metadata = MetadataUnpickler(f).load()
            self.metadata.storage_meta = self.metadata.storage_meta or dcp_metadata.StorageMeta()  # as DCP's own
        self.metadata.storage_meta.load_id = self.load_id
        return self.metadata


class CheckpointPlanner(DefaultLoadPlanner):
    """DCP's planner unpickles non-tensor values (the optimiser's hyperparameters) with weights_only=False, which runs
    code; here they load with weights_only=True (plain numbers, strings and containers)."""

    def load_bytes(self, read_item, value):
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError:
            raise pickle.UnpicklingError(f"checkpoint value {read_item.dest_index.fqn} is not plain data: refusing a "
                                         f"crafted or foreign file") from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj



class DCPWeights:
    """The Bagel weights of a train.py checkpoint (torch DCP: out_dir/checkpoints/step_N), seen like Tensors under our
    parameter names: "model.*" holds the raw weights, "ema.*" the EMA of the trainable ones (a frozen parameter is
    its own EMA); LoRA adapters are merged into their weights as train.py's export merges them. One tensor is loaded
    at a time, without a process group."""
    def __init__(self, folder, ema, lora_alpha):
        self.label, self.reader, self.alpha = folder, CheckpointReader(folder), lora_alpha
        try:
            entries = self.reader.read_metadata().state_dict_metadata
        except Exception as e:
            raise CheckpointError(f"{folder}/.metadata is not a readable DCP checkpoint: {e}") from e
        self.entries = {k: m for k, m in entries.items() if isinstance(m, dcp_metadata.TensorStorageMetadata)}
        raw = {k[len("model."):] for k in self.entries if k.startswith("model.")}
        averaged = {k[len("ema."):] for k in self.entries if k.startswith("ema.")}
        if ema and not averaged:
            raise CheckpointError(f"{folder}: no EMA weights (the run had ema=0); ask for the raw weights")
        use_ema = bool(averaged) if ema is None else ema
        self.stored = {k: ("ema." if use_ema and k in averaged else "model.") + k for k in raw}
        self.adapted = {k[:-len("lora_A.weight")] + "weight" for k in raw if k.endswith(".lora_A.weight")}
        self.names = [k for k in raw if ".lora_A." not in k and ".lora_B." not in k]

    def keys(self):
        return self.names

    def shape(self, key):
        return tuple(self.entries[self.stored[key]].size)

    def dtype(self, key):
        return self.entries[self.stored[key]].properties.dtype

    def load(self, name):
        from torch.distributed.checkpoint import load
        key = self.stored[name]
        t = torch.empty(tuple(self.entries[key].size), dtype=self.entries[key].properties.dtype)
        with warnings.catch_warnings():  # it warns that there is no process group: none is wanted
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            load({key: t}, storage_reader=self.reader, no_dist=True)
        return finite(t, key, self.label)

    def get(self, key, index=()):
        t = self.load(key)
        if key in self.adapted:  # W + (alpha / r) B A
            adapters = [key[:-len("weight")] + f"lora_{ab}.weight" for ab in "AB"]
            t = merge_lora({key: t} | {k: self.load(k) for k in adapters}, self.alpha)[key]
        return t[index] if index else t


class Loaded:
    """Tensors already in memory (a freshly built AE) behind the same interface."""
    def __init__(self, label, state):
        self.label, self.state = label, state

    def keys(self):
        return self.state.keys()

    def shape(self, key):
        return tuple(self.state[key].shape)

    def dtype(self, key):
        return self.state[key].dtype

    def get(self, key, index=()):
        return self.state[key][index] if index else self.state[key]


def check_keys(tensors, names, shapes):
    """The files must hold exactly the keys names maps to, in the shapes the config builds."""
    keys = set(tensors.keys())
    missing = [k for k in names.values() if k not in keys]
    if missing:
        raise CheckpointError(f"{tensors.label}: missing key {missing[0]} ({len(missing)} missing): "
                              "the config does not match the tensors")
    unused = sorted(keys - set(names.values()))
    if unused:
        raise CheckpointError(f"{tensors.label}: unexpected key {unused[0]} ({len(unused)} unexpected): "
                              "the config does not match the tensors")
    for ours, theirs in names.items():
        if tensors.shape(theirs) != shapes[ours]:
            raise CheckpointError(f"{tensors.label}: {theirs} has shape {list(tensors.shape(theirs))}, the config "
                                  f"expects {list(shapes[ours])} (ours: {ours})")


def detect_layout(folder):
    """"official", "hf", "nanobagel" or "dcp" (train.py's checkpoints), from the files a folder holds."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder")
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if has(".metadata"):
        if not has(MANIFEST):
            raise CheckpointError(f"{folder} is a DCP folder without {MANIFEST}: not a complete train.py "
                                  "checkpoint (one killed mid-write stays step_N.tmp)")
        return "dcp"
    if has("llm_config.json") and has("ema.safetensors"):
        return "official"
    if has("config.json"):
        raw = read_json(os.path.join(folder, "config.json"))
        if "llm_config" in raw:
            return "hf"
        if "vae_ch" in raw:
            return "nanobagel"
    if has("llm_config.json"):
        return "official"  # reading it names what is missing
    raise CheckpointError(f"{folder} is not a BAGEL checkpoint: expected llm_config.json + ema.safetensors "
                          "(official), a config.json with llm_config (hf), a nanobagel config.json or a train.py "
                          "checkpoint (out_dir/checkpoints/step_N)")


def llm_fields(llm, where):
    if llm.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: unsupported activation {llm['hidden_act']}")
    if not llm.get("qk_norm", True) or llm.get("tie_word_embeddings", False):
        raise CheckpointError(f"{where}: nanobagel needs qk_norm and untied embeddings")
    if llm.get("layer_module", "Qwen2MoTDecoderLayer") != "Qwen2MoTDecoderLayer":
        raise CheckpointError(f"{where}: layer_module {llm['layer_module']}: nanobagel builds MoT layers only")
    g = lambda key: need(llm, key, where)
    return dict(vocab_size=g("vocab_size"), hidden_size=g("hidden_size"), num_layers=g("num_hidden_layers"),
                num_heads=g("num_attention_heads"), num_kv_heads=g("num_key_value_heads"),
                intermediate_size=g("intermediate_size"), rope_theta=float(g("rope_theta")),
                rms_norm_eps=g("rms_norm_eps"), freeze_und=llm.get("freeze_und", False))


def vit_fields(vit, where, built_layers):
    if vit.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or vit.get("rope", False):
        raise CheckpointError(f"{where}: unsupported ViT activation or rope")
    g = lambda key: need(vit, key, where)
    return dict(vit_hidden_size=g("hidden_size"), vit_num_layers=built_layers,
                vit_num_heads=g("num_attention_heads"), vit_intermediate_size=g("intermediate_size"),
                vit_patch_size=g("patch_size"), vit_layer_norm_eps=vit.get("layer_norm_eps", 1e-6))


def official_config(folder, **overrides):
    """BagelConfig from llm_config.json + vit_config.json (+ the constants the official loaders hard-code).
    The AE shape is not in the release files: read_checkpoint reads it off ae.safetensors, or pass vae_* overrides."""
    llm_path, vit_path = os.path.join(folder, "llm_config.json"), os.path.join(folder, "vit_config.json")
    llm, vit = read_json(llm_path), read_json(vit_path)
    built = need(vit, "num_hidden_layers", vit_path) - 1  # vit_select_layer -2 drops the last layer
    return make_config({**llm_fields(llm, llm_path), **vit_fields(vit, vit_path, built), **overrides}, folder)


def ae_shape(ae: Tensors):
    """The AE hyper-parameters an official folder does not write down, read off ae.safetensors' shapes."""
    level = lambda i: f"encoder.down.{i}.block.0.conv1.weight"
    try:
        ch = ae.shape("encoder.conv_in.weight")[0]
        levels = sum(1 for k in ae.keys() if re.fullmatch(r"encoder\.down\.\d+\.block\.0\.conv1\.weight", k))
        mult = tuple(ae.shape(level(i))[0] // ch for i in range(levels))
        blocks = sum(1 for k in ae.keys() if re.fullmatch(r"encoder\.down\.0\.block\.\d+\.conv1\.weight", k))
        z = ae.shape("decoder.conv_in.weight")[1]
    except KeyError as e:
        raise CheckpointError(f"{ae.label} is not a FLUX AE: no {e}") from e
    return dict(vae_ch=ch, vae_ch_mult=mult, vae_num_res_blocks=blocks, latent_channels=z)


def hf_config(folder, **overrides):
    """BagelConfig from an hf config.json (nested llm_config / vit_config / vae_config)."""
    path = os.path.join(folder, "config.json")
    raw = read_json(path)
    if not (raw.get("visual_gen", True) and raw.get("visual_und", True)):
        raise CheckpointError(f"{path}: visual_gen and visual_und must both be true (nanobagel builds both paths)")
    if raw.get("connector_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or raw.get("interpolate_pos", False):
        raise CheckpointError(f"{path}: unsupported connector_act or interpolate_pos")
    vit, vae = need(raw, "vit_config", path), need(raw, "vae_config", path)
    if vae.get("in_channels", 3) != 3 or vae.get("out_ch", 3) != 3:
        raise CheckpointError(f"{path}: the AE must map 3-channel images")
    g = lambda key: need(vae, key, path + " vae_config")
    return make_config({
        **llm_fields(raw["llm_config"], path + " llm_config"),
        **vit_fields(vit, path + " vit_config", need(vit, "num_hidden_layers", path)),  # already the built count
        **dict(vae_ch=g("ch"), vae_ch_mult=tuple(g("ch_mult")), vae_num_res_blocks=g("num_res_blocks"),
               latent_channels=g("z_channels"), vae_scale_factor=g("scale_factor"), vae_shift_factor=g("shift_factor"),
               latent_patch_size=raw.get("latent_patch_size", 2), max_latent_size=raw.get("max_latent_size", 64),
               vit_max_patches_per_side=raw.get("vit_max_num_patch_per_side", 70)),
        **overrides}, path)


def nanobagel_config(folder, **overrides):
    path = os.path.join(folder, "config.json")
    raw = read_json(path)
    return make_config({**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}, **overrides}, path)


def make_config(values, where):
    unknown = sorted(set(values) - {f.name for f in fields(BagelConfig)})
    if unknown:
        raise CheckpointError(f"{where}: unknown field {unknown[0]}")
    return BagelConfig(**values)


def hf_tensors(folder):
    """The hf weights: model.safetensors, or the shards model.safetensors.index.json lists."""
    index_path = os.path.join(folder, "model.safetensors.index.json")
    if not os.path.isfile(index_path):
        return Tensors(folder, ["model.safetensors"])
    weight_map = need(read_json(index_path), "weight_map", index_path)
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not os.path.isfile(os.path.join(folder, shard)):
            raise CheckpointError(f"{index_path} names the shard {shard}, which is missing")
    tensors = Tensors(folder, shards, index="model.safetensors.index.json")
    for key, shard in tensors.name_of.items():
        if weight_map.get(key) != shard:
            raise CheckpointError(f"{index_path} does not list {key} of {shard}")
    for key, shard in weight_map.items():
        if tensors.name_of.get(key) != shard:
            raise CheckpointError(f"{index_path} lists {key} in {shard}, which does not hold it")
    return tensors


# train.py's checkpoints (DCP) hold the weights, optimiser and EMA; the model config, the AE and the tokenizer come
# from the run's training config in train_state.json, as train.py made them.

MANIFEST = "train_state.json"  # a step_N folder's manifest: its files and hashes, step, training and model config

def run_state(folder):
    """train_state.json's training config, and a getter that names the file when a field is missing."""
    path = os.path.join(folder, MANIFEST)
    state = read_json(path)
    config = need(state, "config", path)
    return state, lambda key: need(config, key, path + " config")


def run_init(folder, init_from):
    """read_checkpoint of the folder a run started from, errors named as the run's."""
    try:
        return read_checkpoint(init_from)
    except CheckpointError as e:
        raise CheckpointError(f"{folder}/{MANIFEST}: the run started from {init_from}: {e}") from e


def dcp_model_config(folder, **overrides):
    """The BagelConfig the run built: train_state.json's model_config where train.py wrote one, else as train.py
    makes it: the init_from folder's config or the preset, then model_args and freeze_und."""
    state, get = run_state(folder)
    if "model_config" in state:
        values = state["model_config"]
    else:
        if get("init_from"):
            base = run_init(folder, get("init_from"))[1]
        elif get("model") in PRESETS:
            base = PRESETS[get("model")]()
        else:
            raise CheckpointError(f"{folder}/{MANIFEST}: unknown model {get('model')!r}")
        values = {**asdict(base), **get("model_args"), "freeze_und": get("freeze_und")}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    return make_config({**values, **overrides}, os.path.join(folder, MANIFEST))


def dcp_vae(folder, cfg):
    """{ours: (store, key)} of the run's AE: its init_from folder's, or the seeded fresh one (model.build_vae)."""
    _, get = run_state(folder)
    if not list(meta_modules(cfg)[1].parameters()):  # the pooled stand-in
        return {}
    if not get("init_from"):
        fresh = Loaded(f"{folder} (the run's fresh AE, model.build_vae)", build_vae(cfg).state_dict())
        return {f"vae.{k}": (fresh, k) for k in fresh.keys()}
    source = {k: v for k, v in run_init(folder, get("init_from"))[2].items() if k.startswith("vae.")}
    shapes = expected_shapes(cfg)
    for ours, (tensors, key) in source.items():
        if tensors.shape(key) != shapes[ours]:
            raise CheckpointError(f"{tensors.label}: {key} has shape {list(tensors.shape(key))}, the run's config "
                                  f"expects {list(shapes[ours])}")
    return source


def tokenizer_source(folder):
    """The folder with a checkpoint's tokenizer files: the folder itself, or for a train.py checkpoint without them the
    run's tokenizer or init_from folder (as train.py chose); None: the run used data.tiny_tokenizer()."""
    if detect_layout(folder) != "dcp" or os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return folder
    _, get = run_state(folder)
    return get("tokenizer") or get("init_from") or None


def read_checkpoint(folder, ema=None, cfg=None, **overrides):
    """(layout, cfg, {ours: (store, key)}) of a folder of any layout; every key and shape checked, nothing loaded.
    ema: True takes the EMA weights, False the raw ones, None the EMA where the folder has both."""
    layout = detect_layout(folder)
    has = lambda name: os.path.isfile(os.path.join(folder, name))
    if layout == "official":  # the release holds only ema.safetensors
        weights = "model.safetensors" if ema is False and has("model.safetensors") else "ema.safetensors"
        files = {"weights": Tensors(folder, [weights]), "vae": Tensors(folder, ["ae.safetensors"])}
        cfg = cfg or official_config(folder, **{**ae_shape(files["vae"]), **overrides})
    elif layout == "hf":
        if ema:
            raise CheckpointError(f"{folder}: the hf layout holds one set of weights; drop --weights ema")
        cfg = cfg or hf_config(folder, **overrides)
        files = {"weights": hf_tensors(folder)}
    elif layout == "nanobagel":
        cfg = cfg or nanobagel_config(folder, **overrides)
        weights = "ema.safetensors" if ema or (ema is None and has("ema.safetensors")) else "model.safetensors"
        files = {"weights": Tensors(folder, [weights]), "vae": Tensors(folder, ["vae.safetensors"])}
    else:
        cfg = cfg or dcp_model_config(folder, **overrides)
        files = {"weights": DCPWeights(folder, ema, run_state(folder)[1]("lora_alpha"))}
    shapes, source = expected_shapes(cfg), {}
    for role, names in name_maps(layout, cfg).items():
        # the fixed tables are rebuilt anyway, so a file may leave them out (official training code pops them)
        names = {o: k for o, k in names.items() if o not in FIXED_TABLES or k in files[role].keys()}
        check_keys(files[role], names, shapes)
        source |= {ours: (files[role], key) for ours, key in names.items()}
    if layout == "dcp":
        source |= dcp_vae(folder, cfg)
    return layout, cfg, source


def checkpoint_config(folder, **overrides):
    """The BagelConfig of a checkpoint folder of any layout (reads configs and safetensors headers only)."""
    return read_checkpoint(folder, **overrides)[1]


# ----------------------------------------------------------------------------------------------
# Loading into modules

def load_checkpoint(folder, device="cpu", dtype=torch.float32, ema=False, cfg=None, **overrides):
    """(Bagel, AutoEncoder, cfg) from a folder of any layout; every key used, every shape checked.
    overrides: BagelConfig fields that the files do not decide (attn_backend, or the AE of an official folder)."""
    _, cfg, source = read_checkpoint(folder, ema=ema, cfg=cfg, **overrides)
    model, vae = (m.to(dtype).to_empty(device=device) for m in meta_modules(cfg))
    if set(dict(model.named_parameters())) - set(source):  # parameters no layout carries (NSA's) start fresh
        model.init_weights()
    else:
        model.init_buffers()  # the fixed tables
    targets = dict(model.named_parameters()) | {f"vae.{k}": v for k, v in vae.named_parameters()}
    with torch.no_grad():
        for ours, (tensors, key) in source.items():
            if ours in FIXED_TABLES:  # the files carry them (bf16 in the release): they must be the fixed table
                if not torch.allclose(tensors.get(key).float(), fixed_table(cfg, ours), atol=1e-2):
                    raise CheckpointError(f"{tensors.label}: {key} is not the fixed 2D sin-cos table")
            else:
                targets[ours].copy_(tensors.get(key))
    return model, vae, cfg


# ----------------------------------------------------------------------------------------------
# Writing: safetensors one tensor at a time, the three layouts, tokenizer files

ST_DTYPE = {v: k for k, v in DTYPES.items()}


def write_safetensors(path, entries, metadata=None):
    """Write entries [(key, shape, dtype, get)] as a safetensors file, calling get() for one tensor at a time.
    Written to path.tmp, then renamed: an interrupted write never leaves a valid-looking file."""
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for key, shape, dtype, _ in entries:
        size = math.prod(shape) * dtype.itemsize
        header[key] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensors start 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for key, shape, dtype, get in entries:
            t = get().detach().to("cpu", dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), key
            f.write(t.reshape(-1).view(torch.uint8).numpy())
    os.replace(path + ".tmp", path)


def llm_config_json(cfg, dtype):
    """Qwen2 config fields, as in the release's llm_config.json."""
    return {"architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "hidden_act": "silu",
            "hidden_size": cfg.hidden_size, "initializer_range": 0.02, "intermediate_size": cfg.intermediate_size,
            "max_position_embeddings": 32768, "max_window_layers": cfg.num_layers, "model_type": "qwen2",
            "num_attention_heads": cfg.num_heads, "num_hidden_layers": cfg.num_layers,
            "num_key_value_heads": cfg.num_kv_heads, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": str(dtype).split(".")[1],
            "use_cache": True, "use_sliding_window": False, "vocab_size": cfg.vocab_size}


def vit_config_json(cfg, num_hidden_layers):
    return {"hidden_act": "gelu_pytorch_tanh", "hidden_size": cfg.vit_hidden_size,
            "image_size": cfg.vit_patch_size * cfg.vit_max_patches_per_side,
            "intermediate_size": cfg.vit_intermediate_size, "layer_norm_eps": cfg.vit_layer_norm_eps,
            "model_type": "siglip_vision_model", "num_attention_heads": cfg.vit_num_heads, "num_channels": 3,
            "num_hidden_layers": num_hidden_layers, "patch_size": cfg.vit_patch_size}


def hf_config_json(cfg, dtype):
    """lmms-engine's BagelConfig.to_dict(): the vit_config counts the layers actually built."""
    return {"architectures": ["Bagel"], "model_type": "bagel", "visual_gen": True, "visual_und": True,
            "llm_config": {**llm_config_json(cfg, dtype), "layer_module": "Qwen2MoTDecoderLayer", "qk_norm": True,
                           "freeze_und": cfg.freeze_und},
            "vit_config": {**vit_config_json(cfg, cfg.vit_num_layers), "rope": False},
            "vae_config": {"resolution": 256, "in_channels": 3, "downsample": 2 ** (len(cfg.vae_ch_mult) - 1),
                           "ch": cfg.vae_ch, "out_ch": 3, "ch_mult": list(cfg.vae_ch_mult),
                           "num_res_blocks": cfg.vae_num_res_blocks, "z_channels": cfg.latent_channels,
                           "scale_factor": cfg.vae_scale_factor, "shift_factor": cfg.vae_shift_factor},
            "latent_patch_size": cfg.latent_patch_size, "max_latent_size": cfg.max_latent_size,
            "vit_max_num_patch_per_side": cfg.vit_max_patches_per_side, "connector_act": "gelu_pytorch_tanh",
            "interpolate_pos": False, "timestep_shift": 1.0, "vit_select_layer": -2, "vit_rope": False,
            "torch_dtype": str(dtype).split(".")[1]}


def write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def make_folder(out):
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise CheckpointError(f"{out} exists and is not an empty folder")
    os.makedirs(out, exist_ok=True)


def write_hf_shards(out, entries, shard_bytes):
    """model.safetensors, or model-0000i-of-0000n.safetensors + model.safetensors.index.json past shard_bytes."""
    shards, size, total = [[]], 0, 0
    for e in entries:
        n = math.prod(e[1]) * e[2].itemsize
        if shards[-1] and size + n > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size, total = size + n, total + n
    if len(shards) == 1:
        return write_safetensors(os.path.join(out, "model.safetensors"), shards[0])
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(os.path.join(out, name), shard)
        weight_map |= {e[0]: name for e in shard}
    write_json(os.path.join(out, "model.safetensors.index.json"), {"metadata": {"total_size": total},
                                                                   "weight_map": weight_map})


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                   "added_tokens.json")
SPECIAL_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>")


def check_tokenizer(folder, cfg):
    """The tokenizer files a folder holds, after checking that every id they give (plus BAGEL's four special
    tokens, appended if missing) has an embedding row."""
    present = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, n))]
    vocab = None
    if "tokenizer.json" in present:
        from tokenizers import Tokenizer
        path = os.path.join(folder, "tokenizer.json")
        try:
            vocab = Tokenizer.from_file(path).get_vocab(with_added_tokens=True)
        except Exception as e:
            raise CheckpointError(f"{path} is not a readable tokenizer: {e}") from e
    elif "vocab.json" in present:
        vocab = read_json(os.path.join(folder, "vocab.json"))
        if "added_tokens.json" in present:
            vocab |= read_json(os.path.join(folder, "added_tokens.json"))
    if vocab is not None:
        rows = max(vocab.values(), default=-1) + 1 + sum(t not in vocab for t in SPECIAL_TOKENS)
        if rows > cfg.vocab_size:
            raise CheckpointError(f"{folder}: the tokenizer needs {rows} embedding rows, the weights have "
                                  f"{cfg.vocab_size}")
    return present


def convert(folder, out, to="official", dtype=None, ema=None, shard_bytes=5 * 10**9, **overrides):
    """Write the checkpoint in folder (any layout) to the new folder out in layout `to`, tensor by tensor: the EMA
    weights where the folder has them (ema=None), or as ema says. dtype casts the Bagel weights (None: keep each
    tensor's); the AE keeps its dtype. hf weights past shard_bytes go to shards plus an index. Returns out's config."""
    if to not in LAYOUTS:
        raise CheckpointError(f"unknown layout {to}: choose one of {', '.join(LAYOUTS)}")
    layout, cfg, source = read_checkpoint(folder, ema=ema, **overrides)
    if to != "nanobagel" and cfg.vae_kind != "flux":
        raise CheckpointError(f"{folder}: vae_kind {cfg.vae_kind} (the tiny recipe's stand-in AE) exists only in "
                              f"the nanobagel layout; the {to} layout needs a FLUX AE: train with model_args "
                              "vae_kind='flux' (README: Checkpoints)")
    tokenizer_from = tokenizer_source(folder)
    tokenizer = check_tokenizer(tokenizer_from, cfg) if tokenizer_from else []
    make_folder(out)
    shapes = expected_shapes(cfg)
    weights_dtype = dtype or source["embed_tokens.weight"][0].dtype(source["embed_tokens.weight"][1])

    def entry(ours, key):
        if ours in FIXED_TABLES:
            return key, shapes[ours], weights_dtype, lambda: fixed_table(cfg, ours)
        tensors, theirs = source[ours]
        out_dtype = tensors.dtype(theirs) if dtype is None or ours.startswith("vae.") else dtype
        return key, shapes[ours], out_dtype, lambda: tensors.get(theirs)

    maps = name_maps(to, cfg)
    dropped = [ours for ours in source if ours not in FIXED_TABLES and not any(ours in m for m in maps.values())]
    if dropped:
        raise CheckpointError(f"the {to} layout has no place for {dropped[0]} ({len(dropped)} tensors)")
    entries = {role: [entry(ours, key) for ours, key in names.items()] for role, names in maps.items()}
    if to == "official":
        write_safetensors(os.path.join(out, "ema.safetensors"), entries["weights"])
        write_safetensors(os.path.join(out, "ae.safetensors"), entries["vae"])
        write_json(os.path.join(out, "llm_config.json"), llm_config_json(cfg, weights_dtype))
        write_json(os.path.join(out, "vit_config.json"), vit_config_json(cfg, cfg.vit_num_layers + 1))
    elif to == "hf":
        write_hf_shards(out, entries["weights"], shard_bytes)
        write_json(os.path.join(out, "config.json"), hf_config_json(cfg, weights_dtype))
    else:
        write_safetensors(os.path.join(out, "model.safetensors"), entries["weights"])
        write_safetensors(os.path.join(out, "vae.safetensors"), entries["vae"])
        write_json(os.path.join(out, "config.json"), asdict(cfg))
    for name in tokenizer:
        shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(out, name))
    if tokenizer_from is None:  # the run's built-in tokenizer (deterministic)
        import data
        data.tiny_tokenizer().tokenizer.save(os.path.join(out, "tokenizer.json"))
    return cfg


def save_nanobagel(folder, model, vae, cfg, ema_state=None, tokenizer_from=None, dtype=None):
    """A nanobagel folder from modules or state dicts; ema_state: {our name: tensor}; dtype casts the Bagel
    weights; tokenizer_from: a folder whose tokenizer files are checked and copied alongside.
    Sharded values (DTensors, FSDP2) are gathered one tensor at a time, so no rank ever holds the whole model:
    then every rank must call, and rank 0 writes."""
    tokenizer = check_tokenizer(tokenizer_from, cfg) if tokenizer_from else []
    state = lambda m: m if isinstance(m, dict) else m.state_dict()
    full = lambda v: v.full_tensor() if hasattr(v, "full_tensor") else v

    def entries(state, cast):
        return [(k, tuple(v.shape), cast or v.dtype, lambda v=v: full(v)) for k, v in state.items()]
    files = [("model.safetensors", entries(state(model), dtype)), ("vae.safetensors", entries(state(vae), None))]
    if ema_state is not None:
        files.insert(1, ("ema.safetensors", entries(ema_state, dtype)))
    if torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        for _, file_entries in files:  # take part in each gather, in rank 0's order
            for *_, get in file_entries:
                get()
        return
    os.makedirs(folder, exist_ok=True)
    for name, file_entries in files:
        write_safetensors(os.path.join(folder, name), file_entries)
    write_json(os.path.join(folder, "config.json"), asdict(cfg))
    for name in tokenizer:
        shutil.copyfile(os.path.join(tokenizer_from, name), os.path.join(folder, name))


# ----------------------------------------------------------------------------------------------
# Loading into a sharded (FSDP2) model: every rank reads only its own rows of each tensor

def local_index(param):
    """The part of the full tensor a (DTensor) parameter holds on this rank, as a tuple of slices.
    Shard(d) splits like torch.chunk: pieces of ceil(n / k) rows, the last ones shorter or empty."""
    ranges = [(0, n) for n in param.shape]
    if hasattr(param, "placements"):
        coord = param.device_mesh.get_coordinate()
        for mesh_dim, placement in enumerate(param.placements):
            if placement.is_shard():
                lo, hi = ranges[placement.dim]
                piece = -(-(hi - lo) // param.device_mesh.size(mesh_dim))
                start = min(lo + coord[mesh_dim] * piece, hi)
                ranges[placement.dim] = (start, min(start + piece, hi))
    return tuple(slice(a, b) for a, b in ranges)


@torch.no_grad()
def load_into_sharded(model, folder, ema=False, vae=None):
    """Fill model, already built and fully_shard-ed (or plain) on any device, from a checkpoint folder of any
    layout: each rank reads from the memory-mapped files only the slices of its own shards, so host memory
    per rank stays at about one shard. The fixed tables are rebuilt; vae (a plain module), if given, is read
    whole. Parameters no layout carries (NSA's) keep their values and are returned by name."""
    _, cfg, source = read_checkpoint(folder, ema=ema)
    left = []
    for ours, param in model.named_parameters():
        if ours not in source:
            left.append(ours)
            continue
        tensors, key = source.pop(ours)
        if tensors.shape(key) != tuple(param.shape):
            raise CheckpointError(f"{tensors.label}: {key} has shape {list(tensors.shape(key))}, the model has "
                                  f"{list(param.shape)} (ours: {ours})")
        local = param.to_local() if hasattr(param, "to_local") else param
        local.copy_(tensors.get(key, local_index(param)))
    for ours in FIXED_TABLES:
        getattr(model, ours).copy_(fixed_table(cfg, ours))
        source.pop(ours, None)
    for name, param in (vae.named_parameters() if vae is not None else ()):
        tensors, key = source.pop(f"vae.{name}")
        param.copy_(tensors.get(key))
    unused = [k for k in source if vae is not None or not k.startswith("vae.")]
    if unused:
        raise CheckpointError(f"{folder}: the model has no parameter {unused[0]} ({len(unused)} unused): "
                              "it was built from another config")
    return left


# ----------------------------------------------------------------------------------------------
# BAGEL from its parts, as the official pre-training starts (train/pretrain_unified_navit.py): a Qwen2 / Qwen2.5 LLM
# folder and a SigLIP (NaViT) folder in their Hugging Face layouts, and the FLUX ae.safetensors. An official name
# is the part's own name behind its prefix: language_model.<Qwen2 name>, vit_model.<SigLIP vision name>.

PARTS = {"language_model.": "llm", "vit_model.": "vit"}
FRESH = ("connector", "time_embedder", "vae2llm", "llm2vae")  # in no part: built as the official Bagel builds them
VIT_LEFT_OUT = r"vision_model\.head\..*|text_model\..*|logit_scale|logit_bias"  # no pooling head, no text tower


def parts_config(llm_dir, vit_dir, ae, **overrides):
    """BagelConfig from the LLM's and the ViT's config.json, with the fields the official loaders force, and the AE's
    shapes."""
    llm_path, vit_path = os.path.join(llm_dir, "config.json"), os.path.join(vit_dir, "config.json")
    llm, vit = read_json(llm_path), read_json(vit_path)
    if llm.get("model_type") != "qwen2":
        raise CheckpointError(f"{llm_path}: model_type {llm.get('model_type')!r}; the LLM part must be Qwen2/Qwen2.5")
    if llm.get("rope_scaling") or llm.get("use_sliding_window"):
        raise CheckpointError(f"{llm_path}: rope_scaling and sliding-window attention are not built")
    vit = vit.get("vision_config", vit)  # a whole SigLIP's config nests the vision tower's
    layers, image_size = need(vit, "num_hidden_layers", vit_path), need(vit, "image_size", vit_path)
    return make_config({**llm_fields({**llm, "qk_norm": True, "tie_word_embeddings": False}, llm_path),
                        **vit_fields(vit, vit_path, layers - 1),  # vit_select_layer -2: the last layer dropped
                        "vit_max_patches_per_side": image_size // need(vit, "patch_size", vit_path),
                        **ae_shape(ae), **overrides}, llm_path)


def parts_tokenizer(llm_dir):
    """The LLM folder's tokenizer with BAGEL's four special tokens, those missing added after its vocabulary (as the
    official add_special_tokens adds them); and the tokens added."""
    from tokenizers import Tokenizer
    path = os.path.join(llm_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {path}: BAGEL takes its tokenizer from the LLM folder")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:
        raise CheckpointError(f"{path} is not a readable tokenizer: {e}") from e
    added = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab(with_added_tokens=True)]
    tokenizer.add_tokens(added)
    return tokenizer, added


def fresh_weights(bagel, seed):
    """The modules no part holds, made on the CPU from the meta model's own, as the official Bagel builds them:
    nn.Linear's own init (seeded), llm2vae zero."""
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name in FRESH:
            module = bagel.get_submodule(name).to_empty(device="cpu")
            for m in module.modules():
                if isinstance(m, torch.nn.Linear):
                    m.reset_parameters()
            out |= {f"{name}.{k}": v for k, v in module.state_dict().items()}
    for k in ("llm2vae.weight", "llm2vae.bias"):
        out[k].zero_()
    return out


def check_part(store, used, left_out=None):
    """A part must hold every key used, and nothing else but what left_out (a regex) matches."""
    missing = sorted(set(used) - set(store.keys()))
    if missing:
        raise CheckpointError(f"{store.label}: missing key {missing[0]} ({len(missing)} missing)")
    unused = sorted(k for k in set(store.keys()) - set(used) if not (left_out and re.fullmatch(left_out, k)))
    if unused:
        raise CheckpointError(f"{store.label}: unexpected key {unused[0]} ({len(unused)} unexpected)")


def assemble(llm_dir, vit_dir, ae_file, out, dtype=None, seed=0, **overrides):
    """A nanobagel folder from BAGEL's parts, tensor by tensor, as the official pre-training builds BAGEL:
      - the generation expert a copy of the understanding expert (init_moe), the QK norms ones (Qwen2 has none),
        lm_head the embedding where the LLM ties them;
      - the ViT without its last layer (vit_select_layer -2), the conv patch embedding as the Linear over (p, q, c)
        patches (convert_conv2d_to_linear);
      - connector, timestep embedder and latent projections fresh (fresh_weights);
      - the tokenizer from the LLM folder (parts_tokenizer); embedding rows added for the tokens added, at the mean
        of the others, only where the embedding has no room for them (rows are never dropped).
    overrides: BagelConfig fields the parts do not decide (max_latent_size, ...); dtype casts the Bagel weights (None:
    keep each part's). Returns the config."""
    ae = Tensors(os.path.dirname(ae_file) or ".", [os.path.basename(ae_file)])
    parts = {"llm": hf_tensors(llm_dir), "vit": hf_tensors(vit_dir)}
    cfg = parts_config(llm_dir, vit_dir, ae, **overrides)
    tokenizer, added = parts_tokenizer(llm_dir)
    rows = cfg.vocab_size  # the LLM's embedding rows
    cfg = replace(cfg, vocab_size=max(rows, max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1))
    bagel, vae = meta_modules(cfg)
    names, ae_names = list(bagel.state_dict()), {f"vae.{k}": k for k, _ in vae.named_parameters()}
    shapes, official, fresh = expected_shapes(cfg), official_names(cfg), fresh_weights(bagel, seed)
    tied = read_json(os.path.join(llm_dir, "config.json")).get("tie_word_embeddings", False)
    reads = {}  # ours -> (part, key), for every tensor a part supplies
    for ours in names:
        name = official[ours.replace(".gen.", ".und.").replace("norm_gen", "norm_und")]  # init_moe's twin
        prefix = next((p for p in PARTS if name.startswith(p)), None)
        if prefix and not re.search(r"\.[qk]_norm\.", name):
            key = name[len(prefix):]
            if key == "lm_head.weight" and tied and key not in parts["llm"].keys():
                key = "model.embed_tokens.weight"
            reads[ours] = PARTS[prefix], key
    dropped = rf"vision_model\.encoder\.layers\.{cfg.vit_num_layers}\..*"
    check_part(parts["llm"], {key for part, key in reads.values() if part == "llm"})
    check_part(parts["vit"], {key for part, key in reads.values() if part == "vit"}, f"{dropped}|{VIT_LEFT_OUT}")
    check_keys(ae, ae_names, shapes)
    C, p = cfg.vit_hidden_size, cfg.vit_patch_size
    source_shape = {"vit.patch_embed.weight": (C, 3, p, p), "embed_tokens.weight": (rows, cfg.hidden_size),
                    "lm_head.weight": (rows, cfg.hidden_size)}
    for ours, (part, key) in reads.items():
        want = source_shape.get(ours, shapes[ours])
        if parts[part].shape(key) != want:
            raise CheckpointError(f"{parts[part].label}: {key} has shape {list(parts[part].shape(key))}, its config "
                                  f"says {list(want)}")

    def tensor(ours):
        if ours in fresh:
            return fresh[ours]
        if ours not in reads:  # the QK norms
            return torch.ones(shapes[ours])
        t = parts[reads[ours][0]].get(reads[ours][1])
        if ours == "vit.patch_embed.weight":  # [C, c, p, q] -> [C, (p, q, c)], the order of model.patchify
            t = t.permute(0, 2, 3, 1).reshape(shapes[ours])
        if ours in ("embed_tokens.weight", "lm_head.weight") and cfg.vocab_size > rows:
            t = torch.cat([t, t.mean(0, keepdim=True).expand(cfg.vocab_size - rows, -1)])
        return t
    make_folder(out)
    out_dtype = lambda ours: dtype or (parts[reads[ours][0]].dtype(reads[ours][1]) if ours in reads else torch.float32)
    write_safetensors(os.path.join(out, "model.safetensors"),
                      [(ours, shapes[ours], out_dtype(ours), lambda ours=ours: tensor(ours)) for ours in names])
    write_safetensors(os.path.join(out, "vae.safetensors"),
                      [(k, ae.shape(k), ae.dtype(k), lambda k=k: ae.get(k)) for k in ae_names.values()])
    write_json(os.path.join(out, "config.json"), asdict(cfg))
    if added:  # the other tokenizer files would not know the tokens added: nanobagel reads tokenizer.json
        tokenizer.save(os.path.join(out, "tokenizer.json"))
    else:
        for name in check_tokenizer(llm_dir, cfg):
            shutil.copyfile(os.path.join(llm_dir, name), os.path.join(out, name))
    return cfg


# ----------------------------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", nargs="?", help="the checkpoint to convert (not with --from-parts)")
    p.add_argument("out")
    p.add_argument("--to", choices=LAYOUTS)
    p.add_argument("--dtype", choices=("bf16", "fp32"))
    p.add_argument("--weights", choices=("ema", "model"), help="default: the EMA where the folder has both")
    p.add_argument("--from-parts", nargs=3, metavar=("LLM_DIR", "VIT_DIR", "AE_FILE"),
                   help="assemble BAGEL from a Qwen2 LLM folder, a SigLIP folder and the FLUX ae.safetensors")
    args = p.parse_args(argv)
    if bool(args.folder) == bool(args.from_parts):
        p.error("give FOLDER OUT, or --from-parts LLM_DIR VIT_DIR AE_FILE OUT")
    dtype = {None: None, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    try:
        if args.from_parts:
            cfg = assemble(*args.from_parts, args.out, dtype)
            print(f"{' + '.join(args.from_parts)} -> {args.out} (nanobagel; {cfg.num_layers} LLM layers, "
                  f"{cfg.vit_num_layers} ViT layers, vocab {cfg.vocab_size})")
            return
        layout = detect_layout(args.folder)
        to = args.to or ("official" if layout == "nanobagel" else "nanobagel")
        convert(args.folder, args.out, to, dtype, None if args.weights is None else args.weights == "ema")
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    print(f"{args.folder} ({layout}) -> {args.out} ({to})")


if __name__ == "__main__":
    main()
