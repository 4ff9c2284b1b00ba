"""model.py + convert.py against the golden outputs of the official BAGEL code (tests/fixtures/bagel_tiny),
driven by its cases.json, plus routing, masking and size checks."""
import json

import pytest
import torch

import convert
import data
import model
from conftest import ACT, FIX, GRAD, LOSS, case_names, fixture_samples, inspect_forward, load_fixture, load_tiny


@pytest.fixture(scope="module")
def golden():
    torch.manual_seed(0)
    bagel, vae, cfg = load_tiny()
    cases, tensors, expected, meta, special = load_fixture()
    packs = {c["name"]: data.pack_samples(fixture_samples(c, tensors), special, cfg.max_latent_size,
                                          cfg.vit_max_patches_per_side) for c in cases["cases"]}
    return bagel, vae, cfg, cases, tensors, expected, packs



@pytest.mark.parametrize("name", case_names())
def test_forward_and_gradients_match_official(golden, name):
    bagel, _, cfg, cases, _, E, packs = golden
    case = next(c for c in cases["cases"] if c["name"] == name)
    pack = packs[name]
    has = lambda key: f"{name}.{key}" in E
    bagel.zero_grad()
    out = inspect_forward(bagel, pack, case["timestep_shift"])
    torch.testing.assert_close(out["input_embeds"], E[f"{name}.input_embeds"], **ACT)
    for k in range(cfg.num_layers - 1):
        torch.testing.assert_close(out["layer_outs"][k], E[f"{name}.layer_out.{k}"], **ACT)
    torch.testing.assert_close(out["hidden"], E[f"{name}.hidden"], **ACT)
    if has("vit_out"):
        torch.testing.assert_close(out["vit_out"], E[f"{name}.vit_out"], **ACT)
    if has("vae_t"):
        torch.testing.assert_close(out["t"], E[f"{name}.vae_t"], **ACT)
        torch.testing.assert_close(out["x_t"], E[f"{name}.vae_x_t"], **ACT)
    torch.testing.assert_close(out["ce"], E[f"{name}.ce_per_token"], **LOSS)
    loss = out["ce"].mean()
    torch.testing.assert_close(out["ce"].mean(), E[f"{name}.ce"], **LOSS)
    if has("mse"):
        torch.testing.assert_close(out["mse_pred"], E[f"{name}.mse_pred"], **ACT)
        torch.testing.assert_close(out["target"][torch.isin(pack.vae_indexes, pack.mse_indexes)],
                                   E[f"{name}.mse_target"], **ACT)
        torch.testing.assert_close(out["mse"], E[f"{name}.mse_per_token"], **LOSS)
        torch.testing.assert_close(out["mse"].mean(), E[f"{name}.mse"], **LOSS)
        loss = loss + out["mse"].mean()
    torch.testing.assert_close(loss, E[f"{name}.loss"], **LOSS)
    loss.backward()
    ours = {theirs: mine for mine, theirs in convert.official_names(cfg).items()}
    params = dict(bagel.named_parameters())
    prefix = f"{name}.grad."
    grads = [k for k in E if k.startswith(prefix)]
    assert grads
    for key in grads:
        p = params[ours[key[len(prefix):]]]
        g = torch.zeros_like(p) if p.grad is None else p.grad
        torch.testing.assert_close(g, E[key], **GRAD, msg=lambda m: f"{key}: {m}")


def test_vae_matches_official(golden):
    _, vae, _, cases, T, E, _ = golden
    vc = cases["vae_case"]
    with torch.no_grad():
        mean, logvar = vae.moments(T[vc["image"]])
        latent = vae.encode(T[vc["image"]], T[vc["posterior_eps"]])
        decoded = vae.decode(latent)
    for ours, key in [(mean, "enc_mean"), (logvar, "enc_logvar"), (latent, "latent"), (decoded, "decoded")]:
        torch.testing.assert_close(ours, E[f"vae.{key}"], **ACT)


def mm_pack(golden):
    """The case with the most kinds of spans (noise spans and several samples), chosen by content."""
    *_, cases, _, _, packs = golden
    return max(packs.values(), key=lambda p: (p.mse_indexes.numel() > 0, len(p.sample_lens), p.num_tokens))


def test_routing_gen_expert_touches_only_latent_tokens(golden):
    bagel, _, _, _, _, _, _ = golden
    pack = mm_pack(golden)
    with torch.no_grad():
        base = inspect_forward(bagel, pack)["hidden"]
        saved = [p.clone() for p in bagel.layers[0].gen.parameters()]
        for p in bagel.layers[0].gen.mlp_norm.parameters():
            p.mul_(1.5)
        changed = inspect_forward(bagel, pack)["hidden"]
        for p, s in zip(bagel.layers[0].gen.parameters(), saved):
            p.copy_(s)
    diff = (changed - base).abs().amax(-1) > 1e-6
    is_latent = torch.zeros(pack.num_tokens, dtype=torch.bool)
    is_latent[pack.vae_indexes] = True
    # latent tokens change; a non-latent token may only change if it can see a clean latent (attention)
    assert diff[is_latent].all()
    layout = model.span_layout(pack.sample_lens, pack.split_lens, pack.split_modes)
    sees_latent = (layout.dense_mask() & is_latent[None, :]).any(1)
    assert not diff[~is_latent & ~sees_latent].any()


def test_masks_no_cross_sample_and_noise_invisible(golden):
    """Perturb one span's input embeddings: only tokens allowed to see it may change."""
    bagel, _, _, _, _, _, _ = golden
    pack = mm_pack(golden)
    layout = model.span_layout(pack.sample_lens, pack.split_lens, pack.split_modes)
    mask = layout.dense_mask()
    starts = torch.tensor([0] + pack.split_lens).cumsum(0).tolist()
    for s, n, mode in zip(starts, pack.split_lens, pack.split_modes):
        span = torch.zeros(pack.num_tokens, dtype=torch.bool)
        span[s:s + n] = True
        x, _ = bagel.embed(pack, 1.0)
        bump = torch.zeros_like(x)
        bump[span] = 1.0
        with torch.no_grad():
            base = run_layers(bagel, pack, x)
            moved = run_layers(bagel, pack, x + bump)
        changed = (moved - base).abs().amax(-1) > 1e-6
        # a token may change only if it can see the span (directly, or through tokens that see it)
        reach = span.clone()
        for _ in range(bagel.cfg.num_layers):
            reach = reach | (mask & reach[None, :]).any(1)
        assert not changed[~reach].any(), (mode, s)
        if mode == "noise":  # noised latents are invisible to every other span
            assert not changed[~span].any()
        assert changed[span].all()


def run_layers(bagel, pack, x):
    """Decoder stack on given input embeddings, via the real forward with embed() swapped out."""
    real = bagel.embed
    bagel.embed = lambda p, s, run_vit: (x, real(p, s, run_vit)[1])
    try:
        return inspect_forward(bagel, pack)["hidden"]
    finally:
        del bagel.embed


def test_gradients_reach_both_experts(golden):
    bagel, *_ = golden
    pack = mm_pack(golden)
    bagel.zero_grad()
    out = bagel(pack)
    (out["ce"].sum() + out["mse"].sum()).backward()
    for layer in bagel.layers:
        for expert in (layer.und, layer.gen):
            for p in expert.parameters():
                assert p.grad is not None and p.grad.abs().sum() > 0


def test_freeze_und_blocks_gradient_to_understanding_path(golden):
    bagel, *_ = golden
    pack = mm_pack(golden)
    bagel.zero_grad()
    bagel.cfg.freeze_und = True
    try:
        out = bagel(pack)
        (out["ce"].sum() + out["mse"].sum()).backward()
    finally:
        bagel.cfg.freeze_und = False
    for layer in bagel.layers:
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in layer.und.parameters())
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in layer.gen.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in bagel.vit.parameters())
    assert bagel.llm2vae.weight.grad.abs().sum() > 0


def test_7b_parameter_count_on_meta():
    with torch.device("meta"):
        m = model.Bagel(model.bagel_7b())
    n = sum(p.numel() for p in m.parameters()) + m.vit_pos_table.numel() + m.latent_pos_table.numel()
    assert n == 14_607_260_128


def test_convert_errors_name_the_problem(tmp_path, golden):
    import shutil
    cfg = golden[2]
    src = FIX / "checkpoint"
    bad = tmp_path / "ckpt"
    shutil.copytree(src, bad)
    with pytest.raises(convert.CheckpointError, match="intermediate_size|shape"):  # a config the files do not fit
        load_tiny(bad, intermediate_size=cfg.intermediate_size + 32)
    (bad / "ae.safetensors").write_bytes((src / "ae.safetensors").read_bytes()[:1000])
    with pytest.raises(convert.CheckpointError, match="ae.safetensors"):
        load_tiny(bad)
    (bad / "ema.safetensors").unlink()
    with pytest.raises(convert.CheckpointError, match="missing .*ema.safetensors"):
        load_tiny(bad)
    with pytest.raises(convert.CheckpointError, match="not a folder"):
        load_tiny(tmp_path / "nowhere")


def test_nsa_backend_starts_as_dense_attention_and_trains(golden):
    """attn_backend="nsa" (one NSA module per layer, shared by both experts: its compressed blocks and windows
    pool keys of both experts' tokens). At init it is dense attention exactly on samples that the window and the
    top-k blocks cover (the fixture's samples are that short), and its parameters get gradients."""
    bagel, *_ = golden
    pack = mm_pack(golden)
    longest = max(pack.sample_lens)
    nsa = dict(block_size=16, kernel_size=16, kernel_stride=8, topk=4, init_blocks=1, local_blocks=2,
               window_size=longest)
    sparse, _, _ = load_tiny(attn_backend="nsa", nsa=nsa)
    with torch.no_grad():
        dense = inspect_forward(bagel, pack)
    out = inspect_forward(sparse, pack)
    torch.testing.assert_close(out["hidden"], dense["hidden"], **ACT)
    torch.testing.assert_close(out["ce"], dense["ce"], **LOSS)
    (out["ce"].sum() + out["mse"].sum()).backward()
    for layer in sparse.layers:
        assert layer.attn.gate.weight.grad.abs().sum() > 0


def test_nsa_layer_keeps_no_copy_of_its_input(golden):
    """The NSA gate runs on the experts' normed rows, which their q/k/v projections keep anyway: of the tensors of
    the hidden width that a decoder layer keeps for its backward, the NSA layer keeps as many bytes as the dense
    one (a pack-order copy for the gate cost 0.44 GiB a layer at 64k)."""
    bagel, _, cfg, *_ = golden
    pack = mm_pack(golden)
    sparse, _, sparse_cfg = load_tiny(attn_backend="nsa")
    kept = {}
    for name, m, c in (("dense", bagel, cfg), ("nsa", sparse, sparse_cfg)):
        layer = m.layers[0]
        weights = {p.untyped_storage().data_ptr() for p in layer.parameters()}
        storages = {}

        def keep(t):
            if t.dim() == 2 and t.shape[1] == c.hidden_size and t.untyped_storage().data_ptr() not in weights:
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        x = torch.randn(pack.num_tokens, c.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = layer(x, *model.layer_context(c, pack, torch.float32))
        kept[name] = sum(storages.values())
        del out
    assert kept["dense"] > 0 and kept["nsa"] == kept["dense"]


def test_flex_backend_forward_matches_sdpa(golden):
    """The GPU path's block mask (flex_attention; padded with a causal sample of its own) gives the exact mask's
    result. Forward only: flex has no backward on CPU (tests/test_gpu.py checks gradients on a GPU)."""
    bagel, _, _, _, _, _, packs = golden
    try:
        for pack in packs.values():
            with torch.no_grad():
                bagel.cfg.attn_backend = "sdpa"
                ref = inspect_forward(bagel, pack)
                bagel.cfg.attn_backend = "flex"
                out = inspect_forward(bagel, pack)
            torch.testing.assert_close(out["hidden"], ref["hidden"], **ACT)
    finally:
        bagel.cfg.attn_backend = "sdpa"
