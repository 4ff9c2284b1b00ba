# 20: the ViT's attention kernels, the VAE encoder's kernel mix, and every kind of real pack on one model
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
timeout 110 python .gpu/vit_attn.py 2>&1 | grep -v -i warn | tee $OUT/vit_attn.log
timeout 60 python .gpu/vae_profile.py 2>&1 | grep -v -i warn | tee $OUT/vae_profile.log
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2}"
bench 390 kinds . $E --steps=5 --warmup=2 --data=synthetic,real:t2i,real:edit,real:vlm,real
save_cache
