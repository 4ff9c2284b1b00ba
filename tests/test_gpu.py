"""GPU checks (skipped without CUDA): the fixture in float32 on the GPU, the fast attention path (flex for the LLM,
varlen for the ViT) against the exact dense-mask SDPA, forward and backward, in float32 and bf16; the ViT's attention
and the VAE's compiled GroupNorm against float64, and what selective checkpointing keeps."""
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


def flash_in_bf16(q, k, v, grad):
    """One image's attention [L, H, D] in float64 with FlashAttention-2's bf16 roundings (rounding P, and dS in the
    backward, before their matmuls; the results rounded to bf16): the error a correct bf16 kernel is expected to
    have. -> out, dq, dk, dv."""
    bf = lambda t: t.to(torch.bfloat16).double()
    q, k, v, grad = (bf(t).transpose(0, 1) for t in (q, k, v, grad))
    scale = q.shape[-1] ** -0.5
    s = q @ k.transpose(1, 2) * scale
    p = torch.softmax(s, -1)
    m = s.amax(-1, keepdim=True)
    unnormalised = torch.exp(s - m)
    out = bf((bf(unnormalised) @ v) / unnormalised.sum(-1, keepdim=True))
    dv = bf(p).transpose(1, 2) @ grad
    ds = bf(p * (grad @ v.transpose(1, 2) - (grad * out).sum(-1, keepdim=True)))
    dq, dk = ds @ k * scale, ds.transpose(1, 2) @ q * scale
    return [bf(t).transpose(0, 1) for t in (out, dq, dk, dv)]


def test_vit_attention_on_the_gpu_is_the_float64_attention():
    """The ViT's varlen attention in bf16, on images of several sizes with SigLIP's head shape: the output and the
    q/k/v gradients against float64 SDPA image by image, within twice the error of the same attention computed in
    float64 with FlashAttention-2's bf16 roundings (a correct kernel's error, modelled independently)."""
    cfg = M.PRESETS["7b"]()
    H, D = cfg.vit_num_heads, cfg.vit_hidden_size // cfg.vit_num_heads
    lens = [729, 1024, 37, 1296]  # 378-504 px images, and an odd length
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(sum(lens), H, D, generator=g, dtype=torch.float64) for _ in range(4))
    qd, kd, vd = (t.clone().requires_grad_() for t in (q, k, v))
    ref = torch.cat([F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in image)).transpose(0, 1)
                     for image in zip(*(t.split(lens) for t in (qd, kd, vd)))])
    ref.backward(grad)
    modelled = [torch.cat(t) for t in zip(*(flash_in_bf16(*image) for image in zip(*(t.split(lens)
                                                                                      for t in (q, k, v, grad)))))]
    qb, kb, vb = (t.to("cuda", torch.bfloat16).requires_grad_() for t in (q, k, v))
    out = M.vit_attention(lens, qb.device, torch.bfloat16)(qb, kb, vb)
    out.backward(grad.to("cuda", torch.bfloat16))
    err = lambda got, want: ((got.cpu().double() - want).norm() / want.norm()).item()
    for name, got, like, want in zip(("out", "dq", "dk", "dv"), (out, qb.grad, kb.grad, vb.grad), modelled,
                                     (ref, qd.grad, kd.grad, vd.grad)):
        assert err(got, want) <= 2 * err(like, want), (name, err(got, want), err(like, want))


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_selective_checkpointing_keeps_the_vit_attention(mode):
    """Under selective checkpointing the ViT layer's varlen attention runs once (its output is saved), under full
    checkpointing twice (forward and recompute); the gradients agree."""
    from torch.utils._python_dispatch import TorchDispatchMode
    import train

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls[str(func.overloadpacket)] = calls.get(str(func.overloadpacket), 0) + 1
            return func(*args, **(kwargs or {}))

    cfg = M.PRESETS["7b"]()
    torch.manual_seed(0)
    layer = M.ViTLayer(cfg).to("cuda", torch.bfloat16)
    lens = [100, 37]
    x = torch.randn(sum(lens), cfg.vit_hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    attend = M.vit_attention(lens, x.device, torch.bfloat16)
    layer.checkpoint = None
    layer(x, attend).float().square().sum().backward()
    want = x.grad.clone()
    x.grad = None
    layer.checkpoint = train.checkpoint_args(mode)
    calls = {}
    with Count():
        layer(x, attend).float().square().sum().backward()
    assert calls["torch_attn._varlen_attn"] == {"full": 2, "selective": 1}[mode], calls
    assert ((x.grad - want).float().norm() / want.float().norm()).item() < 1e-2


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


def test_vae_attention_runs_a_fused_kernel_as_close_as_fp32_math():
    """The VAE's mid-block attention (one head of 512 channels over every pixel) hands SDPA contiguous q, k, v, so a
    fused kernel runs it in bf16 (strided ones fell back to the math kernel in fp32); the block's output against
    float64 on the CPU, within 1.5x the error of the same bf16 block with its attention in fp32 math."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops.add(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    block = M.AttnBlock(512)
    x = torch.randn(2, 512, 24, 40) * 0.01  # small: the attention branch, not the residual, makes the output
    with torch.no_grad():
        ref = copy.deepcopy(block).double()(x.double())
        b16, x16 = copy.deepcopy(block).to("cuda", torch.bfloat16), x.to("cuda", torch.bfloat16)
        ops = set()
        with Ops():
            got = b16(x16)
        with sdpa_kernel([SDPBackend.MATH]):
            h = b16.norm(x16).flatten(2).transpose(1, 2)
            q, k, v = (F.linear(h, f.weight[:, :, 0, 0], f.bias)[:, None].float() for f in (b16.q, b16.k, b16.v))
            a = F.scaled_dot_product_attention(q, k, v).to(torch.bfloat16)[:, 0].transpose(1, 2).reshape(x16.shape)
            math = x16 + b16.proj_out(a)
    assert ops & {"aten._scaled_dot_product_efficient_attention", "aten._scaled_dot_product_flash_attention",
                  "aten._scaled_dot_product_cudnn_attention"}, sorted(ops)
    err = lambda t: ((t.cpu().double() - ref).norm() / ref.norm()).item()
    assert err(got) <= 1.5 * err(math), (err(got), err(math))
