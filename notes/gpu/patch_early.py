import sys, pathlib
# the next step's packs fetched and encoded at the start of the step (the encoder beside the forward and backward),
# not once the backward is queued (when the eager host falls behind the GPU, that is near the backward's end)
p = pathlib.Path(sys.argv[1]) / "train.py"; s = p.read_text()
late = "    if prepare_next:  # after the votes: a signal while the next packs load stops after the step they are for\n        prepare_next()\n"
assert late in s
s = s.replace(late, "")
start = "    n_ce, n_mse, vit_images = counts[0], counts[1], counts[2:]\n"
assert start in s
s = s.replace(start, start + "    if prepare_next:\n        prepare_next()\n")
p.write_text(s)
print("patched early: the next packs encoded from the step's start")
