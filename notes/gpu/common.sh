# sourced by the call scripts on the device: variant NAME -> /tmp/NAME, a copy of the tree changed by .gpu/NAME.diff
# (git diff of the repository) or by .gpu/patch_NAME.py
set -u
export PYTHONUNBUFFERED=1
variant() {
  rm -rf /tmp/$1 && mkdir -p /tmp/$1 && cp -r *.py configs tests /tmp/$1/ || exit 1
  if [ -f .gpu/$1.diff ]; then
    (patch -p1 -d /tmp/$1 < .gpu/$1.diff || (cd /tmp/$1 && git apply $OLDPWD/.gpu/$1.diff)) && echo "variant $1: .gpu/$1.diff" || exit 1
  else
    python .gpu/patch_$1.py /tmp/$1 || exit 1
  fi
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
