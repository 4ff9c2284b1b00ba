# 20 (not run yet): configs/sft.py's step setting (compiled, full checkpointing) on real packs, the ViT's layers
# compiled too (vitcompile.diff) against the code. Run after callM (its inductor cache: the decoder layers).
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant vitcompile
E="--activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --steps=6 --warmup=3"
bench 300 base . $E --data=synthetic,real:edit,real:vlm,real
bench 280 vitcompile /tmp/vitcompile $E --data=synthetic,real:edit,real:vlm,real
save_cache
