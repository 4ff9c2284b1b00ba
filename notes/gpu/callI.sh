# 20: the next packs encoded from the step's start (patch_early) against the code, real mixture, full AC, eager
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant early
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2}"
bench 300 base . $E --steps=8 --warmup=3 --data=synthetic,real   # a fresh machine: ~160 s synthetic compile, ~25 s real
bench 90 early /tmp/early $E --steps=8 --warmup=3 --data=real
bench 90 base2 . $E --steps=8 --warmup=3 --data=real
save_cache
