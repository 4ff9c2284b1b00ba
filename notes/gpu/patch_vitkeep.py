import sys, pathlib
p = pathlib.Path(sys.argv[1]) / "train.py"; s = p.read_text()
old = "        for layer in list(model.layers)[:-1][::config[\"checkpoint_every\"]] + list(model.vit.layers):\n            layer.checkpoint = args\n"
assert old in s
new = old + '''        if config["activation_checkpointing"] == "full":  # the ViT layers keep their varlen attention's output
            from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts
            def vit_policy(ctx, op, *a, **k):
                return CheckpointPolicy.MUST_SAVE if op.name() == "torch_attn::_varlen_attn" else CheckpointPolicy.PREFER_RECOMPUTE
            for layer in model.vit.layers:
                layer.checkpoint = {"context_fn": functools.partial(create_selective_checkpoint_contexts, vit_policy)}
'''
p.write_text(s.replace(old, new))
print("patched vitkeep: full AC, ViT layers keep the varlen attention output")
