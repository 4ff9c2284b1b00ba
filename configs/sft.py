# BAGEL-7B-MoT supervised fine-tuning, the official fine-tune recipe (Bagel TRAIN.md "Fine-tuning"; TorchUMM's
# bagel_sft): start from the released EMA weights, everything but the VAE trains, lr 2e-5 constant.
#   torchrun --nproc_per_node=8 train.py configs/sft.py
# Edit the paths below: init_from is the downloaded BAGEL-7B-MoT folder (official layout: llm_config.json,
# ema.safetensors, ae.safetensors, tokenizer.json); sources are your data in the official formats.
model = "7b"
init_from = "/path/to/BAGEL-7B-MoT"
init_weights = "ema"              # the official recipe fine-tunes from ema.safetensors
model_args = {"max_latent_size": 64}  # BAGEL-7B-MoT's latent table: 64 x 16 px = 1024 px images
sources = [  # official formats (Bagel data/configs/example.yaml); `python data.py PATH:FORMAT` checks one
    # T2I parquet: image bytes, captions (a JSON dict of captions)
    {"path": "/path/to/bagel_example/t2i", "format": "t2i", "weight": 1.0, "mandatory": True},
    # edit parquet: image_list, instruction_list
    {"path": "/path/to/bagel_example/editing/seedxedit_multi", "format": "edit", "weight": 1.0},
    # LLaVA jsonl: conversations with <image> tags; image paths relative to data_folder
    {"path": "/path/to/bagel_example/vlm/llava_ov_si.jsonl", "format": "vlm", "weight": 1.0, "mandatory": True,
     "data_folder": "/path/to/bagel_example/vlm/images"},
]
packing_length = 16384            # per GPU and micro-step (official 10240 expected / 11520 max on 4 GPUs)
text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob = 0.1, 0.3, 0.3
lr = 2e-5
lr_schedule = "constant"
warmup_steps = 2000
max_steps = 500_000               # official total_steps; stop earlier with --max_steps
ema = 0.9999
timestep_shift = 1.0
freeze_vit = freeze_connector = freeze_llm = freeze_und = False  # everything but the (always frozen) VAE trains
activation_checkpointing = "full"  # needed on 80 GB cards (README: memory table); "selective" or "none" where it fits
compile = True                    # per-layer torch.compile: 1.15x eager (README); the first step compiles (minutes)
reshard_after_forward = True      # FSDP2 full sharding of every block over the 8 GPUs
dtype = "bf16"
log_every = 10
save_steps = 1000
keep_checkpoints = 3
export_dtype = "bf16"
out_dir = "out/sft"
# samples built in 8 worker processes, packs made ahead in a thread; the official per-sample cap 10240
data_args = {"workers": 8, "prefetch": 2, "max_sample_tokens": 10240}
