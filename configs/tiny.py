# The tiny model on the built-in coloured-shapes dataset: CPU, about 4 minutes on 2 cores. README's first command.
#   python train.py configs/tiny.py
# By the end the sample grids (out/tiny/samples/) show the prompted shapes in the prompted colours.
model = "tiny"
model_args = {"vocab_size": 384, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 384, "vae_kind": "pooled"}  # no pretrained AE to download: a fixed stand-in
sources = [{"path": "shapes", "image_size": 64, "num_rows": 20000}]
packing_length = 1024
max_steps = 800
lr = 2e-3
warmup_steps = 30
lr_schedule = "cosine"
ema = 0.99
log_every = 20
save_steps = 200
out_dir = "out/tiny"
sample_every = 200
sample_size = 64
sample_prompts = ["a red circle", "a blue square", "a green triangle above a yellow circle"]
