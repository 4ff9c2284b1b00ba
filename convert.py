"""Checkpoint layouts in and out of nanobagel.

Official BAGEL layout (a folder): ema.safetensors (the Bagel module), ae.safetensors (FLUX AE),
llm_config.json (Qwen2 fields), vit_config.json (SigLIP fields).

    python convert.py official path/to/BAGEL-7B-MoT out/nanobagel   # -> model.safetensors + vae.safetensors + config.json

Loading is tensor by tensor from memory-mapped safetensors, so a 29 GB checkpoint never needs twice its size.
"""
import json
import os
import sys
from dataclasses import asdict, fields

import torch
from safetensors import safe_open

from model import AutoEncoder, Bagel, BagelConfig, sincos_2d

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
FIXED_TABLES = {"vit_pos_table": "vit_pos_embed.pos_embed", "latent_pos_table": "latent_pos_embed.pos_embed"}


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


# ----------------------------------------------------------------------------------------------
# Reading

class CheckpointError(ValueError):
    pass


def read_json(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {path}")
    with open(path) as f:
        return json.load(f)


def official_config(folder, **overrides):
    """BagelConfig from llm_config.json + vit_config.json (+ the constants the official loaders hard-code).
    The AE shape is not in the release files; pass vae_* overrides for a non-7B AE."""
    llm, vit = read_json(os.path.join(folder, "llm_config.json")), read_json(os.path.join(folder, "vit_config.json"))
    if vit.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh" or llm.get("hidden_act", "silu") != "silu":
        raise CheckpointError("unsupported activation in the config files")
    cfg = dict(vocab_size=llm["vocab_size"], hidden_size=llm["hidden_size"], num_layers=llm["num_hidden_layers"],
               num_heads=llm["num_attention_heads"], num_kv_heads=llm["num_key_value_heads"],
               intermediate_size=llm["intermediate_size"], rope_theta=float(llm["rope_theta"]),
               rms_norm_eps=llm["rms_norm_eps"],
               vit_hidden_size=vit["hidden_size"], vit_num_layers=vit["num_hidden_layers"] - 1,  # vit_select_layer -2
               vit_num_heads=vit["num_attention_heads"], vit_intermediate_size=vit["intermediate_size"],
               vit_patch_size=vit["patch_size"], vit_layer_norm_eps=vit.get("layer_norm_eps", 1e-6))
    cfg.update(overrides)
    return BagelConfig(**cfg)


def open_safetensors(path):
    if not os.path.isfile(path):
        raise CheckpointError(f"missing {path}")
    try:
        return safe_open(path, framework="pt")
    except Exception as e:  # truncated or not a safetensors file
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from e


def copy_into(target: dict, source, name_map, path):
    """Copy tensors source[name_map[ours]] into target[ours] one by one; strict about keys and shapes."""
    keys = set(source.keys())
    missing = [theirs for theirs in name_map.values() if theirs not in keys]
    if missing:
        raise CheckpointError(f"{path}: missing key {missing[0]} ({len(missing)} missing)")
    unused = sorted(keys - set(name_map.values()))
    if unused:
        raise CheckpointError(f"{path}: unexpected key {unused[0]} ({len(unused)} unexpected): wrong config?")
    for ours, theirs in name_map.items():
        shape = tuple(source.get_slice(theirs).get_shape())
        if shape != tuple(target[ours].shape):
            raise CheckpointError(f"{path}: {theirs} has shape {list(shape)}, the config expects "
                                  f"{list(target[ours].shape)} (ours: {ours})")
        with torch.no_grad():
            target[ours].copy_(source.get_tensor(theirs))


def load_official(folder, cfg: BagelConfig = None, device="cpu", dtype=torch.float32, **overrides):
    """(Bagel, AutoEncoder, cfg) from an official-layout folder; every key used, every shape checked."""
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder} is not a folder")
    cfg = cfg or official_config(folder, **overrides)
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg)
    model.to_empty(device=device).to(dtype)
    vae.to_empty(device=device).to(dtype)
    model.init_weights()  # fixed tables
    params = dict(model.named_parameters())
    ema_path = os.path.join(folder, "ema.safetensors")
    ema = open_safetensors(ema_path)
    name_map = dict(official_names(cfg), **FIXED_TABLES)
    tables = {ours: torch.empty_like(getattr(model, ours)) for ours in FIXED_TABLES}
    copy_into({**params, **tables}, ema, name_map, ema_path)
    for ours, table in tables.items():  # the release stores the tables; they must be the sin-cos we rebuild
        if not torch.allclose(table.float(), getattr(model, ours).float(), atol=1e-2):
            raise CheckpointError(f"{ema_path}: {FIXED_TABLES[ours]} is not the fixed 2D sin-cos table")
    ae_path = os.path.join(folder, "ae.safetensors")
    vae_params = dict(vae.named_parameters())
    copy_into(vae_params, open_safetensors(ae_path), {k: k for k in vae_params}, ae_path)
    return model, vae, cfg


# ----------------------------------------------------------------------------------------------
# The nanobagel layout: config.json (BagelConfig fields), model.safetensors (our names), optional
# ema.safetensors, vae.safetensors (FLUX names), and tokenizer.json when known.

def save_nanobagel(folder, model, vae, cfg, ema_state=None):
    """model and vae: modules or their state dicts."""
    from safetensors.torch import save_file
    state = lambda m: m if isinstance(m, dict) else m.state_dict()
    os.makedirs(folder, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state(model).items()}, os.path.join(folder, "model.safetensors"))
    if ema_state is not None:
        save_file({k: v.contiguous() for k, v in ema_state.items()}, os.path.join(folder, "ema.safetensors"))
    save_file({k: v.contiguous() for k, v in state(vae).items()}, os.path.join(folder, "vae.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(asdict(cfg), f, indent=1)


def load_nanobagel(folder, weights="model", device="cpu", dtype=torch.float32):
    """(Bagel, AutoEncoder, cfg) from a nanobagel folder; weights="ema" takes the EMA weights."""
    raw = read_json(os.path.join(folder, "config.json"))
    known = {f.name for f in fields(BagelConfig)}
    if set(raw) - known:
        raise CheckpointError(f"{folder}/config.json: unknown field {sorted(set(raw) - known)[0]}")
    cfg = BagelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
    with torch.device("meta"):
        model, vae = Bagel(cfg), AutoEncoder(cfg)
    model.to_empty(device=device).to(dtype)
    vae.to_empty(device=device).to(dtype)
    model.init_weights()
    for module, name in ((model, f"{weights}.safetensors"), (vae, "vae.safetensors")):
        path = os.path.join(folder, name)
        params = dict(module.named_parameters())
        copy_into(params, open_safetensors(path), {k: k for k in params}, path)
    return model, vae, cfg


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] != "official":
        sys.exit(__doc__)
    save_nanobagel(sys.argv[3], *load_official(sys.argv[2]))
