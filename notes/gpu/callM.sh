# 19 (not run yet): configs/sft.py's step setting, compiled, full checkpointing, two processes on one card (the
# memory-saving target, >= 47k tok/s at the official checkpointed step's activation memory, by means). D=/tmp/thread
# (after `variant thread`) runs the Feed in a thread instead of the code.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
[ "${D:-.}" = /tmp/thread ] && variant thread
bench 400 full1 ${D:-.} --activation_checkpointing=full --steps=12 --warmup=3   # a fresh compile: over 4 minutes
bench 150 full2 ${D:-.} --activation_checkpointing=full --steps=12 --warmup=3
save_cache
