# BAGEL pre-training from its parts, small: Qwen2.5-0.5B-Instruct (the official trainer's llm_path default), the SigLIP
# so400m-14-980 NaViT and the FLUX AE, assembled once as the official pre-training builds BAGEL (convert.py
# --from-parts: the generation expert copied from the understanding one, QK norms ones, the ViT's last layer dropped,
# the conv patch embedding as a Linear; connector, timestep embedder and latent projections fresh). The official
# pre-training recipe (TRAIN.md "Pre-training", train/pretrain_unified_navit.py defaults) is the fine-tune one of
# sft.py (read from there: data formats, condition dropout, 2000 warm-up steps, EMA 0.9999, everything but the VAE
# trains) with lr 1e-4, flex attention and 32x32 latent tokens (512 px) for the low-resolution stage.
#   python convert.py --from-parts /path/to/Qwen2.5-0.5B-Instruct /path/to/siglip-so400m-14-980-flash-attn2-navit \
#       /path/to/flux/ae.safetensors /path/to/bagel-0.5b-parts
#   torchrun --nproc_per_node=8 train.py configs/pretrain_small.py
# Edit the paths below, and the sources in sft.py (or here): your data in the official formats.
import os

exec(open(os.path.join(os.path.dirname(__file__), "sft.py")).read())
init_from = "/path/to/bagel-0.5b-parts"
init_weights = "model"            # the assembled folder holds one set of weights (the EMA starts from them)
model_args = {"max_latent_size": 32, "attn_backend": "flex"}  # official: 32 for the low-res stage, 64 for 1024 px
packing_length = 32768            # official expected_num_tokens, per GPU and micro-step
lr = 1e-4
activation_checkpointing = "selective"  # not measured at this size: "none" where it fits, "full" where it does not
save_steps = 2000                 # official save_every
out_dir = "out/pretrain_small"
