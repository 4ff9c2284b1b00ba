"""GPU checks (skipped without CUDA): the fixture in float32 on the GPU, the fast attention path (flex for the LLM,
varlen for the ViT) against the exact dense-mask SDPA, forward and backward, in float32 and bf16; each ViT attention
backend and the VAE's compiled GroupNorm against float64."""
import copy

import pytest
import torch
import torch.nn.functional as F

import data
import model as M
from conftest import LOSS, fixture_samples, inspect_forward, load_fixture, load_tiny

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def setup():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    bagel, _, cfg = load_tiny(device="cuda")
    cases, tensors, expected, _, special = load_fixture()
    return bagel, cfg, cases, tensors, expected, special


def losses_and_grads(bagel, pack):
    bagel.zero_grad()
    out = inspect_forward(bagel, pack)
    (out["ce"].sum() + out["mse"].sum()).backward()
    return out, {n: p.grad.clone() for n, p in bagel.named_parameters() if p.grad is not None}


def test_fixture_on_gpu_and_flex_matches_sdpa(setup):
    bagel, cfg, cases, tensors, E, special = setup
    for case in cases["cases"]:
        pack = data.pack_samples(fixture_samples(case, tensors), special).to("cuda")
        bagel.cfg.attn_backend = "sdpa"
        ref, ref_grads = losses_and_grads(bagel, pack)
        torch.testing.assert_close(ref["ce"].cpu(), E[f"{case['name']}.ce_per_token"], **LOSS)
        bagel.cfg.attn_backend = "flex"
        out, grads = losses_and_grads(bagel, pack)
        torch.testing.assert_close(out["hidden"], ref["hidden"], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out["ce"], ref["ce"], atol=1e-4, rtol=1e-4)
        for n, g in ref_grads.items():
            torch.testing.assert_close(grads[n], g, atol=1e-4, rtol=1e-3, msg=lambda m: f"{n}: {m}")
    bagel.cfg.attn_backend = "sdpa"


def test_flex_bf16_close_to_sdpa_bf16(setup):
    bagel, cfg, cases, tensors, E, special = setup
    case = max(cases["cases"], key=lambda c: len(c["samples"]))
    pack = data.pack_samples(fixture_samples(case, tensors), special).to("cuda")
    bagel.to(torch.bfloat16)
    try:
        bagel.cfg.attn_backend = "sdpa"
        ref = inspect_forward(bagel, pack)["hidden"].float()
        bagel.cfg.attn_backend = "flex"
        out = inspect_forward(bagel, pack)["hidden"].float()
    finally:
        bagel.to(torch.float32)
        bagel.cfg.attn_backend = "sdpa"
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()


@pytest.mark.parametrize("backend", ["flash", "cudnn"])
def test_vit_attention_on_the_gpu_is_the_float64_attention(backend):
    """Each ViT attention backend in bf16, on images of several sizes with SigLIP's head shape: the output and the
    q/k/v gradients against float64 SDPA image by image, within twice the error of rounding the float64 result to
    bf16 (FlashAttention-2's varlen kernel measured 2.3e-3 on five 980 px images, where that rounding is ~1.7e-3)."""
    cfg = M.PRESETS["7b"]()
    H, D = cfg.vit_num_heads, cfg.vit_hidden_size // cfg.vit_num_heads
    lens = [729, 1024, 37, 1296]  # 378-504 px images, and an odd length
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(sum(lens), H, D, generator=g, dtype=torch.float64) for _ in range(4))
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in image)).transpose(0, 1)
                     for image in zip(*(t.split(lens) for t in (qd, kd, vd)))])
    ref.backward(grad)
    qb, kb, vb = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = M.vit_attention(lens, qb.device, torch.bfloat16, backend)(qb, kb, vb)
    out.backward(grad.to("cuda", torch.bfloat16))
    err = lambda got, want: ((got.cpu().double() - want).norm() / want.norm()).item()
    for name, got, want in (("out", out, ref), ("dq", qb.grad, qd.grad), ("dk", kb.grad, kd.grad),
                            ("dv", vb.grad, vd.grad)):
        rounding = err(want.to(torch.bfloat16), want)
        assert err(got, want) <= 2 * rounding, (name, err(got, want), rounding)


def test_vae_group_norm_on_the_gpu_is_the_float64_norm():
    """model.GroupNorm runs compiled on CUDA, SiLU fused: against float64 F.group_norm on the CPU, one image and
    several, odd sizes, with and without SiLU; fp32 to float round-off, bf16 within 1.05x the error of CUDA's own
    bf16 norm followed by SiLU."""
    torch.manual_seed(0)
    norm = M.GroupNorm(32, 64, eps=1e-6)
    torch.nn.init.normal_(norm.weight, 1.0, 0.2)
    torch.nn.init.normal_(norm.bias, 0.0, 0.2)
    w, b = norm.weight.detach().double(), norm.bias.detach().double()
    n32, n16 = copy.deepcopy(norm).to("cuda"), copy.deepcopy(norm).to("cuda", torch.bfloat16)
    for shape in [(1, 64, 40, 24), (3, 64, 33, 17), (1, 64, 256, 256)]:
        x = torch.randn(shape) * 2 + 0.5
        for silu in (False, True):
            ref = F.group_norm(x.double(), 32, w, b, 1e-6)
            ref = F.silu(ref) if silu else ref
            with torch.no_grad():
                got32 = n32(x.cuda(), silu=silu).cpu().double()
                torch.testing.assert_close(got32, ref, atol=2e-5, rtol=1e-5)
                x16 = x.to("cuda", torch.bfloat16)
                got16 = n16(x16, silu=silu).cpu().double()
                own = F.group_norm(x16, 32, n16.weight, n16.bias, 1e-6)
                own = (F.silu(own) if silu else own).cpu().double()
            err = lambda t: ((t - ref).norm() / ref.norm()).item()
            assert err(got16) <= 1.05 * err(own), (shape, silu, err(got16), err(own))
