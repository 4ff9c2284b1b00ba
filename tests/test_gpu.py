"""GPU checks (skipped without CUDA): the fixture in float32 on the GPU, and the fast attention path (flex for
the LLM, varlen for the ViT) against the exact dense-mask SDPA, forward and backward, in float32 and bf16."""
import pytest
import torch

import data
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
