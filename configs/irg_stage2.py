# IRG SFT, stage 2 of 2: only the two "full" modes (whole think -> image -> reflect -> image trajectories), from
# stage 1's export. Same recipe otherwise: everything but the VAE trains.
#   torchrun --nproc_per_node=8 train.py configs/irg_stage2.py
# Data: IRG parquet with a `conversation` JSON column (see irg_stage1.py). Edit the paths below.
model = "7b"
init_from = "out/irg_stage1/export"  # stage 1's final weights (nanobagel layout, with its EMA)
init_weights = "ema"
model_args = {"max_latent_size": 64}
_data = "/path/to/IRG-Toy-Dataset"
sources = [{"path": f"{_data}/{g}", "format": "irg", "weight": 1.0, "name": g}
           for g in ("improving_full_learning", "initial_full_learning")]
packing_length = 40000
text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob = 0.0, 0.0, 0.3
lr = 2e-5
lr_schedule = "constant"
warmup_steps = 0
max_steps = 30_000
ema = 0.995
timestep_shift = 4.0
freeze_from_step = {}             # optional IRG switches, off (see irg_stage1.py)
loss_off_from_step = {}
activation_checkpointing = True
dtype = "bf16"
log_every = 10
save_steps = 1000
export_dtype = "bf16"
out_dir = "out/irg_stage2"
data_args = {"prefetch": 4}          # decode and pack ahead in a thread (one core reads ~2 packs/s of 32k)
