# 19 and 20 (not run yet): configs/sft.py's step setting (compiled, full checkpointing). #19: the synthetic rows of
# both processes are the compiled full-checkpointing pair on one card (the ViT does not run on the synthetic pack);
# #20: real packs, the ViT's layers compiled too (vitcompile.diff) against the code. D=/tmp/thread: both on the
# Feed's thread. A fresh machine compiles the decoder layers for over 4 minutes in the first process.
source .gpu/common.sh
nvidia-smi --query-gpu=name --format=csv,noheader
load_cache
variant vitcompile
B=${D:-.}
if [ "$B" = /tmp/thread ]; then
  variant thread
  (cd /tmp/vitcompile && patch -p1 < $OLDPWD/.gpu/thread.diff > /dev/null) || exit 1
fi
E="--activation_checkpointing=full --rows=40 --data_args={'workers':8,'prefetch':2} --steps=10 --warmup=3"
bench 330 base $B $E --data=synthetic,real:edit,real:vlm,real
bench 250 vitcompile /tmp/vitcompile $E --data=synthetic,real:edit,real:vlm,real
save_cache
