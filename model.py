"""nanobagel model: BAGEL (Qwen2 Mixture-of-Transformers + SigLIP NaViT + FLUX VAE), from scratch."""
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn


# ----------------------------------------------------------------------------------------------
# Config: one object for every size

@dataclass
class BagelConfig:
    # Qwen2 MoT language model
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    # SigLIP NaViT (layers actually built: the release drops the last of 27)
    vit_hidden_size: int = 1152
    vit_num_layers: int = 26
    vit_num_heads: int = 16
    vit_intermediate_size: int = 4304
    vit_patch_size: int = 14
    vit_max_patches_per_side: int = 70
    vit_layer_norm_eps: float = 1e-6
    # latents: 2x2 patches of 16-channel FLUX latents, 64x64 latent tokens at most (1024 px)
    latent_channels: int = 16
    latent_patch_size: int = 2
    max_latent_size: int = 64
    # FLUX autoencoder
    vae_ch: int = 128
    vae_ch_mult: tuple = (1, 2, 4, 4)
    vae_num_res_blocks: int = 2
    vae_scale_factor: float = 0.3611
    vae_shift_factor: float = 0.1159
    vae_kind: str = "flux"        # "flux", or "pooled": a fixed stand-in for runs without a pretrained AE
    # training switches that change the forward
    freeze_und: bool = False      # official freeze_und: und tokens give context but no gradient
    attn_backend: str = "sdpa"    # "sdpa" (exact dense mask), "flex" (GPU block mask), "nsa"
    nsa: dict | None = None       # NSA keyword arguments (nsa.NSA) when attn_backend == "nsa"

    @property
    def head_dim(self):
        return self.hidden_size // self.num_heads

    @property
    def latent_dim(self):  # values per latent token
        return self.latent_patch_size ** 2 * self.latent_channels


def bagel_7b(**kw):
    """BAGEL-7B-MoT: Qwen2.5-7B width, both experts; 14,607,260,128 parameters with the two fixed tables."""
    return BagelConfig(**kw)


def bagel_tiny(**kw):
    """The test-sized model of tests/fixtures/bagel_tiny (and configs/tiny.py)."""
    shape = dict(vocab_size=1024, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                 vit_hidden_size=32, vit_num_layers=2, vit_num_heads=2, vit_intermediate_size=64,
                 vae_ch=32, vae_ch_mult=(1, 1, 2, 1))
    return BagelConfig(**{**shape, **kw})


PRESETS = {"tiny": bagel_tiny, "7b": bagel_7b}  # train.py's `model` key


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
    """Per-token description of a pack's attention rule (int64 [L] each, mode int8 [L]), and the rule itself.

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

    @property
    def noise(self):
        """[L] bool: the token lies in a noise span."""
        return self.span_mode == NOISE

    def last_key(self):
        """[L]: the last key each query may see: itself in a causal span, else its span's last token. With it the
        rule reads: visible(i, j) iff sample_start(i) <= j <= last_key(i) and (j is not noise or j >= span_start(i))."""
        idx = torch.arange(self.span_mode.numel(), device=self.span_mode.device)
        return torch.where(self.span_mode == CAUSAL, idx, self.span_end - 1)

    def visible(self, q_idx, k_idx):
        """Boolean visibility of key k_idx from query q_idx (broadcasting index tensors)."""
        same_sample = (k_idx >= self.sample_start[q_idx]) & (k_idx < self.sample_end[q_idx])
        own_span = (k_idx >= self.span_start[q_idx]) & (k_idx < self.span_end[q_idx])
        own_ok = own_span & ((self.span_mode[q_idx] != CAUSAL) | (k_idx <= q_idx))
        earlier_ok = (k_idx < self.span_start[q_idx]) & (self.span_mode[k_idx] != NOISE)
        return same_sample & (own_ok | earlier_ok)

    def dense_mask(self, rows=None):
        """[L, L] boolean mask, True = may attend; [len(rows), L] for the queries `rows` (int64 indices) alone.
        Exact; for SDPA on CPU and for tests."""
        idx = torch.arange(self.sample_start.numel(), device=self.sample_start.device)
        return self.visible((idx if rows is None else rows)[:, None], idx[None, :])


def span_layout(sample_lens, split_lens, split_modes, device=None) -> SpanLayout:
    """Expand per-sample lengths and per-span (length, mode) lists into per-token tensors (built on the CPU,
    where the lengths live, then moved: no device round trips)."""
    assert sum(sample_lens) == sum(split_lens), "spans must tile the samples exactly"
    sample_lens = torch.tensor(sample_lens, dtype=torch.long)
    split_lens = torch.tensor(split_lens, dtype=torch.long)
    modes = torch.tensor([MODE_IDS[m] for m in split_modes], dtype=torch.int8)
    cu = F.pad(sample_lens.cumsum(0), (1, 0))
    cs = F.pad(split_lens.cumsum(0), (1, 0))
    sample_of = torch.repeat_interleave(torch.arange(len(sample_lens)), sample_lens)
    span_of = torch.repeat_interleave(torch.arange(len(split_lens)), split_lens)
    fields = (cu[sample_of], cu[sample_of + 1], cs[span_of], cs[span_of + 1], modes[span_of], cu.to(torch.int32))
    return SpanLayout(*(t.to(device, non_blocking=True) for t in fields))


# ----------------------------------------------------------------------------------------------
# Attention. One interface for every backend: a decoder layer calls its `attn` module as attn(h, q, k, v, ctx),
# with h = (hu, hg) the two experts' normed inputs (NSA's gate reads them), q [N, Hq, D] and k, v [N, Hkv, D]
# before RoPE, rows in the layer's order (understanding tokens first), and ctx the pack's PackAttention, made once
# per forward.
# The backend is chosen once, when the layer is built: DenseAttention for "sdpa" (the exact boolean mask) and
# "flex" (a block mask, GPU), with no weights of its own; nsa.NSA for "nsa", with its compression and gate.

def sdpa(q, k, v, mask):
    """Exact attention of q [n, Hq, D] over k, v [m, Hkv, D] with a boolean mask [n, m] (True = may attend) or
    None; GQA by head groups. Batched 4-D, as SDPA's fused kernels want it (3-D falls back to the math kernel)."""
    o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                       attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


@dataclass
class PackAttention:
    """What every layer's attention needs to know about the pack, made once per forward (pack_attention)."""
    rope: "Rotary"               # RoPE tables at the rows' positions
    attend: object               # attend(q, k, v) -> o: dense attention over the rows with the pack's mask
    layout: SpanLayout = None    # the pack's spans, in pack order
    order: torch.Tensor = None   # order[row] = token (pack position) of each row
    where: torch.Tensor = None   # where[token] = its row
    positions: torch.Tensor = None  # RoPE position of each token, pack order
    rope_theta: float = 1e6
    past: object = None          # sample.py's KV cache: past(x, q, k, v) puts the cached tokens before these rows

    def pack_rows(self, *rows):
        """The layer's rows (understanding tokens first) in pack order, after the cached tokens if there are any."""
        rows = [t[self.where] for t in rows]
        return rows if self.past is None else self.past(*rows)

    def rotate(self, x, positions):
        """RoPE of x [n, H, D] at the given positions (NSA rotates its compressed keys at their windows' starts)."""
        return Rotary(x.shape[-1], self.rope_theta, positions, x.dtype)(x)


class DenseAttention(nn.Module):
    """sdpa / flex: exact attention under the pack's mask; no weights of its own."""
    def forward(self, h, q, k, v, ctx: PackAttention):
        return ctx.attend(ctx.rope(q), ctx.rope(k), v)

    def reset_parameters(self):
        pass


def attention_module(cfg):
    """The attention of one decoder layer, as cfg.attn_backend chooses."""
    if cfg.attn_backend in ("sdpa", "flex"):
        return DenseAttention()
    if cfg.attn_backend == "nsa":
        from nsa import NSA  # Triton: imported only by models that use it
        return NSA(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, **(cfg.nsa or {}))
    raise ValueError(f"unknown attention backend {cfg.attn_backend!r} (sdpa, flex, nsa)")


def pack_attention(cfg, pack, order, where, rope) -> PackAttention:
    """The pack's attention context; the mask of a dense backend is made here, once, for every layer."""
    layout = span_layout(pack.sample_lens, pack.split_lens, pack.split_modes, device=order.device)
    attend = None
    if cfg.attn_backend == "sdpa":
        mask = layout.dense_mask()[order][:, order]
        attend = lambda q, k, v: sdpa(q, k, v, mask)
    elif cfg.attn_backend == "flex":
        attend = flex_attention(pack, layout, order)
    return PackAttention(rope, attend, layout, order, where, pack.position_ids, cfg.rope_theta)


FLEX_PAD = 2048
_compiled_flex = None


def flex_attention(pack, layout, order):
    """attend(q, k, v) through flex attention with the pack's block mask. The pack is padded to a multiple of
    FLEX_PAD so a few shapes cover all packs (one compile each); the padding is a causal sample of its own, so no
    real token sees it and no padded row is empty."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention as flex
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex, dynamic=False)
    N = order.numel()
    pad = -N % FLEX_PAD
    padded = span_layout(pack.sample_lens + [pad], pack.split_lens + [pad], pack.split_modes + ["causal"],
                         device=order.device) if pad else layout
    padded_order = torch.cat([order, torch.arange(N, N + pad, device=order.device)])

    def mask_mod(b, h, qi, ki):
        return padded.visible(padded_order[qi], padded_order[ki])
    block_mask = create_block_mask(mask_mod, None, None, N + pad, N + pad, device=order.device,
                                   _compile=order.is_cuda)

    def attend(q, k, v):
        q, k, v = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(0, 1)[None] for t in (q, k, v))
        o = _compiled_flex(q, k, v, block_mask=block_mask, enable_gqa=True)
        return o[0].transpose(0, 1)[:N]
    return attend


def vit_attention(image_lens, device, dtype):
    """Bidirectional attention inside each image of a packed set of ViT images: varlen kernels on GPU in half
    precision, else SDPA with a block-diagonal mask."""
    lens = torch.tensor(image_lens, dtype=torch.long)
    if device.type != "cuda" or not image_lens or dtype not in (torch.float16, torch.bfloat16):
        image_of = torch.repeat_interleave(torch.arange(len(image_lens)), lens).to(device)
        mask = image_of[:, None] == image_of[None, :]
        return lambda q, k, v: sdpa(q, k, v, mask)
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:  # older torch: one SDPA call per image
        return lambda q, k, v: torch.cat([sdpa(*t, None) for t in zip(*(x.split(image_lens) for x in (q, k, v)))])
    cu = F.pad(lens.cumsum(0), (1, 0)).to(device=device, dtype=torch.int32)
    longest = max(image_lens)
    return lambda q, k, v: varlen_attn(q, k, v, cu, cu, longest, longest)


# ----------------------------------------------------------------------------------------------
# Building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):  # in float32, as Qwen2 does, then back to the input dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class Rotary:
    """Qwen2 RoPE (rotate-half) at given integer positions; cos/sin computed in float32."""
    def __init__(self, head_dim, theta, positions, dtype):
        inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
        freqs = positions.float()[:, None] * inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        self.cos, self.sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]

    def __call__(self, x):  # x [N, H, D] at the positions given at construction
        return x * self.cos + rotate_half(x) * self.sin


def sincos_2d(dim, side):
    """Fixed 2D sin-cos table [side*side, dim] indexed row*side+col; first half encodes the column."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    coord = torch.arange(side, dtype=torch.float64)
    col, row = coord.repeat(side), coord.repeat_interleave(side)

    def one_d(pos):
        out = pos[:, None] * omega[None, :]
        return torch.cat([out.sin(), out.cos()], dim=1)
    return torch.cat([one_d(col), one_d(row)], dim=1).float()


def timestep_features(t, dim=256, max_period=10000):
    """DiT sinusoid of t in [0, 1] (not scaled by 1000), [cos, sin] order."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


# ----------------------------------------------------------------------------------------------
# Qwen2 Mixture-of-Transformers: every layer holds an understanding and a generation expert

class Expert(nn.Module):
    """One expert's weights of one decoder layer: attention projections with QK-norm and a SwiGLU MLP."""
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        C, D, eps = cfg.hidden_size, cfg.head_dim, cfg.rms_norm_eps
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, D
        self.attn_norm = RMSNorm(C, eps)
        self.q_proj = nn.Linear(C, cfg.num_heads * D)
        self.k_proj = nn.Linear(C, cfg.num_kv_heads * D)
        self.v_proj = nn.Linear(C, cfg.num_kv_heads * D)
        self.q_norm = RMSNorm(D, eps)
        self.k_norm = RMSNorm(D, eps)
        self.o_proj = nn.Linear(cfg.num_heads * D, C, bias=False)
        self.mlp_norm = RMSNorm(C, eps)
        self.gate_proj = nn.Linear(C, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(C, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, C, bias=False)

    def qkv(self, x):
        h = self.attn_norm(x)
        q = self.q_norm(self.q_proj(h).unflatten(-1, (self.num_heads, self.head_dim)))
        k = self.k_norm(self.k_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim)))
        v = self.v_proj(h).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return h, q, k, v

    def mlp(self, x):
        h = self.mlp_norm(x)
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class CheckpointedLayer(nn.Module):
    """A layer whose activations may be recomputed in backward instead of kept: train.py sets `checkpoint` to the
    torch.utils.checkpoint arguments of its mode ({}: everything recomputed; a selective policy's context_fn: only
    what it does not save). The parameter names stay those of the layer (no wrapper module)."""
    checkpoint = None

    def forward(self, *args):
        if self.checkpoint is None or not torch.is_grad_enabled():
            return self.layer(*args)
        return torch.utils.checkpoint.checkpoint(self.layer, *args, use_reentrant=False, preserve_rng_state=False,
                                                 **self.checkpoint)


class DecoderLayer(CheckpointedLayer):
    """Tokens arrive sorted: the first n use the understanding expert, the rest the generation expert.
    Each sub-layer runs per expert on its slice; attention runs once over all tokens."""
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        self.und, self.gen = Expert(cfg), Expert(cfg)
        self.attn = attention_module(cfg)

    def layer(self, x, n, ctx: PackAttention):
        frozen = (lambda t: t.detach()) if self.cfg.freeze_und else (lambda t: t)
        hu, qu, ku, vu = self.und.qkv(x[:n])
        hg, qg, kg, vg = self.gen.qkv(x[n:])
        q = torch.cat([frozen(qu), qg])
        k = torch.cat([frozen(ku), kg])
        v = torch.cat([frozen(vu), vg])
        o = self.attn((hu, hg), q, k, v, ctx).flatten(1)
        x = x + torch.cat([frozen(self.und.o_proj(o[:n])), self.gen.o_proj(o[n:])])
        return x + torch.cat([frozen(self.und.mlp(x[:n])), self.gen.mlp(x[n:])])


# ----------------------------------------------------------------------------------------------
# SigLIP NaViT vision encoder: Linear patch embedding, learned 70x70 positions, pre-LN layers

class ViTLayer(CheckpointedLayer):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        C, eps = cfg.vit_hidden_size, cfg.vit_layer_norm_eps
        self.num_heads = cfg.vit_num_heads
        self.norm1 = nn.LayerNorm(C, eps=eps)
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(C, C) for _ in range(4))
        self.norm2 = nn.LayerNorm(C, eps=eps)
        self.fc1 = nn.Linear(C, cfg.vit_intermediate_size)
        self.fc2 = nn.Linear(cfg.vit_intermediate_size, C)

    def layer(self, x, attend):
        h = self.norm1(x)
        q, k, v = (p(h).unflatten(-1, (self.num_heads, -1)) for p in (self.q_proj, self.k_proj, self.v_proj))
        x = x + self.out_proj(attend(q, k, v).flatten(1))
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class ViT(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        C, p = cfg.vit_hidden_size, cfg.vit_patch_size
        self.patch_embed = nn.Linear(3 * p * p, C)  # over (p, q, c)-ordered patches
        self.pos_embed = nn.Embedding(cfg.vit_max_patches_per_side ** 2, C)
        self.layers = nn.ModuleList(ViTLayer(cfg) for _ in range(cfg.vit_num_layers))
        self.post_norm = nn.LayerNorm(C, eps=cfg.vit_layer_norm_eps)

    def forward(self, patches, pos_ids, attend):
        x = self.patch_embed(patches) + self.pos_embed(pos_ids)
        for layer in self.layers:
            x = layer(x, attend)
        return self.post_norm(x)


# ----------------------------------------------------------------------------------------------
# FLUX autoencoder (frozen in training; FLUX key names kept so ae.safetensors loads as is)

def group_norm(C):
    return GroupNorm(32, C, eps=1e-6)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm, and the SiLU that follows it in most places fused (silu=True). On CUDA both run compiled: CUDA's
    own kernel reduces each (image, group) in one thread block, 32 blocks for one image on an H100's 132 SMs, about
    4x slower (README: the frozen VAE). One compile covers every image size (dynamic shapes)."""
    def forward(self, x, silu=False):
        norm = _compiled_group_norm() if x.is_cuda else _group_norm
        return norm(x, self.num_groups, self.weight, self.bias, self.eps, silu)


def _group_norm(x, groups, weight, bias, eps, silu):
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y


@functools.cache
def _compiled_group_norm():
    return torch.compile(_group_norm, dynamic=True)


class ResnetBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.norm1, self.conv1 = group_norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = group_norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(self.norm1(x, silu=True))
        h = self.conv2(self.norm2(h, silu=True))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels of the feature map."""
    def __init__(self, C):
        super().__init__()
        self.norm = group_norm(C)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(C, C, 1) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # [B, HW, C]
        # the 1x1 convolutions as linears on the pixels: q, k, v come out contiguous, which the fused attention
        # kernels need (strided ones fell back to the math kernel in fp32: 21 ms of the 77 that two 1024 px images
        # took on an H100)
        q, k, v = (F.linear(h, f.weight[:, :, 0, 0], f.bias)[:, None] for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, stride=2)

    def forward(self, x):  # pad right and bottom by one, then a stride-2 conv
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def mid_block(C):
    return nn.ModuleDict(dict(block_1=ResnetBlock(C, C), attn_1=AttnBlock(C), block_2=ResnetBlock(C, C)))


def run_mid(mid, x):
    return mid.block_2(mid.attn_1(mid.block_1(x)))


class Encoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, mult in enumerate(ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else ch * mult, ch * mult)
                                        for j in range(num_res_blocks))
            cin = ch * mult
            if i != len(ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = mid_block(cin)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 2 * z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for block in level.block:
                h = block(h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = run_mid(self.mid, h)
        return self.conv_out(self.norm_out(h, silu=True))


class Decoder(nn.Module):
    def __init__(self, ch, ch_mult, num_res_blocks, z_channels):
        super().__init__()
        cin = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, cin, 3, padding=1)
        self.mid = mid_block(cin)
        levels = []
        for i in reversed(range(len(ch_mult))):  # up[i] belongs to ch_mult[i]; built from the deepest
            level = nn.Module()
            level.block = nn.ModuleList(ResnetBlock(cin if j == 0 else ch * ch_mult[i], ch * ch_mult[i])
                                        for j in range(num_res_blocks + 1))
            cin = ch * ch_mult[i]
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = group_norm(cin), nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z):
        h = run_mid(self.mid, self.conv_in(z))
        for level in reversed(self.up):
            for block in level.block:
                h = block(h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(self.norm_out(h, silu=True))


class AutoEncoder(nn.Module):
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        args = (cfg.vae_ch, cfg.vae_ch_mult, cfg.vae_num_res_blocks, cfg.latent_channels)
        self.encoder, self.decoder = Encoder(*args), Decoder(*args)
        self.scale, self.shift = cfg.vae_scale_factor, cfg.vae_shift_factor

    def moments(self, x):
        """Posterior mean and log-variance of images x [B, 3, H, W] in [-1, 1]."""
        return self.encoder(x).chunk(2, dim=1)

    def latent(self, mean, logvar, eps):
        """The sampled, scaled latent of posterior moments; eps is the posterior noise (the shape of the latent)."""
        return self.scale * (mean + torch.exp(0.5 * logvar) * eps - self.shift)

    def encode(self, x, eps):
        return self.latent(*self.moments(x), eps)

    def decode(self, z):
        return self.decoder(z / self.scale + self.shift)


class PooledAE(nn.Module):
    """A parameter-free stand-in for the FLUX AE where no pretrained one is at hand (the tiny built-in run):
    4x4 average pooling then 2x2 space-to-depth, so [3, H, W] -> [12 (+4 zero), H/8, W/8]; decode inverts it
    up to the pooling. Random FLUX weights would train fine but decode to noise; this one shows the shapes."""
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.channels = cfg.latent_channels

    def moments(self, x):
        mean = F.pixel_unshuffle(F.avg_pool2d(x, 4), 2)
        mean = F.pad(mean, (0, 0, 0, 0, 0, self.channels - mean.shape[1]))
        return mean, torch.full_like(mean, -math.inf)

    def latent(self, mean, logvar, eps=None):
        return mean

    def encode(self, x, eps=None):
        return self.moments(x)[0]

    def decode(self, z):
        return F.interpolate(F.pixel_shuffle(z[:, :12], 2), scale_factor=4.0, mode="nearest")


def build_vae(cfg: BagelConfig):
    """The frozen AE. A FLUX AE's fresh weights are seeded, so one that no checkpoint filled is still a function of
    the config (convert.py rebuilds it for train.py's checkpoints, which hold no AE)."""
    if cfg.vae_kind == "pooled":
        return PooledAE(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return AutoEncoder(cfg)


# ----------------------------------------------------------------------------------------------
# BAGEL

class TimestepEmbedder(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(256, C), nn.SiLU(), nn.Linear(C, C))

    def forward(self, t):
        return self.mlp(timestep_features(t).to(self.mlp[0].weight.dtype))


class Connector(nn.Module):
    """ViT features -> LLM width: fc1, GELU-tanh, fc2."""
    def __init__(self, cin, cout):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(cin, cout), nn.Linear(cout, cout)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def flow_timesteps(timestep_raw, shift):
    """t = sigmoid(raw) (logit-normal), then the shift s*t / (1 + (s-1)*t); raw = -inf gives t = 0."""
    t = torch.sigmoid(timestep_raw)
    return shift * t / (1 + (shift - 1) * t)


def ce_chunk(logits, labels, weights):
    """Per-token CE of a chunk of logits [n, V] (in float32, or float64 for float64 logits), and the gradient of
    sum(weights * ce) with respect to the logits, in the logits' dtype: weights * (softmax - onehot)."""
    x = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(x, -1)
    ce = lse - x.gather(1, labels[:, None])[:, 0]
    grad = torch.exp(x - lse[:, None]).scatter_add(1, labels[:, None], -torch.ones_like(lse)[:, None])
    return ce, (grad * weights[:, None]).to(logits.dtype)


_compiled_ce_chunk = None


class LinearCrossEntropy(torch.autograd.Function):
    """Per-token CE of h @ W^T, fused with its gradient: the [N, vocab] logits exist one chunk of rows at a time, and
    the gradients of h and W are made in the forward from the chunk's logits (3 matmuls, not the 4 of recomputing
    the logits in backward). That needs the upstream gradient before it arrives: it is taken to be c * weights for
    a scalar c (the training loss is a weighted sum of per-token CE; c is read off in backward, and an upstream
    gradient of another form is an error)."""

    @staticmethod
    def forward(ctx, h, weight, labels, weights, chunk):
        global _compiled_ce_chunk
        one = ce_chunk
        if h.is_cuda:  # the fp32 softmax fused into one pass over each chunk's bf16 logits
            _compiled_ce_chunk = _compiled_ce_chunk or torch.compile(ce_chunk, dynamic=True)
            one = _compiled_ce_chunk
        need_dh, need_dw = ctx.needs_input_grad[:2]
        ce = torch.empty(h.shape[0], device=h.device, dtype=torch.promote_types(h.dtype, torch.float32))
        dh = torch.empty_like(h) if need_dh else None
        dw = torch.zeros_like(weight) if need_dw else None
        for i in range(0, h.shape[0], chunk):
            hc = h[i:i + chunk]
            ce[i:i + chunk], g = one(hc @ weight.t(), labels[i:i + chunk], weights[i:i + chunk])
            if need_dh:
                dh[i:i + chunk] = g @ weight
            if need_dw:  # a frozen lm_head (LoRA) skips this third matmul
                torch.addmm(dw, g.t(), hc, out=dw)  # (the out= form: torch's FLOP counter does not see addmm_)
        ctx.save_for_backward(dh, dw, weights)
        return ce

    @staticmethod
    def backward(ctx, grad_ce):
        dh, dw, weights = ctx.saved_tensors
        if not weights.numel():  # no CE token in this pack
            return dh, dw, None, None, None
        c = (grad_ce * weights).sum() / (weights * weights).sum()
        torch._assert_async(((grad_ce - c * weights).abs() <= 1e-4 * grad_ce.abs().max() + 1e-30).all(),
                            "LinearCrossEntropy: the upstream gradient is not proportional to the CE weights")
        scaled = lambda t: None if t is None else t * c.to(t.dtype)
        return scaled(dh), scaled(dw), None, None, None


def cross_entropy(h, weight, labels, weights=None, chunk=4096):
    """Per-token CE [N] (float32) of the logits h @ weight^T at the CE positions, a chunk of rows at a time (the
    152k-vocab logits of 4k rows: 1.2 GB in bf16). Under autograd, the training loss must be sum(c * weights * ce)
    (weights: ones if None): LinearCrossEntropy."""
    dtype = torch.promote_types(h.dtype, torch.float32)
    weights = torch.ones_like(labels, dtype=dtype) if weights is None else weights.to(dtype)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return LinearCrossEntropy.apply(h, weight, labels, weights, chunk)
    return torch.cat([ce_chunk(h[i:i + chunk] @ weight.t(), labels[i:i + chunk], weights[i:i + chunk])[0]
                      for i in range(0, h.shape[0], chunk)]) if h.shape[0] else h.new_zeros(0, dtype=dtype)


def expert_order(is_gen):
    """MoT routing, once per sequence: rows sorted understanding tokens first, then generation (latent) tokens,
    each in sequence order. Returns (order, where): order[row] = token, where[token] = row. A stable sort, not
    nonzero(): no device sync."""
    order = torch.argsort(is_gen.to(torch.int8), stable=True)
    where = torch.empty_like(order)
    where[order] = torch.arange(order.numel(), device=order.device)
    return order, where


def layer_context(cfg, pack, dtype):
    """What every decoder layer of a pack's forward takes besides its rows: n (the rows are the n understanding tokens,
    then the latents: expert_order) and the pack's attention context (RoPE at the rows' positions, in `dtype`)."""
    is_gen = torch.zeros(pack.num_tokens, dtype=torch.bool, device=pack.position_ids.device)
    is_gen[pack.vae_indexes] = True
    order, where = expert_order(is_gen)
    rope = Rotary(cfg.head_dim, cfg.rope_theta, pack.position_ids[order], dtype)
    return pack.num_tokens - pack.vae_indexes.numel(), pack_attention(cfg, pack, order, where, rope)


class Bagel(nn.Module):
    """The trainable BAGEL: MoT LLM, ViT, connector and latent heads (the VAE is separate and frozen)."""
    def __init__(self, cfg: BagelConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.embed_tokens = nn.Embedding(cfg.vocab_size, C)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm_und, self.norm_gen = RMSNorm(C, cfg.rms_norm_eps), RMSNorm(C, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(C, cfg.vocab_size, bias=False)
        self.vit = ViT(cfg)
        self.connector = Connector(cfg.vit_hidden_size, C)
        self.time_embedder = TimestepEmbedder(C)
        self.vae2llm = nn.Linear(cfg.latent_dim, C)
        self.llm2vae = nn.Linear(C, cfg.latent_dim)
        # fixed 2D sin-cos tables, rebuilt at init (not trained, not saved)
        self.register_buffer("vit_pos_table", sincos_2d(C, cfg.vit_max_patches_per_side), persistent=False)
        self.register_buffer("latent_pos_table", sincos_2d(C, cfg.max_latent_size), persistent=False)

    @torch.no_grad()
    def init_weights(self, std=0.02):
        """Fresh weights (after meta-device construction + to_empty): normal linears, unit norms, zero biases,
        zero llm2vae as the official code, and the fixed tables recomputed."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.zeros_(self.llm2vae.weight)
        nn.init.zeros_(self.llm2vae.bias)
        for layer in self.layers:  # the attention's own weights (NSA's) have their own starting values
            layer.attn.reset_parameters()
        self.init_buffers()

    @torch.no_grad()
    def init_buffers(self):
        """The fixed sin-cos tables (non-persistent buffers: rebuilt, never loaded)."""
        self.vit_pos_table.copy_(sincos_2d(self.cfg.hidden_size, self.cfg.vit_max_patches_per_side))
        self.latent_pos_table.copy_(sincos_2d(self.cfg.hidden_size, self.cfg.max_latent_size))

    def final_norm(self, x, n):
        """Each expert's final RMSNorm on its rows (the first n are understanding tokens)."""
        h_und = self.norm_und(x[:n])
        return torch.cat([h_und.detach() if self.cfg.freeze_und else h_und, self.norm_gen(x[n:])])

    def embed(self, pack, timestep_shift, run_vit=None):
        """The packed input sequence [L, C] and what the losses need: x0 and the flow target per latent token.
        run_vit: run the ViT (default: when the pack has ViT images); when it does not, ViT tokens stay zero vectors
        (the official visual_und=False). Under FSDP every rank must make the same choice (it enters the ViT's sharded
        modules), so train.py passes True when any rank has images."""
        cfg, dtype = self.cfg, self.embed_tokens.weight.dtype
        x = self.embed_tokens.weight.new_zeros(pack.num_tokens, cfg.hidden_size)
        x = x.index_put((pack.text_indexes,), self.embed_tokens(pack.text_ids))
        vit_out = None
        if run_vit or (run_vit is None and pack.vit_lens):
            attend = vit_attention(pack.vit_lens, x.device, dtype)
            vit_out = self.vit(pack.vit_patches.to(dtype), pack.vit_pos_ids, attend)
            vit_emb = self.connector(vit_out) + self.vit_pos_table[pack.vit_pos_ids].to(dtype)
            x = x.index_put((pack.vit_indexes,), vit_emb)
        p = cfg.latent_patch_size
        x0 = torch.cat([patchify(z, p) for z in pack.vae_latents]) if pack.vae_latents else \
            x.new_zeros(0, cfg.latent_dim, dtype=torch.float32)
        sizes = [h * w for h, w in pack.vae_grids]
        tokens_per_image = torch.tensor(sizes, dtype=torch.long).to(x.device, non_blocking=True)
        t = flow_timesteps(pack.vae_timestep_raw.repeat_interleave(tokens_per_image, output_size=sum(sizes)),
                           timestep_shift)
        x0 = x0.float()
        x_t = (1 - t[:, None]) * x0 + t[:, None] * pack.vae_noise.float()
        vae_emb = self.vae2llm(x_t.to(dtype)) + self.time_embedder(t) + \
            self.latent_pos_table[pack.latent_pos_ids].to(dtype)
        x = x.index_put((pack.vae_indexes,), vae_emb)
        return x, dict(vit_out=vit_out, t=t, x_t=x_t, target=pack.vae_noise.float() - x0)

    def forward(self, pack, timestep_shift=1.0, run_vit=None, ce_weights=None):
        """Per-token losses of a pack: {"ce": [Nce], "mse": [Nmse]} (sums and means belong to train.py). Under
        autograd the loss backpropagated must weigh the CE tokens proportionally to ce_weights (default: equally)."""
        cfg = self.cfg
        x, aux = self.embed(pack, timestep_shift, run_vit)
        n, ctx = layer_context(cfg, pack, x.dtype)
        x = x[ctx.order]
        for layer in self.layers:
            x = layer(x, n, ctx)
        h = self.final_norm(x, n)
        ce = cross_entropy(h[ctx.where[pack.ce_indexes]], self.lm_head.weight, pack.ce_labels, ce_weights)
        pred = self.llm2vae(h[ctx.where[pack.mse_indexes]]).float()
        noised = torch.searchsorted(pack.vae_indexes, pack.mse_indexes)  # MSE tokens among the latent tokens
        mse = (pred - aux["target"][noised]).pow(2).mean(-1)
        return dict(ce=ce, mse=mse)


# ----------------------------------------------------------------------------------------------
# LoRA (UniCoT): low-rank adapters on chosen Linear layers, y = W x + b + (alpha / r) B A x, no dropout, no bias.
# A LoRALinear is still an nn.Linear with the same weight and bias, so base checkpoints load into it unchanged; its
# adapters are lora_A [r, in] and lora_B [out, r], and B starts at zero, so an adapted model starts as its base.
# train.py applies LoRA to the meta model before fully_shard: FSDP2 then shards base weights and adapters alike.

class LoRALinear(nn.Linear):
    def __init__(self, in_features, out_features, bias, rank, alpha, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.scale = alpha / rank
        self.lora_A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(rank, out_features, bias=False, device=device, dtype=dtype)

    @torch.no_grad()
    def reset_lora(self):
        """A as nn.Linear initialises (as PEFT), B zero. (Bagel.init_weights does not know B must be zero.)"""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x):
        return super().forward(x) + self.lora_B(self.lora_A(x)) * self.scale


def apply_lora(model, targets, rank, alpha):
    """Replace, in place, every nn.Linear whose module name matches one of the fnmatch patterns `targets`
    (e.g. "layers.*.gen.q_proj") by a LoRALinear sharing its weight and bias, adapters freshly initialised.
    Every pattern must match a Linear layer: a typo (or UniCoT's missing comma) is an error, not a silently
    smaller adapter. Returns the names adapted."""
    from fnmatch import fnmatch
    linears = [(name, m) for name, m in model.named_modules()
               if isinstance(m, nn.Linear) and not isinstance(m, LoRALinear) and ".lora_" not in name]
    unmatched = [t for t in targets if not any(fnmatch(name, t) for name, _ in linears)]
    if unmatched:
        raise ValueError(f"LoRA targets matching no Linear layer: {unmatched} (Linear layers are named like "
                         f"{', '.join(n for n, _ in linears[:3])}, ...)")
    chosen = [(name, m) for name, m in linears if any(fnmatch(name, t) for t in targets)]
    for name, linear in chosen:
        parent, _, child = name.rpartition(".")
        w = linear.weight
        lora = LoRALinear(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha,
                          device=w.device, dtype=w.dtype)
        lora.weight, lora.bias = linear.weight, linear.bias
        lora.reset_lora()
        setattr(model.get_submodule(parent), child, lora)
    return [name for name, _ in chosen]


def merge_lora(state, alpha):
    """A state dict without LoRA: each adapted W becomes W + (alpha / r) B @ A (r from A's shape) and the A/B entries
    go, so the result loads into a plain Bagel. Sharded (DTensor) values work too, and stay sharded."""
    out = {k: v for k, v in state.items() if ".lora_A." not in k and ".lora_B." not in k}
    for key, A in state.items():
        if key.endswith(".lora_A.weight"):
            base = key[:-len("lora_A.weight")]
            W, B = state[base + "weight"], state[base + "lora_B.weight"]
            out[base + "weight"] = W + (alpha / A.shape[0]) * (B.to(W.dtype) @ A.to(W.dtype))
    return out
