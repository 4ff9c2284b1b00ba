# IRG (Interleaving Reasoning Generation) SFT, stage 1 of 2: think -> image -> reflect -> better image, learnt from
# IRG's six decomposed modes. Full fine-tuning of everything but the VAE from BAGEL-7B-MoT's EMA weights.
#   torchrun --nproc_per_node=8 train.py configs/irg_stage1.py
#   torchrun --nproc_per_node=8 train.py configs/irg_stage2.py      # then stage 2, from this run's export
# Data: IRG parquet (e.g. Osilly/IRG-Toy-Dataset), a `conversation` JSON column per row: user text (no loss);
# assistant parts: text (CE unless need_loss is false) or base64 images with need_loss (generated, MSE),
# need_vae / need_vit (clean conditions for what follows); system turns ignored; as IRG reads it, a bad image
# part (undecodable, no flag set) is left out, not the row, and base64 may be line-wrapped. Edit the paths below.
model = "7b"
init_from = "/path/to/BAGEL-7B-MoT"
init_weights = "ema"
model_args = {"max_latent_size": 64}
_data = "/path/to/IRG-Toy-Dataset"
_groups = {  # IRG's stage-1 mixture; the four generation groups are mandatory (one sample in every pack)
    "improving_full_learning": 1.0, "initial_full_learning": 1.0,
    "improving_thinking_generation_learning": 0.5, "initial_thinking_generation_learning": 0.5,
    "improving_thinking_understanding_learning": 0.5, "initial_thinking_understanding_learning": 0.5,
}
_mandatory = {"improving_full_learning", "initial_full_learning", "improving_thinking_generation_learning",
              "initial_thinking_generation_learning"}
sources = [{"path": f"{_data}/{g}", "format": "irg", "weight": w, "name": g, "mandatory": g in _mandatory}
           for g, w in _groups.items()]
packing_length = 40000            # IRG: 40000 tokens per GPU, samples up to 32768
text_cond_dropout_prob, vit_cond_dropout_prob = 0.0, 0.0
vae_cond_dropout_prob = 0.3       # IRG leaves it at the default: clean VAE conditions dropped 30% of the time
lr = 2e-5
lr_schedule = "constant"
warmup_steps = 500
max_steps = 30_000                # IRG's stage-2 conversion names checkpoint 30000; upstream never stops by itself
ema = 0.995
timestep_shift = 4.0
# IRG's optional mid-run switches (off): e.g. freeze_from_step = {"vit.*": 2000, "connector.*": 2000} (ViT),
# {"layers.*.und.*": N, "embed_tokens.*": N, "lm_head.*": N, "norm_und.*": N} (text expert),
# {"layers.*.gen.*": N, "norm_gen.*": N, "time_embedder.*": N, "vae2llm.*": N, "llm2vae.*": N} (image expert);
# loss_off_from_step = {"ce": N} or {"mse": N}.
freeze_from_step = {}
loss_off_from_step = {}
activation_checkpointing = "full"
dtype = "bf16"
log_every = 10
save_steps = 1000
export_dtype = "bf16"
out_dir = "out/irg_stage1"
data_args = {"workers": 8, "prefetch": 2, "max_sample_tokens": 32768}  # IRG: 40000 a pack, samples up to 32768
