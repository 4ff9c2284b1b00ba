"""convert.py --from-parts: BAGEL assembled from a Qwen2 LLM, a SigLIP ViT and the FLUX AE, each in its own Hugging Face
layout, as the official pre-training builds it. The parts are written here, in those layouts, independently of
convert.py; each rule is checked: every generation-expert tensor equals its understanding twin, the QK norms are ones,
the ViT has one layer fewer, the Linear patch embedding computes what the conv computed, the AE round-trips, the
special tokens are added where missing; then the assembled model trains a few steps and samples."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

import convert
import data
import model
import sample
from conftest import ACT, FIX, load_fixture, word_tokenizer

ROOT = Path(__file__).parent.parent
AE = FIX / "checkpoint" / "ae.safetensors"
QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, intermediate_size=128, rope_theta=1e6, rms_norm_eps=1e-6,
             vocab_size=1040, hidden_act="silu", use_sliding_window=False, rope_scaling=None)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_attention_heads=2,
              num_hidden_layers=3, patch_size=14, image_size=980, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
              num_channels=3)
# our name inside layers.{i}.und. -> the Qwen2 name inside model.layers.{i}. (Hugging Face's modeling_qwen2)
QWEN2_LAYER = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               **{f"{p}_proj": f"self_attn.{p}_proj" for p in "qkvo"},
               **{f"{p}_proj": f"mlp.{p}_proj" for p in ("gate", "up", "down")}}


def qwen2_folder(folder, tied, without=(), **config):
    """A Qwen2 checkpoint as Hugging Face writes it: config.json, bf16 weights in two shards and an index (no lm_head
    when tied), tokenizer.json (conftest's word tokenizer; `without`: special tokens that are plain words instead)."""
    c = {**QWEN2, "tie_word_embeddings": tied, **config}
    H, D = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"]
    q, kv, inter = c["num_attention_heads"] * D, c["num_key_value_heads"] * D, c["intermediate_size"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], H), "model.norm.weight": (H,)}
    for i in range(c["num_hidden_layers"]):
        layer = f"model.layers.{i}."
        shapes |= {layer + "input_layernorm.weight": (H,), layer + "post_attention_layernorm.weight": (H,),
                   layer + "self_attn.q_proj.weight": (q, H), layer + "self_attn.q_proj.bias": (q,),
                   layer + "self_attn.k_proj.weight": (kv, H), layer + "self_attn.k_proj.bias": (kv,),
                   layer + "self_attn.v_proj.weight": (kv, H), layer + "self_attn.v_proj.bias": (kv,),
                   layer + "self_attn.o_proj.weight": (H, q), layer + "mlp.gate_proj.weight": (inter, H),
                   layer + "mlp.up_proj.weight": (inter, H), layer + "mlp.down_proj.weight": (H, inter)}
    if not tied:
        shapes["lm_head.weight"] = (c["vocab_size"], H)
    g = torch.Generator().manual_seed(1)
    tensors = {k: (torch.randn(s, generator=g) * 0.05 + (1.0 if k.endswith("norm.weight") else 0.0)).to(torch.bfloat16)
               for k, s in shapes.items()}
    folder.mkdir()
    keys = sorted(tensors)
    weight_map = {k: f"model-0000{1 + (i >= len(keys) // 2)}-of-00002.safetensors" for i, k in enumerate(keys)}
    for shard in set(weight_map.values()):
        save_file({k: tensors[k] for k in keys if weight_map[k] == shard}, folder / shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(c))
    tokenizer = json.loads(word_tokenizer().tokenizer.to_str())
    vocab = tokenizer["model"]["vocab"]
    for name in without:
        i = vocab.pop(name)
        vocab[f"w{i}"] = i
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return tensors


def siglip_folder(folder):
    """A SigLIP vision tower as Hugging Face writes it (fp32): the conv patch embedding, a 70x70 position table, three
    layers, the post norm, and an attention-pooling head that BAGEL does not use."""
    C, I, p = SIGLIP["hidden_size"], SIGLIP["intermediate_size"], SIGLIP["patch_size"]
    side = SIGLIP["image_size"] // p
    shapes = {"vision_model.embeddings.patch_embedding.weight": (C, 3, p, p),
              "vision_model.embeddings.patch_embedding.bias": (C,),
              "vision_model.embeddings.position_embedding.weight": (side * side, C),
              "vision_model.post_layernorm.weight": (C,), "vision_model.post_layernorm.bias": (C,),
              "vision_model.head.probe": (1, 1, C), "vision_model.head.mlp.fc1.weight": (I, C)}
    for i in range(SIGLIP["num_hidden_layers"]):
        layer = f"vision_model.encoder.layers.{i}."
        for name, (n_out, n_in) in {"layer_norm1": (C, None), "layer_norm2": (C, None), "mlp.fc1": (I, C),
                                    "mlp.fc2": (C, I), **{f"self_attn.{x}_proj": (C, C) for x in ("q", "k", "v", "out")}
                                    }.items():
            shapes |= {layer + name + ".weight": (n_out, n_in) if n_in else (n_out,), layer + name + ".bias": (n_out,)}
    g = torch.Generator().manual_seed(2)
    tensors = {k: torch.randn(s, generator=g) * 0.05 for k, s in shapes.items()}
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(SIGLIP))
    return tensors


def assemble(tmp_path, name, tied=False, **qwen2):
    llm = qwen2_folder(tmp_path / f"{name}_llm", tied, **qwen2)
    vit = siglip_folder(tmp_path / f"{name}_vit")
    out = tmp_path / name
    cfg = convert.assemble(str(tmp_path / f"{name}_llm"), str(tmp_path / f"{name}_vit"), str(AE), str(out))
    return llm, vit, out, cfg


def test_assembled_from_parts_follows_the_official_rules(tmp_path):
    llm, vit, out, cfg = assemble(tmp_path, "untied")
    ours = load_file(out / "model.safetensors")
    # the LLM: und = Qwen2 (bf16 kept), gen = und (init_moe), QK norms ones (Qwen2 has none)
    layers = QWEN2["num_hidden_layers"]
    for i in range(layers):
        for name, theirs in QWEN2_LAYER.items():
            for p in ("weight", "bias"):
                if f"model.layers.{i}.{theirs}.{p}" in llm:
                    assert torch.equal(ours[f"layers.{i}.und.{name}.{p}"], llm[f"model.layers.{i}.{theirs}.{p}"])
    for k in ("embed_tokens.weight", "norm_und.weight", "lm_head.weight"):
        assert torch.equal(ours[k], llm[{"embed_tokens.weight": "model.embed_tokens.weight",
                                         "norm_und.weight": "model.norm.weight"}.get(k, k)]), k
    gen = [k for k in ours if ".gen." in k or k.startswith("norm_gen")]
    assert len(gen) == len([k for k in ours if ".und." in k or k.startswith("norm_und")])
    for k in gen:
        assert torch.equal(ours[k], ours[k.replace(".gen.", ".und.").replace("norm_gen", "norm_und")]), k
    norms = [k for k in ours if k.endswith(("q_norm.weight", "k_norm.weight"))]
    assert len(norms) == 2 * 2 * layers and all(torch.equal(ours[k], torch.ones_like(ours[k])) for k in norms)
    # the ViT: one layer fewer, the layers kept as they were, no pooling head
    assert cfg.vit_num_layers == SIGLIP["num_hidden_layers"] - 1
    assert {int(k.split(".")[2]) for k in ours if k.startswith("vit.layers.")} == set(range(cfg.vit_num_layers))
    for i in range(cfg.vit_num_layers):
        assert torch.equal(ours[f"vit.layers.{i}.q_proj.weight"],
                           vit[f"vision_model.encoder.layers.{i}.self_attn.q_proj.weight"])
        assert torch.equal(ours[f"vit.layers.{i}.fc2.bias"], vit[f"vision_model.encoder.layers.{i}.mlp.fc2.bias"])
    assert torch.equal(ours["vit.pos_embed.weight"], vit["vision_model.embeddings.position_embedding.weight"])
    # the Linear patch embedding computes what the conv computed, on the same image
    bagel, vae, loaded_cfg = convert.load_checkpoint(str(out))
    assert loaded_cfg == cfg
    p = SIGLIP["patch_size"]
    image = torch.randn(3, 2 * p, 3 * p, generator=torch.Generator().manual_seed(3))
    conv = F.conv2d(image[None], vit["vision_model.embeddings.patch_embedding.weight"],
                    vit["vision_model.embeddings.patch_embedding.bias"], stride=p)[0]
    with torch.no_grad():
        linear = bagel.vit.patch_embed(model.patchify(image, p))
    torch.testing.assert_close(linear, conv.flatten(1).t(), atol=1e-5, rtol=1e-5)
    # the AE round-trips: the same tensors, and the fixture's official latent from the loaded AE
    ae, written = load_file(AE), load_file(out / "vae.safetensors")
    assert sorted(ae) == sorted(written) and all(torch.equal(ae[k], written[k]) for k in ae)
    cases, tensors, expected, _, _ = load_fixture()
    with torch.no_grad():
        latent = vae.encode(tensors[cases["vae_case"]["image"]], tensors[cases["vae_case"]["posterior_eps"]])
    torch.testing.assert_close(latent, expected["vae.latent"], **ACT)
    # fresh modules as the official Bagel builds them: nn.Linear's init (|w|, |b| <= 1/sqrt(fan_in)), llm2vae zero
    assert not ours["llm2vae.weight"].any() and not ours["llm2vae.bias"].any()
    for name in ("connector.fc1", "connector.fc2", "time_embedder.mlp.0", "time_embedder.mlp.2", "vae2llm"):
        w, b = ours[name + ".weight"], ours[name + ".bias"]
        bound = w.shape[1] ** -0.5
        assert w.abs().max() <= bound and b.abs().max() <= bound and b.abs().max() > bound / 2, name
        assert abs(w.std().item() - bound / 3 ** 0.5) < 0.1 * bound, name
    # the tokenizer and its rows: the LLM folder's, unchanged
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "untied_llm" / "tokenizer.json").read_bytes()
    assert cfg.vocab_size == QWEN2["vocab_size"] and cfg.hidden_size == QWEN2["hidden_size"]
    # tied embeddings: lm_head is the embedding; the fresh modules are seeded (the same in both folders)
    llm_tied, _, out_tied, _ = assemble(tmp_path, "tied", tied=True)
    tied = load_file(out_tied / "model.safetensors")
    assert torch.equal(tied["lm_head.weight"], llm_tied["model.embed_tokens.weight"])
    assert all(torch.equal(tied[k], ours[k]) for k in ours if k.split(".")[0] in convert.FRESH)


@pytest.mark.parametrize("rows", [QWEN2["vocab_size"], 1026])
def test_missing_special_tokens_added_after_the_vocabulary(tmp_path, rows):
    """As the official add_special_tokens: the missing tokens get the ids after the vocabulary. With room in the
    embedding nothing else changes; without, rows are added for them at the mean of the others."""
    llm, _, out, cfg = assemble(tmp_path, "parts", without=("<|vision_start|>", "<|vision_end|>"), vocab_size=rows)
    tok = data.load_tokenizer(str(out))
    base = Tokenizer.from_file(str(tmp_path / "parts_llm" / "tokenizer.json")).get_vocab_size()
    assert base <= rows
    assert [tok.special["vision_start"], tok.special["vision_end"]] == [base, base + 1]
    assert cfg.vocab_size == max(rows, base + 2)
    ours = load_file(out / "model.safetensors")
    embed = llm["model.embed_tokens.weight"]
    for k, theirs in (("embed_tokens.weight", embed), ("lm_head.weight", llm["lm_head.weight"])):
        assert torch.equal(ours[k][:rows], theirs)
        for row in ours[k][rows:]:
            torch.testing.assert_close(row.float(), theirs.float().mean(0), atol=1e-2, rtol=0)  # bf16 rounding


def test_parts_errors_name_the_problem(tmp_path):
    qwen2_folder(tmp_path / "llm", tied=False)
    siglip_folder(tmp_path / "vit")
    args = [str(tmp_path / "llm"), str(tmp_path / "vit"), str(AE)]
    config = json.loads((tmp_path / "llm" / "config.json").read_text())
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(convert.CheckpointError, match="model_type 'llama'; the LLM part must be Qwen2"):
        convert.assemble(*args, str(tmp_path / "a"))
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(convert.CheckpointError, match=r"missing key model\.layers\.2\.input_layernorm\.weight"):
        convert.assemble(*args, str(tmp_path / "b"))
    H, I = QWEN2["hidden_size"], QWEN2["intermediate_size"]
    (tmp_path / "llm" / "config.json").write_text(json.dumps({**config, "intermediate_size": I + 8}))
    with pytest.raises(convert.CheckpointError, match=rf"layers\.0\.mlp\.gate_proj\.weight has shape \[{I}, {H}\], its "
                                                      rf"config says \[{I + 8}, {H}\]"):
        convert.assemble(*args, str(tmp_path / "c"))
    (tmp_path / "llm" / "config.json").write_text(json.dumps(config))
    vit = load_file(tmp_path / "vit" / "model.safetensors")
    save_file({**vit, "vision_model.embeddings.extra": torch.zeros(2)}, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(convert.CheckpointError, match=r"unexpected key vision_model\.embeddings\.extra"):
        convert.assemble(*args, str(tmp_path / "d"))
    vit["vision_model.post_layernorm.weight"][1] = float("nan")
    save_file(vit, tmp_path / "vit" / "model.safetensors")
    with pytest.raises(convert.CheckpointError, match=r"vit/model.safetensors: vision_model\.post_layernorm\.weight "
                                                      "holds NaN or Inf"):
        convert.assemble(*args, str(tmp_path / "e"))
    os.remove(tmp_path / "llm" / "tokenizer.json")
    with pytest.raises(convert.CheckpointError, match="tokenizer.json: BAGEL takes its tokenizer from the LLM folder"):
        convert.assemble(*args, str(tmp_path / "f"))


def test_assembled_model_trains_and_samples(tmp_path, capsys):
    """The CLI assembles; train.py runs configs/pretrain_small.py from the folder for three steps (on the harness's
    packs, on the CPU: no flex attention, no compile, fp32; sources only checked, never read); sample.py draws and
    answers from the export and from the last DCP checkpoint."""
    qwen2_folder(tmp_path / "llm", tied=True)
    siglip_folder(tmp_path / "vit")
    convert.main(["--from-parts", str(tmp_path / "llm"), str(tmp_path / "vit"), str(AE), str(tmp_path / "bagel")])
    assert "(nanobagel; 2 LLM layers, 2 ViT layers" in capsys.readouterr().out
    out = tmp_path / "run"
    cmd = [sys.executable, "tests/train_harness.py", "configs/pretrain_small.py", f"--init_from={tmp_path / 'bagel'}",
           "--model_args={}", "--sources=[{'path': 'shapes'}]", "--compile=False", "--dtype=fp32", "--max_steps=3",
           "--save_steps=3", "--log_every=1", "--warmup_steps=1", f"--out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3] and all(r["n_ce"] > 0 and r["n_mse"] > 0 for r in rows)
    sample.main(["--ckpt", str(out / "export"), "--prompt", "w5 w6", "--size", "32", "--steps", "3",
                 "--out", str(tmp_path / "t2i.png")])
    sample.main(["--ckpt", str(out / "checkpoints" / "step_0000003"), "--prompt", "w7", "--image",
                 str(tmp_path / "t2i.png"), "--understand", "--vit-size", "28", "--max-new-tokens", "3"])
    assert capsys.readouterr().out.count("\n") == 2
