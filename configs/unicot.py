# UniCoT with LoRA (TorchUMM's Uni-CoT recipe): adapters of rank 256, alpha 512; every base weight frozen; no EMA.
# The export holds merged weights (W + alpha/r B A, a plain checkpoint) and the adapters alone in
# export/lora.safetensors.
#   torchrun --nproc_per_node=8 train.py configs/unicot.py
# Data: UniCoT MDP parquet, no text loss: [system_prompt] prompt think -> image (initial visual state), or
# prompt think -> source_image (clean VAE + ViT) edit_instruction -> target_image (self-reflection step); think is
# left out with probability think_drop. Decomposition rows (task_type, instruction_list, image_list: the
# Breakdown data) are read by the same format. Edit the paths below.
model = "7b"
init_from = "/path/to/BAGEL-7B-MoT"
init_weights = "ema"
model_args = {"max_latent_size": 64}
sources = [
    {"path": "/path/to/UniCoT-Self-Reflection-6K", "format": "unicot", "weight": 1.0, "think_drop": 0.0},
]
# The adapted layers of TorchUMM's run, which the published numbers came from (0.81 B adapter parameters): upstream's
# list ["q_proj", "v_proj", "q_proj_moe_gen", "v_proj_moe_gen," "gate_proj", "up_proj", "down_proj"] lost
# v_proj_moe_gen and gate_proj to its missing comma, and PEFT's suffix match adds SigLIP's q/v (visual_und).
lora_targets = ["layers.*.und.q_proj", "layers.*.und.v_proj", "layers.*.gen.q_proj", "layers.*.up_proj",
                "layers.*.down_proj", "vit.layers.*.q_proj", "vit.layers.*.v_proj"]
# Upstream's intended set (1.16 B): q/v and gate/up/down of both experts, SigLIP q/v:
# lora_targets = ["layers.*.q_proj", "layers.*.v_proj", "layers.*.gate_proj", "layers.*.up_proj",
#                 "layers.*.down_proj", "vit.layers.*.q_proj", "vit.layers.*.v_proj"]
lora_rank = 256
lora_alpha = 512.0
packing_length = 49152            # UniCoT LoRA: 49152 tokens per GPU
text_cond_dropout_prob, vit_cond_dropout_prob, vae_cond_dropout_prob = 0.0, 0.0, 0.0
lr = 2e-5
lr_schedule = "constant"
warmup_steps = 200
max_steps = 3000
ema = 0.0                         # no EMA, as upstream
timestep_shift = 1.0
activation_checkpointing = "full"
dtype = "bf16"
log_every = 10
save_steps = 200
export_dtype = "bf16"
out_dir = "out/unicot"
data_args = {"workers": 8, "prefetch": 2, "max_sample_tokens": 16384}  # TorchUMM: 49152 a pack, 16384 a sample
