# sourced by the call scripts on the device: variant NAME -> /tmp/NAME, a copy of the tree patched by .gpu/patch_NAME.py
set -u
export PYTHONUNBUFFERED=1
variant() {
  rm -rf /tmp/$1 && mkdir -p /tmp/$1 && cp -r *.py configs tests /tmp/$1/ && python .gpu/patch_$1.py /tmp/$1 || exit 1
}
bench() {  # bench LIMIT LABEL DIR args...
  local limit=$1 label=$2 dir=$3; shift 3
  echo "=== $label ($(date +%T), limit $limit s): $*"
  (cd $dir && timeout $limit python bench.py "$@" 2>&1 | grep -v -E "^\s*$|Warning|warn\(" | tee -a $OUT/$label.log | tail -40)
  echo "=== $label done $(date +%T) rc=${PIPESTATUS[0]}"
}
save_cache() {  # in 15 MB parts (a returned file may be 16 MiB at most): here, cat ind.tgz.part* > .gpu/ind.tgz
  local d=/tmp/torchinductor_root; [ -d $d ] || return
  tar czf /tmp/ind.tgz -C /tmp torchinductor_root 2>/dev/null; ls -la /tmp/ind.tgz
  [ $(stat -c %s /tmp/ind.tgz) -lt 60000000 ] && split -b 15000000 /tmp/ind.tgz $OUT/ind.tgz.part
}
load_cache() {
  [ -f .gpu/ind.tgz ] && [ ! -d /tmp/torchinductor_root ] && tar xzf .gpu/ind.tgz -C /tmp && echo "cache loaded"
}
