"""Run train.main on fixed synthetic packs, so different world sizes and accumulation see the same packs.

    [torchrun --nproc_per_node=N] python tests/train_harness.py --grad_accum=A [--key=value ...]

Pack g (global index) goes to step s, micro-step m, rank r with g = (s*A + m)*W + r... ordered so that
W ranks x A micro-steps always cover packs [s*W*A, (s+1)*W*A): one process with A=2 sees exactly the packs two
processes with A=1 see. Faults, by environment variable:
    NAN_STEPS=1,2        those steps' packs are poisoned (NaN flow noise)
    NAN_WEIGHT=NAME      that parameter is NaN from the start (as if loaded so)
    CRASH_AT=POINT@STEP  the process dies (os._exit(9), as a kill) right after that point of that step's save
    DISK_FULL_AT=STEP    writing that step's per-rank file raises OSError(ENOSPC), as a full disk does
    SIGNAL_AT=NAME@STEP[@RANK[@compute]]  the process sends itself that signal (SIGTERM, SIGINT) while loading that
                         step's packs (inside the step before, train.Feed), or with @compute from inside its own
                         train_step (rank 0 unless told)
"""
import errno
import inspect
import os
import signal
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
        self.sources, self.tokenizer, self.rank, self.world, self.seed = sources, tokenizer, rank, world_size, seed
        self.accum = ACCUM
        # train.py makes a new loader seeded seed + step when the world size changed: continue at that step
        self.count = (seed - train.DEFAULTS["seed"]) * self.accum
        self.stats = {"fill": 1.0}

    def next_pack(self):
        s, m = divmod(self.count, self.accum)
        g = (s * self.accum + m) * self.world + self.rank
        self.count += 1
        if SIGNAL and m == 0 and s + 1 == SIGNAL[1] and self.rank == SIGNAL[2]:
            # @compute: sent inside the step's own train_step, from its call of frozen_mask after the backward (the
            # step's packs load a step ahead, inside the step before)
            if SIGNAL[3] == "compute":
                frozen_mask = train.frozen_mask
                def signalling_frozen_mask(*args, **kwargs):
                    os.kill(os.getpid(), signal.Signals[SIGNAL[0]])
                    train.frozen_mask = frozen_mask
                    return frozen_mask(*args, **kwargs)
                train.frozen_mask = signalling_frozen_mask
            else:
                os.kill(os.getpid(), signal.Signals[SIGNAL[0]])
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


def after(owner, name, hit, fault):
    """Wrap owner.name: once a call returns and hit(*args) holds, fault() runs."""
    real = getattr(owner, name)

    def wrapped(*args, **kwargs):
        out = real(*args, **kwargs)
        if hit(*args, **kwargs):
            fault()
        return out
    setattr(owner, name, wrapped)


def crash_at(point, step):
    """The save's points, in order: the process dies right after the named one, during the save of `step`
    (set_aside: an existing step_N moved away; pruning: an old checkpoint renamed .del, not yet deleted)."""
    final, renamed = f"step_{step:07d}", []
    base = lambda path: os.path.basename(str(path))
    named = lambda f: str(getattr(f, "name", ""))
    points = {
        "tmp_made": (train.os, "makedirs", lambda path, *a, **k: base(path) == final + ".tmp"),
        "dcp_saved": (train.dcp, "save", lambda *a, checkpoint_id, **k: base(checkpoint_id) == final + ".tmp"),
        "rank_file_saved": (train.torch, "save", lambda obj, f, *a, **k: f"{final}.tmp{os.sep}rank_" in named(f)),
        "manifest_written": (train.json, "dump", lambda obj, f, *a, **k: named(f).endswith(
            os.path.join(final + ".tmp", train.MANIFEST))),
        "set_aside": (train.os, "replace", lambda src, dst: base(src) == final and base(dst) == final + ".del"),
        "renamed": (train.os, "replace", lambda src, dst: base(src) == final + ".tmp" and base(dst) == final),
        "pruning": (train.os, "replace", lambda src, dst: renamed and base(dst).endswith(".del")),
    }
    after(train.os, "replace", lambda src, dst: base(dst) == final, lambda: renamed.append(final))
    after(*points[point], lambda: os._exit(9))


def disk_full_at(step):
    def full():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    after(train.torch, "save", lambda obj, f, *a, **k: f"step_{step:07d}.tmp" in getattr(f, "name", ""), full)


def nan_weight(name):
    real = train.build

    def build(config):
        run = real(config)
        with torch.no_grad():
            train.local(dict(run.model.named_parameters())[name]).fill_(float("nan"))
        return run
    train.build = build


if __name__ == "__main__":
    args = sys.argv[1:]
    NAN_STEPS = {int(s) for s in os.environ.get("NAN_STEPS", "").split(",") if s}
    ACCUM = next((int(a.split("=")[1]) for a in args if a.startswith("--grad_accum=")), 1)
    SIGNAL = os.environ.get("SIGNAL_AT", "").split("@")
    SIGNAL = [SIGNAL[0], int(SIGNAL[1]), int(SIGNAL[2]) if len(SIGNAL) > 2 else 0,
              SIGNAL[3] if len(SIGNAL) > 3 else "load"] if SIGNAL[0] else None
    FixedLoader.__signature__ = inspect.signature(data.Loader)  # the arguments train.py checks data_args against
    data.Loader = FixedLoader
    if os.environ.get("CRASH_AT"):
        point, step = os.environ["CRASH_AT"].split("@")
        crash_at(point, int(step))
    if os.environ.get("DISK_FULL_AT"):
        disk_full_at(int(os.environ["DISK_FULL_AT"]))
    if os.environ.get("NAN_WEIGHT"):
        nan_weight(os.environ["NAN_WEIGHT"])
    train.main(args)
