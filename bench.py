"""Time train.py's own training step on a fixed, realistic pack.

    python bench.py                                    # real width, 4 MoT layers, one 16k pack (1 GPU)
    python bench.py --activation_checkpointing=True
    torchrun --nproc_per_node=2 bench.py               # FSDP2 over 2 GPUs (one pack per GPU)

The pack: 3 text-to-image samples (60 caption ids + 2 wrappers, then a 512x512 target: 1,024 latent tokens + 2
markers) and chat samples (128-token question without loss, answer with CE) filling the rest. bf16 compute,
fp32 master weights and AdamW state (FSDP2), the frozen VAE encoding included. Any train.py key can be given.
"""
import os
import sys
import time

import torch

import data
import train

BENCH = dict(model="7b", model_args={"num_layers": 4, "attn_backend": "flex"}, packing_length=16384,
             ema=0.0, warmup_steps=0, lr=1e-5, compile=True, log_every=1)


def bench_pack(tokenizer, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(10, tokenizer.vocab_size, (n,), generator=g).tolist()
    text = lambda n, loss: {"type": "text", "ids": ids(n), "loss": loss, "special_token_loss": False,
                            "special_token_label": None}
    samples = []
    for _ in range(3):  # 62 + 1026 positions each
        samples.append([text(60, False), {"type": "vae_image", "pixels": torch.rand(3, 512, 512, generator=g) * 2 - 1,
                                          "latent": None, "loss": True, "timestep_raw": float(torch.randn(1, generator=g)),
                                          "noise": torch.randn(16, 64, 64, generator=g),
                                          "posterior_eps": torch.randn(16, 64, 64, generator=g)}])
    left = length - 3 * 1088
    while left > 0:  # chat: 130 + answer
        answer = min(380, left - 130 - 2)
        if answer < 8:
            break
        samples.append([text(128, False), text(answer, True)])
        left -= 130 + answer + 2
    return data.pack_samples(samples, tokenizer.special)


def main(argv):
    cfg = dict(train.DEFAULTS)
    cfg.update(BENCH)
    for arg in argv:  # the same --key=value overrides as train.py
        key, value = arg[2:].split("=", 1)
        train.set_key(cfg, key, train.literal(value), "command line")
    cfg["model_args"] = {**BENCH["model_args"], **cfg["model_args"]}
    steps, warmup = 12, 3
    run = train.build(cfg)
    pack = bench_pack(run.tokenizer if run.tokenizer.vocab_size > 1000 else BigVocab(run), cfg["packing_length"],
                      seed=run.rank)
    run.log(f"pack: {pack.num_tokens} tokens, {len(pack.sample_lens)} samples, {pack.ce_indexes.numel()} CE, "
            f"{pack.mse_indexes.numel()} MSE")
    peak = train.peak_flops(run.device, cfg["peak_tflops"])
    times = []
    for i in range(warmup + steps):
        sync(run)
        t0 = time.time()
        r = train.train_step(run, [pack], cfg["lr"])
        sync(run)
        times.append(time.time() - t0)
        run.log(f"step {i}: {times[-1] * 1000:.0f} ms, loss {r['loss']:.4f}")
    if os.environ.get("BENCH_PROFILE"):
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                train.train_step(run, [pack], cfg["lr"])
            sync(run)
        run.log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=60))
    dt = sorted(times[warmup:])[len(times[warmup:]) // 2]  # median
    tokens, flops = train.all_sum([r["tokens"], r["flops"]], run.device)
    mem = torch.cuda.max_memory_allocated() / 2**30 if run.device.type == "cuda" else 0.0
    run.log(f"RESULT world {run.world} | ac {cfg['activation_checkpointing']} | compile {cfg['compile']} | "
            f"{tokens / dt:,.0f} tok/s ({tokens / dt / run.world:,.0f} per GPU) | step {dt * 1000:.0f} ms "
            f"(min {min(times[warmup:]) * 1000:.0f}, max {max(times[warmup:]) * 1000:.0f}) | "
            f"{flops / dt / run.world / 1e12:.0f} TFLOP/s per GPU | MFU {flops / dt / run.world / peak if peak else 0:.3f} | "
            f"peak mem {mem:.1f} GiB | first step (compiles) {times[0]:.0f} s")
    torch.distributed.destroy_process_group()


def sync(run):
    if run.device.type == "cuda":
        torch.cuda.synchronize(run.device)


class BigVocab:
    """The built-in tokenizer's special ids with the model's full vocabulary for random text ids."""
    def __init__(self, run):
        self.special, self.vocab_size = run.tokenizer.special, run.model_cfg.vocab_size


if __name__ == "__main__":
    main(sys.argv[1:])
