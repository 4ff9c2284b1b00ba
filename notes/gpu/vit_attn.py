# The ViT's attention (16 heads, head dim 72, bidirectional inside each image) on a VLM pack's images, bf16:
# forward and forward+backward ms and TFLOP/s of each kernel choice, and its error against float64 per image.
import statistics, sys, torch, torch.nn.functional as F
from torch.nn.attention import sdpa_kernel, SDPBackend
from torch.nn.attention.varlen import varlen_attn
torch.manual_seed(0)
H, D = 16, 72
def timed(fn, reps=10):
    for _ in range(3):
        fn()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
    return statistics.median(ts)
def per_image(backend):
    def attend(q, k, v, lens):
        outs = []
        with sdpa_kernel([backend]):
            for qi, ki, vi in zip(*(x.split(lens) for x in (q, k, v))):
                outs.append(F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qi, ki, vi)))[0].transpose(0, 1))
        return torch.cat(outs)
    return attend
def varlen(q, k, v, lens):
    cu = F.pad(torch.tensor(lens, device=q.device).cumsum(0), (1, 0)).int()
    return varlen_attn(q, k, v, cu, cu, max(lens), max(lens))
def flex_fn():
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    flex = torch.compile(flex_attention)
    cache = {}
    def attend(q, k, v, lens):
        key = tuple(lens)
        if key not in cache:
            doc = torch.repeat_interleave(torch.arange(len(lens), device=q.device), torch.tensor(lens, device=q.device))
            n = doc.numel(); pad = -n % 128
            doc = F.pad(doc, (0, pad), value=-1)
            cache[key] = (create_block_mask(lambda b, h, i, j: (doc[i] == doc[j]) & (doc[i] >= 0), None, None, n + pad, n + pad), pad)
        mask, pad = cache[key]
        qp, kp, vp = (F.pad(t, (0, 0, 0, 0, 0, pad)).transpose(0, 1)[None] for t in (q, k, v))
        return flex(qp, kp, vp, block_mask=mask)[0].transpose(0, 1)[:q.shape[0]]
    return attend
methods = {"varlen (FA2)": varlen, "cudnn per image": per_image(SDPBackend.CUDNN_ATTENTION),
           "flash per image": per_image(SDPBackend.FLASH_ATTENTION),
           "efficient per image": per_image(SDPBackend.EFFICIENT_ATTENTION)}
try:
    methods["flex"] = flex_fn()
except Exception as e:
    print("flex unavailable", e)
for lens in ([4900, 4900, 3640], [4900, 2870, 1792, 1024, 784, 2880], [1296, 1296, 1296, 1296]):
    n = sum(lens); flop = 4 * sum(l * l for l in lens) * H * D
    q, k, v = (torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(n, H, D, device="cuda", dtype=torch.bfloat16)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = per_image(SDPBackend.MATH)(qd, kd, vd, lens); ref.backward(g.double())
    print(f"images {lens}: {flop / 1e9:.0f} GFLOP forward", flush=True)
    for name, fn in methods.items():
        try:
            out = fn(q, k, v, lens)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
            err = lambda a, b: ((a.double() - b).norm() / b.norm()).item()
            errs = f"err out {err(out, ref):.1e} dq {err(dq, qd.grad):.1e} dk {err(dk, kd.grad):.1e} dv {err(dv, vd.grad):.1e}"
            f = timed(lambda: fn(q.detach(), k.detach(), v.detach(), lens))
            fb = timed(lambda: torch.autograd.grad(fn(q, k, v, lens), (q, k, v), g))
            print(f"  {name:20s} fwd {f:6.2f} ms ({flop / f / 1e9:4.0f} TFLOP/s) fwd+bwd {fb:6.2f} ms "
                  f"({3.5 * flop / fb / 1e9:4.0f} TFLOP/s) | {errs}", flush=True)
        except Exception as e:
            print(f"  {name:20s} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
