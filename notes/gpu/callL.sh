# 20: the Feed in a thread (+ the VAE attention's fused kernel) against the code, every kind of pack; cuDNN's ViT
# attention on the VLM and mixed packs; the GPU tests. .gpu/base/: the committed train.py, model.py, bench.py.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
rm -rf /tmp/base && mkdir -p /tmp/base && cp -r *.py configs tests /tmp/base/ && cp .gpu/base/*.py /tmp/base/
variant cudnn
timeout 35 python .gpu/vit_newlen.py 2>&1 | grep -v -i warn | tee $OUT/vit_newlen.log
E="--compile=False --activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --steps=5 --warmup=2"
bench 190 base /tmp/base $E --data=synthetic,real:t2i,real:edit,real
bench 170 thread . $E --data=synthetic,real:t2i,real:edit,real:vlm,real
bench 100 cudnn /tmp/cudnn $E --data=real:vlm,real
save_cache
timeout 60 python -m pytest -q -x tests/test_gpu.py tests/test_step.py -k "gpu or feed" 2>&1 | tail -5 | tee $OUT/pytest.log
