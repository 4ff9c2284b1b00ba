# The FLUX encoder (random weights, bf16, compiled GroupNorm as in model.py): NCHW against channels-last, cudnn.benchmark
# off/on; ms per call and per megapixel, and the channels-last moments against NCHW's.
import statistics, sys, time, torch
sys.path.insert(0, ".")
import model as M
torch.manual_seed(0)
vae = M.build_vae(M.bagel_7b()).cuda().to(torch.bfloat16).eval().requires_grad_(False)
sizes = [(4, 512, 512), (1, 1024, 1024), (2, 768, 640), (3, 576, 576)]
xs = {s: torch.rand(s[0], 3, s[1], s[2], device="cuda").mul(2).sub(1).to(torch.bfloat16) for s in sizes}
def run(x, cl):
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        return vae.moments(x)
ref = {}
for bench_flag in (False, True):
    torch.backends.cudnn.benchmark = bench_flag
    for cl in (False, True):
        if cl:
            vae.to(memory_format=torch.channels_last)
        else:
            vae.to(memory_format=torch.contiguous_format)
        t0 = time.time(); run(xs[sizes[0]], cl); torch.cuda.synchronize()
        first = time.time() - t0
        row = []
        for s in sizes:
            for _ in range(2):
                out = run(xs[s], cl)
            ts = []
            for _ in range(5):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record(); out = run(xs[s], cl); b.record(); torch.cuda.synchronize(); ts.append(a.elapsed_time(b))
            ms = statistics.median(ts); mpix = s[0] * s[1] * s[2] / 2**20
            if not cl:
                ref[s] = out[0].float()
            err = ((out[0].float() - ref[s]).norm() / ref[s].norm()).item()
            row.append(f"{s}: {ms:.1f} ms ({ms / mpix:.1f}/Mpix, err {err:.1e})")
        print(f"benchmark={bench_flag} channels_last={cl} first {first:.1f} s | " + " | ".join(row), flush=True)
