# 25 in one call: 28 MoT layers, LoRA rank 16, full AC, eager, expandable segments; flex against NSA (default: recompute_branches)
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
LORA="--lora_targets=['layers.*.und.q_proj','layers.*.und.v_proj','layers.*.gen.q_proj','layers.*.up_proj','layers.*.down_proj','vit.layers.*.q_proj','vit.layers.*.v_proj']"
A="--activation_checkpointing=full --compile=False --steps=2 --warmup=1 --lora_rank=16 --lora_alpha=32.0"
L64="--data=long:65536 --packing_length=65536"; L32="--data=long:32768 --packing_length=32768"
M="'num_layers':28,'attn_backend'"
bench 110 flex64 . $A $L64 "$LORA" "--model_args={$M:'flex'}"
bench 90 nsa64 . $A $L64 "$LORA" "--model_args={$M:'nsa'}"
bench 70 flex32 . $A $L32 "$LORA" "--model_args={$M:'flex'}"
bench 55 nsa32 . $A $L32 "$LORA" "--model_args={$M:'nsa'}"
