# The tiny model on the built-in coloured-shapes dataset: CPU, under 5 minutes on 2 free cores. README's first command.
#   python train.py configs/tiny.py
# By the end the sample grids (out/tiny/samples/) draw the prompted shapes in the prompted colours and places.
model = "tiny"
model_args = {"vocab_size": 384, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 384, "vae_kind": "pooled"}  # no pretrained AE to download: a fixed stand-in
sources = [{"path": "shapes", "image_size": 64, "num_rows": 20000}]
val_sources = [{"path": "shapes", "image_size": 64, "num_rows": 500, "seed": 1}]  # other rows: held out
packing_length = 1024             # ~33 samples a step; half as many per step learns two shapes far slower
max_steps = 1800                  # two shapes in the asked colours and places take ~1600 (notes/tiny_demo.md)
lr = 2e-3                         # constant: 4e-3, or a cosine decay from the start, learn the two-shape prompts later
warmup_steps = 30
lr_schedule = "constant"
timestep_shift = 3.0              # train where the sampler (shift 3) decides the layout: at high noise
ema = 0.95                        # short: 0.99 lags the late-learnt two-shape prompts by ~200 steps
log_every = 100
eval_every = 300
save_steps = 600
out_dir = "out/tiny"
sample_every = 600                # drawn as sample.py draws (sample.T2I; sample_settings would override it)
sample_size = 64
sample_prompts = ["a red circle", "a blue square", "a green triangle above a yellow circle"]
