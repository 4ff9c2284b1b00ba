"""pack_samples against the official packer's golden layout (tests/fixtures/bagel_tiny)."""
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import data
import model
from conftest import fixture_samples, load_fixture

def token_tables(pack):
    """Per-token kind / id / sample / item, recomputed from the Pack fields (fixture conventions)."""
    L = pack.num_tokens
    kind = torch.full((L,), -1, dtype=torch.long)
    kind[pack.text_indexes] = 0
    starts = torch.tensor([0] + pack.split_lens).cumsum(0)
    for s, n, m in zip(starts.tolist(), pack.split_lens, pack.split_modes):
        if m != "causal":  # the first and last token of an image split are its markers
            kind[s] = kind[s + n - 1] = 1
    kind[pack.vit_indexes] = 2
    kind[pack.vae_indexes] = 3
    tid = torch.full((L,), -1, dtype=torch.long)
    tid[pack.text_indexes] = pack.text_ids
    sample = torch.repeat_interleave(torch.arange(len(pack.sample_lens)), torch.tensor(pack.sample_lens))
    item, pos, spl = [], 0, 0
    for sl in pack.sample_lens:
        end, k = pos + sl, 0
        while pos < end:
            item += [k] * pack.split_lens[spl]
            pos += pack.split_lens[spl]
            spl, k = spl + 1, k + 1
    return kind, tid, sample, torch.tensor(item)


CASES, TENSORS, EXPECTED, META, SPECIAL = load_fixture()


@pytest.mark.parametrize("case", CASES["cases"], ids=lambda c: c["name"])
def test_pack_matches_official_layout(case):
    name, meta = case["name"], META[case["name"]]
    exp = {k[len(name) + 1:]: v for k, v in EXPECTED.items() if k.startswith(name + ".")}
    samples = fixture_samples(case, TENSORS)
    pack = data.pack_samples(samples, SPECIAL)
    L = meta["sequence_length"]
    assert pack.num_tokens == L
    assert pack.sample_lens == meta["sample_lens"] == exp["sample_lens"].tolist()
    assert torch.equal(pack.position_ids, exp["position_ids"])
    kind, tid, sample, item = token_tables(pack)
    assert torch.equal(kind, exp["token_kind"])
    assert torch.equal(tid, exp["token_id"])
    assert torch.equal(sample, exp["token_sample"])
    assert torch.equal(item, exp["token_item"])
    # the split table
    starts = [0] + torch.tensor(pack.split_lens).cumsum(0).tolist()[:-1]
    assert [(s, n, m) for s, n, m in zip(starts, pack.split_lens, pack.split_modes)] == \
        [(sp["start"], sp["length"], sp["mode"]) for sp in meta["splits"]]
    # the attention mask of every sample, and nothing across samples
    mask = model.span_layout(pack.sample_lens, pack.split_lens, pack.split_modes).dense_mask()
    cu = [0] + torch.tensor(pack.sample_lens).cumsum(0).tolist()
    block = torch.zeros(L, L, dtype=torch.bool)
    for i in range(len(pack.sample_lens)):
        a, b = cu[i], cu[i + 1]
        assert torch.equal(mask[a:b, a:b], exp[f"attn_mask.{i}"])
        block[a:b, a:b] = True
    assert not mask[~block].any()
    # losses' positions
    assert torch.equal(pack.ce_indexes, exp["ce_indexes"])
    assert torch.equal(pack.ce_labels, exp["ce_labels"])
    assert torch.equal(pack.ce_weights, exp["ce_loss_weights"])
    assert len(pack.ce_indexes) == meta["n_ce"]
    assert torch.equal(pack.mse_indexes, exp.get("mse_indexes", torch.zeros(0, dtype=torch.long)))
    assert len(pack.mse_indexes) == meta.get("n_mse", 0)
    # image tokens
    assert torch.equal(pack.vit_pos_ids, exp.get("vit_pos_ids", torch.zeros(0, dtype=torch.long)))
    assert torch.equal(pack.latent_pos_ids, exp.get("latent_pos_ids", torch.zeros(0, dtype=torch.long)))
    assert torch.equal(pack.vit_indexes, (kind == 2).nonzero().flatten())
    assert torch.equal(pack.vae_indexes, (kind == 3).nonzero().flatten())
    # per-image inputs, in sequence order, straight from the fixture's tensors
    items = [it for s in samples for it in s]
    vits = [it for it in items if it["type"] == "vit_image"]
    vaes = [it for it in items if it["type"] == "vae_image"]
    assert pack.vit_lens == [it["pixels"].shape[1] * it["pixels"].shape[2] // 196 for it in vits]
    vit_rows = [it["pixels"].reshape(3, it["pixels"].shape[1] // 14, 14, it["pixels"].shape[2] // 14, 14)
                .permute(1, 3, 2, 4, 0).reshape(-1, 588) for it in vits]  # (p, q, c) features, written out
    assert torch.equal(pack.vit_patches, torch.cat(vit_rows) if vit_rows else torch.zeros(0, 588))
    assert pack.vae_grids == [(it["latent"].shape[1] // 2, it["latent"].shape[2] // 2) for it in vaes]
    assert all(a is b["latent"] for a, b in zip(pack.vae_latents, vaes))
    assert pack.vae_pixels == [None] * len(vaes) and pack.vae_posterior_eps == [None] * len(vaes)
    assert pack.vae_timestep_raw.tolist() == [it["timestep_raw"] if it["loss"] else -math.inf for it in vaes]
    rows = []
    for it, (h, w) in zip(vaes, pack.vae_grids):
        rows.append(model.patchify(it["noise"], 2) if it["loss"] else torch.zeros(h * w, 64))
    assert torch.equal(pack.vae_noise, torch.cat(rows) if rows else torch.zeros(0, 64))
    if "vae_x_t" in exp:  # noise rows feed x_t = (1-t) x0 + t noise exactly as the official code did
        t = torch.sigmoid(torch.repeat_interleave(pack.vae_timestep_raw,
                                                  torch.tensor([h * w for h, w in pack.vae_grids])))
        shift = case["timestep_shift"]
        t = shift * t / (1 + (shift - 1) * t)
        x0 = torch.cat([model.patchify(l, 2) for l in pack.vae_latents])
        assert torch.allclose((1 - t[:, None]) * x0 + t[:, None] * pack.vae_noise, exp["vae_x_t"], atol=1e-6)
        assert torch.allclose(t, exp["vae_t"], atol=1e-7)


def test_drop_and_draws():
    """CFG-dropped items: text vanishes without advancing; images advance the position by one."""
    sp = SPECIAL
    samples = [[{"type": "text", "ids": [5, 6], "drop": True},
                {"type": "vit_image", "pixels": torch.zeros(3, 14, 28), "drop": True},
                {"type": "text", "ids": [7]},
                {"type": "vae_image", "pixels": torch.zeros(3, 16, 32), "loss": True}]]
    g = torch.Generator().manual_seed(0)
    pack = data.pack_samples(samples, sp, generator=g)
    assert pack.position_ids.tolist() == [1, 2, 3] + [4] * 4
    assert pack.split_modes == ["causal", "noise"] and pack.sample_lens == [7]
    assert pack.vit_patches.shape == (0, 588) and pack.vit_lens == []
    assert pack.vae_grids == [(1, 2)] and pack.vae_latents == [None]
    assert pack.vae_posterior_eps[0].shape == (16, 2, 4)
    assert pack.mse_indexes.tolist() == [4, 5] and pack.latent_pos_ids.tolist() == [0, 1]
    # the draws come from the generator, in order: timestep, noise, posterior eps
    g = torch.Generator().manual_seed(0)
    t = torch.randn((), generator=g).item()
    noise = torch.randn(16, 2, 4, generator=g)
    eps = torch.randn(16, 2, 4, generator=g)
    assert pack.vae_timestep_raw.tolist() == [t]
    assert torch.equal(pack.vae_noise, model.patchify(noise, 2))
    assert torch.equal(pack.vae_posterior_eps[0], eps)
