# 20 (not run yet): the Feed in a thread (thread.diff) against the code on every kind of real pack, eager, full
# checkpointing; what a new size costs the ViT's attention and the VAE encoder. ~560 s; callL2 right after it.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant thread
timeout 25 python .gpu/vit_newlen.py 2>&1 | grep -v -i warn | tee $OUT/vit_newlen.log
timeout 60 python .gpu/vae_newsize.py 2>&1 | grep -v -i warn | tee $OUT/vae_newsize.log
# 10 timed steps: T2I and edit packs repeat their images (so their sizes) after ~7 packs, and the step lines show
# whether the second epoch, its cuDNN plans built, runs faster
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --steps=10 --warmup=2"
bench 300 base . $E --data=synthetic,real:t2i,real:edit,real:vlm,real   # ~150 s of it a fresh machine's compile
bench 170 thread /tmp/thread $E --data=synthetic,real:t2i,real:edit,real
save_cache
