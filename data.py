"""nanobagel data: samples (lists of items) -> packed multimodal sequences (Pack) for model.py.

Read top to bottom:
  1. Pack + pack_samples: the exact official BAGEL layout of a list of samples (the contract, notes/PACK.md)
"""
import math
from dataclasses import dataclass, fields

import torch

from model import patchify


# ----------------------------------------------------------------------------------------------
# 1. The Pack: a flat sequence of several samples, and the official BAGEL layout rules
#
# A sample is an ordered list of items (the fixture vocabulary, tests/fixtures/bagel_tiny/cases.json):
#   {"type": "text", "ids": [...], "loss": bool, "special_token_loss": bool, "special_token_label": int|None}
#   {"type": "vit_image", "pixels": [3, H, W] in [-1, 1], H and W multiples of 14}
#   {"type": "vae_image", "latent": [16, 2h, 2w] or None, "pixels": [3, 16h, 16w] or None, "loss": bool,
#    "timestep_raw": float|None, "noise": [16, 2h, 2w]|None, "posterior_eps": [16, 2h, 2w]|None}
# and any item may carry "drop": True (CFG condition dropout).

@dataclass
class Pack:
    sample_lens: list            # tokens per sample
    split_lens: list             # one split per (kept) item; the splits tile the pack in order
    split_modes: list            # 'causal' | 'full' | 'noise'
    position_ids: torch.Tensor   # Long[L] RoPE ids, restart at 0 per sample
    text_ids: torch.Tensor       # Long[Nt] every token embedded by embed_tokens (text and the 4 markers)
    text_indexes: torch.Tensor   # Long[Nt]
    vit_patches: torch.Tensor    # Float[Nvit, 588] patchify(pixels, 14), images in sequence order
    vit_pos_ids: torch.Tensor    # Long[Nvit] row*vit_side + col
    vit_indexes: torch.Tensor    # Long[Nvit]
    vit_lens: list               # patches per ViT image
    vae_indexes: torch.Tensor    # Long[Nv] all latent tokens, noised and clean, sequence order
    latent_pos_ids: torch.Tensor  # Long[Nv] row*max_latent_size + col
    vae_grids: list              # (h, w) latent-token grid per VAE image
    vae_latents: list            # per VAE image: [16, 2h, 2w] or None (pixels given)
    vae_pixels: list             # per VAE image: [3, 16h, 16w] or None (latent given)
    vae_posterior_eps: list      # per VAE image: [16, 2h, 2w] for pixel images, else None
    vae_timestep_raw: torch.Tensor  # Float[Nimg_vae] pre-sigmoid draw; -inf for clean conditions
    vae_noise: torch.Tensor      # Float[Nv, 64] patchify(noise, 2); zeros for clean tokens
    ce_indexes: torch.Tensor     # Long[Nce]
    ce_labels: torch.Tensor      # Long[Nce]
    ce_weights: torch.Tensor     # Float[Nce] 1/sqrt(len(ids)+1) per text-loss token, 1.0 special-token loss
    mse_indexes: torch.Tensor    # Long[Nmse] latent tokens of noised images

    @property
    def num_tokens(self):
        return sum(self.sample_lens)

    def to(self, device):
        def move(v):
            if isinstance(v, torch.Tensor):
                return v.to(device)
            if isinstance(v, list):
                return [move(x) for x in v]
            return v
        return Pack(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


def vae_grid(item):
    """(h, w) latent-token grid of a vae_image item (latent is [16, 2h, 2w], pixels [3, 16h, 16w])."""
    if item.get("latent") is not None:
        _, H, W = item["latent"].shape
        return H // 2, W // 2
    _, H, W = item["pixels"].shape
    return H // 16, W // 16


def grid_pos_ids(h, w, side):
    """row*side + col for an h x w grid in raster order (the index into a side x side position table)."""
    return (torch.arange(h)[:, None] * side + torch.arange(w)[None, :]).flatten()


def pack_samples(samples, special, max_latent_size=64, vit_side=70, generator=None) -> Pack:
    """Lay samples out one after another with the official BAGEL packing rules.

    special: {"im_start", "im_end", "vision_start", "vision_end"} -> token id.
    Missing draws of noised VAE images (timestep_raw ~ N(0,1), noise, and posterior_eps for pixel images)
    are taken from `generator` in sequence order; the loader always supplies them, so this is for ad-hoc use.
    """
    vs, ve = special["vision_start"], special["vision_end"]
    sample_lens, split_lens, split_modes, position_ids = [], [], [], []
    text_ids, text_indexes = [], []
    vit_patches, vit_pos_ids, vit_indexes, vit_lens = [], [], [], []
    vae_indexes, latent_pos_ids, vae_grids, vae_latents, vae_pixels, vae_eps = [], [], [], [], [], []
    vae_t, vae_noise = [], []
    ce_indexes, ce_labels, ce_weights, mse_indexes = [], [], [], []
    L = 0  # tokens laid out so far
    for sample in samples:
        start, rope = L, 0
        for item in sample:
            kind = item["type"]
            if item.get("drop"):
                # a dropped condition adds no tokens; a dropped image still advances the position (official)
                rope += kind != "text"
                continue
            if kind == "text":
                ids = [int(i) for i in item["ids"]]
                n = len(ids) + 2
                text_ids += [special["im_start"]] + ids + [special["im_end"]]
                text_indexes += range(L, L + n)
                position_ids += range(rope, rope + n)
                if item.get("loss"):  # next-token CE on <|im_start|> + ids, labels ids + <|im_end|>
                    ce_indexes += range(L, L + n - 1)
                    ce_labels += ids + [special["im_end"]]
                    ce_weights += [1.0 / math.sqrt(len(ids) + 1)] * (n - 1)
                if item.get("special_token_loss"):  # the <|im_end|> position predicts e.g. <|vision_start|>
                    ce_indexes.append(L + n - 1)
                    ce_labels.append(int(item["special_token_label"]))
                    ce_weights.append(1.0)
                mode, rope = "causal", rope + n
            elif kind == "vit_image":
                pixels = item["pixels"]
                h, w = pixels.shape[1] // 14, pixels.shape[2] // 14
                n = h * w + 2
                vit_patches.append(patchify(pixels.float(), 14))
                vit_pos_ids.append(grid_pos_ids(h, w, vit_side))
                vit_indexes.append(torch.arange(L + 1, L + n - 1))
                vit_lens.append(h * w)
                text_ids += [vs, ve]
                text_indexes += [L, L + n - 1]
                position_ids += [rope] * n  # a whole image takes one position id
                mode, rope = "full", rope + 1
            elif kind == "vae_image":
                h, w = vae_grid(item)
                n = h * w + 2
                latent, pixels = item.get("latent"), item.get("pixels")
                assert (latent is None) != (pixels is None), "a vae_image has exactly one of latent / pixels"
                noised = bool(item.get("loss"))
                eps = item.get("posterior_eps")
                if noised:
                    t_raw, noise = item.get("timestep_raw"), item.get("noise")
                    if t_raw is None:
                        t_raw = torch.randn((), generator=generator).item()
                    if noise is None:
                        noise = torch.randn(16, 2 * h, 2 * w, generator=generator)
                    vae_t.append(float(t_raw))
                    vae_noise.append(patchify(noise.float(), 2))
                    mse_indexes.append(torch.arange(L + 1, L + n - 1))
                else:
                    vae_t.append(-math.inf)
                    vae_noise.append(torch.zeros(h * w, 64))
                if pixels is not None and eps is None:
                    eps = torch.randn(16, 2 * h, 2 * w, generator=generator)
                vae_indexes.append(torch.arange(L + 1, L + n - 1))
                latent_pos_ids.append(grid_pos_ids(h, w, max_latent_size))
                vae_grids.append((h, w))
                vae_latents.append(latent)
                vae_pixels.append(pixels)
                vae_eps.append(eps if pixels is not None else None)
                text_ids += [vs, ve]
                text_indexes += [L, L + n - 1]
                position_ids += [rope] * n
                # a noised image does not advance the position: a following clean copy reuses the id
                mode, rope = ("noise", rope) if noised else ("full", rope + 1)
            else:
                raise ValueError(f"unknown item type {kind!r}")
            split_lens.append(n)
            split_modes.append(mode)
            L += n
        sample_lens.append(L - start)

    def cat(xs, *shape, dtype=torch.long):
        return torch.cat(xs) if xs else torch.zeros(0, *shape, dtype=dtype)

    long = lambda x: torch.tensor(x, dtype=torch.long)
    return Pack(
        sample_lens=sample_lens, split_lens=split_lens, split_modes=split_modes,
        position_ids=long(position_ids), text_ids=long(text_ids), text_indexes=long(text_indexes),
        vit_patches=cat(vit_patches, 14 * 14 * 3, dtype=torch.float32), vit_pos_ids=cat(vit_pos_ids),
        vit_indexes=cat(vit_indexes), vit_lens=vit_lens,
        vae_indexes=cat(vae_indexes), latent_pos_ids=cat(latent_pos_ids), vae_grids=vae_grids,
        vae_latents=vae_latents, vae_pixels=vae_pixels, vae_posterior_eps=vae_eps,
        vae_timestep_raw=torch.tensor(vae_t, dtype=torch.float32),
        vae_noise=cat(vae_noise, 64, dtype=torch.float32),
        ce_indexes=long(ce_indexes), ce_labels=long(ce_labels),
        ce_weights=torch.tensor(ce_weights, dtype=torch.float32), mse_indexes=cat(mse_indexes))
