# 20: per pack kind (base), then the ViT levers on VLM packs: vitkeep, unit, both, base again. Full AC, eager.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant vitkeep; variant unit; variant both
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2}"
bench 255 base . $E --steps=5 --warmup=2 --data=synthetic,real:t2i,real:edit,real:vlm
save_cache
bench 72 vitkeep /tmp/vitkeep $E --steps=6 --warmup=2 --data=real:vlm
bench 72 unit /tmp/unit $E --steps=6 --warmup=2 --data=real:vlm
bench 72 both /tmp/both $E --steps=6 --warmup=2 --data=real:vlm
bench 72 base2 . $E --steps=6 --warmup=2 --data=real:vlm
