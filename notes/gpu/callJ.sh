# 20: the real mixture from the latent cache (the cached target). The same seed draws the same packs, so the
# first process's encodes fill the cache for every pack the second one times; run after callI (its inductor cache).
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --latent_cache=/tmp/latents"
bench 150 fill . $E --steps=8 --warmup=3 --data=real
bench 240 cached . $E --steps=8 --warmup=3 --data=synthetic,real
