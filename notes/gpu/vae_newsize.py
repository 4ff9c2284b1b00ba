# What a new image size costs the FLUX encoder (cuDNN plans for its convolutions, the compiled norm's guards): wall ms
# of the first call of each size against a later one, one image a call, bf16, random weights; then the same with the
# norm eager, to tell the convolutions' share from the compiled norm's.
import sys, time, torch
sys.path.insert(0, ".")
import model as M
vae = M.build_vae(M.bagel_7b()).cuda().to(torch.bfloat16).eval().requires_grad_(False)
def wall(x):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    with torch.no_grad():
        vae.moments(x)
    torch.cuda.synchronize(); return (time.perf_counter() - t0) * 1000
wall(torch.zeros(1, 3, 512, 512, device="cuda", dtype=torch.bfloat16))  # the norm's compiles
sizes = {"compiled norm": ((528, 800), (640, 496), (1024, 768), (720, 960), (592, 592), (864, 1024)),
         "eager norm": ((544, 816), (656, 512), (1008, 784), (736, 944), (608, 608), (880, 1008))}
for name, shapes in sizes.items():
    if name == "eager norm":
        M.GroupNorm.forward = lambda self, x, silu=False: M._group_norm(x, self.num_groups, self.weight, self.bias,
                                                                       self.eps, silu)
    rows = []
    for h, w in shapes:
        x = torch.rand(1, 3, h, w, device="cuda").mul(2).sub(1).to(torch.bfloat16)
        first, later = wall(x), min(wall(x) for _ in range(3))
        rows.append(f"{h}x{w}: first {first:.0f} ms, later {later:.1f}")
    print(f"encoder, new sizes, {name}: " + " | ".join(rows), flush=True)
