"""sample.py: the KV-cached path (dense and NSA) against the uncached forward and the official golden outputs
(tests/fixtures/bagel_tiny, driven by its cases.json), guidance, seeds, FSDP2, and a tiny model overfit on one
image-caption pair that the sampler reproduces from its caption."""
import dataclasses
import math

import numpy as np
import pytest
import torch

import convert
import data
import model
import sample
import train
from conftest import case_names, fixture_samples, inspect_forward, load_fixture, load_tiny

GOLDEN = dict(atol=1e-4, rtol=1e-4)   # against the official fp32 outputs (fixture README)
SAME = dict(atol=1e-5, rtol=1e-5)     # cached vs uncached forward: same weights, only the summation order differs


class ByteTokenizer:
    """The tokenizer duck type sample.py needs: utf-8 bytes as ids (decode writes any ids), the four special ids."""
    def __init__(self, special):
        self.special = special

    def encode(self, text):
        return list(text.encode())

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors: one thread is faster than two and immune to a busy machine's oversubscription."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    bagel, vae, cfg = load_tiny()
    cases, tensors, expected, _, special = load_fixture()
    return bagel.eval(), vae.eval(), cfg, cases, tensors, expected, special


def items_of(cases, tensors, kind):
    return [it for c in cases["cases"] for s in fixture_samples(c, tensors) for it in s if it["type"] == kind]


# ----------------------------------------------------------------------------------------------
# The KV cache

def replay(bagel, case, tensors, special, text_by_token, golden=None):
    """Replay every sample of a fixture case item by item against a cache: context items prefilled (or text fed token
    by token), noised images as velocity() calls. Every token must match the uncached forward on the whole pack, and
    where golden (the fixture's expected tensors) is given, the official hidden states / mse_pred."""
    cfg, name = bagel.cfg, case["name"]
    samples = fixture_samples(case, tensors)
    pack = data.pack_samples(samples, special, cfg.max_latent_size, cfg.vit_max_patches_per_side)
    with torch.no_grad():
        out = inspect_forward(bagel, pack, case["timestep_shift"])
        logits = bagel.lm_head(out["hidden"])
    row_of_latent = {int(j): r for r, j in enumerate(pack.vae_indexes)}   # pack position -> latent row
    mse_row = {int(j): r for r, j in enumerate(pack.mse_indexes)}
    spans = iter(pack.split_lens)
    start, checked = 0, 0
    for items in samples:
        cache = sample.KVCache(cfg.num_layers)
        for it in items:
            idx = torch.arange(start, start + next(spans))
            start += len(idx)
            with torch.no_grad():
                if it["type"] == "vae_image" and it.get("loss"):
                    rows = [row_of_latent[int(j)] for j in idx[1:-1]]
                    v = sample.velocity(bagel, cache, out["x_t"][rows], out["t"][rows[0]], data.item_grid(it), special)
                    mse = [mse_row[int(j)] for j in idx[1:-1]]
                    torch.testing.assert_close(v, out["mse_pred"][mse], **SAME)
                    if golden:
                        torch.testing.assert_close(v, golden[f"{name}.mse_pred"][mse], **GOLDEN)
                elif it["type"] == "text" and text_by_token:
                    ids = [special["im_start"]] + list(it["ids"]) + [special["im_end"]]
                    got = torch.stack([sample.feed_token(bagel, cache, t) for t in ids])
                    torch.testing.assert_close(got, logits[idx], **SAME)
                else:
                    h = sample.prefill(bagel, cache, [it], special)
                    torch.testing.assert_close(h, out["hidden"][idx], **SAME)
                    if golden:
                        torch.testing.assert_close(h, golden[f"{name}.hidden"][idx], **GOLDEN)
            checked += len(idx)
    assert checked == pack.num_tokens
    return out


@pytest.mark.parametrize("text_by_token", [False, True])
@pytest.mark.parametrize("name", case_names())
def test_cached_replay_equals_forward_and_official(tiny, name, text_by_token):
    bagel, _, cfg, cases, tensors, E, special = tiny
    replay(bagel, next(c for c in cases["cases"] if c["name"] == name), tensors, special, text_by_token, E)


@pytest.fixture(scope="module")
def tiny_nsa(tiny):
    """The fixture model with NSA attention (the CPU torch reference) on a pattern small enough that its samples are
    sparse; every branch live: random key/value compression, intra-block position bias and gate."""
    bagel, _, cfg, *_ = tiny
    pattern = dict(block_size=4, kernel_size=4, kernel_stride=2, topk=2, init_blocks=1, local_blocks=1, window_size=4)
    net = model.Bagel(dataclasses.replace(cfg, attn_backend="nsa", nsa=pattern))
    missing, unexpected = net.load_state_dict(bagel.state_dict(), strict=False)
    assert not unexpected and missing and all(".attn." in k for k in missing)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k in missing:
            p = net.get_parameter(k)
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 if "compress" in k else 0.2))
    return net.eval()


@pytest.mark.parametrize("text_by_token", [False, True])
@pytest.mark.parametrize("name", case_names())
def test_nsa_cached_replay_equals_forward(tiny, tiny_nsa, name, text_by_token):
    """NSA through the KV cache (compressed keys, selected blocks and the sliding window over the cached tokens) equals
    the uncached forward; and its attention differs from dense attention on these samples by far more than the
    tolerance, so a cache that got the compressed keys, the blocks or the window wrong could not pass."""
    bagel, _, _, cases, tensors, _, special = tiny
    case = next(c for c in cases["cases"] if c["name"] == name)
    out = replay(tiny_nsa, case, tensors, special, text_by_token)
    pack = data.pack_samples(fixture_samples(case, tensors), special, bagel.cfg.max_latent_size,
                             bagel.cfg.vit_max_patches_per_side)
    dense = model.Bagel(bagel.cfg).eval()
    dense.load_state_dict({k: v for k, v in tiny_nsa.state_dict().items() if ".attn." not in k})
    with torch.no_grad():
        assert (out["hidden"] - inspect_forward(dense, pack, case["timestep_shift"])["hidden"]).abs().max() > 1e-2


def test_greedy_text_matches_uncached_argmax(tiny):
    """Greedy answer after an image + question; then the uncached forward on context + answer must predict each
    answer token (argmax) at the position before it."""
    bagel, _, cfg, cases, tensors, _, special = tiny
    question = {"type": "text", "ids": items_of(cases, tensors, "text")[0]["ids"]}
    context = [items_of(cases, tensors, "vit_image")[0], question]
    cache = sample.KVCache(cfg.num_layers)
    sample.prefill(bagel, cache, context, special)
    ids = sample.generate_text(bagel, cache, special, max_new_tokens=8)
    full = context + [{"type": "text", "ids": ids, "loss": True}]
    pack = data.pack_samples([full], special, cfg.max_latent_size, cfg.vit_max_patches_per_side)
    with torch.no_grad():
        pred = bagel.lm_head(inspect_forward(bagel, pack)["hidden"][pack.ce_indexes]).argmax(-1).tolist()
    assert pred[:len(ids)] == ids
    if len(ids) < 8:  # stopped at <|im_end|>
        assert pred[len(ids)] == special["im_end"]
    draws = [sample.answer(bagel, None, ByteTokenizer(special), "what is it?", max_new_tokens=6, temperature=1.0,
                           seed=s) for s in (3, 3, 4)]
    assert draws[0] == draws[1] and draws[0] != draws[2]  # temperature sampling: seeded


def test_prefill_refuses_what_is_not_context(tiny):
    bagel, _, cfg, *_, special = tiny
    cache = sample.KVCache(cfg.num_layers)
    latent = torch.zeros(16, 4, 4)
    with pytest.raises(ValueError, match="noised image"):
        sample.prefill(bagel, cache, [{"type": "vae_image", "latent": latent, "loss": True}], special)
    with pytest.raises(ValueError, match="needs its latent"):
        sample.prefill(bagel, cache, [{"type": "vae_image", "pixels": torch.zeros(3, 32, 32)}], special)
    with pytest.raises(ValueError, match="at least one item"):
        sample.prefill(bagel, cache, [], special)
    assert len(cache) == 0 and cache.pos == 0


# ----------------------------------------------------------------------------------------------
# Guidance

def test_guide_formula():
    g = torch.Generator().manual_seed(0)
    v, v_text, v_img = (torch.randn(6, 64, generator=g, dtype=torch.float64) for _ in range(3))
    for renorm in ("global", "channel", "text_channel"):  # scale 1 with real branches is the unguided velocity
        torch.testing.assert_close(sample.guide(v, v_text, v_img, 1.0, 1.0, renorm), v)
        assert sample.guide(v, None, None, 4.0, 2.0, renorm) is v
    # scale 4 / 2 against the formula written out (bagel_official.md §9.3)
    raw = v_img + 2.0 * ((v_text + 4.0 * (v - v_text)) - v_img)
    torch.testing.assert_close(sample.guide(v, v_text, v_img, 4.0, 2.0, "global"),
                               raw * min(1.0, (v.norm() / raw.norm()).item()))
    per_token = lambda a, b: (a.norm(dim=1, keepdim=True) / b.norm(dim=1, keepdim=True)).clamp(max=1.0)
    torch.testing.assert_close(sample.guide(v, v_text, v_img, 4.0, 2.0, "channel"), raw * per_token(v, raw))
    text = v_text + 4.0 * (v - v_text)
    torch.testing.assert_close(sample.guide(v, v_text, v_img, 4.0, 2.0, "text_channel"),
                               v_img + 2.0 * (text * per_token(v, text) - v_img))
    assert sample.guide(v, v_text, None, 4.0, 1.0, "global").norm() <= v.norm() * (1 + 1e-12)
    with pytest.raises(ValueError, match="cfg_renorm_type"):
        sample.guide(v, v_text, None, 4.0, 1.0, "per_pixel")


def test_sampler_equals_uncached_euler_with_guidance(tiny):
    """The whole text-to-image sampler recomputed without a cache: each velocity from model.forward on a training
    pack whose noised image has x0 = 0, noise = x / t and raw timestep logit(t), so that its x_t is the current x;
    Euler on the shifted grid and text CFG with global renorm written out from bagel_official.md §9.2-9.3."""
    bagel, _, cfg, _, _, _, special = tiny
    grid, steps, shift, scale, interval = (2, 3), 6, 3.0, 4.0, (0.4, 1.0)
    caption = [{"type": "text", "ids": list(b"a red circle")}]

    def v_uncached(context, x, t):
        noise = model.unpatchify(x / t, *grid, 2, 16)
        item = {"type": "vae_image", "latent": torch.zeros_like(noise), "loss": True, "noise": noise,
                "timestep_raw": math.inf if t == 1 else math.log(t / (1 - t))}
        pack = data.pack_samples([context + [item]], special, cfg.max_latent_size, cfg.vit_max_patches_per_side)
        return inspect_forward(bagel, pack, 1.0)["mse_pred"].double()

    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0)).double()
    u = torch.linspace(1, 0, steps, dtype=torch.float64)
    ts = (shift * u / (1 + (shift - 1) * u)).tolist()
    with torch.no_grad():
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = v_uncached(caption, x.float(), t)
            if interval[0] < t <= interval[1]:
                v_u = v_uncached([], x.float(), t)
                guided = v_u + scale * (v - v_u)
                v = guided * min(1.0, (v.norm() / guided.norm()).item())
            x = x - v * (t - t_next)
        full, empty = sample.KVCache(cfg.num_layers), sample.KVCache(cfg.num_layers)
        sample.prefill(bagel, full, caption, special)
        got = sample.sample_latent(bagel, full, grid, special, torch.Generator().manual_seed(0), empty,
                                   num_timesteps=steps, timestep_shift=shift, cfg_text_scale=scale,
                                   cfg_interval=interval, cfg_renorm_type="global")
    torch.testing.assert_close(got.double(), x, atol=1e-4, rtol=1e-4)


def branches(bagel, cfg, special, edit_items=None):
    """(full, cfg_text, cfg_img) caches for a prompt, with an optional image before it."""
    prompt = [{"type": "text", "ids": list(b"a red circle")}]
    cfg_text = sample.KVCache(cfg.num_layers)
    if edit_items:
        sample.prefill(bagel, cfg_text, edit_items, special)
    full = cfg_text.copy()
    sample.prefill(bagel, full, prompt, special)
    cfg_img = sample.KVCache(cfg.num_layers)
    sample.prefill(bagel, cfg_img, prompt, special)
    return full, cfg_text, (cfg_img if edit_items else None)


@pytest.mark.parametrize("edit", [False, True])
def test_guidance_scale_one_equals_unguided(tiny, edit):
    bagel, _, cfg, cases, tensors, _, special = tiny
    edit_items = None
    if edit:
        latent = next(it["latent"] for it in items_of(cases, tensors, "vae_image") if it.get("latent") is not None)
        edit_items = [{"type": "vae_image", "latent": latent, "loss": False}, items_of(cases, tensors, "vit_image")[0]]
    full, cfg_text, cfg_img = branches(bagel, cfg, special, edit_items)

    def run(**kw):
        settings = dict(sample.EDIT if edit else sample.T2I, num_timesteps=6, **kw)
        return sample.sample_latent(bagel, full, (2, 3), special, torch.Generator().manual_seed(0), cfg_text, cfg_img,
                                    **settings)
    unguided = sample.sample_latent(bagel, full, (2, 3), special, torch.Generator().manual_seed(0), num_timesteps=6)
    assert torch.equal(run(cfg_text_scale=1.0, cfg_img_scale=1.0), unguided)
    assert torch.equal(run(cfg_interval=(1.0, 1.0)), unguided)  # no t in (1, 1]: never guided
    # a hair above 1 runs every branch through guide(): still the unguided result, up to that hair
    torch.testing.assert_close(run(cfg_text_scale=1 + 1e-6, cfg_img_scale=1 + 1e-6), unguided, atol=1e-4, rtol=0)
    assert (run() - unguided).abs().max() > 1e-2  # and the default guidance does act


# ----------------------------------------------------------------------------------------------
# Seeds, front ends, command line

def test_seeded_images_grid_and_edit(tiny):
    bagel, vae, cfg, *_, special = tiny
    tok = ByteTokenizer(special)
    kw = dict(image_size=(32, 48), num_timesteps=4)
    a, b, c = (np.asarray(sample.generate_image(bagel, vae, tok, "a red circle", seed=s, **kw)) for s in (7, 7, 8))
    assert a.shape == (32, 48, 3) and np.array_equal(a, b) and not np.array_equal(a, c)
    grid = sample.sample_grid(bagel, vae, tok, ["a red circle", "a blue square"], seed=7, **kw)
    assert grid.size == (96, 32)
    assert np.array_equal(np.asarray(grid)[:, :48], a)
    src = sample.make_grid([grid])  # any PIL image will do as the edit source
    edits = [np.asarray(sample.generate_image(bagel, vae, tok, "make it blue", image=src, seed=1, num_timesteps=3,
                                              vae_size=(32, 96), vit_size=(28, 84))) for _ in range(2)]
    assert edits[0].shape == (32, 96, 3) and np.array_equal(*edits)
    pooled = model.PooledAE(cfg)  # the weightless stand-in AE of the tiny built-in run
    assert sample.generate_image(bagel, pooled, tok, "make it blue", image=src, num_timesteps=2, vae_size=(32, 96),
                                 vit_size=(28, 84)).size == (96, 32)
    with pytest.raises(ValueError, match="multiples of 16"):
        sample.generate_image(bagel, vae, tok, "x", image_size=(20, 32))


def test_command_line(tiny, tmp_path, capsys):
    bagel, vae, cfg, *_ = tiny
    convert.save_nanobagel(str(tmp_path / "ckpt"), bagel, vae, cfg)
    args = ["--ckpt", str(tmp_path / "ckpt"), "--tokenizer", "tiny", "--size", "32", "--steps", "3"]
    sample.main(args + ["--prompts", "a red circle", "a blue square", "--out", str(tmp_path / "grid.png")])
    from PIL import Image
    assert Image.open(tmp_path / "grid.png").size == (64, 32)
    sample.main(args + ["--prompt", "what is it?", "--image", str(tmp_path / "grid.png"), "--understand",
                        "--max-new-tokens", "4"])
    assert capsys.readouterr().out.strip()
    # input image sizes for small models: the 64x32 grid edited at sides 16..32 (VAE) and 28 (ViT) is 32x16
    sample.main(args + ["--prompt", "make it blue", "--image", str(tmp_path / "grid.png"), "--image-size", "16", "32",
                        "--vit-size", "28", "--out", str(tmp_path / "edit.png")])
    grid = Image.open(tmp_path / "grid.png")
    edit = sample.generate_image(bagel, vae, data.tiny_tokenizer(), "make it blue", image=grid, num_timesteps=3,
                                 vae_size=(16, 32), vit_size=(28, 28))
    assert edit.size == (32, 16) and np.array_equal(np.asarray(Image.open(tmp_path / "edit.png")), np.asarray(edit))
    capsys.readouterr()
    sample.main(args + ["--prompt", "what is it?", "--image", str(tmp_path / "grid.png"), "--understand",
                        "--max-new-tokens", "4", "--vit-size", "28"])
    assert capsys.readouterr().out.strip() == sample.answer(bagel, vae, data.tiny_tokenizer(), "what is it?", [grid],
                                                            max_new_tokens=4, vit_size=(28, 28))
    with pytest.raises(SystemExit):
        sample.main(args + ["--prompt", "x", "--vit-size", "28", "56", "84"])


def fsdp_rank(rank, world, init_file):
    """One rank of test_sample_grid_under_fsdp2: the grid of an FSDP2-sharded model, mid-training, equals the
    unsharded model's, and training goes on after it."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    bagel, vae, _ = load_tiny()
    special = load_fixture()[4]
    tok, prompts = ByteTokenizer(special), ["a red circle", "a blue square"]
    kw = dict(image_size=(32, 32), num_timesteps=3)
    reference = np.asarray(sample.sample_grid(bagel, vae, tok, prompts, **kw))
    train.shard(bagel, init_device_mesh("cpu", (world,)), torch.float32, train.DEFAULTS)  # train.py's wrapping
    pack = data.pack_samples([[{"type": "text", "ids": [5, 6, 7], "loss": True}]], special)
    bagel(pack)["ce"].sum().backward()  # train.py samples after training steps
    assert np.array_equal(np.asarray(sample.sample_grid(bagel, vae, tok, prompts, **kw)), reference)
    assert bagel.training
    bagel(pack)["ce"].sum().backward()
    train.finish_distributed()  # passed


def test_sample_grid_under_fsdp2(tmp_path):
    torch.multiprocessing.spawn(fsdp_rank, args=(2, str(tmp_path / "init")), nprocs=2)


# ----------------------------------------------------------------------------------------------
# Overfit: a tiny model learns one caption -> image pair; the sampler must draw that image from the caption.

def test_overfit_one_pair_is_reproduced(tiny):
    """Latent-space training (packs from data.pack_samples with fresh timestep / noise draws, 10% caption dropout
    as the official text_cond_dropout_prob), then the default T2I sampler (50 points, shift 3, text CFG 4 on
    (0.4, 1], global renorm). The target latent has unit variance: drawing nothing (zeros) scores MSE 1, leaving
    the start noise 2. Bound: latent MSE < 0.05, pixel MSE of the decoded images < 0.1 of the target image's
    variance. Runs here reach about 0.007 and 0.02 of the variance: the margin absorbs thread-count numerics."""
    _, vae, _, _, _, _, _ = tiny
    special = dict(im_start=256, im_end=257, vision_start=258, vision_end=259)  # bytes below, then the specials
    cfg = model.bagel_tiny(vocab_size=260, hidden_size=128, intermediate_size=256, vit_num_layers=1,
                           max_latent_size=8, vit_max_patches_per_side=8)  # width > 64 latent values per token
    g = torch.Generator().manual_seed(0)
    x0 = torch.nn.functional.interpolate(torch.randn(1, 16, 2, 2, generator=g), size=(4, 4), mode="bilinear",
                                         align_corners=True)[0]   # a smooth 32x32-pixel image's latent [16, 4, 4]
    x0 = x0 / x0.std()
    caption = list(b"a red circle on blue")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        net = model.Bagel(cfg)
        net.init_weights()
    steps, lr = 500, 3e-3
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    for step in range(steps):
        batch = [[{"type": "text", "ids": caption, "drop": bool(torch.rand((), generator=g) < 0.1)},
                  {"type": "vae_image", "latent": x0, "loss": True}] for _ in range(8)]
        loss = net(data.pack_samples(batch, special, cfg.max_latent_size, 8, generator=g))["mse"].mean()
        opt.zero_grad()
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        opt.step()
    net.eval()
    with torch.no_grad():
        full, uncond = sample.KVCache(cfg.num_layers), sample.KVCache(cfg.num_layers)
        sample.prefill(net, full, [{"type": "text", "ids": caption}], special)
        tokens = sample.sample_latent(net, full, (2, 2), special, torch.Generator().manual_seed(1), uncond,
                                      **sample.T2I)
        latent_mse = (tokens - model.patchify(x0, 2)).pow(2).mean().item()
        target = vae.decode(x0[None])
        drawn = vae.decode(model.unpatchify(tokens, 2, 2, 2, 16)[None])
        pixel_mse = (drawn - target).pow(2).mean().item()
    print(f"overfit: loss {loss.item():.4f}, latent mse {latent_mse:.4f}, pixel mse {pixel_mse:.4f} "
          f"(target variance {target.var().item():.4f})")
    assert latent_mse < 0.05
    assert pixel_mse < 0.1 * target.var().item()
