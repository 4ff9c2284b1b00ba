"""Run train.main on fixed synthetic packs, so different world sizes and accumulation see the same packs.

    [torchrun --nproc_per_node=N] python tests/train_harness.py --grad_accum=A [--key=value ...]

Pack g (global index) goes to step s, micro-step m, rank r with g = (s*A + m)*W + r... ordered so that
W ranks x A micro-steps always cover packs [s*W*A, (s+1)*W*A): one process with A=2 sees exactly the packs two
processes with A=1 see. NAN_STEPS=1,2 poisons those steps' packs. CRASH_AT_SAVE=k kills the process (os._exit) inside the k-th checkpoint save, after the
sharded files are written and before the checkpoint is committed.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import train  # noqa: E402


def synthetic_samples(g, vocab):
    """Two samples per pack: text-to-image (pixels, noised target) and understanding (ViT + CE text)."""
    gen = torch.Generator().manual_seed(1000 + g)
    ids = lambda n: torch.randint(4, vocab, (n,), generator=gen).tolist()
    t2i = [{"type": "text", "ids": ids(5), "loss": False, "special_token_loss": False, "special_token_label": None},
           {"type": "vae_image", "pixels": torch.rand(3, 32, 48, generator=gen) * 2 - 1, "latent": None,
            "loss": True, "timestep_raw": float(torch.randn((), generator=gen)),
            "noise": torch.randn(16, 4, 6, generator=gen), "posterior_eps": torch.randn(16, 4, 6, generator=gen)}]
    und = [{"type": "vit_image", "pixels": torch.rand(3, 28, 42, generator=gen) * 2 - 1},
           {"type": "text", "ids": ids(3 + g % 4), "loss": True, "special_token_loss": False,
            "special_token_label": None}]
    # some packs have no ViT image: with 2 ranks, step 0 has images on one rank only, step 1 on none
    return [t2i, und if g % 5 not in (1, 2, 3) else und[1:]]


class FixedLoader:
    def __init__(self, sources, tokenizer, packing_length, dropout, rank, world_size, seed, **_):
        self.tokenizer, self.rank, self.world, self.seed = tokenizer, rank, world_size, seed
        self.accum = ACCUM
        # train.py makes a new loader seeded seed + step when the world size changed: continue at that step
        self.count = (seed - train.DEFAULTS["seed"]) * self.accum
        self.stats = {"fill": 1.0}

    def next_pack(self):
        s, m = divmod(self.count, self.accum)
        g = (s * self.accum + m) * self.world + self.rank
        self.count += 1
        pack = data.pack_samples(synthetic_samples(g, self.tokenizer.vocab_size), self.tokenizer.special)
        if s + 1 in NAN_STEPS:  # a poisoned pack: its flow noise is NaN
            pack.vae_noise[:] = float("nan")
        return pack

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]

    def close(self):  # no worker processes to stop
        pass



def crash_in_save(k):
    real, calls = train.dcp.save, [0]

    def save(*args, **kwargs):
        real(*args, **kwargs)
        calls[0] += 1
        if calls[0] == k:
            os._exit(9)
    train.dcp.save = save


if __name__ == "__main__":
    args = sys.argv[1:]
    NAN_STEPS = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}
    ACCUM = next((int(a.split("=")[1]) for a in args if a.startswith("--grad_accum=")), 1)
    data.Loader = FixedLoader
    if os.environ.get("CRASH_AT_SAVE"):
        crash_in_save(int(os.environ["CRASH_AT_SAVE"]))
    train.main(args)
