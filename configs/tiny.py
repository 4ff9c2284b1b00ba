# The tiny model on the built-in coloured-shapes dataset: CPU, minutes. README's first command.
#   python train.py configs/tiny.py
model = "tiny"
model_args = {"vocab_size": 384, "hidden_size": 128, "num_layers": 4, "num_heads": 4, "num_kv_heads": 2,
              "intermediate_size": 384, "vae_kind": "pooled"}  # no pretrained AE to download: a fixed stand-in
sources = [{"path": "shapes", "image_size": 32, "num_rows": 20000}]
packing_length = 512
max_steps = 300
lr = 2e-3
warmup_steps = 30
lr_schedule = "cosine"
ema = 0.99
timestep_shift = 1.0
log_every = 10
save_steps = 100
out_dir = "out/tiny"
sample_every = 100
sample_size = 32
sample_prompts = ["a red circle", "a blue square", "a green triangle above a yellow circle"]
