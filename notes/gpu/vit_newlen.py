# What a new image length costs the ViT's attention the first time (cuDNN builds a plan per shape; FA2 has none):
# host+GPU ms of the first and of a later forward+backward per image length, per kernel choice, 16 heads, d72, bf16.
import time, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.varlen import varlen_attn
H, D = 16, 72
def cudnn(q, k, v, n):
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        return F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
def fa2(q, k, v, n):
    cu = torch.tensor([0, n], device="cuda", dtype=torch.int32)
    return varlen_attn(q, k, v, cu, cu, n, n)
for name, fn in (("cudnn", cudnn), ("varlen FA2", fa2)):
    firsts, laters = [], []
    for h, w in ((41, 57), (70, 53), (33, 70), (62, 62), (27, 44), (70, 70), (45, 38), (58, 66)):
        n = h * w
        q, k, v = (torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        ts = []
        for _ in range(3):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            torch.autograd.grad(fn(q, k, v, n), (q, k, v), torch.ones_like(q))
            torch.cuda.synchronize(); ts.append((time.perf_counter() - t0) * 1000)
        firsts.append(ts[0]); laters.append(ts[2])
    print(f"{name}: first call per new length {' '.join(f'{t:.1f}' for t in firsts)} ms; later "
          f"{' '.join(f'{t:.1f}' for t in laters)} ms", flush=True)
