# Where the FLUX encoder's time goes (random weights, bf16, model.py's compiled GroupNorm): GPU time by kind of kernel,
# NCHW against channels-last, on 2 x 1024 px and 4 x 512 px.
import sys, torch
from torch.profiler import profile, ProfilerActivity
sys.path.insert(0, ".")
import model as M
torch.manual_seed(0)
vae = M.build_vae(M.bagel_7b()).cuda().to(torch.bfloat16).eval().requires_grad_(False)
def kind(name):
    n = name.lower()
    if "triton" in n: return "norm (triton)"
    if any(s in n for s in ("conv", "xmma", "cutlass", "implicit", "sm90", "cudnn", "fprop", "wgrad", "dgrad")): return "conv"
    if "flash" in n or "fmha" in n or "attention" in n: return "attn"
    if "copy" in n or "transpose" in n or "nchw" in n or "nhwc" in n: return "layout copy"
    return "other"
for shape in ((2, 1024, 1024), (4, 512, 512)):
    x = torch.rand(shape[0], 3, shape[1], shape[2], device="cuda").mul(2).sub(1).to(torch.bfloat16)
    for cl in (False, True):
        vae.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xi = x.contiguous(memory_format=torch.channels_last) if cl else x
        with torch.no_grad():
            for _ in range(3): vae.moments(xi)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(3): vae.moments(xi)
                torch.cuda.synchronize()
        by, top = {}, []
        for e in prof.key_averages():
            t = e.device_time_total / 3 / 1000
            if t <= 0: continue
            by[kind(e.key)] = by.get(kind(e.key), 0) + t; top.append((t, e.key[:90], e.count // 3))
        print(f"{shape} channels_last={cl}: {sum(by.values()):.1f} ms | " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(by.items(), key=lambda kv: -kv[1])), flush=True)
        for t, k, c in sorted(top, reverse=True)[:8]:
            print(f"    {t:6.2f} ms x{c:3d} {k}")
