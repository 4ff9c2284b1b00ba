# recA (reconstruction alignment): the model regenerates an image from its own understanding of it. Each image goes
# in as a 224 px ViT view (never dropped: the information bottleneck), then a request to describe it (data.py's
# RECON_PROMPTS, 66 of them, like recA's all description requests: none says copy; dropped 10% of the time), then
# the same image as the generation target at 512-1024 px. Image loss only.
# Only the generation path trains: the gen expert, its final norm, the timestep embedder and the latent
# projections; the understanding path is frozen with freeze_und (context, no gradient), ViT and connector frozen.
#   torchrun --nproc_per_node=8 train.py configs/reca.py
# Data: images alone (captions ignored): recA's webdataset .tar shards (a folder of them, as below; a row per key:
# its image, and json/txt members if any), or parquet / jsonl with an `image` column (bytes, or paths relative to
# the data). The export holds the RAW weights (recA's gains are in them; with EMA 0.9999 over ~1000 steps the EMA
# is still the base model); the EMA goes to out/reca/export_ema/. Edit the paths below.
model = "7b"
init_from = "/path/to/BAGEL-7B-MoT"
init_weights = "ema"
model_args = {"max_latent_size": 64}
sources = [{"path": "/path/to/text-to-image-2M/data_1024_10K", "format": "reca", "weight": 1.0}]
packing_length = 32768            # recA: 32768 tokens per GPU (about 7 images at 1024 px)
text_cond_dropout_prob = 0.1      # the prompt; the ViT view is never dropped, and there are no clean VAE conditions
vit_cond_dropout_prob, vae_cond_dropout_prob = 0.0, 0.0
freeze_und = True                 # und tokens give context but no gradient (official freeze_und)
freeze_vit = freeze_connector = True
train_only = ["layers.*.gen.*", "norm_gen.*", "time_embedder.*", "vae2llm.*", "llm2vae.*"]
lr = 4e-5
lr_schedule = "constant"
warmup_steps = 1000
max_steps = 1000                  # TorchUMM's recA run (total_steps 1000); upstream never stops by itself
ema = 0.9999
save_ema_as_default = False       # sample.py and --init_from take the raw weights
timestep_shift = 1.0
activation_checkpointing = "full"
dtype = "bf16"
log_every = 10
save_steps = 250
export_dtype = "bf16"
out_dir = "out/reca"
data_args = {"workers": 8, "prefetch": 2, "max_sample_tokens": 16384}  # the official default per-sample cap
