# 20: real packs, full AC, eager: base, the ViT keeping its attention output under full AC, the ViT one FSDP2 unit, base again
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant vitkeep
E="--compile=False --activation_checkpointing=full --rows=40 --steps=6 --data_args={'workers':8,'prefetch':2}"
bench 235 base . $E --data=synthetic,real
bench 95 vitkeep /tmp/vitkeep $E --data=real
variant unit
bench 95 unit /tmp/unit $E --data=real
bench 95 base2 . $E --data=real
