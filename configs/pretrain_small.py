# BAGEL pre-training from its parts, small: Qwen2.5-0.5B-Instruct (the official trainer's llm_path default), the SigLIP
# so400m-14-980 NaViT and the FLUX AE, assembled once as the official pre-training builds BAGEL (convert.py
# --from-parts: the generation expert copied from the understanding one, QK norms ones, the ViT's last layer dropped,
# the conv patch embedding as a Linear; connector, timestep embedder and latent projections fresh). Then the official
# pre-training recipe (TRAIN.md "Pre-training", train/pretrain_unified_navit.py defaults): everything but the VAE
# trains, lr 1e-4 constant after 2000 warm-up steps, EMA 0.9999, flex attention, 32x32 latent tokens (512 px).
#   python convert.py --from-parts /path/to/Qwen2.5-0.5B-Instruct /path/to/siglip-so400m-14-980-flash-attn2-navit \
#       /path/to/flux/ae.safetensors /path/to/bagel-0.5b-parts
#   torchrun --nproc_per_node=8 train.py configs/pretrain_small.py
# Edit the paths below; sources are your data in the official formats (`python data.py PATH:FORMAT` checks one).
init_from = "/path/to/bagel-0.5b-parts"
init_weights = "model"            # the assembled folder holds one set of weights (its EMA starts here)
model_args = {"max_latent_size": 32, "attn_backend": "flex"}  # official: 32 for the low-res stage, 64 for 1024 px
sources = [  # official formats (Bagel data/configs/example.yaml): t2i_pretrain, unified_edit, vlm_sft
    {"path": "/path/to/bagel_example/t2i", "format": "t2i", "weight": 1.0},
    {"path": "/path/to/bagel_example/editing/seedxedit_multi", "format": "edit", "weight": 1.0},
    {"path": "/path/to/bagel_example/vlm/llava_ov_si.jsonl", "format": "vlm", "weight": 1.0,
     "data_folder": "/path/to/bagel_example/vlm/images"},
]
packing_length = 32768            # official expected_num_tokens, per GPU and micro-step
text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob = 0.1, 0.3, 0.3
lr = 1e-4
lr_schedule = "constant"
warmup_steps = 2000
max_steps = 500_000               # official total_steps; stop earlier with --max_steps
ema = 0.9999
timestep_shift = 1.0
freeze_vit = freeze_connector = freeze_llm = freeze_und = False
activation_checkpointing = "selective"  # not measured at this size: "none" where it fits, "full" where it does not
compile = True
dtype = "bf16"
log_every = 10
save_steps = 2000                 # official save_every
keep_checkpoints = 3
export_dtype = "bf16"
out_dir = "out/pretrain_small"
data_args = {"prefetch": 4}
