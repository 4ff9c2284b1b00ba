"""NSA tests (CPU): the torch reference against the library's golden fixture, the Triton kernels (run by the
Triton interpreter) against the torch reference on packs with causal, full and noise spans, and the masking
semantics against model.SpanLayout.dense_mask."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import model  # noqa: E402

# Without a GPU, nsa's kernels are built for the Triton interpreter (exact fp32 on the CPU, as in CI) and run under
# it during these tests only. On a CUDA machine they stay compiled for the GPU (test_gpu_bf16_kernels_match_reference
# checks them there): switching Triton to the interpreter inside a process that also compiles for the GPU breaks the
# other tests' torch.compile.
if importlib.util.find_spec("triton") is None:  # found, not imported: Triton reads TRITON_INTERPRET when imported
    pytest.skip("nsa.py's kernels need triton (installed on Linux only)", allow_module_level=True)
ON_GPU = torch.cuda.is_available()
_saved = os.environ.get("TRITON_INTERPRET")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
import nsa  # noqa: E402
import triton  # noqa: E402

PROBE = """
import torch, triton, triton.language as tl
@triton.jit
def loop_to_loaded_bound(X):
    for i in range(0, tl.load(X)):
        tl.store(X + 1, i)
x = torch.tensor([2, 0], dtype=torch.int32)
loop_to_loaded_bound[(1,)](x)
assert x[1] == 1
"""


def _interpreter_runs_nsa():
    """The kernels loop to bounds they load; Triton 3.6's interpreter cannot (3.9's can)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True).returncode == 0


if ON_GPU:
    needs_interpreter = pytest.mark.skip(reason="CUDA machine: nsa's kernels are compiled for the GPU here; the exact "
                                         "fp32 interpreter tests run where there is no GPU (CI)")
else:
    needs_interpreter = pytest.mark.skipif(not _interpreter_runs_nsa(), reason=f"Triton {triton.__version__}'s "
                                           "interpreter cannot loop to loaded bounds (requirements.txt pins one "
                                           "that can)")
    if _saved is None:
        os.environ.pop("TRITON_INTERPRET")
    else:
        os.environ["TRITON_INTERPRET"] = _saved
    assert nsa.INTERPRET, "nsa was imported before this module could build its kernels for the Triton interpreter"


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    if not ON_GPU:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter reads it again at every launch


FIXTURE = Path(__file__).parent / "fixtures" / "nsa_reference"


def rope_table(inv_freq):
    """Rotate-half RoPE with the given inverse frequencies, as rope(t [n, H, D], positions [n])."""
    def rope(t, pos):
        ang = pos.double()[:, None] * inv_freq.double()[None]
        cos = torch.cat([ang.cos()] * 2, -1)[:, None].to(t.dtype)
        sin = torch.cat([ang.sin()] * 2, -1)[:, None].to(t.dtype)
        half = t.shape[-1] // 2
        return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin
    return rope


def rope_default(D):
    return rope_table(1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D))


def no_rope(t, pos):
    return t


# ----------------------------------------------------------------------------------------------
# Golden fixture (library semantics, causal packs)

@pytest.fixture(scope="module")
def golden():
    C = json.loads((FIXTURE / "cases.json").read_text())
    I = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(FIXTURE / "inputs.safetensors").items()}
    E = load_file(FIXTURE / "expected.safetensors")
    seqlens = C["dims"]["seqlens"]
    layout = model.span_layout(seqlens, seqlens, ["causal"] * len(seqlens))
    assert torch.equal(layout.cu_seqlens, I["cu_seqlens"].int())
    return C, I, E, layout


def get(I, E, name):
    return I[name] if name in I else E[name]


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=tol)


def check_kinds(C):
    return sorted({ch["kind"] for ch in C["checks"]})


def test_fixture_checks_are_all_handled(golden):
    C = golden[0]
    assert set(check_kinds(C)) <= {"compress_forward", "compress_backward", "compressed_attention", "selection",
                                   "selected_attention", "sliding_window", "gate", "pipeline"}


def _compress_args(C, ch, I, E):
    w_k = None if ch["inputs"].get("w_k") is None else get(I, E, ch["inputs"]["w_k"])
    w_v = None if ch["inputs"].get("w_v") is None else get(I, E, ch["inputs"]["w_v"])
    return w_k, w_v


def _compressed_inputs(C, compress_type):
    fwd = [ch for ch in C["checks"] if ch["kind"] == "compress_forward" and ch["compress_type"] == compress_type][0]
    return fwd


def test_compression(golden):
    C, I, E, layout = golden
    cfg = C["config"]
    cu, l, d = I["cu_seqlens"], cfg["kernel_size"], cfg["kernel_stride"]
    rows = E["rows"]
    for ch in [c for c in C["checks"] if c["kind"] == "compress_forward"]:
        w_k, w_v = _compress_args(C, ch, I, E)
        ck = nsa.compress(I[ch["inputs"]["k"]], w_k, cu, l, d, ch["compress_type"], I[ch["inputs"]["pe"]])
        cv = nsa.compress(I[ch["inputs"]["v"]], w_v, cu, l, d, ch["compress_type"])
        close(ck, E[ch["expected"]["ck"]])
        close(cv, E[ch["expected"]["cv"]])
        if "ck_rope" in ch["expected"] and "rope.inv_freq" in E:
            pos = nsa.window_starts(cu, l, d) - layout.sample_start[nsa.window_starts(cu, l, d)]
            close(rope_table(E["rope.inv_freq"])(ck, pos), E[ch["expected"]["ck_rope"]], 5e-5)
    for ch in [c for c in C["checks"] if c["kind"] == "compress_backward"]:
        fwd = _compressed_inputs(C, ch["compress_type"])
        w_k, w_v = _compress_args(C, fwd, I, E)
        leaves = {"dk": I[fwd["inputs"]["k"]].clone(), "dv": I[fwd["inputs"]["v"]].clone(),
                  "dpe": I[fwd["inputs"]["pe"]].clone(), "dw_k": w_k, "dw_v": w_v}
        leaves = {n: t.clone().requires_grad_() for n, t in leaves.items() if t is not None}
        ck = nsa.compress(leaves["dk"], leaves.get("dw_k"), cu, l, d, ch["compress_type"], leaves["dpe"])
        cv = nsa.compress(leaves["dv"], leaves.get("dw_v"), cu, l, d, ch["compress_type"])
        ((ck * get(I, E, ch["upstream"]["ck"])).sum() + (cv * get(I, E, ch["upstream"]["cv"])).sum()).backward()
        for name, ref in ch["expected"].items():
            g = leaves[name].grad
            close(g[rows] if name in ("dk", "dv") else g, E[ref], 2e-5)


def _relative_columns(x, layout, C, width):
    """[H, N, NC] over global compressed keys -> [H, N, width] over each token's sample-relative keys."""
    cfg = C["config"]
    nc = nsa.compressed_lengths(layout.cu_seqlens, cfg["kernel_size"], cfg["kernel_stride"])
    ccu = torch.nn.functional.pad(nc.cumsum(0), (1, 0))
    sample = torch.searchsorted(layout.cu_seqlens.long(), torch.arange(x.shape[1]), right=True) - 1
    cols = ccu[sample][:, None] + torch.arange(width)[None]
    ok = torch.arange(width)[None] < nc[sample][:, None]
    out = x.gather(2, cols.clamp(max=x.shape[2] - 1).expand(x.shape[0], -1, -1))
    return torch.where(ok, out, 0.0)


def test_compressed_attention_and_selection(golden):
    C, I, E, layout = golden
    cfg = C["config"]
    rows = E["rows"]
    scale = C["dims"]["head_dim"] ** -0.5
    HK = C["dims"]["num_kv_heads"]
    cvis = nsa.compressed_visibility(layout, cfg["kernel_size"], cfg["kernel_stride"])
    for ch in [c for c in C["checks"] if c["kind"] == "compressed_attention"]:
        q, ck, cv = (get(I, E, ch["inputs"][n]).clone().requires_grad_() for n in ("q", "ck", "cv"))
        o, probs = nsa._masked_attention(q, ck, cv, cvis[None], scale)
        (o * get(I, E, ch["inputs"]["do"])).sum().backward()
        ex = ch["expected"]
        close(o[rows], E[ex["o"]])
        close(ck.grad, E[ex["dck"]])
        close(cv.grad, E[ex["dcv"]])
        if "dq" in ex:
            close(q.grad[rows], E[ex["dq"]])
        score = probs.detach().view(HK, -1, *probs.shape[1:]).sum(1)
        close(_relative_columns(score, layout, C, E[ex["score"]].shape[2])[:, rows], E[ex["score"]])
    for ch in [c for c in C["checks"] if c["kind"] == "selection"]:
        q, ck = get(I, E, ch["inputs"]["q"]), get(I, E, ch["inputs"]["ck"])
        _, probs = nsa._masked_attention(q, ck, ck, cvis[None], scale)
        raw, score = nsa.block_scores_ref(probs, layout, HK, cfg["kernel_size"], cfg["kernel_stride"],
                                          cfg["block_size"], cfg["init_blocks"], cfg["local_blocks"])
        ex = ch["expected"]
        close(raw, E[ex["block_score_raw"]])
        want = E[ex["block_score"]]
        selectable = score > float("-inf")
        close(score[selectable], want[selectable])
        assert (want[~selectable] == 0).all()  # the library's unselectable (future) blocks score 0
        idx = nsa.select_blocks(score, ch["topk"])
        keep = torch.ones(idx.shape[1], dtype=torch.bool)
        keep[torch.tensor(ch.get("exclude_rows", []), dtype=torch.long)] = False
        assert idx.shape == E[ex["idx"]].shape
        assert torch.equal(idx[:, keep], E[ex["idx"]][:, keep])


def test_selected_and_sliding_attention(golden):
    C, I, E, layout = golden
    cfg = C["config"]
    rows = E["rows"]
    scale = C["dims"]["head_dim"] ** -0.5
    for ch in [c for c in C["checks"] if c["kind"] == "selected_attention"]:
        q, k, v = (get(I, E, ch["inputs"][n]).clone().requires_grad_() for n in ("q", "k", "v"))
        mask = nsa.selected_mask(layout, get(I, E, ch["inputs"]["idx"]), cfg["block_size"])
        o, _ = nsa._masked_attention(q, k, v, mask, scale)
        (o * get(I, E, ch["inputs"]["do"])).sum().backward()
        for name, t in [("o", o), ("dq", q.grad), ("dk", k.grad), ("dv", v.grad)]:
            close(t.detach()[rows], E[ch["expected"][name]])
    for ch in [c for c in C["checks"] if c["kind"] == "sliding_window"]:
        q, k, v = (get(I, E, ch["inputs"][n]) for n in ("q", "k", "v"))
        o, _ = nsa._masked_attention(q, k, v, nsa.window_mask(layout, ch["window_size"])[None], scale)
        close(o[rows], E[ch["expected"]["o"]])
    for ch in [c for c in C["checks"] if c["kind"] == "gate"]:
        g = nsa.gate_values(get(I, E, ch["inputs"]["x"]), get(I, E, ch["inputs"]["weight"]), C["dims"]["num_q_heads"])
        close(g[rows], E[ch["expected"]["gate"]])


def test_pipelines_end_to_end(golden):
    """The NSA module (torch backend) with the fixture's parameters reproduces each stored final output."""
    C, I, E, layout = golden
    cfg, dims = C["config"], C["dims"]
    rows = E["rows"]
    for ch in [c for c in C["checks"] if c["kind"] == "pipeline"]:
        fwd = _compressed_inputs(C, ch["compress_type"])
        m = nsa.NSA(dims["hidden"], dims["num_q_heads"], dims["num_kv_heads"], dims["head_dim"],
                    block_size=cfg["block_size"], compress_type=ch["compress_type"], kernel_size=cfg["kernel_size"],
                    kernel_stride=cfg["kernel_stride"], topk=ch["topk"], init_blocks=cfg["init_blocks"],
                    local_blocks=cfg["local_blocks"], window_size=ch["window_size"], backend="torch")
        w_k, w_v = _compress_args(C, fwd, I, E)
        gate = [c for c in C["checks"] if c["kind"] == "gate"][0]
        with torch.no_grad():
            if w_k is not None:
                m.compress_key.copy_(w_k)
                m.compress_value.copy_(w_v)
            m.intra_block_pe.copy_(I[fwd["inputs"]["pe"]])
            m.gate.weight.copy_(get(I, E, gate["inputs"]["weight"]))
            o = m.attend(I[gate["inputs"]["x"]], I["q"], I["k"], I["v"], layout, no_rope)
        close(o[rows], E[ch["final_output"]])


# ----------------------------------------------------------------------------------------------
# Triton kernels (interpreter, fp32) against the torch reference

CFG = dict(block_size=16, kernel_size=8, kernel_stride=4, init_blocks=1, local_blocks=2)

PACKS = {
    # samples (lengths) and spans (lengths, modes) tiling them
    "mixed_spans": ([70, 5, 45], [20, 30, 20, 5, 10, 25, 10],
                    ["causal", "full", "causal", "causal", "causal", "noise", "causal"]),
    "noise_then_text_partial_blocks": ([83, 21], [9, 40, 34, 13, 8], ["causal", "noise", "causal", "full", "causal"]),
    "many_tiny_samples": ([3, 7, 1, 12, 9, 2, 17, 6, 4, 11], [3, 7, 1, 5, 7, 9, 2, 17, 6, 4, 11],
                          ["causal", "full", "causal", "causal", "noise", "causal", "causal", "full", "causal",
                           "causal", "causal"]),
    "all_shorter_than_kernel": ([5, 7, 3], [5, 4, 3, 3], ["causal", "causal", "full", "noise"]),
    "long_causal": ([100, 12], [100, 12], ["causal", "causal"]),
}


def random_module(H, KH, D, hidden, compress_type="weightedpool", **kw):
    m = nsa.NSA(hidden, H, KH, D, compress_type=compress_type, **kw)
    with torch.no_grad():  # away from the near-dense init, so that every branch and parameter matters
        for p in m.parameters():
            p.normal_(0, 0.3)
        if compress_type == "linear":
            m.compress_key.normal_(0, (kw["kernel_size"] * D) ** -0.5)
            m.compress_value.normal_(0, (kw["kernel_size"] * D) ** -0.5)
    return m


def run_both(m, layout, H, KH, D, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = layout.sample_start.numel()
    x = torch.randn(N, m.gate.in_features, generator=g)
    q, k, v = (torch.randn(N, h, D, generator=g) for h in (H, KH, KH))
    do = torch.randn(N, H, D, generator=g)
    pos = torch.randint(0, 50, (N,), generator=g)
    out = {}
    for backend in ("torch", "triton"):
        m.backend = backend
        m.zero_grad()
        leaves = [t.clone().requires_grad_() for t in (x, q, k, v)]
        o = m.attend(*leaves, layout, rope_default(D), position_ids=pos)
        (o * do).sum().backward()
        out[backend] = [("o", o.detach())] + [(n, t.grad) for n, t in zip("xqkv", leaves)] + \
                       [(n, p.grad.clone()) for n, p in m.named_parameters()]
    return out


@needs_interpreter
@pytest.mark.parametrize("pack,compress_type,topk,window,D", [
    ("mixed_spans", "weightedpool", 3, 40, 16),
    ("noise_then_text_partial_blocks", "linear", 4, 40, 12),  # head_dim not a power of two
    ("long_causal", "weightedpool", 4, 40, 16),  # key tiles that need no mask (kernels' fast path)
    ("many_tiny_samples", "avgpool", 16, 8, 16),  # samples shorter than kernel and block, topk above the block count
    ("all_shorter_than_kernel", "weightedpool", 3, 4, 16),  # no compressed key at all
])
def test_triton_matches_reference(pack, compress_type, topk, window, D):
    H, KH = 6, 2
    layout = model.span_layout(*PACKS[pack])
    m = random_module(H, KH, D, 24, compress_type, topk=topk, window_size=window, **CFG)
    out = run_both(m, layout, H, KH, D)
    for (name, ref), (_, tri) in zip(out["torch"], out["triton"]):
        torch.testing.assert_close(tri, ref, atol=2e-5, rtol=2e-5, msg=f"{pack}: {name}")


@needs_interpreter
def test_triton_branches_on_fixture(golden):
    """The kernels on the library's own causal case: compressed output/scores/selection and selected and
    sliding outputs equal the fixture (one fixture pipeline, fp32 interpreter)."""
    C, I, E, layout = golden
    cfg = C["config"]
    rows = E["rows"]
    pipe = [c for c in C["checks"] if c["kind"] == "pipeline"][-1]
    full_cfg = dict(cfg, topk=pipe["topk"], window_size=pipe["window_size"])
    fwd = _compressed_inputs(C, pipe["compress_type"])
    ck, cv = E[fwd["expected"]["ck"]], E[fwd["expected"]["cv"]]
    with torch.no_grad():  # the three branches' kernels, forward
        plan = nsa.get_plan(layout, full_cfg)
        o_cmp, o_slc, o_swa = nsa._branches_forward(I["q"], I["k"], I["v"], ck, cv, plan, full_cfg,
                                                    C["dims"]["head_dim"] ** -0.5)[0]
    close(o_cmp[rows], E[pipe["compressed_output"]])
    close(o_slc[rows], E[pipe["selected_output"]])
    close(o_swa[rows], E[pipe["sliding_output"]])


@needs_interpreter
def test_topk_kernel_matches_select_blocks():
    """_topk equals select_blocks on scores with forced (+inf), unselectable (-inf) and exactly zero blocks and rows
    with fewer selectable blocks than topk; it reads only up to each row's last block."""
    g = torch.Generator().manual_seed(5)
    layout = model.span_layout(*PACKS["mixed_spans"])
    plan = nsa.Plan(layout, 8, 4, 16, 40)
    N, NB, KH = layout.sample_start.numel(), plan.num_blocks, 2
    col = torch.arange(NB)
    tie_break = 1e-30 / (1.0 + col)  # as the kernels' scores carry it: no exact ties but between forced blocks
    score = torch.rand(KH, N, NB, generator=g) * 0.01 + tie_break
    score = torch.where(torch.rand(KH, N, NB, generator=g) < 0.2, tie_break, score)  # zero probability mass
    score[torch.rand(KH, N, NB, generator=g) < 0.3] = float("-inf")
    score[:, :, 0] = float("inf")  # forced, as block 0 and the query's own block are
    score[:, torch.arange(N), plan.last_block.long()] = float("inf")
    ref = score.masked_fill(col > plan.last_block.long()[:, None], float("-inf"))
    garbage = score.masked_fill(col > plan.last_block.long()[:, None], 5.0)  # never written: must not be read
    for topk in (2, 3, NB + 2):
        torch.testing.assert_close(nsa.select_blocks_triton(garbage, topk, plan), nsa.select_blocks(ref, topk))
    # rows of up to 32 columns (8 chunks at the interpreter's chunk width) and exact ties everywhere: the first of
    # equal columns wins, as a stable sort picks
    layout = model.span_layout([450], [450], ["causal"])
    plan = nsa.Plan(layout, 8, 4, 16, 40)
    N, NB = 450, plan.num_blocks
    col = torch.arange(NB)
    score = torch.randint(0, 3, (KH, N, NB), generator=g).float()
    score[torch.rand(KH, N, NB, generator=g) < 0.2] = float("-inf")
    unseen = col > plan.last_block.long()[:, None]
    ref = score.masked_fill(unseen, float("-inf"))
    for topk in (1, 5, 16):
        order = torch.sort(-ref, dim=-1, stable=True).indices[..., :topk]
        chosen = torch.where(ref.gather(-1, order) > float("-inf"), order, nsa.BIG).sort(-1).values
        want = torch.where(chosen == nsa.BIG, -1, chosen).int()
        torch.testing.assert_close(nsa.select_blocks_triton(score.masked_fill(unseen, 9.0), topk, plan), want)


@needs_interpreter
@pytest.mark.parametrize("compress_type", ["weightedpool", "avgpool"])
def test_pool_kernels_match_compress(compress_type):
    """compress_triton (the pool kernels) equals compress, output and the gradients of x, w and pe, on packs with
    samples shorter than the kernel, a head dim that is not a power of two, and kernels of 2 and 3 strides."""
    g = torch.Generator().manual_seed(7)
    for pack in ("mixed_spans", "many_tiny_samples"):
        for kernel_size, stride in ((8, 4), (12, 4)):
            layout = model.span_layout(*PACKS[pack])
            plan = nsa.Plan(layout, kernel_size, stride, 16, 40)
            N, H, D = layout.sample_start.numel(), 2, 12
            inputs = {"x": torch.randn(N, H, D, generator=g), "pe": torch.randn(H, kernel_size, D, generator=g)}
            if compress_type == "weightedpool":
                inputs["w"] = torch.randn(H, kernel_size, generator=g)
            dout = torch.randn(len(plan.window_starts), H, D, generator=g)
            out = {}
            for backend in ("torch", "triton"):
                t = {n: v.clone().requires_grad_() for n, v in inputs.items()}
                if backend == "torch":
                    o = nsa.compress(t["x"], t.get("w"), layout.cu_seqlens, kernel_size, stride, compress_type, t["pe"])
                else:
                    o = nsa.compress_triton(t["x"], t.get("w"), plan, kernel_size, stride, t["pe"])
                (o * dout).sum().backward()
                out[backend] = [o.detach()] + [t[n].grad for n in sorted(t)]
            for ref, tri in zip(out["torch"], out["triton"]):
                torch.testing.assert_close(tri, ref, atol=2e-5, rtol=2e-5, msg=f"{pack} {kernel_size}/{stride}")


def test_chunked_reference_equals_whole():
    """nsa_reference over chunks of 7 query rows (each recomputed in backward: what holds a layer's reference at 32k
    to a few GB) equals it in one piece: the three branches and the gradients of q, k, v, the compressed keys and
    values and the gates, on a pack whose chunks cut through samples and spans."""
    H, KH, D = 6, 2, 16
    layout = model.span_layout(*PACKS["mixed_spans"])
    pattern = nsa.NSA(1, H, KH, D, topk=3, window_size=40, **CFG).pattern
    N = layout.sample_start.numel()
    NC = len(nsa.window_starts(layout.cu_seqlens, pattern["kernel_size"], pattern["kernel_stride"]))
    g = torch.Generator().manual_seed(6)
    inputs = [torch.randn(s, generator=g) for s in ((N, H, D), (N, KH, D), (N, KH, D), (NC, KH, D), (NC, KH, D))]
    inputs.append(torch.rand(N, H, 3, generator=g))
    do = torch.randn(N, H, D, generator=g)
    results = []
    for chunk in (N, 7):
        leaves = [t.clone().requires_grad_() for t in inputs]
        branches = nsa.nsa_reference(*leaves[:5], layout, pattern, D ** -0.5, chunk=chunk)
        sum(leaves[5][..., b:b + 1] * o for b, o in enumerate(branches)).backward(do)
        results.append([o.detach() for o in branches] + [t.grad for t in leaves])
    names = ("o_cmp", "o_slc", "o_swa", "dq", "dk", "dv", "dck", "dcv", "dgate")
    for name, whole, chunked in zip(names, *results):
        assert whole.abs().sum() > 0, name
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5, msg=lambda m: f"{name}: {m}")


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_layer_check_at_tiny_width(monkeypatch, dtype):
    """bench.py's `nsa layer` check (a decoder layer with both experts, the kernels against the reference) at the
    bagel_tiny fixture's width, on its case with the most kinds of spans, the reference over chunks of 5 query rows:
    the kernels in fp32 (interpreter) agree with it to fp32 rounding (the floor, fp32 with the reference, is 0); in
    fp16 every error is at most twice the floor, the same layer in fp16 with exact attention."""
    import bench
    import data
    from conftest import fixture_config_overrides, fixture_samples, load_fixture
    cases, tensors, _, _, special = load_fixture()
    cfg = model.bagel_tiny(**fixture_config_overrides(), attn_backend="nsa", nsa=dict(topk=3, window_size=8, **CFG))
    packs = [data.pack_samples(fixture_samples(c, tensors), special, cfg.max_latent_size,
                               cfg.vit_max_patches_per_side) for c in cases["cases"]]
    pack = max(packs, key=lambda p: (len(set(p.split_modes)), len(p.sample_lens), p.num_tokens))
    assert set(pack.split_modes) == {"causal", "full", "noise"} and len(pack.sample_lens) > 1
    monkeypatch.setattr(nsa, "REF_CHUNK", cfg.num_heads * pack.num_tokens * 5)
    assert bench.check_layer(cfg, pack, fast=("triton", dtype)) < (1e-5 if dtype == torch.float32 else 0.0)


# ----------------------------------------------------------------------------------------------
# Masking semantics

def random_layout(g, n_samples=3):
    sample_lens, split_lens, modes = [], [], []
    for _ in range(n_samples):
        spans = [int(x) for x in torch.randint(1, 25, (int(torch.randint(1, 5, (1,), generator=g)),), generator=g)]
        sample_lens.append(sum(spans))
        split_lens += spans
        modes += [["causal", "full", "noise"][int(i)] for i in torch.randint(0, 3, (len(spans),), generator=g)]
    return model.span_layout(sample_lens, split_lens, modes)


def test_plan_visibility_form_equals_span_layout_visible():
    """The kernels' form of the rule (key ranges + noise markers) is exactly SpanLayout.visible."""
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        layout = random_layout(g)
        plan = nsa.Plan(layout, 8, 4, 16, 10 ** 6)
        j = torch.arange(layout.sample_start.numel())[None]
        form = (j >= layout.sample_start[:, None]) & (j <= plan.hi.long()[:, None]) & \
               (plan.tok_noise.long()[None] >= plan.nlo.long()[:, None])
        assert torch.equal(form, layout.dense_mask())
        # compressed keys: the kernels' [klo, khi) + noise marker == "all tokens of the window visible"
        c = torch.arange(len(plan.c_noise))[None]
        cform = (c >= plan.c_klo.long()[:, None]) & (c < plan.c_khi.long()[:, None]) & \
                (plan.c_noise.long()[None] >= plan.nlo.long()[:, None])
        assert torch.equal(cform, nsa.compressed_visibility(layout, 8, 4))


def test_reference_gradients_vanish_on_invisible_keys():
    """d o_i / d k_j and d o_i / d v_j are zero wherever SpanLayout.dense_mask says j is invisible to i: no query sees
    another sample, a later token of a causal span, or another span's noised latents (compressed keys included)."""
    H, KH, D = 4, 2, 8
    layout = model.span_layout(*PACKS["mixed_spans"])
    mask = layout.dense_mask()
    m = random_module(H, KH, D, 12, topk=3, window_size=16, backend="torch", **CFG)
    N = layout.sample_start.numel()
    g = torch.Generator().manual_seed(3)
    x, q = torch.randn(N, 12, generator=g), torch.randn(N, H, D, generator=g)
    k, v = (torch.randn(N, KH, D, generator=g).requires_grad_() for _ in range(2))
    o = m.attend(x, q, k, v, layout, rope_default(D))
    for i in range(0, N, 2):
        dk, dv = torch.autograd.grad(o[i].sum(), (k, v), retain_graph=True)
        leak = (dk.abs().sum((1, 2)) + dv.abs().sum((1, 2)))[~mask[i]]
        assert (leak == 0).all(), f"query {i} depends on invisible keys"
        assert dv.abs().sum() > 0


@needs_interpreter
def test_triton_output_ignores_invisible_keys():
    """Perturbing tokens invisible to a set of queries (another sample, a noise span) leaves their Triton output
    bit-for-bit unchanged, selection included."""
    H, KH, D = 4, 2, 8
    layout = model.span_layout(*PACKS["noise_then_text_partial_blocks"])
    mask = layout.dense_mask()
    m = random_module(H, KH, D, 12, topk=3, window_size=16, backend="triton", **CFG)
    N = layout.sample_start.numel()
    g = torch.Generator().manual_seed(4)
    x, q = torch.randn(N, 12, generator=g), torch.randn(N, H, D, generator=g)
    k, v = torch.randn(N, KH, D, generator=g), torch.randn(N, KH, D, generator=g)
    queries = torch.arange(49, 83)  # the text span after the noise span of sample 0
    hidden = ~mask[queries].any(0)
    assert hidden[9:49].all() and hidden[83:].all()
    with torch.no_grad():
        o = m.attend(x, q, k, v, layout, rope_default(D))
        k2, v2 = k.clone(), v.clone()
        k2[hidden] += 5 * torch.randn(int(hidden.sum()), KH, D, generator=g)
        v2[hidden] += 5 * torch.randn(int(hidden.sum()), KH, D, generator=g)
        o2 = m.attend(x, q, k2, v2, layout, rope_default(D))
    assert torch.equal(o[queries], o2[queries])
    assert not torch.equal(o, o2)


@needs_interpreter
def test_init_is_dense_attention_on_short_samples():
    """At initialisation (o_cmp = 0, gates 0.5) NSA equals dense masked attention when the window and the top-k
    blocks cover every sample (both backends; head_dim 8 is padded to the kernels' 16)."""
    H, KH, D = 4, 2, 8
    layout = model.span_layout([40, 23], [10, 18, 12, 23], ["causal", "full", "causal", "noise"])
    N = layout.sample_start.numel()
    g = torch.Generator().manual_seed(5)
    x, q = torch.randn(N, 12, generator=g), torch.randn(N, H, D, generator=g)
    k, v = torch.randn(N, KH, D, generator=g), torch.randn(N, KH, D, generator=g)
    rope = rope_default(D)
    pos = torch.arange(N) - layout.sample_start
    dense, _ = nsa._masked_attention(rope(q, pos), rope(k, pos), v, layout.dense_mask()[None], D ** -0.5)
    for backend in ("torch", "triton"):
        m = nsa.NSA(12, H, KH, D, topk=3, window_size=40, backend=backend, **CFG)
        with torch.no_grad():
            torch.testing.assert_close(m.attend(x, q, k, v, layout, rope), dense, atol=1e-5, rtol=1e-5)


def test_shape_mismatch_is_a_clear_error():
    layout = model.span_layout([10], [10], ["causal"])
    m = nsa.NSA(8, 4, 2, 8, block_size=16, kernel_size=8, kernel_stride=4, topk=3, window_size=8)
    with pytest.raises(ValueError, match="NSA expects"):
        m.attend(torch.randn(10, 8), torch.randn(10, 4, 8), torch.randn(9, 2, 8), torch.randn(10, 2, 8), layout, no_rope)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_kernels_match_reference():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, str(Path(nsa.__file__).parent / "bench.py"), "nsa", "check"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_launch_retries_with_one_stage_then_explains():
    """A launch shape that needs more shared memory than the GPU has (an H100 tuning on a smaller GPU) is retried
    with one pipeline stage; if that does not fit either, the error says how to choose smaller tiles."""
    from triton.runtime.errors import OutOfResources

    class Kernel:  # stands in for a @triton.jit function: kernel[grid](*args, **meta)
        __name__ = "_fake"

        def __init__(self, fits_at):
            self.fits_at, self.calls = fits_at, []

        def __getitem__(self, grid):
            def launch(*args, **meta):
                self.calls.append(meta.get("num_stages"))
                if meta.get("num_stages") != self.fits_at:
                    raise OutOfResources(300000, 232448, "shared memory")
                return "ran"
            return launch

    k = Kernel(fits_at=1)
    assert nsa._launch(k, (1,), 0, num_warps=4, num_stages=3) == "ran" and k.calls == [3, 1]
    k = Kernel(fits_at=None)
    with pytest.raises(RuntimeError, match="NSA_TILES"):
        nsa._launch(k, (1,), num_stages=2)
    assert k.calls == [2, 1]


def op_case(pack):
    """The NSA op at tiny width on one of PACKS: its pattern and plan, seeded inputs q, k, v, ck, cv and the gate (in
    (0, 1)), and an output gradient."""
    H, KH, D = 6, 2, 16
    layout = model.span_layout(*PACKS[pack])
    pattern = nsa.NSA(1, H, KH, D, topk=4, window_size=40, **CFG).pattern
    plan = nsa.get_plan(layout, pattern)
    N, NC = layout.sample_start.numel(), plan.window_starts.numel()
    g = torch.Generator().manual_seed(0)
    shapes = [(N, H, D), (N, KH, D), (N, KH, D), (NC, KH, D), (NC, KH, D), (N, H, 3)]
    inputs = [torch.randn(s, generator=g) for s in shapes]
    inputs[5] = inputs[5].sigmoid()
    return pattern, plan, inputs, torch.randn(N, H, D, generator=g)


@needs_interpreter
def test_recomputed_branches_give_the_same_output_and_gradients():
    """recompute_branches: the backward reruns the branches from the saved selection instead of keeping them: the
    same output and gradients, bit for bit, and less kept for the backward by exactly the three branch outputs, their
    log-sum-exps and the selected branch's per-slot log-sum-exps (shapes from the pattern)."""
    pattern, plan, inputs, do = op_case("mixed_spans")
    (N, H, D), slots = inputs[0].shape, min(pattern["topk"], plan.num_blocks)
    results, kept = [], []
    for recompute in (False, True):
        leaves = [t.clone().requires_grad_() for t in inputs]
        saved = {}

        def keep(t):  # each storage once
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            o = nsa._NSAAttention.apply(*leaves, plan, pattern, D ** -0.5, recompute)
        o.backward(do)
        results.append([o.detach()] + [t.grad for t in leaves])
        kept.append(sum(saved.values()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert kept[0] - kept[1] == 3 * N * H * D * 4 + 3 * H * N * 4 + N * slots * H * 4


@needs_interpreter
def test_unaligned_inputs_take_the_pointer_path():
    """q, k, v, compressed keys/values and do as views at an odd storage offset (a slice of a fused projection, a
    tensor read at an odd file offset) cannot go through TMA descriptors (16-byte aligned bases): the same results
    as aligned copies, forward and backward."""
    pattern, plan, aligned, do = op_case("long_causal")
    D = aligned[0].shape[-1]
    odd = [torch.empty(t.numel() + 1)[1:].view(t.shape).copy_(t) for t in aligned]  # 4 bytes past a 16-byte boundary
    assert all(t.data_ptr() % 16 for t in odd)
    results = []
    for inputs in (aligned, odd):
        leaves = [t.clone() if t is aligned[5] else t for t in inputs]
        leaves = [t.requires_grad_() for t in leaves]
        o = nsa._NSAAttention.apply(*leaves, plan, pattern, D ** -0.5)
        o.backward(torch.empty(do.numel() + 1)[1:].view(do.shape).copy_(do) if inputs is odd else do)
        results.append([o.detach()] + [t.grad for t in leaves])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
