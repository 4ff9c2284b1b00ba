"""Native Sparse Attention (NSA) for BAGEL's packed multimodal sequences: Triton kernels and a torch reference.

NSA (arXiv 2502.11089) replaces one softmax over all keys by three gated branches per query head:
  o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa,   g = sigmoid(Linear(x)) viewed [L, H, 3]
  - compressed: attention over keys/values pooled over windows of `kernel_size` tokens, stride `kernel_stride`;
  - selected:   attention over the `topk` blocks of `block_size` tokens that the compressed attention
                probabilities (summed over the query heads of a GQA group) rate highest;
  - sliding:    attention over a window of `window_size` + 1 keys.
For a causal single-span sequence this is exactly the reference library (XunhaoLai native-sparse-attention-triton,
9bea856; tests/fixtures/nsa_reference checks it); what follows generalises it to BAGEL's packs.

Visibility (model.SpanLayout, the pack's layout every call receives): key j is visible to query i iff same sample
and (j in i's span and (span not causal or j <= i)) or (j in an earlier non-noise span). Equivalently, with
    hi(i)  = layout.last_key(): i for a causal span, else the last token of i's span (the last key i may see)
    nlo(i) = the first token of i's span                                 (noise keys must be at or after it)
  visible(i, j)  <=>  sample_start(i) <= j <= hi(i)  and  (j is not noise or j >= nlo(i)).
The kernels use only this form (per query: a key range and nlo; per key: a noise marker); the reference builds
dense masks from layout.dense_mask(), so each checks the other.

The rules for the three branches:
  - Compressed key c pools tokens [c*stride, c*stride + kernel_size) of its sample and is visible to query i iff
    ALL its tokens are (the library's rule in the causal case; the only rule under which a pooled key never carries
    the future past hi(i) or another span's noised latents). Its RoPE position is its window's first token's.
  - Selection: block b (tokens [b*block_size, (b+1)*block_size) of the sample) can be chosen by query i iff it
    holds a token visible to i; its score is the library's overlap-weighted sum of i's compressed probabilities;
    forced blocks (+inf) are b < init_blocks and the local blocks qb - local_blocks < b <= qb (qb = i's own block,
    for every span mode); zero-score ties go to the earlier block. Chosen blocks are masked token by token.
  - Sliding window: the window_size + 1 keys [hi_w - w, hi_w], hi_w(i) = min(hi(i), max(i + w // 2,
    sample_start(i) + w)), masked by the rule: the library's [i - w, i] for causal queries; full and noise spans
    see w/2 ahead; in a sample of at most w + 1 tokens the window covers everything a query may see.

Kernels (Triton; varlen over the packed sequence; bf16 in, fp32 accumulation; each one's design: notes/nsa.md):
  _NSAAttention, the gated sum as one autograd op (the gates fold into the branches' lse in backward); _pool_* the
  compression; _band_* flash attention over per-query key ranges (compressed branch, sliding window); _block_scores
  and _topk the selection; _slc_* selected attention gathered per KV block; _gate_* the gate.
Launch shapes (_tiles) are tuned on an H100 (`python bench.py nsa sweep`); NSA_TILES overrides them.

Speed (`python bench.py nsa bench`; the README's table, H100): fwd+bwd 1.14x dense SDPA at 16k, 3.37x at 64k.
Below 16k the host launching ~130 kernels bounds the step. Per-kernel times, designs tried, the floor: notes/nsa.md.
"""
import functools
import json
import math
import os

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
import triton
import triton.language as tl

BIG = 2 ** 30  # int32 sentinel, larger than any token index
BIG_I32 = tl.constexpr(BIG)


# ----------------------------------------------------------------------------------------------
# Shared pieces (both backends): compression, gate, positions

def compressed_lengths(cu_seqlens, kernel_size, kernel_stride):
    lens = cu_seqlens.long().diff()
    return torch.where(lens >= kernel_size, (lens - kernel_size) // kernel_stride + 1, 0)


def window_starts(cu_seqlens, kernel_size, kernel_stride):
    """Packed index of the first token of every compressed window, [NC] int64."""
    cu = cu_seqlens.long()
    nc = compressed_lengths(cu, kernel_size, kernel_stride)
    sample = torch.repeat_interleave(torch.arange(len(nc), device=cu.device), nc)
    first_c = F.pad(nc.cumsum(0), (1, 0))[sample]
    return cu[sample] + (torch.arange(len(sample), device=cu.device) - first_c) * kernel_stride


def compress(x, w, cu_seqlens, kernel_size, kernel_stride, compress_type, pe=None, starts=None):
    """Pool x [L, H, D] over each sample's windows -> [NC, H, D]. pe [H, kernel_size, D] is added to every window
    before pooling (keys only). weightedpool w [H, l]; linear w [H, l*D, D] (row j*D + d); avgpool w None.
    starts: window_starts(...), if already at hand."""
    if compress_type not in ("avgpool", "weightedpool", "linear"):
        raise ValueError(f"unknown compress_type {compress_type!r}")
    starts = window_starts(cu_seqlens, kernel_size, kernel_stride) if starts is None else starts
    win = x[starts[:, None] + torch.arange(kernel_size, device=x.device)]  # [NC, l, H, D]
    if pe is not None:
        win = win + pe.transpose(0, 1).to(win.dtype)
    if compress_type == "avgpool":
        return win.mean(1)
    if compress_type == "weightedpool":
        return torch.einsum("nlhd,hl->nhd", win, w.to(win.dtype))
    NC, l, H, D = win.shape  # linear
    return torch.einsum("nhk,hkd->nhd", win.permute(0, 2, 1, 3).reshape(NC, H, l * D), w.to(win.dtype))


def gate_values(x, weight, num_heads):
    """sigmoid(x W^T) viewed [L, H, 3]: branch 0 compressed, 1 selected, 2 sliding. W's rows are zero-padded to a
    multiple of 32: cuBLAS takes 1.5x as long for BAGEL's 84 = 3 x 28 output columns as for 96 (H100)."""
    n = weight.shape[0]
    logits = x @ F.pad(weight, (0, 0, 0, -n % 32)).t().to(x.dtype)
    return torch.sigmoid(logits[:, :n]).reshape(-1, num_heads, 3)


# ----------------------------------------------------------------------------------------------
# Torch reference: dense masks from model.visible, readable, any layout. Test oracle and CPU path. Masks and scores
# are per query row: each function takes `rows` (default all) and nsa_reference runs over chunks of rows ([L, L]
# masks would need over 100 GB at 32k tokens).

REF_CHUNK = 2 ** 26  # score elements (query heads x rows x keys) per chunk of nsa_reference: 256 MB a score tensor


def _masked_attention(q, k, v, mask, scale):
    """q [L, Hq, D], k/v [M, Hkv, D], mask [Hkv or 1, L, M] -> (o [L, Hq, D], probs [Hq, L, M]); empty rows give 0.
    GQA by viewing q's heads as [Hkv, group]: k and v are not repeated per query head."""
    L, H, D = q.shape
    KH = k.shape[1]
    s = torch.einsum("lkgd,mkd->kglm", q.float().reshape(L, KH, H // KH, D), k.float()) * scale
    s = s.masked_fill(~mask[:, None], float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)
    o = torch.einsum("kglm,mkd->lkgd", p, v.float()).reshape(L, H, v.shape[-1])
    return o.to(q.dtype), p.flatten(0, 1)


def compressed_visibility(layout, kernel_size, kernel_stride, rows=None):
    """[R, NC]: compressed key c is visible to query i iff all tokens of its window are."""
    vis = layout.dense_mask(rows)
    starts = window_starts(layout.cu_seqlens, kernel_size, kernel_stride)
    return vis[:, starts[:, None] + torch.arange(kernel_size, device=vis.device)].all(-1)


def block_scores_ref(probs, layout, num_kv_heads, kernel_size, kernel_stride, block_size, init_blocks, local_blocks,
                     rows=None):
    """probs [Hq, R, NC] of the queries `rows` -> (raw [Hkv, R, NB], score [Hkv, R, NB]) over each query's
    sample-relative blocks b < NB.
    raw: probabilities summed over the group, weighted by how many stride-chunks window c shares with block b.
    score: raw (+ a tiny earlier-block tie-break) on selectable blocks, +inf on forced ones, -inf elsewhere."""
    dev, cu = probs.device, layout.cu_seqlens.long()
    NB = int(math.ceil(int(cu.diff().max()) / block_size))
    rel_start = window_starts(cu, kernel_size, kernel_stride) - cu[:-1][
        torch.repeat_interleave(torch.arange(len(cu) - 1, device=dev),
                                compressed_lengths(cu, kernel_size, kernel_stride))]
    b0 = torch.arange(NB, device=dev) * block_size
    overlap = (torch.minimum(rel_start[:, None] + kernel_size, b0 + block_size)
               - torch.maximum(rel_start[:, None], b0)).clamp(min=0) // kernel_stride  # [NC, NB]
    p = probs.unflatten(0, (num_kv_heads, -1)).sum(1)
    raw = p @ overlap.to(p.dtype)
    # selectable: the block holds a token visible to the query
    keys = torch.arange(layout.sample_start.numel(), device=dev)
    rows = keys if rows is None else rows
    onehot = F.one_hot((keys - layout.sample_start) // block_size, NB).float()  # key j -> its block within its sample
    cand = (layout.dense_mask(rows).float() @ onehot) > 0  # [R, NB]
    qb = (rows - layout.sample_start[rows]) // block_size
    b = torch.arange(NB, device=dev)
    forced = (b[None] < init_blocks) | ((b[None] > qb[:, None] - local_blocks) & (b[None] <= qb[:, None]))
    score = torch.where(forced, float("inf"), raw + 1e-30 / (1.0 + b))
    score = torch.where(cand, score, float("-inf"))
    return raw, score


def select_blocks(score, topk):
    """score [Hkv, L, NB] -> int32 [Hkv, L, min(topk, NB)]: chosen block ids ascending, then -1 padding."""
    K = min(topk, score.shape[-1])
    val, idx = score.topk(K, dim=-1)
    idx = torch.where(val == float("-inf"), BIG, idx).sort(-1).values
    return torch.where(idx == BIG, -1, idx).to(torch.int32)


def selected_mask(layout, idx, block_size, rows=None):
    """[Hkv, R, L]: visible keys inside the blocks that idx [Hkv, R, K] lists for the queries `rows` (sample-relative
    block ids, -1 = none)."""
    keys = torch.arange(layout.sample_start.numel(), device=idx.device)
    rel_block = (keys - layout.sample_start) // block_size
    chosen = (idx.long()[:, :, :, None] == rel_block[None, None, None, :]).any(2)
    return chosen & layout.dense_mask(rows)[None]


def window_mask(layout, window_size, rows=None):
    """[R, L]: visible keys in [hi_w - w, hi_w], hi_w = min(hi, max(i + w // 2, sample_start + w)) (docstring)."""
    keys = torch.arange(layout.sample_start.numel(), device=layout.sample_start.device)
    rows = keys if rows is None else rows
    hi_w = torch.minimum(layout.last_key()[rows],
                         torch.maximum(rows + window_size // 2, layout.sample_start[rows] + window_size))
    return layout.dense_mask(rows) & (keys <= hi_w[:, None]) & (keys >= hi_w[:, None] - window_size)


def _reference_rows(q, k, v, ck, cv, layout, pattern, scale, rows):
    """nsa_reference's three branches for the queries `rows` (q holds just their rows)."""
    c = pattern
    cvis = compressed_visibility(layout, c["kernel_size"], c["kernel_stride"], rows)
    o_cmp, probs = _masked_attention(q, ck, cv, cvis[None], scale)
    with torch.no_grad():
        _, score = block_scores_ref(probs, layout, k.shape[1], c["kernel_size"], c["kernel_stride"], c["block_size"],
                                    c["init_blocks"], c["local_blocks"], rows)
        idx = select_blocks(score, c["topk"])
    o_slc, _ = _masked_attention(q, k, v, selected_mask(layout, idx, c["block_size"], rows), scale)
    o_swa, _ = _masked_attention(q, k, v, window_mask(layout, c["window_size"], rows)[None], scale)
    return o_cmp, o_slc, o_swa


def nsa_reference(q, k, v, ck, cv, layout, pattern, scale, chunk=None):
    """All three branches with dense masks. q [L, Hq, D] and k [L, Hkv, D] rotated, ck/cv [NC, Hkv, D]. Over chunks
    of `chunk` query rows (default: REF_CHUNK score elements), each recomputed in backward rather than kept."""
    L = q.shape[0]
    chunk = chunk or max(1, REF_CHUNK // (q.shape[1] * L))
    rows = torch.arange(L, device=q.device)
    if chunk >= L:
        return _reference_rows(q, k, v, ck, cv, layout, pattern, scale, rows)
    run = _reference_rows
    if torch.is_grad_enabled():
        run = functools.partial(torch.utils.checkpoint.checkpoint, _reference_rows, use_reentrant=False,
                                preserve_rng_state=False)
    outs = [run(q_rows, k, v, ck, cv, layout, pattern, scale, r)
            for q_rows, r in zip(q.split(chunk), rows.split(chunk))]
    return tuple(torch.cat(o) for o in zip(*outs))


# ----------------------------------------------------------------------------------------------
# Triton kernels. Layouts: q/o [L, H, D], k/v [M, Hkv, D]; lse and delta [H, L] fp32 in log2 units.
# Visibility enters each kernel as per-query int32 key ranges [klo, khi) and nlo, and per-key noise markers
# (the first noise token a key covers, BIG if none): key c is visible iff klo <= c < khi and noise[c] >= nlo.

@triton.jit
def _pool_windows(START, NC, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    """This program's BC windows (of head program_id(1)): ids, first tokens, row/column mask."""
    rc = tl.program_id(0) * BC + tl.arange(0, BC)
    cm = rc < NC
    rd = tl.arange(0, BD)
    return rc, tl.load(START + rc, mask=cm, other=0).to(tl.int64), cm[:, None] & (rd < D)[None, :], rd


@triton.jit
def _pool_fwd(X, W, OUT, START, NC, sxn, KS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BC: tl.constexpr):
    # out[c, h] = sum_l w[h, l] x[start_c + l, h] over BC windows of one head, in fp32, windows never materialised
    h = tl.program_id(1)
    rc, s, m, rd = _pool_windows(START, NC, D, BD, BC)
    acc = tl.zeros([BC, BD], tl.float32)
    for l in range(KS):
        x = tl.load(X + (s + l)[:, None] * sxn + h * D + rd[None, :], mask=m, other=0.0)
        acc += tl.load(W + h * KS + l).to(tl.float32) * x.to(tl.float32)
    tl.store(OUT + rc.to(tl.int64)[:, None] * sxn + h * D + rd[None, :], acc.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _pool_bwd_dx(DOUT, W, DX, REL, CBASE, CCOUNT, L, sxn, KS: tl.constexpr, STRIDE: tl.constexpr, D: tl.constexpr,
                 BD: tl.constexpr, BT: tl.constexpr):
    # dx[t, h] = sum of w[h, t - start_c] dout[c, h] over the KS // STRIDE windows c that can hold token t: the
    # window of t's sample with relative id rel // STRIDE - j (rel = t's index in its sample), if it exists
    t, h = tl.program_id(0) * BT + tl.arange(0, BT), tl.program_id(1)
    tm = t < L
    rel = tl.load(REL + t, mask=tm, other=0)
    cbase = tl.load(CBASE + t, mask=tm, other=0)
    count = tl.load(CCOUNT + t, mask=tm, other=0)
    rd = tl.arange(0, BD)
    dm = rd < D
    acc = tl.zeros([BT, BD], tl.float32)
    for j in range(KS // STRIDE):
        c = rel // STRIDE - j
        ok = tm & (c >= 0) & (c < count)
        w = tl.load(W + h * KS + rel - c * STRIDE, mask=ok, other=0.0).to(tl.float32)
        dout = tl.load(DOUT + (cbase + c).to(tl.int64)[:, None] * sxn + h * D + rd[None, :],
                       mask=ok[:, None] & dm[None, :], other=0.0)
        acc += w[:, None] * dout.to(tl.float32)
    tl.store(DX + t.to(tl.int64)[:, None] * sxn + h * D + rd[None, :], acc.to(DX.dtype.element_ty),
             mask=tm[:, None] & dm[None, :])


@triton.jit
def _pool_bwd_dw(DOUT, X, DW_PART, START, NC, sxn, H, KS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                 BC: tl.constexpr):
    # this program's share of dw[h, l] = sum_c dout[c, h] . x[start_c + l, h]: DW_PART [programs, H, KS], summed
    # by the caller (deterministic, unlike atomics)
    h = tl.program_id(1)
    rc, s, m, rd = _pool_windows(START, NC, D, BD, BC)
    dout = tl.load(DOUT + rc.to(tl.int64)[:, None] * sxn + h * D + rd[None, :], mask=m, other=0.0).to(tl.float32)
    for l in range(KS):
        x = tl.load(X + (s + l)[:, None] * sxn + h * D + rd[None, :], mask=m, other=0.0)
        tl.store(DW_PART + (tl.program_id(0) * H + h) * KS + l, tl.sum(dout * x.to(tl.float32)))


@triton.jit
def _band_rows(KLO, KHI, NLO, rq, N):
    """Per-row key ranges of a query tile: (in range, klo, khi, nlo)."""
    qm = rq < N
    return (qm, tl.load(KLO + rq, mask=qm, other=0), tl.load(KHI + rq, mask=qm, other=0),
            tl.load(NLO + rq, mask=qm, other=0))


@triton.jit
def _unmasked(QSTAT, KNMIN, t, k0, BK: tl.constexpr):
    """Whether key tile [k0, k0 + BK) (BK-aligned) is visible to every row of query tile t, so that it needs no
    mask: QSTAT[t] = (lowest such k0, highest tile end, max nlo), KNMIN[k0 // BK] = first noise token a key of the
    tile covers (Plan.band_stats)."""
    return (k0 >= tl.load(QSTAT + t * 3)) & (k0 + BK <= tl.load(QSTAT + t * 3 + 1)) & (
        tl.load(KNMIN + k0 // BK) >= tl.load(QSTAT + t * 3 + 2))


@triton.jit
def _source(X, n_rows, sxn, BR: tl.constexpr, BD: tl.constexpr, TMA: tl.constexpr):
    """What _tile reads from: a Hopper bulk-copy (TMA) descriptor for [BR, BD] tiles of a row-major [n_rows, sxn]
    tensor, or the plain pointer."""
    if TMA:
        return tl.make_tensor_descriptor(X, shape=[n_rows, sxn], strides=[sxn, 1], block_shape=[BR, BD])
    else:
        return X


@triton.jit
def _tile(X, row0, n_rows, col0, sxn, BR: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, TMA: tl.constexpr):
    """Rows [row0, row0 + BR) x columns [col0, col0 + D) of X (a _source); zeros past the last row."""
    if TMA:
        return X.load([row0, col0])
    else:
        r = tl.arange(0, BR)
        rd = tl.arange(0, BD)
        ptr = X + tl.cast(row0, tl.int64) * sxn + col0 + (r[:, None] * sxn + rd[None, :])
        return tl.load(ptr, mask=((row0 + r) < n_rows)[:, None] & (rd < D)[None, :], other=0.0)


@triton.jit
def _band_query_tile(Q, K, V, KLO, KHI, NLO, N, NK, sqn, skn, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
                     BQ: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """This program's query tile (one head): rows, their key ranges, the BK-aligned key span they cover (KNMIN has
    one entry per aligned tile), the q tile, and K and V as _tile reads them."""
    t, h = tl.program_id(0), tl.program_id(1)
    rq = t * BQ + tl.arange(0, BQ)
    qm, klo, khi, nlo = _band_rows(KLO, KHI, NLO, rq, N)
    live = khi > klo
    q = _tile(_source(Q, N, sqn, BQ, BD, TMA), t * BQ, N, h * D, sqn, BQ, D, BD, TMA)
    return (t, h, h // G, rq, qm, klo, khi, nlo, tl.min(tl.where(live, klo // BK * BK, NK)),
            tl.max(tl.where(live, khi, 0)), q, _source(K, NK, skn, BK, BD, TMA), _source(V, NK, skn, BK, BD, TMA))


@triton.jit
def _band_key_tile(K, V, KNOISE, QSTAT, KNMIN, t, start, kh, klo, khi, nlo, q, NK, skn,
                   D: tl.constexpr, BD: tl.constexpr, BK: tl.constexpr, TMA: tl.constexpr):
    """Key tile [start, start + BK): k, v and the scores q k^T, -inf at keys a row may not see (no mask at all
    when the tile is visible to every row)."""
    rk = start + tl.arange(0, BK)
    k = _tile(K, start, NK, kh * D, skn, BK, D, BD, TMA)
    v = _tile(V, start, NK, kh * D, skn, BK, D, BD, TMA)
    s = tl.dot(q, tl.trans(k))
    if _unmasked(QSTAT, KNMIN, t, start, BK) == 0:
        kn = tl.load(KNOISE + rk, mask=rk < NK, other=-1)
        vis = (rk[None, :] >= klo[:, None]) & (rk[None, :] < khi[:, None]) & (kn[None, :] >= nlo[:, None])
        s = tl.where(vis, s, float("-inf"))
    return k, v, s


@triton.jit
def _band_fwd(Q, K, V, O, LSE, KLO, KHI, NLO, KNOISE, QSTAT, KNMIN, N, NK, qk_scale, sqn, skn,
              G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
              TMA: tl.constexpr):
    t, h, kh, rq, qm, klo, khi, nlo, k_start, k_end, q, K, V = _band_query_tile(
        Q, K, V, KLO, KHI, NLO, N, NK, sqn, skn, G, D, BD, BQ, BK, TMA)
    m_i = tl.full([BQ], float("-inf"), tl.float32)
    l_i = tl.zeros([BQ], tl.float32)
    acc = tl.zeros([BQ, BD], tl.float32)
    for start in range(k_start, k_end, BK):
        k, v, s = _band_key_tile(K, V, KNOISE, QSTAT, KNMIN, t, start, kh, klo, khi, nlo, q, NK, skn,
                                 D, BD, BK, TMA)
        s = s * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    ok = l_i > 0
    o = acc / tl.where(ok, l_i, 1.0)[:, None]
    rd = tl.arange(0, BD)
    tl.store(O + rq.to(tl.int64)[:, None] * sqn + h * D + rd[None, :], o.to(O.dtype.element_ty),
             mask=qm[:, None] & (rd < D)[None, :])
    tl.store(LSE + h.to(tl.int64) * N + rq, tl.where(ok, m_i + tl.log2(tl.where(ok, l_i, 1.0)), float("inf")), mask=qm)


@triton.jit
def _band_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, KLO, KHI, NLO, KNOISE, QSTAT, KNMIN, N, NK, qk_scale, sm_scale, sqn,
                 skn, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr, BK: tl.constexpr,
                 TMA: tl.constexpr):
    # dq += this branch's part (DQ already holds the other branches')
    t, h, kh, rq, qm, klo, khi, nlo, k_start, k_end, q, K, V = _band_query_tile(
        Q, K, V, KLO, KHI, NLO, N, NK, sqn, skn, G, D, BD, BQ, BK, TMA)
    do = _tile(_source(DO, N, sqn, BQ, BD, TMA), t * BQ, N, h * D, sqn, BQ, D, BD, TMA)
    lse = tl.load(LSE + h.to(tl.int64) * N + rq, mask=qm, other=float("inf"))
    delta = tl.load(DELTA + h.to(tl.int64) * N + rq, mask=qm, other=0.0)
    dq = tl.zeros([BQ, BD], tl.float32)
    for start in range(k_start, k_end, BK):
        k, v, s = _band_key_tile(K, V, KNOISE, QSTAT, KNMIN, t, start, kh, klo, khi, nlo, q, NK, skn,
                                 D, BD, BK, TMA)
        p = tl.exp2(s * qk_scale - lse[:, None])
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    rd = tl.arange(0, BD)
    dq_ptr = DQ + rq.to(tl.int64)[:, None] * sqn + h * D + rd[None, :]
    dq_mask = qm[:, None] & (rd < D)[None, :]
    dq = dq * sm_scale + tl.load(dq_ptr, mask=dq_mask, other=0.0).to(tl.float32)
    tl.store(dq_ptr, dq.to(DQ.dtype.element_ty), mask=dq_mask)


@triton.jit
def _band_bwd_dkdv(Q, K, V, DO, DK, DV, LSE, DELTA, KLO, KHI, NLO, KNOISE, QSTAT, KNMIN, QT_LO, QT_HI, QC, N, NK,
                   qk_scale, sm_scale, sqn, skn, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
                   BK: tl.constexpr, TMA: tl.constexpr):
    # one program per (key tile, kv head, chunk of QC query tiles); dk/dv summed with fp32 atomics. Works on
    # transposed scores [BK, BQ], as dk and dv want them.
    kt, kh, ch = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    t0 = tl.load(QT_LO + kt) + ch * QC
    t1 = tl.minimum(tl.load(QT_HI + kt), t0 + QC)
    k0 = kt * BK
    rk = k0 + tl.arange(0, BK)
    k = _tile(_source(K, NK, skn, BK, BD, TMA), k0, NK, kh * D, skn, BK, D, BD, TMA)
    v = _tile(_source(V, NK, skn, BK, BD, TMA), k0, NK, kh * D, skn, BK, D, BD, TMA)
    Q = _source(Q, N, sqn, BQ, BD, TMA)
    DO = _source(DO, N, sqn, BQ, BD, TMA)
    kn = tl.load(KNOISE + rk, mask=rk < NK, other=-1)
    dk = tl.zeros([BK, BD], tl.float32)
    dv = tl.zeros([BK, BD], tl.float32)
    for it in range(0, (t1 - t0) * G):  # one flat loop over (query tile, head): one software pipeline
        t = t0 + it // G
        h = kh * G + it % G
        rq = t * BQ + tl.arange(0, BQ)
        qm = rq < N
        q = _tile(Q, t * BQ, N, h * D, sqn, BQ, D, BD, TMA)
        do = _tile(DO, t * BQ, N, h * D, sqn, BQ, D, BD, TMA)
        lse = tl.load(LSE + h.to(tl.int64) * N + rq, mask=qm, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * N + rq, mask=qm, other=0.0)
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])
        if _unmasked(QSTAT, KNMIN, t, k0, BK) == 0:
            _, klo, khi, nlo = _band_rows(KLO, KHI, NLO, rq, N)
            vis_t = (rk[:, None] >= klo[None, :]) & (rk[:, None] < khi[None, :]) & (kn[:, None] >= nlo[None, :])
            p_t = tl.where(vis_t, p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = p_t * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q)
    rd = tl.arange(0, BD)
    o = rk.to(tl.int64)[:, None] * skn + kh * D + rd[None, :]
    wm = (rk < NK)[:, None] & (rd < D)[None, :] & ((rk * 0 + t1) > t0)[:, None]
    tl.atomic_add(DK + o, dk * sm_scale, mask=wm)
    tl.atomic_add(DV + o, dv, mask=wm)


@triton.jit
def _block_scores(Q, CK, LSE, OUT, CU, CCU, BCU, HI, NLO, CKHI, CNOISE, BCLEAN, N, NCK, qk_scale, sqn, sckn, soh,
                  son, NB_OUT, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BQ: tl.constexpr,
                  BK: tl.constexpr, R: tl.constexpr, KD: tl.constexpr, BS: tl.constexpr, INIT: tl.constexpr,
                  LOCAL: tl.constexpr, TMA: tl.constexpr):
    # one program per (query tile of one sample, sample, kv head), the group's heads summed per key tile. Block
    # tiles of BB = BK // R columns: the BK compressed keys starting R before the tile's first block cover the
    # BB - 1 blocks written per tile. CK has R zero rows in front, so that tile rows never start below 0.
    qt, b, kh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    BB: tl.constexpr = BK // R
    ss = tl.load(CU + b)
    se = tl.load(CU + b + 1)
    cbase = tl.load(CCU + b)
    nc = tl.load(CCU + b + 1) - cbase
    bbase = tl.load(BCU + b)
    nb = tl.load(BCU + b + 1) - bbase
    rq = ss + qt * BQ + tl.arange(0, BQ)
    qm = rq < se
    hi = tl.load(HI + rq, mask=qm, other=0)
    nlo = tl.load(NLO + rq, mask=qm, other=0)
    ckhi = tl.load(CKHI + rq, mask=qm, other=0) - cbase
    qb = (rq - ss) // BS
    hi_max = tl.max(tl.where(qm, hi, ss))
    n_blocks = tl.where(qt * BQ < se - ss, tl.minimum(nb, (hi_max - ss) // BS + 1), 0)
    c_all = tl.minimum(nc, tl.min(tl.where(qm, ckhi, nc)))  # compressed keys before c_all are visible to all rows
    nlo_max = tl.max(tl.where(qm, nlo, 0))                    # ... if they cover no noise token before nlo_max
    cl = tl.arange(0, BK)
    bl = tl.arange(0, BB)
    delta = cl[:, None] - R - R * bl[None, :]
    w = tl.minimum(KD, R - delta) - tl.maximum(0, -delta)
    w = tl.where((w > 0) & (bl[None, :] < BB - 1), w, 0).to(tl.float32)
    Q = _source(Q, N, sqn, BQ, BD, TMA)
    CK = _source(CK, NCK + R, sckn, BK, BD, TMA)
    for b0 in range(0, n_blocks, BB - 1):
        c_rel = (b0 - 1) * R + cl
        cm = (c_rel >= 0) & (c_rel < nc)
        cn = tl.load(CNOISE + cbase + c_rel, mask=cm, other=-1)
        ck = _tile(CK, cbase + b0 * R, NCK + R, kh * D, sckn, BK, D, BD, TMA)  # keys of other samples: masked below
        acc = tl.zeros([BQ, BK], tl.float32)
        for g in range(G):
            h = kh * G + g
            q = _tile(Q, ss + qt * BQ, N, h * D, sqn, BQ, D, BD, TMA)
            lse = tl.load(LSE + h.to(tl.int64) * N + rq, mask=qm, other=float("inf"))  # rows past the sample: p = 0
            acc += tl.exp2(tl.dot(q, tl.trans(ck)) * qk_scale - lse[:, None])
        if ((b0 - 1) * R < 0) | ((b0 - 1) * R + BK > c_all) | (tl.min(cn) < nlo_max):  # visibility is the group's
            acc = tl.where(cm[None, :] & (c_rel[None, :] < ckhi[:, None]) & (cn[None, :] >= nlo[:, None]), acc, 0.0)
        _write_block_scores(OUT, BCLEAN, acc, w, b0, bl, nb, ss, se, bbase, hi, nlo, qb, rq, qm, kh, soh, son, NB_OUT,
                            BB, BS, INIT, LOCAL)


@triton.jit
def _write_block_scores(OUT, BCLEAN, acc, w, b0, bl, nb, ss, se, bbase, hi, nlo, qb, rq, qm, kh, soh, son, NB_OUT,
                        BB: tl.constexpr, BS: tl.constexpr, INIT: tl.constexpr, LOCAL: tl.constexpr):
    """Blocks b0 .. b0 + BB - 2 of a query tile: the overlap-weighted sums of the group's compressed probabilities
    (in fp32), +inf where forced, -inf where no token is visible."""
    raw = tl.dot(acc, w, input_precision="ieee")
    b_rel = b0 + bl
    bv = (bl < BB - 1) & (b_rel < nb)
    first = ss + b_rel * BS
    top = tl.minimum(tl.minimum(first + BS, se)[None, :] - 1, hi[:, None])
    clean = tl.load(BCLEAN + bbase + b_rel, mask=bv, other=BIG_I32)
    cand = bv[None, :] & (first[None, :] <= hi[:, None]) & (
        (clean[None, :] <= top) | (tl.maximum(first[None, :], nlo[:, None]) <= top))
    forced = (b_rel[None, :] < INIT) | ((b_rel[None, :] > qb[:, None] - LOCAL) & (b_rel[None, :] <= qb[:, None]))
    val = tl.where(forced, float("inf"), raw + 1e-30 / (1.0 + b_rel[None, :].to(tl.float32)))
    val = tl.where(cand, val, float("-inf"))
    tl.store(OUT + kh.to(tl.int64) * soh + rq.to(tl.int64)[:, None] * son + b_rel[None, :], val,
             mask=qm[:, None] & bv[None, :] & (b_rel[None, :] < NB_OUT))


@triton.jit
def _slc_entries(QLIST, E, r0, n_rows, G: tl.constexpr, BM: tl.constexpr):
    """The list entries (flat query * K_SLOTS + slot) of rows r0 .. r0+BM of a work item: entry r // G, head r % G.
    Loaded one row chunk ahead, so that the gathers they address do not wait for them."""
    r = r0 + tl.arange(0, BM)
    return tl.load(QLIST + E + r // G, mask=r < n_rows, other=0)


@triton.jit
def _slc_rows(HI, NLO, e, r0, n_rows, kh, K_SLOTS: tl.constexpr, G: tl.constexpr, BM: tl.constexpr):
    """Rows r0 .. r0+BM of a work item of KV head kh, from their entries: (in range, query (int64), slot, head, hi,
    nlo)."""
    r = r0 + tl.arange(0, BM)
    rm = r < n_rows
    i = e // K_SLOTS
    hi = tl.load(HI + i, mask=rm, other=-1)
    nlo = tl.load(NLO + i, mask=rm, other=BIG_I32)
    return rm, i.to(tl.int64), e % K_SLOTS, kh * G + r % G, hi, nlo


@triton.jit
def _slc_block(K, V, KNOISE, WORK, skn, skh, svn, svh, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr,
               BS: tl.constexpr):
    """A selected-attention work item (kv head, block's first token, block end, list offset, list length): its
    KV block loaded once, with the token and dim masks and the keys' noise markers."""
    wid = tl.program_id(0).to(tl.int64) * 5
    kh = tl.load(WORK + wid)
    tok0 = tl.load(WORK + wid + 1)
    tok1 = tl.load(WORK + wid + 2)
    E = tl.load(WORK + wid + 3)
    n_rows = tl.load(WORK + wid + 4) * G
    rk = tok0 + tl.arange(0, BS)
    km = rk < tok1
    rd = tl.arange(0, BD)
    dm = rd < D
    k = tl.load(K + rk.to(tl.int64)[:, None] * skn + kh * skh + rd[None, :], mask=km[:, None] & dm[None, :], other=0.0)
    v = tl.load(V + rk.to(tl.int64)[:, None] * svn + kh * svh + rd[None, :], mask=km[:, None] & dm[None, :], other=0.0)
    kn = tl.load(KNOISE + rk, mask=km, other=-1)
    return kh, E, n_rows, rk, km, rd, dm, k, v, kn


@triton.jit
def _slc_fwd(Q, K, V, OP, LP, QLIST, WORK, HI, NLO, KNOISE, H, qk_scale, sqn, sqh, skn, skh, svn, svh,
             K_SLOTS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
             BS: tl.constexpr):
    # one program per work item (kv head, block's first token, block end, list offset, list length): load the
    # block once, stream the (query, head) rows that chose it, softmax within the block, write per-slot
    # partials o_s [L, K_SLOTS, H, D] and lse_s [L, K_SLOTS, H]; _slc_combine merges a row's slots.
    kh, E, n_rows, rk, km, rd, dm, k, v, kn = _slc_block(K, V, KNOISE, WORK, skn, skh, svn, svh, G, D, BD, BS)
    e = _slc_entries(QLIST, E, 0, n_rows, G, BM)
    for r0 in range(0, n_rows, BM):
        e_next = _slc_entries(QLIST, E, r0 + BM, n_rows, G, BM)
        rm, i64, slot, h, hi, nlo = _slc_rows(HI, NLO, e, r0, n_rows, kh, K_SLOTS, G, BM)
        q = tl.load(Q + i64[:, None] * sqn + h[:, None] * sqh + rd[None, :], mask=rm[:, None] & dm[None, :], other=0.0)
        vis = km[None, :] & (rk[None, :] <= hi[:, None]) & (kn[None, :] >= nlo[:, None])
        s = tl.where(vis, tl.dot(q, tl.trans(k)) * qk_scale, float("-inf"))
        m = tl.max(s, 1)
        m_use = tl.where(m == float("-inf"), 0.0, m)
        p = tl.exp2(s - m_use[:, None])
        l = tl.sum(p, 1)
        ok = l > 0
        o = tl.dot(p.to(v.dtype), v) / tl.where(ok, l, 1.0)[:, None]
        row = (i64 * K_SLOTS + slot) * H + h  # [L, K_SLOTS, H]: a query's heads side by side
        tl.store(OP + row[:, None] * D + rd[None, :], o.to(OP.dtype.element_ty), mask=rm[:, None] & dm[None, :])
        tl.store(LP + row, tl.where(ok, m_use + tl.log2(tl.where(ok, l, 1.0)), float("-inf")), mask=rm)
        e = e_next


@triton.jit
def _slc_bwd(Q, K, V, DO, DQP, DK, DV, LSE, DELTA, QLIST, WORK, HI, NLO, KNOISE, N, H, qk_scale, sm_scale,
             sqn, sqh, skn, skh, svn, svh, sdkn, sdkh,
             K_SLOTS: tl.constexpr, G: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BM: tl.constexpr,
             BS: tl.constexpr):
    # same walk as _slc_fwd: dk/dv accumulate per block (fp32 atomics: a block's list may span work items),
    # dq per (row, slot) partial, summed by _slc_combine.
    kh, E, n_rows, rk, km, rd, dm, k, v, kn = _slc_block(K, V, KNOISE, WORK, skn, skh, svn, svh, G, D, BD, BS)
    dk = tl.zeros([BS, BD], tl.float32)
    dv = tl.zeros([BS, BD], tl.float32)
    e = _slc_entries(QLIST, E, 0, n_rows, G, BM)
    for r0 in range(0, n_rows, BM):
        e_next = _slc_entries(QLIST, E, r0 + BM, n_rows, G, BM)
        rm, i64, slot, h, hi, nlo = _slc_rows(HI, NLO, e, r0, n_rows, kh, K_SLOTS, G, BM)
        qo = i64[:, None] * sqn + h[:, None] * sqh + rd[None, :]
        q = tl.load(Q + qo, mask=rm[:, None] & dm[None, :], other=0.0)
        do = tl.load(DO + qo, mask=rm[:, None] & dm[None, :], other=0.0)
        lse = tl.load(LSE + h.to(tl.int64) * N + i64, mask=rm, other=float("inf"))
        delta = tl.load(DELTA + h.to(tl.int64) * N + i64, mask=rm, other=0.0)
        vis = km[None, :] & (rk[None, :] <= hi[:, None]) & (kn[None, :] >= nlo[:, None])
        p = tl.where(vis, tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        dq = tl.dot(ds.to(k.dtype), k) * sm_scale
        row = (i64 * K_SLOTS + slot) * H + h  # [L, K_SLOTS, H]: a query's heads side by side
        tl.store(DQP + row[:, None] * D + rd[None, :], dq.to(DQP.dtype.element_ty), mask=rm[:, None] & dm[None, :])
        e = e_next
    o = rk.to(tl.int64)[:, None] * sdkn + kh * sdkh + rd[None, :]
    wm = km[:, None] & dm[None, :] & ((rk * 0 + n_rows) > 0)[:, None]
    tl.atomic_add(DK + o, dk * sm_scale, mask=wm)
    tl.atomic_add(DV + o, dv, mask=wm)


@triton.jit
def _slc_combine(XP, LP, OUT, LSE, NROWS, N, H,
                 K_SLOTS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, GRAD: tl.constexpr):
    # rows are (query, head) = query * H + head. Forward: merge the slots' softmaxes (o, lse); GRAD: sum dq.
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = row < NROWS
    rd = tl.arange(0, BD)
    dm = rd < D
    slot0 = (row // H) * K_SLOTS * H + row % H  # partials are [L, K_SLOTS, H]
    m = tl.full([BR], float("-inf"), tl.float32)
    for s in range(K_SLOTS):
        m = tl.maximum(m, tl.load(LP + slot0 + s * H, mask=rm, other=float("-inf")))
    m_use = tl.where(m == float("-inf"), 0.0, m)
    acc = tl.zeros([BR, BD], tl.float32)
    l = tl.zeros([BR], tl.float32)
    for s in range(K_SLOTS):
        ls = tl.load(LP + slot0 + s * H, mask=rm, other=float("-inf"))
        x = tl.load(XP + (slot0 + s * H)[:, None] * D + rd[None, :],
                    mask=(rm & (ls > float("-inf")))[:, None] & dm[None, :], other=0.0)
        if GRAD:
            w = tl.where(ls > float("-inf"), 1.0, 0.0)
        else:
            w = tl.exp2(ls - m_use)
        acc += w[:, None] * x.to(tl.float32)
        l += w
    if GRAD:
        out = acc
    else:
        out = acc / tl.where(l > 0, l, 1.0)[:, None]
        lse = tl.where(l > 0, m_use + tl.log2(tl.where(l > 0, l, 1.0)), float("inf"))
        tl.store(LSE + (row % H) * N + row // H, lse, mask=rm)
    tl.store(OUT + row[:, None] * D + rd[None, :], out.to(OUT.dtype.element_ty), mask=rm[:, None] & dm[None, :])


@triton.jit
def _topk(S, IDX, TOKENS, LAST, N_TOKENS, N, NB, K: tl.constexpr, KP: tl.constexpr, NBP: tl.constexpr,
          CW: tl.constexpr, BR: tl.constexpr):
    # select_blocks for the score rows (kv head program_id(1), query) of BR queries from TOKENS, whose blocks up to
    # the last one they see (LAST; all that _block_scores wrote) fit in NBP columns. The row is cut into chunks of
    # CW columns and each chunk's maximum kept: a pick takes the chunk with the largest (the first of equals), re-reads
    # that chunk (L1) for its first largest column, knocks the column out (a bit per column) and updates the chunk's
    # maximum, so that K picks cost NBP + K * (NBP / CW + CW), not K * NBP. Then the picks are sorted ascending.
    C: tl.constexpr = NBP // CW
    j = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = j < N_TOKENS
    i = tl.load(TOKENS + j, mask=rm, other=0)
    r = tl.program_id(1).to(tl.int64) * N + i
    row = S + r * NB
    last = tl.load(LAST + i, mask=rm, other=-1)
    c = tl.arange(0, NBP)
    s = tl.load(row[:, None] + c[None, :], mask=rm[:, None] & (c[None, :] <= last[:, None]), other=float("-inf"))
    chunk_max = tl.max(tl.reshape(s, [BR, C, CW]), 2)
    chunk = tl.arange(0, C)
    w = tl.arange(0, CW)
    taken = tl.zeros([BR, C], tl.int32)  # bit b of chunk h: column h * CW + b is picked
    kk = tl.arange(0, KP)
    out = tl.full([BR, KP], BIG_I32, tl.int32)
    for t in tl.static_range(K):
        m = tl.max(chunk_max, 1)
        h = tl.argmax(chunk_max, 1).to(tl.int32)
        here = chunk[None, :] == h[:, None]
        cols = h[:, None] * CW + w[None, :]
        x = tl.load(row[:, None] + cols, mask=rm[:, None] & (cols <= last[:, None]), other=float("-inf"))
        bits = tl.sum(tl.where(here, taken, 0), 1)
        x = tl.where(((bits[:, None] >> w[None, :]) & 1) != 0, float("-inf"), x)
        a = tl.argmax(x, 1).to(tl.int32)
        out = tl.where((kk[None, :] == t) & (m > float("-inf"))[:, None], (h * CW + a)[:, None], out)
        taken = tl.where(here, taken | (1 << a)[:, None], taken)
        chunk_max = tl.where(here, tl.max(tl.where(w[None, :] == a[:, None], float("-inf"), x), 1)[:, None], chunk_max)
    out = tl.sort(out, 1)
    tl.store(IDX + r[:, None] * K + kk[None, :], tl.where(out == BIG_I32, -1, out),
             mask=rm[:, None] & (kk[None, :] < K))


@triton.jit
def _gate_rows(NROWS, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    """This program's BR (query, head) rows of [rows, D] tensors: (rows, in range, element mask, element offsets)."""
    row = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    rm = row < NROWS
    rd = tl.arange(0, BD)
    return row, rm, rm[:, None] & (rd < D)[None, :], row[:, None] * D + rd[None, :]


@triton.jit
def _gate_fwd(GATE, O1, O2, O3, OUT, NROWS, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr):
    # rows are (query, head): out = g0 * o_cmp + g1 * o_slc + g2 * o_swa with GATE [rows, 3]
    row, rm, m, off = _gate_rows(NROWS, D, BD, BR)
    g0 = tl.load(GATE + row * 3, mask=rm, other=0.0).to(tl.float32)
    g1 = tl.load(GATE + row * 3 + 1, mask=rm, other=0.0).to(tl.float32)
    g2 = tl.load(GATE + row * 3 + 2, mask=rm, other=0.0).to(tl.float32)
    o = g0[:, None] * tl.load(O1 + off, mask=m, other=0.0).to(tl.float32) + \
        g1[:, None] * tl.load(O2 + off, mask=m, other=0.0).to(tl.float32) + \
        g2[:, None] * tl.load(O3 + off, mask=m, other=0.0).to(tl.float32)
    tl.store(OUT + off, o.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _gate_branch_bwd(GATE, O, LSE, do, DG, LSE_G, DELTA, row, rm, m, off, b: tl.constexpr, N, H):
    # one branch b: the gate gradient dg_b = sum_d o_b do. The branch's output gradient g_b do is never formed:
    # with p the branch's softmax, its backward needs g_b p (in dv += (g_b p)^T do and ds = g_b p (do v^T - dg_b)),
    # and g_b p = exp2(s - (lse - log2 g_b)). So its kernels take the raw do, lse - log2 g_b and dg_b for delta.
    g = tl.load(GATE + row * 3 + b, mask=rm, other=1.0).to(tl.float32)  # g = 0 gives lse + inf: p = 0, as it should
    o = tl.load(O + off, mask=m, other=0.0).to(tl.float32)
    dg = tl.sum(o * do, 1)
    tl.store(DG + row * 3 + b, dg, mask=rm)
    hn = (b * H + row % H) * N + row // H  # [3, H, N]
    tl.store(DELTA + hn, dg, mask=rm)
    tl.store(LSE_G + hn, tl.load(LSE + (row % H) * N + row // H, mask=rm, other=0.0) - tl.log2(g), mask=rm)


@triton.jit
def _gate_bwd(GATE, O1, O2, O3, LSE1, LSE2, LSE3, DO, DG, LSE_G, DELTA, NROWS, N, H, D: tl.constexpr,
              BD: tl.constexpr, BR: tl.constexpr):
    row, rm, m, off = _gate_rows(NROWS, D, BD, BR)
    do = tl.load(DO + off, mask=m, other=0.0).to(tl.float32)
    _gate_branch_bwd(GATE, O1, LSE1, do, DG, LSE_G, DELTA, row, rm, m, off, 0, N, H)
    _gate_branch_bwd(GATE, O2, LSE2, do, DG, LSE_G, DELTA, row, rm, m, off, 1, N, H)
    _gate_branch_bwd(GATE, O3, LSE3, do, DG, LSE_G, DELTA, row, rm, m, off, 2, N, H)


# ----------------------------------------------------------------------------------------------
# Launch plumbing

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # as triton.jit saw it when it built these kernels


def _tiles(name):
    """Launch shapes: tiny under the CPU interpreter, tuned on an H100; NSA_TILES='{"name": [...]}' overrides. Band:
    (BQ, BK, num_warps, num_stages, TMA loads); score: (BQ, num_warps, blocks per key tile, TMA); slc, slc_bwd: (rows
    per step, num_warps, num_stages); slc_chunk: entries per work item; topk: (elements per program, num_warps,
    fewest columns, columns per chunk)."""
    override = json.loads(os.environ.get("NSA_TILES", "{}"))
    if name in override:
        return tuple(override[name]) if isinstance(override[name], list) else override[name]
    if INTERPRET:
        tma, plain = (16, 16, 1, 1, True), (16, 16, 1, 1, False)  # the tests cover both load paths
        return dict(cmp_fwd=tma, cmp_dq=tma, cmp_dkdv=tma, swa_fwd=plain, swa_dq=plain, swa_dkdv=plain,
                    score=(16, 1, 4, True), slc=(16, 1, 1), slc_bwd=(16, 1, 1), slc_chunk=16,
                    topk=(1024, 1, 2, 4))[name]
    return dict(cmp_fwd=(128, 64, 8, 3, False), cmp_dq=(64, 64, 4, 2, True), cmp_dkdv=(64, 128, 8, 3, False),
                swa_fwd=(64, 64, 4, 2, False), swa_dq=(64, 64, 4, 2, False), swa_dkdv=(32, 64, 4, 3, False),
                score=(64, 4, 16, True), slc=(64, 4, 3), slc_bwd=(128, 8, 2), slc_chunk=1024,
                topk=(1024, 1, 64, 32))[name]


def _launch(kernel, grid, *args, **meta):
    """kernel[grid](*args, **meta). A launch shape tuned on an H100 that needs more shared memory than this GPU has
    is retried with one pipeline stage, then reported with the way out."""
    try:
        return kernel[grid](*args, **meta)
    except triton.runtime.errors.OutOfResources as e:
        if meta.get("num_stages") == 1:
            raise RuntimeError(f"NSA kernel {kernel.__name__} does not fit this GPU ({e}); give it smaller tiles "
                               f"with NSA_TILES (keys and defaults: nsa._tiles)") from e
        return _launch(kernel, grid, *args, **{**meta, "num_stages": 1})


def _bd(D):
    """Head dim as the kernels tile it: a power of two, at least 16 (tl.dot's smallest)."""
    return max(16, triton.next_power_of_2(D))


def _use_tma(D, wanted, *tensors):
    """Hopper bulk tensor copies for whole-row tiles, where every tensor's base and row stride are 16-byte aligned (a
    view at an odd offset takes the pointer path). Device-side descriptors need a scratch allocator, which Triton
    keeps per thread: set it on every use (backward kernels run on autograd's thread, forward ones on the caller's)."""
    if not (wanted and D == _bd(D) and all(t.data_ptr() % 16 == 0 and t.stride(0) * t.element_size() % 16 == 0
                                          for t in tensors)):
        return False
    triton.set_allocator(_scratch)
    return True


def _scratch(size, align, stream):
    return torch.empty(size, dtype=torch.int8, device="cpu" if INTERPRET else "cuda")


def _i32(t):
    return t.to(torch.int32).contiguous()


class Plan:
    """Per-pack index tensors for the kernels (int32) from a SpanLayout; get_plan builds it once per pack."""

    def __init__(self, layout, kernel_size, kernel_stride, block_size, window_size):
        L, dev, N = layout, layout.sample_start.device, layout.sample_start.numel()
        assert N < BIG, "pack too long for int32 token indices"
        idx = torch.arange(N, device=dev)
        cu = L.cu_seqlens.long()
        lens, B = cu.diff(), len(cu) - 1
        sample = torch.repeat_interleave(torch.arange(B, device=dev), lens)
        noise, hi = L.noise, L.last_key()
        tok_noise = torch.where(noise, idx, BIG)
        next_noise = tok_noise.flip(0).cummin(0).values.flip(0)  # first noise token at or after j
        next_clean = torch.where(noise, BIG, idx).flip(0).cummin(0).values.flip(0)
        # compressed keys
        nc = compressed_lengths(cu, kernel_size, kernel_stride)
        ccu = F.pad(nc.cumsum(0), (1, 0))
        c_first = window_starts(cu, kernel_size, kernel_stride)
        self.window_starts = c_first  # each compressed key's first token: compression and compressed-key positions
        c_last = c_first + kernel_size - 1
        c_noise = torch.where(next_noise[c_first] <= c_last, next_noise[c_first], BIG) if len(c_first) else c_first
        rel_hi = hi - L.sample_start
        n_vis = torch.where(rel_hi >= kernel_size - 1, (rel_hi - kernel_size + 1) // kernel_stride + 1, 0)
        self.c_klo, self.c_count = ccu[sample], nc[sample]  # the first compressed key of each token's sample, how many
        self.c_khi = self.c_klo + torch.minimum(n_vis, nc[sample])
        self.rel, self.c_noise, self.ccu = idx - L.sample_start, c_noise, ccu
        # sliding window: keys [w_lo, w_hi)
        hi_w = torch.minimum(hi, torch.maximum(idx + window_size // 2, L.sample_start + window_size))
        self.w_lo = torch.maximum(L.sample_start, hi_w - window_size)
        self.w_hi = hi_w + 1
        # selection blocks
        nb = (lens + block_size - 1) // block_size
        self.bcu = F.pad(nb.cumsum(0), (1, 0))
        b_sample = torch.repeat_interleave(torch.arange(B, device=dev), nb)
        self.b_first = cu[b_sample] + (torch.arange(len(b_sample), device=dev) - self.bcu[b_sample]) * block_size
        self.b_end = torch.minimum(self.b_first + block_size, cu[b_sample + 1])
        self.b_clean = torch.where(next_clean[self.b_first] < self.b_end, next_clean[self.b_first], BIG)
        self.block_of_sample = self.bcu[sample]  # global id of each token's sample's first block
        self.last_block = (hi - L.sample_start) // block_size  # the last block (in its sample) a query can see
        self.max_len = int(lens.max())
        self.num_blocks = -(-self.max_len // block_size)
        self.cu, self.hi, self.nlo, self.tok_noise, self.B = cu, hi, L.span_start, tok_noise, B
        self.block_size, self.num_blocks_total = block_size, len(self.b_first)
        self._cache = {}  # per-pack launch data, filled on first use (key_tiles, band_stats, topk_groups)
        for name in ["window_starts", "c_klo", "c_khi", "c_count", "rel", "c_noise", "ccu", "w_lo", "w_hi", "bcu",
                     "b_first", "b_end", "b_clean", "cu", "hi", "nlo", "tok_noise", "last_block"]:
            setattr(self, name, _i32(getattr(self, name)))

    def key_tiles(self, klo, khi, nk, BQ, BK, n_kv):
        """Cached per pack (shared by all layers): for each key tile, the hull [lo, hi) of query tiles with a row whose
        key range meets it; how many query tiles QC one dk/dv program takes, and the number of such chunks: about 8
        waves of programs over the GPU's multiprocessors, so that short packs and the causal staircase fill it."""
        key = (klo.data_ptr(), nk, BQ, BK, n_kv)
        if key not in self._cache:
            N, T, live = klo.numel(), -(-klo.numel() // BQ), khi > klo
            lo = F.pad(torch.where(live, klo, BIG), (0, T * BQ - N), value=BIG).view(T, BQ).amin(1)
            hi = F.pad(torch.where(live, khi, 0), (0, T * BQ - N), value=0).view(T, BQ).amax(1)
            k0 = torch.arange(-(-nk // BK), device=klo.device) * BK
            meet = (lo[None, :] < k0[:, None] + BK) & (hi[None, :] > k0[:, None])
            lo = _i32(torch.where(meet.any(1), meet.int().argmax(1), 0))
            hi = _i32(torch.where(meet.any(1), T - meet.flip(1).int().argmax(1), 0))
            span = (hi - lo).clamp(min=0)
            sms = 4 if INTERPRET else torch.cuda.get_device_properties(klo.device).multi_processor_count
            qc = max(2, min(64, -(-int(span.sum()) * n_kv // (8 * sms))))
            self._cache[key] = (lo, hi, qc, max(1, -(-int(span.max()) // qc)))
        return self._cache[key]

    def topk_groups(self, min_width):
        """Cached per pack: the queries grouped by the power-of-two number of score columns (at least min_width)
        that holds their blocks up to the last one they see, [(width, int32 token ids)], so that top-k scans no
        more columns than a query can have (early queries of a long sample, short samples in a pack)."""
        key = ("topk", min_width)
        if key not in self._cache:
            n = self.last_block.long() + 1
            width = torch.where(n <= min_width, min_width, 2 ** torch.ceil(torch.log2(n.double())).long())
            self._cache[key] = [(int(w), _i32(torch.nonzero(width == w).flatten())) for w in width.unique().tolist()]
        return self._cache[key]

    def band_stats(self, klo, khi, nlo, knoise, nk, BQ, BK):
        """Cached per pack: what _unmasked reads. Per query tile of BQ rows: the lowest BK-aligned key tile start
        visible to all rows (BIG if a row sees nothing), the highest tile end, the largest nlo; per key tile: the
        first noise token any of its keys covers."""
        key = ("stats", klo.data_ptr(), knoise.data_ptr(), nk, BQ, BK)
        if key not in self._cache:
            N, T = klo.numel(), -(-klo.numel() // BQ)
            pad = lambda t, value: F.pad(t.long(), (0, T * BQ - N), value=value).view(T, BQ)
            valid = pad(torch.ones_like(klo), 0).bool()
            lo, hi = pad(klo, 0), pad(khi, BIG)
            all_live = ((hi > lo) | ~valid).all(1)
            fast_lo = torch.where(all_live, -(-lo.amax(1) // BK) * BK, BIG)
            qstat = torch.stack([fast_lo, hi.amin(1), pad(nlo, 0).amax(1)], 1)
            KT = -(-nk // BK)
            knmin = F.pad(knoise.long(), (0, KT * BK - nk), value=-1).view(KT, BK).amin(1)
            self._cache[key] = (_i32(qstat), _i32(knmin))
        return self._cache[key]


def get_plan(layout, pattern):
    """The Plan of a pack, built once and kept on the layout: every layer of a forward shares it."""
    key = (pattern["kernel_size"], pattern["kernel_stride"], pattern["block_size"], pattern["window_size"])
    plans = layout.__dict__.setdefault("_nsa_plans", {})
    return plans[key] if key in plans else plans.setdefault(key, Plan(layout, *key))


class _Pool(torch.autograd.Function):
    """compress() without pe for weightedpool and avgpool: out[c] = sum_l w[:, l] x[start_c + l] as kernels,
    forward and backward, with no [windows, kernel_size, H, D] copy of x."""

    @staticmethod
    def forward(ctx, x, w, plan, kernel_stride):
        x = x.contiguous()
        (_, H, D), NC = x.shape, plan.window_starts.numel()
        out = x.new_empty(NC, H, D)
        ctx.save_for_backward(x, w)
        ctx.plan, ctx.stride = plan, kernel_stride
        if NC:
            _pool_fwd[(triton.cdiv(NC, 64), H)](x, w, out, plan.window_starts, NC, H * D, KS=w.shape[1], D=D, BD=_bd(D),
                                               BC=64)
        return out

    @staticmethod
    def backward(ctx, dout):
        (x, w), plan, dout = ctx.saved_tensors, ctx.plan, dout.contiguous()
        (L, H, D), NC = x.shape, dout.shape[0]
        dx = torch.zeros_like(x) if NC == 0 else torch.empty_like(x)
        dw = None
        if NC:
            _pool_bwd_dx[(triton.cdiv(L, 64), H)](dout, w, dx, plan.rel, plan.c_klo, plan.c_count, L, H * D,
                                                 KS=w.shape[1], STRIDE=ctx.stride, D=D, BD=_bd(D), BT=64)
        if ctx.needs_input_grad[1]:
            part = torch.zeros(max(1, triton.cdiv(NC, 64)), H, w.shape[1], device=x.device, dtype=torch.float32)
            if NC:
                _pool_bwd_dw[(triton.cdiv(NC, 64), H)](dout, x, part, plan.window_starts, NC, H * D, H, KS=w.shape[1],
                                                      D=D, BD=_bd(D), BC=64)
            dw = part.sum(0).to(w.dtype)
        return dx, dw, None, None


def compress_triton(x, w, plan, kernel_size, kernel_stride, pe=None):
    """Kernel twin of compress (weightedpool, avgpool): pe enters as the bias sum_l w[:, l] pe[:, l], which is what
    adding it to every window before pooling amounts to."""
    if w is None:  # avgpool
        w = torch.full((x.shape[1], kernel_size), 1.0 / kernel_size, device=x.device, dtype=torch.float32)
    out = _Pool.apply(x, w, plan, kernel_stride)
    return out if pe is None else out + torch.einsum("hl,hld->hd", w.to(pe.dtype), pe).to(out.dtype)


def _band_forward(q, k, v, klo, khi, nlo, knoise, scale, kind, plan):
    """Flash attention where query i sees keys c in [klo_i, khi_i) with noise[c] >= nlo_i -> (o, lse [H, N] log2).
    kind: "cmp" (compressed keys) or "swa" (sliding window), which pick their own tiles."""
    (N, H, D), (NK, KH, _) = q.shape, k.shape
    if NK == 0:  # no sample long enough for one compressed key: every row sees nothing
        return torch.zeros_like(q), torch.full((H, N), float("inf"), device=q.device)
    o, lse = torch.empty_like(q), torch.empty(H, N, device=q.device, dtype=torch.float32)
    BQ, BK, W, S, tma = _tiles(kind + "_fwd")
    stats = plan.band_stats(klo, khi, nlo, knoise, NK, BQ, BK)
    _launch(_band_fwd, (triton.cdiv(N, BQ), H), q, k, v, o, lse, klo, khi, nlo, knoise, *stats, N, NK,
            scale * math.log2(math.e), q.stride(0), k.stride(0), G=H // KH, D=D, BD=_bd(D),
            BQ=BQ, BK=BK, TMA=_use_tma(D, tma, q, k, v), num_warps=W, num_stages=S)
    return o, lse


def _band_backward(q, k, v, do, lse, delta, klo, khi, nlo, knoise, scale, kind, plan, dq, dk, dv):
    """Adds this branch's gradients: dq (q's dtype) and the fp32 dk, dv buffers. do, lse and delta as _gate_bwd
    gives them (the gate folded into lse)."""
    (N, H, D), (NK, KH, _) = q.shape, k.shape
    if NK == 0:
        return
    meta = dict(G=H // KH, D=D, BD=_bd(D))
    qk_scale = scale * math.log2(math.e)
    BQ, BK, W, S, tma = _tiles(kind + "_dq")
    stats = plan.band_stats(klo, khi, nlo, knoise, NK, BQ, BK)
    _launch(_band_bwd_dq, (triton.cdiv(N, BQ), H), q, k, v, do, dq, lse, delta, klo, khi, nlo, knoise, *stats, N, NK,
            qk_scale, scale, q.stride(0), k.stride(0), BQ=BQ, BK=BK, TMA=_use_tma(D, tma, q, k, v, do), **meta,
            num_warps=W, num_stages=S)
    BQ, BK, W, S, tma = _tiles(kind + "_dkdv")
    qt_lo, qt_hi, qc, n_chunks = plan.key_tiles(klo, khi, NK, BQ, BK, KH)
    stats = plan.band_stats(klo, khi, nlo, knoise, NK, BQ, BK)
    _launch(_band_bwd_dkdv, (triton.cdiv(NK, BK), KH, n_chunks), q, k, v, do, dk, dv, lse, delta, klo, khi, nlo,
            knoise, *stats, qt_lo, qt_hi, qc, N, NK, qk_scale, scale, q.stride(0), k.stride(0), BQ=BQ, BK=BK,
            TMA=_use_tma(D, tma, q, k, v, do), **meta, num_warps=W, num_stages=S)


def block_scores_triton(q, ck, lse, plan: Plan, num_kv_heads, kernel_stride, kernel_size, block_size, init_blocks,
                        local_blocks):
    """Kernel twin of block_scores_ref's `score` (float32 [Hkv, L, NB]) in each query's blocks up to its last
    visible one (plan.last_block); the rest of the row is left unwritten."""
    N, H, D = q.shape
    R, KD = block_size // kernel_stride, kernel_size // kernel_stride
    assert block_size % kernel_stride == 0 and kernel_size % kernel_stride == 0 and KD - 1 <= R
    assert R & (R - 1) == 0, "block_size / kernel_stride must be a power of two"
    out = torch.empty((num_kv_heads, N, plan.num_blocks), device=q.device, dtype=torch.float32)
    BQ, W, blocks, tma = _tiles("score")
    BK = R * blocks  # compressed keys per tile: blocks - 1 blocks written per tile
    # no compressed key anywhere: the kernel still reads (masked) through valid pointers
    c_noise = plan.c_noise if ck.shape[0] else plan.c_noise.new_zeros(1)
    ck_pad = F.pad(ck, (0, 0, 0, 0, R, 0))  # R zero rows in front (see _block_scores)
    _launch(_block_scores, (triton.cdiv(plan.max_len, BQ), plan.B, num_kv_heads),
            q, ck_pad, lse, out, plan.cu, plan.ccu, plan.bcu, plan.hi, plan.nlo, plan.c_khi, c_noise, plan.b_clean,
            N, ck.shape[0], (D ** -0.5) * math.log2(math.e), q.stride(0), ck_pad.stride(0), *out.stride()[:2],
            plan.num_blocks, G=H // num_kv_heads, D=D, BD=_bd(D), BQ=BQ, BK=BK, R=R, KD=KD, BS=block_size,
            INIT=init_blocks, LOCAL=local_blocks, TMA=_use_tma(D, tma, q, ck_pad), num_warps=W)
    return out


def _selection_work(idx, plan: Plan):
    """Invert the top-k lists without a host sync: for each (kv head, block) the flat entries query * K + slot that
    chose it (qlist, grouped by block), cut into work items of at most `slc_chunk` entries: int32 [W, 5] =
    (kv head, first token, end token, offset into qlist, count); W is an upper bound, unused items have count 0."""
    KH, N, K = idx.shape
    NBT, dev = plan.num_blocks_total, idx.device
    n_keys = KH * NBT
    kh = torch.arange(KH, device=dev, dtype=torch.int32)[:, None, None]
    key = torch.where(idx >= 0, kh * NBT + plan.block_of_sample[None, :, None] + idx, n_keys).flatten()
    sorted_key, order = torch.sort(key, stable=True)  # int32 keys: half the radix passes of int64
    qlist = _i32(order % (N * K))
    # each key's entries start where a binary search puts it (torch.bincount would read the keys' max on the host)
    offs = torch.searchsorted(sorted_key, torch.arange(n_keys + 1, device=dev, dtype=sorted_key.dtype))
    counts = offs.diff()
    chunk = _tiles("slc_chunk")
    n_chunks = (counts + chunk - 1) // chunk
    cum = n_chunks.cumsum(0)
    w = torch.arange(n_keys + -(-KH * N * K // chunk), device=dev)
    kid = torch.searchsorted(cum, w, right=True).clamp(max=n_keys - 1)
    j = w - (cum - n_chunks)[kid]
    count = torch.where(w < cum[-1], torch.minimum(counts[kid] - j * chunk, torch.full_like(j, chunk)), 0)
    gb = kid % NBT
    work = torch.stack([kid // NBT, plan.b_first.long()[gb], plan.b_end.long()[gb], offs[kid] + j * chunk, count], 1)
    return qlist, _i32(work)


def select_blocks_triton(score, topk, plan: Plan):
    """Kernel twin of select_blocks (first index wins exact ties; scores carry an earlier-block tie-break); reads
    only what block_scores_triton wrote."""
    KH, N, NB = score.shape
    K = min(topk, NB)
    idx = torch.empty(KH, N, K, device=score.device, dtype=torch.int32)
    elems, W, min_width, chunk = _tiles("topk")
    for width, tokens in plan.topk_groups(min_width):
        BR = max(1, min(128, elems // width))
        _topk[(triton.cdiv(len(tokens), BR), KH)](score, idx, tokens, plan.last_block, len(tokens), N, NB, K=K,
                                                  KP=triton.next_power_of_2(K), NBP=width, CW=min(chunk, width), BR=BR,
                                                  num_warps=W)
    return idx


def _selected_forward(q, k, v, selection, plan, scale):
    """Attention of each query over the visible tokens of its selected blocks (selection: _selection_work's qlist
    and work), gathered per KV block -> (o, lse, state for _selected_backward)."""
    N, H, D = q.shape
    qlist, work = selection
    KH, BD = k.shape[1], _bd(D)
    K = qlist.numel() // (N * KH)
    op = torch.empty(N, K, H, D, device=q.device, dtype=q.dtype)
    lp = torch.full((N, K, H), float("-inf"), device=q.device, dtype=torch.float32)
    BM, W, S = _tiles("slc")
    _launch(_slc_fwd, (len(work),), q, k, v, op, lp, qlist, work, plan.hi, plan.nlo, plan.tok_noise, H,
            scale * math.log2(math.e), *q.stride()[:2], *k.stride()[:2], *v.stride()[:2],
            K_SLOTS=K, G=H // KH, D=D, BD=BD, BM=BM, BS=plan.block_size, num_warps=W, num_stages=S)
    o, lse = torch.empty_like(q), torch.empty(H, N, device=q.device, dtype=torch.float32)
    _slc_combine[(triton.cdiv(N * H, 16),)](op, lp, o, lse, N * H, N, H, K_SLOTS=K, D=D, BD=BD, BR=16, GRAD=False)
    return o, lse, (lp, qlist, work)


def _selected_backward(q, k, v, do, lse, delta, state, plan, scale, dq, dk, dv):
    """Writes dq (q's dtype; the first branch to do so) and adds to the fp32 dk, dv buffers (do as in
    _band_backward)."""
    lp, qlist, work = state
    N, H, D = q.shape
    KH, K, BD = k.shape[1], lp.shape[1], _bd(D)
    dqp = torch.empty(N, K, H, D, device=q.device, dtype=q.dtype)
    BM, W, S = _tiles("slc_bwd")
    _launch(_slc_bwd, (len(work),), q, k, v, do, dqp, dk, dv, lse, delta, qlist, work, plan.hi, plan.nlo,
            plan.tok_noise, N, H, scale * math.log2(math.e), scale,
            *q.stride()[:2], *k.stride()[:2], *v.stride()[:2], *dk.stride()[:2],
            K_SLOTS=K, G=H // KH, D=D, BD=BD, BM=BM, BS=plan.block_size, num_warps=W, num_stages=S)
    _slc_combine[(triton.cdiv(N * H, 16),)](dqp, lp, dq, lse, N * H, N, H, K_SLOTS=K, D=D, BD=BD, BR=16, GRAD=True)


def _branches_forward(q, k, v, ck, cv, plan, pattern, scale, selection=None):
    """The three branches' outputs, with what their backward needs; a known selection (qlist, work: a recompute)
    skips the block scores and the top-k."""
    o_cmp, lse_cmp = _band_forward(q, ck, cv, plan.c_klo, plan.c_khi, plan.nlo, plan.c_noise, scale, "cmp", plan)
    if selection is None:
        score = block_scores_triton(q, ck, lse_cmp, plan, k.shape[1], pattern["kernel_stride"],
                                    pattern["kernel_size"], pattern["block_size"], pattern["init_blocks"],
                                    pattern["local_blocks"])
        selection = _selection_work(select_blocks_triton(score, pattern["topk"], plan), plan)
    o_slc, lse_slc, slc_state = _selected_forward(q, k, v, selection, plan, scale)
    o_swa, lse_swa = _band_forward(q, k, v, plan.w_lo, plan.w_hi, plan.nlo, plan.tok_noise, scale, "swa", plan)
    return (o_cmp, o_slc, o_swa), (lse_cmp, lse_slc, lse_swa), slc_state


class _NSAAttention(torch.autograd.Function):
    """o = g_cmp * o_cmp + g_slc * o_slc + g_swa * o_swa as one op: the backward splits do into the branches'
    output gradients and softmax deltas in one pass (_gate_bwd), and the branches add into shared dq, dk, dv.
    recompute: keep only the inputs and the block selection, and run the branches again in backward (three [L, Hq, D]
    outputs fewer kept, one more forward of the branches)."""

    @staticmethod
    def forward(ctx, q, k, v, ck, cv, gate, plan, pattern, scale, recompute=False):
        q, k, v, ck, cv, gate = (t.contiguous() for t in (q, k, v, ck, cv, gate))
        outs, lses, slc_state = _branches_forward(q, k, v, ck, cv, plan, pattern, scale)
        N, H, D = q.shape
        o = torch.empty_like(q)
        _gate_fwd[(triton.cdiv(N * H, 16),)](gate, *outs, o, N * H, D=D, BD=_bd(D), BR=16)
        kept = slc_state[1:] if recompute else (*outs, *lses, *slc_state)  # slc_state: (lp, qlist, work)
        ctx.save_for_backward(q, k, v, ck, cv, gate, *kept)
        ctx.plan, ctx.pattern, ctx.scale, ctx.recompute = plan, pattern, scale, recompute
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, ck, cv, gate, *kept = ctx.saved_tensors
        plan, scale, do = ctx.plan, ctx.scale, do.contiguous()
        if ctx.recompute:
            outs, lses, slc_state = _branches_forward(q, k, v, ck, cv, plan, ctx.pattern, scale, selection=kept)
            kept = (*outs, *lses, *slc_state)
        o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, *slc_state = kept
        N, H, D = q.shape
        dgate = torch.empty(N, H, 3, device=q.device, dtype=torch.float32)
        lse_g, delta = (torch.empty(3, H, N, device=q.device, dtype=torch.float32) for _ in range(2))
        _gate_bwd[(triton.cdiv(N * H, 16),)](gate, o_cmp, o_slc, o_swa, lse_cmp, lse_slc, lse_swa, do, dgate, lse_g,
                                             delta, N * H, N, H, D=D, BD=_bd(D), BR=16)
        dq = torch.empty_like(q)
        dk, dv, dck, dcv = (torch.zeros(t.shape, device=q.device, dtype=torch.float32) for t in (k, v, ck, cv))
        _selected_backward(q, k, v, do, lse_g[1], delta[1], slc_state, plan, scale, dq, dk, dv)
        _band_backward(q, ck, cv, do, lse_g[0], delta[0], plan.c_klo, plan.c_khi, plan.nlo, plan.c_noise, scale,
                       "cmp", plan, dq, dck, dcv)
        _band_backward(q, k, v, do, lse_g[2], delta[2], plan.w_lo, plan.w_hi, plan.nlo, plan.tok_noise, scale,
                       "swa", plan, dq, dk, dv)
        return (dq, dk.to(k.dtype), dv.to(v.dtype), dck.to(ck.dtype), dcv.to(cv.dtype), dgate.to(gate.dtype),
                None, None, None, None)


# ----------------------------------------------------------------------------------------------
# The module

class NSA(torch.nn.Module):
    """NSA for one attention layer: compression parameters, intra-block key position bias and the branch gate.
    The layer's own q/k/v/o projections and norms stay in the model; forward takes q, k (before RoPE) and v."""

    def __init__(self, hidden_size, num_heads, num_kv_heads, head_dim, block_size=64, compress_type="weightedpool",
                 kernel_size=32, kernel_stride=16, topk=16, init_blocks=1, local_blocks=2, window_size=512,
                 backend=None, recompute_branches=True):
        super().__init__()
        assert num_heads % num_kv_heads == 0 and kernel_size % kernel_stride == 0 and block_size % kernel_stride == 0
        assert topk >= init_blocks + local_blocks, "topk must cover the forced blocks"
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.pattern = dict(block_size=block_size, kernel_size=kernel_size, kernel_stride=kernel_stride, topk=topk,
                            init_blocks=init_blocks, local_blocks=local_blocks, window_size=window_size)
        self.compress_type = compress_type
        self.backend = backend  # None: triton on CUDA, torch elsewhere; or force "torch" / "triton"
        # the kernels' backward reruns the branches (_NSAAttention): the NSA step's peak memory at or under the flex
        # step's, for ~5% of its time (28 layers at 64k, notes/speed.md); False keeps the three branch outputs
        self.recompute_branches = recompute_branches
        shape = {"weightedpool": (num_kv_heads, kernel_size),
                 "linear": (num_kv_heads, kernel_size * head_dim, head_dim), "avgpool": None}[compress_type]
        if shape is not None:
            self.compress_key = torch.nn.Parameter(torch.empty(shape))
            self.compress_value = torch.nn.Parameter(torch.empty(shape))
        self.intra_block_pe = torch.nn.Parameter(torch.empty(num_kv_heads, kernel_size, head_dim))
        self.gate = torch.nn.Linear(hidden_size, 3 * num_heads, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self):
        """Near-dense start: key pooling = mean (selection scores mean something), value pooling = 0 (o_cmp = 0),
        pe = 0, every gate 0.5. Then o = (o_slc + o_swa) / 2: dense attention exactly on samples the window and the
        top-k blocks cover (at most min(window_size + 1, topk * block_size) tokens; tested)."""
        if self.compress_type == "weightedpool":
            self.compress_key.fill_(1.0 / self.pattern["kernel_size"])
            self.compress_value.zero_()
        elif self.compress_type == "linear":
            l, D = self.pattern["kernel_size"], self.head_dim
            self.compress_key.copy_(torch.eye(D).repeat(l, 1).expand(self.num_kv_heads, l * D, D) / l)
            self.compress_value.zero_()
        self.intra_block_pe.zero_()
        self.gate.weight.zero_()

    def forward(self, h, q, k, v, ctx):
        """The decoder layer's attention interface (model.py): rows in the layer's order, q and k before RoPE; ctx the
        pack's model.PackAttention. NSA works in pack order (after a KV cache's tokens). The gate reads each expert's
        normed rows h = (und, gen), which q/k/v keep anyway: only the [n, H, 3] gate values move to pack order."""
        g, q, k, v = ctx.pack_rows(torch.cat([gate_values(t, self.gate.weight, self.num_heads) for t in h]), q, k, v)
        return self.gated(g, q, k, v, ctx.layout, ctx.rotate, ctx.positions)[-len(ctx.where):][ctx.order]

    def attend(self, x, q, k, v, layout, rope, position_ids=None):
        """In pack order: x [L, hidden] normed hidden state (gate input), q [L, Hq, D] and k/v [L, Hkv, D] before RoPE;
        layout a model.SpanLayout; rope(t, positions) rotates [n, H, D]; position_ids [L] (default: index in sample)."""
        return self.gated(gate_values(x, self.gate.weight, self.num_heads), q, k, v, layout, rope, position_ids)

    def gated(self, g, q, k, v, layout, rope, position_ids=None):
        """attend with the gate values g [L, Hq, 3] (gate_values of x) given instead of x."""
        c = self.pattern
        L = layout.sample_start.numel()
        H, KH, D = self.num_heads, self.num_kv_heads, self.head_dim
        if q.shape != (L, H, D) or k.shape != (L, KH, D) or v.shape != (L, KH, D) or g.shape != (L, H, 3):
            raise ValueError(f"NSA expects q [{L}, {H}, {D}], k/v [{L}, {KH}, {D}] and gate [{L}, {H}, 3] for this "
                             f"pack; got {', '.join(str(tuple(t.shape)) for t in (q, k, v, g))}")
        plan = get_plan(layout, c)
        pos = torch.arange(L, device=q.device) - layout.sample_start if position_ids is None else position_ids
        w_k, w_v = getattr(self, "compress_key", None), getattr(self, "compress_value", None)
        backend = self.backend or ("triton" if q.is_cuda else "torch")
        if backend == "torch" or self.compress_type == "linear":
            args = (layout.cu_seqlens, c["kernel_size"], c["kernel_stride"], self.compress_type)
            ck = compress(k, w_k, *args, pe=self.intra_block_pe, starts=plan.window_starts)
            cv = compress(v, w_v, *args, starts=plan.window_starts)
        else:
            args = (plan, c["kernel_size"], c["kernel_stride"])
            ck = compress_triton(k, w_k, *args, pe=self.intra_block_pe)
            cv = compress_triton(v, w_v, *args)
        ck = rope(ck, pos[plan.window_starts])
        q, k = rope(q, pos), rope(k, pos)
        scale = self.head_dim ** -0.5
        if backend != "torch":
            return _NSAAttention.apply(q, k, v, ck, cv, g, plan, c, scale, self.recompute_branches)
        o_cmp, o_slc, o_swa = nsa_reference(q, k, v, ck, cv, layout, c, scale)
        g = g.to(o_cmp.dtype)
        return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_swa


if __name__ == "__main__":
    raise SystemExit("nsa.py is a library; its command line: python bench.py nsa check|init|bench|breakdown|sweep")
