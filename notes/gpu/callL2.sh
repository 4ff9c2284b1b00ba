# 20 (not run yet), on callL's warm machine: cuDNN's ViT attention (patch_cudnn.py) against callL's base rows; the
# GPU tests of both variants; the cached target: one process fills the latent cache, the next times the same
# packs from it against the synthetic pack. V=thread (default) or V=cudnn picks the variant the cached rows run.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant thread
variant cudnn
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2}"
bench 90 cudnn /tmp/cudnn $E --steps=5 --warmup=2 --data=real:vlm,real
(cd /tmp/thread && timeout 40 python -m pytest -q -x tests/test_gpu.py tests/test_step.py -k "gpu or feed" 2>&1 | tail -3)
(cd /tmp/cudnn && timeout 30 python -m pytest -q -x tests/test_gpu.py -k vit 2>&1 | tail -3)
C="--latent_cache=/tmp/latents --steps=8 --warmup=3"
bench 120 fill /tmp/${V:-thread} $E $C --data=real
bench 180 cached /tmp/${V:-thread} $E $C --data=synthetic,real
