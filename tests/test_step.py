"""The training step's pieces that exist for speed, each against a plain reference: the fused linear cross-entropy
(values and gradients in float64 against F.cross_entropy, with and without per-token weights), activation
checkpointing modes (gradients identical to no checkpointing; the last decoder layer neither checkpointed nor
resharded), the latent cache (the encoder's latents), frozen weights in the compute dtype, hybrid sharding (a 2 x 2
mesh equals one process); and two official behaviours the step follows: the learning-rate warm-up and
visual_und=False (ViT tokens are zero vectors)."""
import dataclasses
import math
import os
import types

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

import data
import model as M
import train
from conftest import curve, fixture_samples, load_fixture, load_tiny, run_training


@pytest.mark.parametrize("weighted", [False, True])
def test_fused_cross_entropy_matches_plain_ce(weighted):
    """Per-token values, and the gradients of sum(c * w * ce) for h and W, across chunk boundaries (N not a multiple
    of the chunk), in float64 against F.cross_entropy on the full logits."""
    g = torch.Generator().manual_seed(0)
    N, C, V, chunk = 37, 16, 50, 8
    h = torch.randn(N, C, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(V, C, dtype=torch.float64, generator=g).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=g)
    w = torch.rand(N, dtype=torch.float64, generator=g) + 0.5 if weighted else torch.ones(N, dtype=torch.float64)
    ref = F.cross_entropy(h @ W.t(), labels, reduction="none")
    dh_ref, dW_ref = torch.autograd.grad((3.0 * w * ref).sum(), (h, W))
    ce = M.cross_entropy(h, W, labels, w if weighted else None, chunk=chunk)
    dh, dW = torch.autograd.grad((3.0 * w * ce).sum(), (h, W))
    torch.testing.assert_close(ce, ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dh, dh_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(dW, dW_ref, atol=1e-12, rtol=1e-12)
    with torch.no_grad():  # evaluation: chunked, no gradients made
        torch.testing.assert_close(M.cross_entropy(h, W, labels, chunk=chunk), ref.detach(), atol=1e-12, rtol=1e-12)


def test_fused_cross_entropy_with_a_frozen_head():
    """A frozen lm_head (LoRA runs): the gradient of h alone, as plain CE gives it."""
    g = torch.Generator().manual_seed(1)
    h = torch.randn(21, 8, dtype=torch.float64, generator=g).requires_grad_()
    W = torch.randn(30, 8, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 30, (21,), generator=g)
    want, = torch.autograd.grad(F.cross_entropy(h @ W.t(), labels, reduction="sum"), h)
    got, = torch.autograd.grad(M.cross_entropy(h, W, labels, chunk=8).sum(), h)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)


def test_fused_cross_entropy_refuses_another_upstream_gradient():
    """The gradients are made in the forward for a loss sum(c * w * ce): any other upstream gradient is an error,
    not silently wrong gradients."""
    h = torch.randn(9, 4, requires_grad=True)
    W = torch.randn(7, 4, requires_grad=True)
    ce = M.cross_entropy(h, W, torch.randint(0, 7, (9,)), chunk=4)
    with pytest.raises(RuntimeError, match="not proportional"):
        (ce * torch.arange(9.0)).sum().backward()


@pytest.fixture(scope="module")
def tiny():
    bagel, vae, cfg = load_tiny()
    cases, tensors, _, _, special = load_fixture()
    case = max(cases["cases"], key=lambda c: len(c["samples"]))  # the fixture's largest pack: text, ViT, latents
    pack = data.pack_samples(fixture_samples(case, tensors), special, cfg.max_latent_size, cfg.vit_max_patches_per_side)
    return bagel, pack


def gradients(bagel, pack, mode, every=1):
    for layer in bagel.layers:
        layer.checkpoint = None
    for layer in list(bagel.layers)[::every] + list(bagel.vit.layers):
        layer.checkpoint = None if mode == "none" else train.checkpoint_args(mode)
    bagel.zero_grad()
    out = bagel(pack)
    (out["ce"].sum() + out["mse"].sum()).backward()
    return {n: p.grad.clone() for n, p in bagel.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode,every", [("full", 1), ("selective", 1), ("full", 2)])
def test_activation_checkpointing_modes_give_the_same_gradients(tiny, mode, every):
    bagel, pack = tiny
    assert pack.vit_lens and pack.mse_indexes.numel() and pack.ce_indexes.numel()
    ref = gradients(bagel, pack, "none")
    got = gradients(bagel, pack, mode, every)
    assert got.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=0, rtol=0, msg=name)
    gradients(bagel, pack, "none")  # leave the shared model as it was


@pytest.mark.parametrize("every", [1, 2])
def test_the_last_decoder_layer_is_neither_checkpointed_nor_resharded(tmp_path, every):
    """Its backward follows the forward at once: checkpointing it would rebuild its activations right away, and
    resharding it would gather its weights again. train.py checkpoints the other decoder layers (every k-th) and all
    ViT layers; under FSDP2 (each decoder layer a unit, the ViT one unit), after a forward, the last layer's weights are
    still gathered, every other layer's are sharded again."""
    cfg = dataclasses.replace(M.bagel_tiny(), num_layers=5)
    model = train.meta_model(dict(train.DEFAULTS, activation_checkpointing="full", checkpoint_every=every), cfg,
                             print)
    assert [layer.checkpoint is not None for layer in model.layers] == \
        [i % every == 0 and i < cfg.num_layers - 1 for i in range(cfg.num_layers)]
    assert all(layer.checkpoint is not None for layer in model.vit.layers)

    bagel, _, _ = load_tiny()  # a model of its own: sharding changes it
    cases, tensors, _, _, special = load_fixture()
    case = max(cases["cases"], key=lambda c: len(c["samples"]))
    pack = data.pack_samples(fixture_samples(case, tensors), special, bagel.cfg.max_latent_size,
                             bagel.cfg.vit_max_patches_per_side)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        train.shard(bagel, init_device_mesh("cpu", (1,)), torch.float32, train.DEFAULTS)
        bagel(pack)
        sharded = [all(isinstance(p, DTensor) for p in layer.parameters()) for layer in bagel.layers]
        assert sharded == [True] * (bagel.cfg.num_layers - 1) + [False]
        assert all(isinstance(p, DTensor) for p in bagel.vit.parameters())
        units = [name for name, m in bagel.named_modules() if isinstance(m, FSDPModule)]  # the ViT is one unit
        assert sorted(units) == sorted(["", "vit"] + [f"layers.{i}" for i in range(bagel.cfg.num_layers)])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["none", "full", "selective"])
def test_checkpointed_layers_compile_whole(tiny, mode):
    """train.py compiles each decoder layer: dynamo must trace a checkpointed layer as one graph (fullgraph=True
    makes a graph break an error; an explicit default context_fn made it refuse full checkpointing). aot_eager runs
    the traced graph without a C++ compiler: the gradients are eager's."""
    bagel, pack = tiny
    ref = gradients(bagel, pack, mode)
    torch._dynamo.reset()
    for layer in bagel.layers:
        layer.compile(backend="aot_eager", fullgraph=True)
    try:
        got = gradients(bagel, pack, mode)
    finally:
        for layer in bagel.layers:
            layer._compiled_call_impl = None  # the shared model eager again
        gradients(bagel, pack, "none")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5, msg=name)


def test_compiled_decoder_layers_take_packs_of_any_length_without_recompiling(monkeypatch):
    """Real packs differ in length. train.py compiles the decoder layers with dynamic shapes from the first pack, so
    only a new kind of pack compiles: the checkpointed layers and the last one are two graphs, a pack without
    generation tokens (an empty expert slice) two more. Static first graphs recompiled at each pack's first new
    length (11-13 s a time at real width in configs/sft.py's setting). aot_eager traces as inductor would."""
    bagel, _, cfg = load_tiny()
    cases, tensors, _, _, special = load_fixture()
    packs = [data.pack_samples(fixture_samples(case, tensors)[:k], special, cfg.max_latent_size,
                               cfg.vit_max_patches_per_side)
             for case in cases["cases"] for k in range(len(case["samples"]), 0, -1)]
    kinds = [pack.vae_indexes.numel() > 0 for pack in packs]  # generation tokens: the latents
    assert len({p.num_tokens for p in packs}) > len(set(kinds))  # some packs bring a kind compiled a new length
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="aot_eager", **kw))
    torch._dynamo.reset()
    model = train.meta_model(dict(train.DEFAULTS, activation_checkpointing="full", compile=True), cfg, print)
    model.to_empty(device="cpu")
    model.init_buffers()
    model.load_state_dict(bagel.state_dict())
    graphs = lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    start, seen = graphs(), set()
    for pack, kind in zip(packs, kinds):
        out = model(pack)
        (out["ce"].sum() + out["mse"].sum()).backward()
        seen.add(kind)
        assert graphs() - start == 2 * len(seen), (pack.num_tokens, kind)
    torch._dynamo.reset()


def test_warmup_is_the_official_schedule():
    """Hugging Face's get_constant_schedule_with_warmup, which the official trainer uses: step k < W runs at
    lr * k / W (step 0 at 0), then lr; cosine decays from lr at the end of the warm-up to min_lr at max_steps."""
    config = dict(train.DEFAULTS, lr=1e-3, min_lr=1e-5, warmup_steps=4, max_steps=14, lr_schedule="constant")
    assert [train.lr_at(config, k) for k in range(6)] == [0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3]
    config["lr_schedule"] = "cosine"
    for k in (4, 9, 14):
        want = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (k - 4) / 10))
        assert train.lr_at(config, k) == pytest.approx(want, rel=1e-12)


def test_visual_und_off_leaves_vit_tokens_zero(tiny):
    """Official visual_und=False: the ViT does not run; its tokens keep their positions as zero vectors (no position
    table added either), and nothing else changes."""
    bagel, pack = tiny
    with torch.no_grad():
        on, _ = bagel.embed(pack, 1.0, run_vit=True)
        off, _ = bagel.embed(pack, 1.0, run_vit=False)
    vit = torch.zeros(pack.num_tokens, dtype=torch.bool)
    vit[pack.vit_indexes] = True
    assert on[vit].abs().sum() > 0 and off[vit].abs().sum() == 0
    torch.testing.assert_close(off[~vit], on[~vit], atol=0, rtol=0)


def test_latent_cache_gives_the_encoders_latents(tmp_path):
    """The second epoch reads each image's posterior moments from the cache and draws the same latent the encoder
    gives; a file that holds another image's moments is made again; another VAE uses another folder."""
    _, vae, cfg = load_tiny()
    g = torch.Generator().manual_seed(0)
    image = lambda h, w: {"type": "vae_image", "latent": None, "loss": True, "pixels": torch.randint(
        0, 256, (3, h, w), generator=g, dtype=torch.uint8)}  # uint8, as the loader gives them: two sizes
    samples = [[image(32, 48)], [image(32, 48)], [image(48, 32)]]
    pack = data.pack_samples(samples, {"im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4},
                             cfg.max_latent_size, cfg.vit_max_patches_per_side, generator=g)
    fresh = lambda: data.Pack(**{**pack.__dict__, "vae_latents": list(pack.vae_latents)})
    want = train.encode_images(vae, [fresh()], torch.float32)[0].vae_latents
    cache = train.LatentCache(str(tmp_path), vae)
    for epoch in range(2):
        got = train.encode_images(vae, [fresh()], torch.float32, cache)[0].vae_latents
        for z, w in zip(got, want):
            torch.testing.assert_close(z, w, atol=1e-6, rtol=1e-6)
    assert (cache.misses, cache.hits) == (3, 3)
    assert not os.path.exists(cache.path(pack.vae_keys[0]))  # written only when asked (no GPU wait in the step)
    cache.write()
    os.replace(cache.path(pack.vae_keys[1]), cache.path(pack.vae_keys[0]))  # image 0's file holds image 1's moments
    got = train.encode_images(vae, [fresh()], torch.float32, cache)[0].vae_latents
    torch.testing.assert_close(got[0], want[0], atol=1e-6, rtol=1e-6)
    assert cache.misses == 5  # image 0 (not trusted) and image 1 (gone) encoded again
    with torch.no_grad():
        next(vae.parameters()).add_(1.0)
    assert train.LatentCache(str(tmp_path), vae).folder != cache.folder


def test_encoder_calls_hold_at_most_encode_pixels(monkeypatch):
    """Images of one size go through the encoder together, across packs, in calls of at most ENCODE_PIXELS pixels
    (an image larger than that alone); the latents are those of encoding each image by itself."""
    _, vae, cfg = load_tiny()
    g = torch.Generator().manual_seed(0)
    image = lambda h, w: {"type": "vae_image", "latent": None, "loss": True, "pixels": torch.randint(
        0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
    specials = {"im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4}
    made = [data.pack_samples([[image(32, 48)], [image(32, 48)], [image(48, 32)]], specials, cfg.max_latent_size,
                              cfg.vit_max_patches_per_side, generator=g) for _ in range(2)]
    copy = lambda p: data.Pack(**{**p.__dict__, "vae_latents": list(p.vae_latents)})
    calls, moments = [], vae.moments
    monkeypatch.setattr(vae, "moments", lambda x: calls.append(tuple(x.shape)) or moments(x))
    monkeypatch.setattr(train, "ENCODE_PIXELS", 1)  # one image a call
    alone = [p.vae_latents for p in train.encode_images(vae, [copy(p) for p in made], torch.float32)]
    assert len(calls) == 6
    calls.clear()
    monkeypatch.setattr(train, "ENCODE_PIXELS", 3 * 32 * 48)  # the four 32x48 images: 3 + 1; the 48x32 pair: 2
    together = [p.vae_latents for p in train.encode_images(vae, [copy(p) for p in made], torch.float32)]
    assert sorted(calls) == sorted([(3, 3, 32, 48), (1, 3, 32, 48), (2, 3, 48, 32)])
    for zs, ws in zip(together, alone):
        for z, w in zip(zs, ws):
            torch.testing.assert_close(z, w, atol=1e-5, rtol=1e-5)


def test_feed_hands_out_encoded_packs_a_step_ahead(tmp_path):
    """Feed: take() gives the packs the loader made next, encoded as encode_images does inline, with the loader
    state just after them; prepare() has already drawn the following ones (so a checkpoint must save take()'s
    state, not the loader's). On a GPU the encoding runs on a side stream while the main stream is busy, and the
    latents are bit for bit the inline ones; the latent cache is written at take(), not inside the step."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _, vae, cfg = load_tiny(device=device)
    g = torch.Generator().manual_seed(0)
    image = lambda h, w: {"type": "vae_image", "latent": None, "loss": True, "pixels": torch.randint(
        0, 256, (3, h, w), generator=g, dtype=torch.uint8)}
    specials = {"im_start": 1, "im_end": 2, "vision_start": 3, "vision_end": 4}
    made = [data.pack_samples([[image(32, 48)], [image(48, 32)]], specials, cfg.max_latent_size,
                              cfg.vit_max_patches_per_side, generator=g) for _ in range(3)]
    copy = lambda p: data.Pack(**{**p.__dict__, "vae_latents": list(p.vae_latents)})
    want = [train.encode_images(vae, [copy(p).to(device)], torch.float32)[0].vae_latents for p in made]
    handed = iter(made)
    drawn = []
    next_pack = lambda: drawn.append(1) or copy(next(handed))
    run = types.SimpleNamespace(vae=vae, device=device, dtype=torch.float32,
                                latent_cache=train.LatentCache(str(tmp_path), vae))
    feed = train.Feed(run, next_pack, 1, data_state=lambda: len(drawn))
    for step in range(3):
        packs, state = feed.take()
        assert state == step + 1 and len(packs) == 1
        if device.type == "cuda":  # keep the main stream busy while the side stream encodes
            x = torch.randn(2048, 2048, device=device)
            for _ in range(20):
                x = x @ x / 2048 ** 0.5
        if step < 2:
            feed.prepare()
            assert len(drawn) == step + 2  # the next step's pack is drawn now, inside this step
        for z, w in zip(packs[0].vae_latents, want[step]):
            torch.testing.assert_close(z, w, atol=0, rtol=0)
    assert len(run.latent_cache.unwritten) == 0 and run.latent_cache.misses == 6
    assert all(os.path.exists(run.latent_cache.path(k)) for p in made for k in p.vae_keys)


def test_frozen_weights_are_stored_in_the_compute_dtype():
    """Only what trains keeps an fp32 master: a LoRA run's base weights (and any frozen part) are stored in the
    compute dtype, its adapters in fp32; every parameter is there, with its name and shape."""
    config = dict(train.DEFAULTS, lora_targets=["layers.*.und.q_proj", "vit.layers.*.v_proj"], lora_rank=2)
    with torch.device("meta"):
        bagel = M.Bagel(M.bagel_tiny())
    M.apply_lora(bagel, config["lora_targets"], 2, 4.0)
    before = {n: p.shape for n, p in bagel.named_parameters()}
    trains = train.trainable_mask(list(before), config)
    train.freeze(bagel, trains, torch.bfloat16)
    after = dict(bagel.named_parameters())
    assert {n: p.shape for n, p in after.items()} == before
    for name, p in after.items():
        assert (p.dtype, p.requires_grad) == ((torch.float32, True) if ".lora_" in name else (torch.bfloat16, False))
    assert sum(trains.values()) == 2 * (bagel.cfg.num_layers + bagel.cfg.vit_num_layers)


def test_hybrid_sharding_equals_one_process(tmp_path):
    """fsdp_shard_size=2 on 4 processes: a 2 x 2 mesh (shard inside pairs, replicate across them, HSDP) sees the packs
    one process sees in 4 micro-steps, and must give the same losses, gradient norms and weights."""
    run_training(tmp_path / "one", "--grad_accum=4", "--max_steps=3")
    run_training(tmp_path / "hsdp", "--grad_accum=1", "--max_steps=3", "--fsdp_shard_size=2", nproc=4)
    one, hsdp = curve(tmp_path / "one"), curve(tmp_path / "hsdp")
    for s in (1, 2, 3):
        for key in ("loss", "ce", "mse", "grad_norm"):
            assert hsdp[s][key] == pytest.approx(one[s][key], rel=2e-5, abs=1e-6), (s, key)
    a, b = (load_file(str(tmp_path / d / "export/ema.safetensors")) for d in ("one", "hsdp"))
    assert a.keys() == b.keys()
    for k in a:  # but the ViT key biases: softmax cancels them, so Adam steps on their round-off (as test_train says)
        if not (k.startswith("vit.") and k.endswith("k_proj.bias")):
            torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=1e-4, msg=k)


def test_memory_formula_counts_what_a_layer_keeps():
    """bench.layer_activation_bytes on the fixture's layer shapes against an independent count: full checkpointing
    keeps the bf16 layer input; selective adds the bf16 outputs of the seven matmuls (q, k, v, o, gate, up, down) and
    what attention keeps for backward (its bf16 output, the fp32 log-sum-exp per head); no checkpointing keeps more
    than selective. memory_gib: states by parameter count, each term checked by hand on the fixture model."""
    import bench
    _, _, cfg = load_tiny()
    C, F_, H, KH, D = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    act = bench.layer_activation_bytes(cfg)
    assert act["full"] == 2 * C
    assert act["selective"] == 2 * C + 2 * (H * D + 2 * KH * D + C + 2 * F_ + C) + H * (2 * D + 4)
    assert act["none"] > act["selective"]
    # an NSA model is counted as dense (bench.py's long NSA rows stopped here once, after their steps)
    assert bench.layer_activation_bytes(dataclasses.replace(cfg, attn_backend="nsa")) == act
    params = sum(p.numel() for p in M.Bagel(cfg).parameters())
    layer = sum(p.numel() for p in M.DecoderLayer(cfg).parameters())
    tokens, world = 4096, 2
    forward_end = cfg.num_layers * tokens * act["full"] + tokens * (act["none"] - act["full"]) + \
        4096 * cfg.vocab_size * 6 + 8 * layer
    want = params * 12 / world + params * 4 / world + max(forward_end, params * 4 / world)
    assert bench.memory_gib(cfg, act, world, tokens, "full") == pytest.approx(want / 2 ** 30, rel=1e-12)


def test_peak_sites_replays_an_allocator_trace():
    """bench.peak_sites (BENCH_PEAK) on a hand-made allocator trace, the answer worked out by hand: 100 bytes before
    the recording; +50 (this repository's model.py, called from train.py), +30 (a file elsewhere), -50, -40 of a block
    from before the recording, +120 (no Python frame: the autograd engine) -> peak 210, reached by the last
    allocation, with 120 + 30 traced and 60 from before live at it."""
    import bench
    here = os.path.dirname(os.path.abspath(bench.__file__))
    frame = lambda path, line, name: {"filename": path, "line": line, "name": name}
    ours = [frame(os.path.join(here, "model.py"), 10, "f"), frame(os.path.join(here, "train.py"), 20, "g"),
            frame("/elsewhere/runner.py", 5, "main")]
    event = lambda action, addr, size, frames=(): {"action": action, "addr": addr, "size": size, "frames": list(frames)}
    trace = [event("alloc", 1, 50, ours), event("alloc", 2, 30, [frame("/elsewhere/lib.py", 1, "h")]),
             event("free_requested", 1, 50), event("free_completed", 1, 50), event("free_completed", 999, 40),
             event("alloc", 3, 120), event("free_requested", 3, 120), event("free_completed", 3, 120)]
    peak, last, sites = bench.peak_sites(trace, 100, top=5)
    assert (peak, last) == (210, "(no Python frame: autograd's engine)")
    assert sites == [(120, "(no Python frame: autograd's engine)"), (60, "(allocated before the recording)"),
                     (30, "lib.py:1 h")]
    # the repository's frames name the site while its allocation is live at the peak
    peak, last, sites = bench.peak_sites(trace[:2], 100, top=5)
    assert (peak, last) == (180, "lib.py:1 h")
    assert sites == [(100, "(allocated before the recording)"), (50, "model.py:10 f < train.py:20 g"),
                     (30, "lib.py:1 h")]
