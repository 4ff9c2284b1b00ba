"""The Loader: first-fit packing, epochs without loss or duplication, fill on a realistic mix, exact resume,
weights, sharding and CFG dropout."""
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import data
from conftest import DEFAULT_DROPOUT, NO_DROPOUT, png, word_tokenizer, words, write_jsonl

TOK = word_tokenizer()


def chat_rows(n, seed=0, max_words=300):
    """Text-only chats with known lengths: cost = (user words + 2) + (assistant words + 2)."""
    rng = random.Random(seed)
    rows, costs = [], []
    for _ in range(n):
        u, a = rng.randint(1, max_words), rng.randint(1, max_words)
        rows.append({"messages": [{"role": "user", "content": words(range(u))},
                                  {"role": "assistant", "content": words(range(a))}]})
        costs.append(u + a + 4)
    return rows, costs


def test_first_fit_against_a_reference_simulation(tmp_path):
    rows, costs = chat_rows(300)
    src = data.Source(write_jsonl(tmp_path / "c.jsonl", rows))
    P, K = 1024, 4
    loader = data.Loader([src], TOK, packing_length=P, open_packs=K, seed=3, dropout=DEFAULT_DROPOUT)
    packs = [loader.next_pack() for _ in range(60)]
    # the stream of samples the loader draws (its order is not what is tested here)
    stream = data.Loader([src], TOK, packing_length=P, open_packs=K, seed=3, dropout=DEFAULT_DROPOUT)
    keys = [stream.order.next_key() for _ in range(loader.counts["samples"])]
    # textbook first fit with K open bins; room is made by closing the fullest bin; a bin closes once even the
    # smallest sample seen so far cannot fit
    open_bins, closed, smallest = [], [], float("inf")
    for key in keys:
        cost = costs[key[2]]
        smallest = min(smallest, cost)
        for b in open_bins:
            if b[0] + cost <= P:
                break
        else:
            if len(open_bins) == K:
                fullest = max(open_bins, key=lambda b: b[0])
                open_bins.remove(fullest)
                closed.append(fullest)
            b = [0, []]
            open_bins.append(b)
        b[0] += cost
        b[1].append(key)
        if P - b[0] < smallest:
            open_bins.remove(b)
            closed.append(b)
    assert [p.sample_keys for p in packs] == [b[1] for b in closed[:60]]
    for p in packs:
        assert p.num_tokens == sum(costs[k[2]] for k in p.sample_keys) <= P
    # and it packs better than next fit (LMMS Engine's "first_fit") on the same stream
    next_fit, used = [], 0
    for key in keys:
        if used + costs[key[2]] > P:
            next_fit.append(used)
            used = 0
        used += costs[key[2]]
    assert loader.stats["fill"] > sum(next_fit) / (len(next_fit) * P) + 0.05


def test_an_epoch_loses_and_duplicates_nothing_across_ranks(tmp_path):
    rows, costs = chat_rows(101, max_words=60)
    rows[7] = {"messages": []}  # a bad row is skipped, not lost silently: it is counted
    src = data.Source(write_jsonl(tmp_path / "c.jsonl", rows))
    seen = []
    for rank in range(2):
        loader = data.Loader([src], TOK, packing_length=512, rank=rank, world_size=2, seed=1, dropout=DEFAULT_DROPOUT)
        epoch0 = []
        while True:
            epoch0 += [k[2] for k in loader.next_pack().sample_keys if k[1] == 0]
            buffered = [k for p in loader.packer.open + loader.packer.ready for k in p["keys"] if k[1] == 0]
            if loader.stats["epochs"][src.name] >= 1 and not buffered:
                break
        assert len(epoch0) == len(set(epoch0))
        mine = set(loader.order.shard(0, 0).tolist())
        assert 7 not in epoch0 and ("empty_messages" in loader.stats["skipped"]) == (7 in mine)
        seen.append(set(epoch0) | (mine & {7}))
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == set(range(101))
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def realistic_mix(tmp_path, n, seed=0):
    """The mix for the fill test, half and half:
    - T2I (official parquet): aspect ratio uniform over 1:1, 4:3, 3:4, 16:9, 9:16, long side uniform over
      512, 544, ..., 1024 px, so 1024..4096 latent tokens after the official resize (VAE 512-1024, stride 16);
      caption 8..77 tokens.
    - VLM chat (official jsonl): one image, same aspect ratios, long side uniform over 378, 406, ..., 980 px, so
      ~729..4900 ViT patches after the resize (ViT 378-980, stride 14); question 5..40 tokens, answer 1..200."""
    rng = random.Random(seed)
    aspects = [(1, 1), (4, 3), (3, 4), (16, 9), (9, 16)]
    cache = {}

    def image(lo, hi, step):
        a, b = rng.choice(aspects)
        long = rng.randrange(lo, hi + 1, step)
        size = (long, long * b // a) if a >= b else (long * a // b, long)
        if size not in cache:
            cache[size] = png(*size, colour=(rng.randrange(256), 0, 0))
        return size, cache[size]
    t2i, vlm = [], []
    (tmp_path / "vlm").mkdir()
    for i in range(n):
        if i % 2 == 0:
            t2i.append({"image": image(512, 1024, 32)[1], "captions": json.dumps({"c": words(range(rng.randint(8, 77)))})})
        else:
            (w, h), blob = image(378, 980, 28)
            name = f"vlm/{w}x{h}.png"
            (tmp_path / name).write_bytes(blob)
            vlm.append({"image": name, "conversations": [
                {"from": "human", "value": "<image>\n" + words(range(rng.randint(5, 40)))},
                {"from": "gpt", "value": words(range(rng.randint(1, 200)))}]})
    pq.write_table(pa.Table.from_pylist(t2i), str(tmp_path / "t2i.parquet"), row_group_size=64)
    write_jsonl(tmp_path / "vlm.jsonl", vlm)
    return [data.Source(str(tmp_path / "t2i.parquet"), format="t2i"),
            data.Source(str(tmp_path / "vlm.jsonl"), format="vlm")]


@pytest.fixture
def one_thread():
    """Data work is small memory-bound ops: one thread is faster than several fighting over 2 busy cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_fill_on_a_realistic_mix(tmp_path, one_thread):
    sources = realistic_mix(tmp_path, 700)
    loader = data.Loader(sources, TOK, packing_length=32768, open_packs=8, seed=0, dropout=DEFAULT_DROPOUT)
    packs = [loader.next_pack() for _ in range(20)]
    fill = sum(p.num_tokens for p in packs) / (20 * 32768)
    assert loader.stats["fill"] == fill
    assert fill >= 0.97, fill
    assert all(p.num_tokens <= 32768 for p in packs)
    assert {k[0] for p in packs for k in p.sample_keys} == {0, 1}


def assert_same_pack(a, b):
    for f in data.fields(data.Pack):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y), f.name
        elif isinstance(x, list) and x and any(isinstance(v, torch.Tensor) for v in x):
            assert len(x) == len(y) and all((u is None and v is None) or torch.equal(u, v) for u, v in zip(x, y)), f.name
        else:
            assert x == y, f.name


def test_resume_gives_the_identical_next_packs(tmp_path):
    rows, _ = chat_rows(50, max_words=40)
    (tmp_path / "a.png").write_bytes(png(40, 30))
    rows += [{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                        {"type": "text", "text": "w5"}]},
                           {"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "a.png"}}]}]}
             ] * 20
    rows[3] = "{not json"
    chats = data.Source(write_jsonl(tmp_path / "c.jsonl", rows), vae_size=(32, 64), vit_size=(28, 56))
    make = lambda: data.Loader([data.Source("shapes", num_rows=500), chats], TOK, packing_length=400, open_packs=4,
                               seed=7, rank=1, world_size=2, dropout=DEFAULT_DROPOUT)
    a = make()
    for _ in range(5):
        a.next_pack()
    state = json.dumps(a.state_dict())  # plain JSON
    assert json.loads(state)["packer"]["open"], "the test needs buffered samples"
    after = [a.next_pack() for _ in range(8)]
    b = make()
    b.load_state_dict(json.loads(state))
    for x in after:
        assert_same_pack(x, b.next_pack())
    assert a.stats == b.stats and a.state_dict() == b.state_dict()
    assert sum(after[0].vae_timestep_raw.isfinite()) > 0  # draws (timesteps, noise) were part of what matched
    with pytest.raises(ValueError, match="state is for"):
        data.Loader([data.Source("shapes", num_rows=500), chats], TOK, packing_length=400, open_packs=4, seed=7,
                    rank=0, world_size=2, dropout=DEFAULT_DROPOUT).load_state_dict(json.loads(state))


def test_weighted_sources(tmp_path):
    a, b = data.Source("shapes", name="a", weight=3.0), data.Source("shapes", name="b", weight=1.0)
    loader = data.Loader([a, b], TOK, packing_length=512, seed=0, dropout=DEFAULT_DROPOUT)
    picks = [loader.order.next_key()[0] for _ in range(4000)]
    share = picks.count(0) / len(picks)
    assert abs(share - 0.75) < 4 * (0.75 * 0.25 / 4000) ** 0.5
    # and a source's rows come in its own shuffled order, continuing where it stopped
    rows_a = [k for k in [loader.order.next_key() for _ in range(50)] if k[0] == 0]
    assert [r for _, _, r in rows_a] == loader.order.shard(0, 0)[picks.count(0):picks.count(0) + len(rows_a)].tolist()


def test_cfg_dropout_only_on_conditions_of_generating_samples():
    probs = (0.1, 0.3, 0.5)  # text, ViT, VAE
    loader = data.Loader([data.Source("shapes", image_size=32)], TOK, packing_length=4096, seed=0, dropout=probs)
    dropped = {"text": [0, 0], "vit_image": [0, 0], "vae_image": [0, 0]}
    for row in range(3000):
        items, _ = loader.build([0, 0, row])
        generates = any(it["type"] == "vae_image" and it["loss"] for it in items)
        for it in items:
            if not generates or it.get("loss"):
                assert not it.get("drop")  # understanding samples and targets are never dropped
            else:  # a condition of a generating sample (caption, instruction, source image as VAE and ViT)
                dropped[it["type"]][0] += 1
                dropped[it["type"]][1] += bool(it.get("drop"))
    for p, (n, k) in zip(probs, dropped.values()):
        assert n > 500 and abs(k / n - p) < 4 * (p * (1 - p) / n) ** 0.5, (p, n, k)


def test_packs_feed_position_tables():
    """Every position id of a packed image stays inside the model's tables, and every split is accounted for."""
    loader = data.Loader([data.Source("shapes")], TOK, packing_length=256, seed=0, dropout=DEFAULT_DROPOUT)
    for _ in range(10):
        p = loader.next_pack()
        assert p.num_tokens == sum(p.split_lens) == p.position_ids.numel() <= 256
        assert p.latent_pos_ids.max() < 64 * 64 and p.vit_pos_ids.max() < 70 * 70
        assert p.vae_noise.shape == (p.vae_indexes.numel(), 64) and len(p.vae_grids) == len(p.vae_pixels)


def test_prefetch_changes_nothing_but_timing(tmp_path):
    """A background thread makes the same packs; state_dict/stats describe the packs handed out, so a run resumed
    from it continues exactly; errors of the thread surface in next_pack."""
    rows, _ = chat_rows(40, max_words=30)
    rows[5] = {"messages": []}
    src = data.Source(write_jsonl(tmp_path / "c.jsonl", rows))
    make = lambda **kw: data.Loader([data.Source("shapes", num_rows=300), src], TOK, packing_length=300,
                                    open_packs=4, seed=2, **kw, dropout=DEFAULT_DROPOUT)
    plain, ahead = make(), make(prefetch=3)
    for _ in range(6):
        assert_same_pack(plain.next_pack(), ahead.next_pack())
    assert ahead.state_dict() == plain.state_dict() and ahead.stats == plain.stats
    resumed = make(prefetch=2)
    resumed.load_state_dict(ahead.state_dict())
    for _ in range(4):
        p = plain.next_pack()
        assert_same_pack(p, ahead.next_pack())
        assert_same_pack(p, resumed.next_pack())
    with pytest.raises(RuntimeError, match="before the first next_pack"):
        resumed.load_state_dict(plain.state_dict())
    (tmp_path / "img").mkdir()
    pictured = []
    for i in range(30):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(28, 28))
        pictured.append({"messages": [{"role": "user", "content": [{"type": "image", "image": f"img/{i}.png"}]},
                                      {"role": "assistant", "content": "w1"}]})
    broken = data.Loader([data.Source(write_jsonl(tmp_path / "p.jsonl", pictured), vit_size=(28, 28))], TOK,
                         packing_length=300, max_bad_streak=20, prefetch=2, seed=0, dropout=DEFAULT_DROPOUT)
    for i in range(30):  # the images vanish after the start-up checks passed
        (tmp_path / "img" / f"{i}.png").unlink()
    for _ in range(2):  # raised again, not a hang, when called after the failure
        with pytest.raises(RuntimeError, match="20 bad samples in a row"):
            broken.next_pack()


def mixed_sources(tmp_path):
    """Chats with images and bad rows (malformed JSON, no messages, a missing image file), and mandatory shapes."""
    rows, _ = chat_rows(60, max_words=40)
    for i in range(0, 60, 4):
        (tmp_path / f"{i}.png").write_bytes(png(20 + i, 30, colour=(i, 2 * i, 255 - i)))
        rows[i] = {"messages": [{"role": "user", "content": [{"type": "image", "image": f"{i}.png"},
                                                             {"type": "text", "text": "w5"}]},
                                {"role": "assistant", "content": [{"type": "image", "image": f"{i}.png"}]}]}
    rows[3], rows[10], rows[9] = "{not json", {"messages": []}, rows[8] | {"messages": [
        {"role": "user", "content": [{"type": "image", "image": "gone.png"}]}, {"role": "assistant", "content": "w1"}]}
    chats = data.Source(write_jsonl(tmp_path / "c.jsonl", rows), vae_size=(32, 64), vit_size=(28, 56))
    return [chats, data.Source("shapes", num_rows=100, image_size=32, mandatory=True)]


def test_workers_make_the_same_packs_and_states(tmp_path):
    """N = 0, 1, 3 worker processes (3 with the prefetch thread too): identical packs, counts (bad rows included)
    and states; a state saved while keys were in flight resumes to the same packs with any N."""
    sources = mixed_sources(tmp_path)
    make = lambda **kw: data.Loader(sources, TOK, packing_length=400, open_packs=4, seed=5, dropout=DEFAULT_DROPOUT,
                                    **kw)
    plain, one, three = make(), make(workers=1), make(workers=3, prefetch=2)
    state = None
    for i in range(14):
        p = plain.next_pack()
        assert_same_pack(p, one.next_pack())
        assert_same_pack(p, three.next_pack())
        if i == 6:
            state = one.state_dict()
            assert sum(map(len, one.stream.in_flight)) > 0, "the test needs keys in flight"
            after = []
        elif state:
            after.append(p)
    assert plain.stats == one.stats == three.stats and plain.state_dict() == one.state_dict() == three.state_dict()
    assert set(plain.stats["skipped"]) == {"malformed_json", "empty_messages", "missing_file"}
    assert sum(after[0].vae_timestep_raw.isfinite()) > 0  # noise and timesteps came through too
    for n in (0, 3):
        resumed = make(workers=n)
        resumed.load_state_dict(state)
        for p in after:
            assert_same_pack(p, resumed.next_pack())
        resumed.close()
    for loader in (one, three):
        processes = loader.stream.processes
        loader.close()
        assert len(processes) == loader.workers and not any(p.is_alive() for p in processes)
    with pytest.raises(RuntimeError, match="stopped"):
        one.next_pack()


class FailingTokenizer(data.TextTokenizer):
    """Fails, with an error that is not a bad row, on the word w13 (at module level: worker processes import it)."""

    def encode(self, text):
        if "w13" in text.split():
            raise ValueError("tokenizer failure")
        return super().encode(text)


def test_worker_failures_surface_in_the_main_process(tmp_path):
    rows = [{"messages": [{"role": "user", "content": words(range(i, i + 3))}, {"role": "assistant", "content": "w1"}]}
            for i in range(20, 80)]
    rows[40] = {"messages": [{"role": "user", "content": "w13"}, {"role": "assistant", "content": "w1"}]}
    src = data.Source(write_jsonl(tmp_path / "c.jsonl", rows))
    make = lambda **kw: data.Loader([src], FailingTokenizer(TOK.tokenizer), packing_length=64, open_packs=2, seed=0,
                                    dropout=NO_DROPOUT, **kw)
    for n, error in ((0, ValueError), (2, RuntimeError)):
        loader = make(workers=n)
        with pytest.raises(error, match="tokenizer failure"):
            for _ in range(60):
                loader.next_pack()
        assert loader.stats["samples"] == loader.order.shard(0, 0).tolist().index(40)  # where it failed, both ways
        loader.close()
    loader = make(workers=1)
    loader.next_pack()
    os.kill(loader.stream.processes[0].pid, signal.SIGKILL)
    with pytest.raises(RuntimeError, match=r"worker 0 is gone \(exit code -9\)"):
        for _ in range(60):
            loader.next_pack()


def test_mandatory_sources_and_the_sample_cap_against_a_reference_simulation(tmp_path):
    """Mandatory sources: a pack opened for a drawn sample gets one sample of each mandatory source, the next of its
    order (into that pack if it fits, else the first it fits, else a pack of its own); samples over max_sample_tokens
    are counted skips (a skipped seed: that source's next)."""
    P, K, cap = 1024, 2, 600
    # costs 6..604, 6..804 and 6..204: some over the cap, and now and then a seed has no room in its new pack
    data_rows = [chat_rows(400, seed=s, max_words=w) for s, w in enumerate((300, 400, 100))]
    sources = [data.Source(write_jsonl(tmp_path / f"{s}.jsonl", rows), weight=w, mandatory=m)
               for s, ((rows, _), w, m) in enumerate(zip(data_rows, (1.0, 2.0, 0.5), (True, False, True)))]
    loader = data.Loader(sources, TOK, packing_length=P, open_packs=K, max_sample_tokens=cap, seed=4,
                         dropout=NO_DROPOUT)
    packs = [loader.next_pack() for _ in range(80)]
    # the reference: the same source draws and row orders (not what is tested here), packed by the rule above
    order, cursor, draws, too_long = loader.order, [0, 0, 0], 0, 0
    cost = lambda key: data_rows[key[0]][1][key[2]]
    open_bins, closed, smallest = [], [], float("inf")

    def next_fitting(s):
        nonlocal too_long
        while True:
            key = [s, 0, int(order.shard(s, 0)[cursor[s]])]
            cursor[s] += 1
            if cost(key) <= cap:
                return key
            too_long += 1

    def new_bin():
        if len(open_bins) == K:
            fullest = max(open_bins, key=lambda b: b[0])
            open_bins.remove(fullest)
            closed.append(fullest)
        open_bins.append([0, []])
        return open_bins[-1]

    def put(b, key):
        nonlocal smallest
        smallest = min(smallest, cost(key))
        b[0] += cost(key)
        b[1].append(key)
        if P - b[0] < smallest:
            open_bins.remove(b)
            closed.append(b)

    def first_fit(c, bins):
        return next((b for b in bins if b[0] + c <= P), None)
    while len(closed) < 80:
        s, draws = order.pick(draws), draws + 1
        key = [s, 0, int(order.shard(s, 0)[cursor[s]])]
        cursor[s] += 1
        if cost(key) > cap:
            too_long += 1
        elif (b := first_fit(cost(key), open_bins)) is not None:
            put(b, key)
        else:
            new = new_bin()
            put(new, key)
            for m in (0, 2):
                seed = next_fitting(m)
                put(first_fit(cost(seed), [new] * any(b is new for b in open_bins) + open_bins) or new_bin(), seed)
    assert [p.sample_keys for p in packs] == [b[1] for b in closed[:80]]
    assert loader.stats["skipped"] == {"too_long": too_long} and too_long > 10
    assert max(cost(k) for p in packs for k in p.sample_keys) <= cap
    # and the mandatory sources have the shares a weighted draw alone would not give them
    drawn = [k[0] for p in packs for k in p.sample_keys]
    shares = np.bincount(drawn, minlength=3) / len(drawn)
    assert shares[2] > 0.25 > 0.5 / 3.5, shares  # ~one seed per opened pack, on top of its weighted draws
    key = max((k for p in packs for k in p.sample_keys), key=cost)  # the cap itself is allowed (as officially)
    capped = lambda c: data.Loader(sources, TOK, packing_length=P, max_sample_tokens=c, dropout=NO_DROPOUT)
    assert capped(cost(key)).build(key)[1] == cost(key)
    with pytest.raises(data.BadSample, match="too_long"):
        capped(cost(key) - 1).build(key)
    assert capped(P + 1000).build.max_sample_tokens == P  # a cap over the pack: the pack (a config's cap, a shorter
    with pytest.raises(ValueError, match="max_sample_tokens"):  # packing_length on the command line)
        capped(-1)


def test_every_opened_pack_holds_each_mandatory_source_when_there_is_room(tmp_path):
    """Counting over many packs: with room for the seeds, every pack has one of each mandatory source; without the
    flag the rare source is missing from most packs."""
    rows, _ = chat_rows(3000, max_words=40)  # costs 6..84: every pack fits a sample and both seeds
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    for mandatory in (True, False):
        sources = [data.Source(path, name="a", weight=1.0, mandatory=mandatory),
                   data.Source(path, name="b", weight=8.0),
                   data.Source(path, name="c", weight=0.2, mandatory=mandatory)]
        loader = data.Loader(sources, TOK, packing_length=512, seed=1, dropout=NO_DROPOUT)
        packs = [set(k[0] for k in loader.next_pack().sample_keys) for _ in range(300)]
        with_both = sum({0, 2} <= p for p in packs)
        assert with_both == 300 if mandatory else with_both < 60, with_both


def test_workers_end_with_the_process_that_started_them(tmp_path):
    """train.py leaves by os._exit (no clean-up of its own runs): the workers, and with them the forkserver, end by
    themselves; a lingering one would keep the output pipe open, and the run below would time out."""
    (tmp_path / "run.py").write_text(
        "import os, multiprocessing.forkserver, data\n"
        "if __name__ == '__main__':\n"
        "    shapes = [data.Source('shapes', num_rows=50)]\n"
        "    loader = data.Loader(shapes, data.tiny_tokenizer(), 512, (0, 0, 0), workers=2)\n"
        "    loader.next_pack()\n"
        "    print(*[p.pid for p in loader.stream.processes], multiprocessing.forkserver._forkserver._forkserver_pid)\n"
        "    os._exit(0)\n")
    repo = os.path.dirname(os.path.abspath(data.__file__))
    run = subprocess.run([sys.executable, str(tmp_path / "run.py")], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "PYTHONPATH": repo})
    pids = [int(p) for p in run.stdout.split()]
    assert len(pids) == 3, run.stderr

    def running(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    deadline = time.monotonic() + 10
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(map(running, pids))
