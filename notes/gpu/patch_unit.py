import sys, pathlib
p = pathlib.Path(sys.argv[1]) / "train.py"; s = p.read_text()
old = "    for layer in list(model.layers)[:-1] + list(model.vit.layers):\n        fully_shard(layer, **kw)"
assert old in s
p.write_text(s.replace(old, "    for layer in list(model.layers)[:-1] + [model.vit]:\n        fully_shard(layer, **kw)"))
print("patched unit: the ViT one FSDP2 unit")
