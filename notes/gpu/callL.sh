# 20 (not run yet): the Feed in a thread (thread.diff) and cuDNN's ViT attention (patch_cudnn.py) against the code,
# every kind of real pack, eager, full checkpointing; the GPU tests of both variants. ~500 s with a carried cache.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant thread
variant cudnn
timeout 25 python .gpu/vit_newlen.py 2>&1 | grep -v -i warn | tee $OUT/vit_newlen.log
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --steps=5 --warmup=2"
bench 170 base . $E --data=synthetic,real:t2i,real:edit,real:vlm,real   # a fresh cache: ~150 s more
bench 150 thread /tmp/thread $E --data=synthetic,real:t2i,real:edit,real
bench 90 cudnn /tmp/cudnn $E --data=real:vlm,real
save_cache
(cd /tmp/thread && timeout 40 python -m pytest -q -x tests/test_gpu.py tests/test_step.py -k "gpu or feed" 2>&1 | tail -3)
(cd /tmp/cudnn && timeout 30 python -m pytest -q -x tests/test_gpu.py -k vit 2>&1 | tail -3)
