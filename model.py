"""nanobagel model: BAGEL (Qwen2 Mixture-of-Transformers + SigLIP NaViT + FLUX VAE), from scratch."""
from dataclasses import dataclass

import torch


# ----------------------------------------------------------------------------------------------
# Patches: images and latents become token rows in raster order, features in (p, q, c) order

def patchify(x, p):
    """[C, H, W] -> [(H/p)*(W/p), p*p*C], rows in raster order, features ordered (p, q, c)."""
    C, H, W = x.shape
    x = x.reshape(C, H // p, p, W // p, p).permute(1, 3, 2, 4, 0)
    return x.reshape((H // p) * (W // p), p * p * C)


def unpatchify(tokens, h, w, p, C):
    """Inverse of patchify: [h*w, p*p*C] -> [C, h*p, w*p]."""
    x = tokens.reshape(h, w, p, p, C).permute(4, 0, 2, 1, 3)
    return x.reshape(C, h * p, w * p)


# ----------------------------------------------------------------------------------------------
# Who may attend to whom inside a pack

CAUSAL, FULL, NOISE = 0, 1, 2
MODE_IDS = {"causal": CAUSAL, "full": FULL, "noise": NOISE}


@dataclass
class SpanLayout:
    """Per-token description of a pack's attention rule (int64 [L] each, mode int8 [L]).

    Key j is visible to query i iff both lie in the same sample and either
      - j is in i's own span and (the span is not causal or j <= i), or
      - j lies in an earlier span of the sample that is not a noise span.
    Noised latents (and their markers) are therefore seen only by their own span.
    """
    sample_start: torch.Tensor
    sample_end: torch.Tensor
    span_start: torch.Tensor
    span_end: torch.Tensor
    span_mode: torch.Tensor
    cu_seqlens: torch.Tensor  # int32 [S+1], sample boundaries for varlen kernels


def span_layout(sample_lens, split_lens, split_modes, device=None) -> SpanLayout:
    """Expand per-sample lengths and per-span (length, mode) lists into per-token tensors."""
    assert sum(sample_lens) == sum(split_lens), "spans must tile the samples exactly"
    sample_lens = torch.tensor(sample_lens, dtype=torch.long, device=device)
    split_lens = torch.tensor(split_lens, dtype=torch.long, device=device)
    modes = torch.tensor([MODE_IDS[m] for m in split_modes], dtype=torch.int8, device=device)
    cu = torch.nn.functional.pad(sample_lens.cumsum(0), (1, 0))
    cs = torch.nn.functional.pad(split_lens.cumsum(0), (1, 0))
    sample_of = torch.repeat_interleave(torch.arange(len(sample_lens), device=device), sample_lens)
    span_of = torch.repeat_interleave(torch.arange(len(split_lens), device=device), split_lens)
    return SpanLayout(cu[sample_of], cu[sample_of + 1], cs[span_of], cs[span_of + 1], modes[span_of],
                      cu.to(torch.int32))


def visible(layout: SpanLayout, q_idx, k_idx):
    """Boolean visibility of key k_idx from query q_idx (broadcasting index tensors)."""
    L = layout
    same_sample = (k_idx >= L.sample_start[q_idx]) & (k_idx < L.sample_end[q_idx])
    own_span = (k_idx >= L.span_start[q_idx]) & (k_idx < L.span_end[q_idx])
    own_ok = own_span & ((L.span_mode[q_idx] != CAUSAL) | (k_idx <= q_idx))
    earlier_ok = (k_idx < L.span_start[q_idx]) & (L.span_mode[k_idx] != NOISE)
    return same_sample & (own_ok | earlier_ok)


def dense_mask(layout: SpanLayout):
    """[L, L] boolean mask, True = may attend. Exact; for SDPA on CPU and for tests."""
    idx = torch.arange(layout.sample_start.numel(), device=layout.sample_start.device)
    return visible(layout, idx[:, None], idx[None, :])
