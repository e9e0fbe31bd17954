# The shared start of the one-GPU visit scripts (scale-, speed-, sweep-, throughput-visit.sh),
# sourced after they set `stage` (the unpacked stage directory, holding whl/ with the tiktoken
# and regex wheels where a step needs them): sets `out` ($OUT, else gpu-out), puts the wheels on PYTHONPATH (installed
# once per machine under /tmp/pylib), writes $out/gpu.txt, and defines `step`.
out=${OUT:-gpu-out}
mkdir -p "$out" /tmp/visit
export PYTHONPATH=/tmp/pylib${PYTHONPATH:+:$PYTHONPATH}
[[ -d /tmp/pylib/tiktoken || ! -d $stage/whl ]] || python3 -m pip install --no-deps -q --target /tmp/pylib "$stage"/whl/*.whl
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt"
step() {  # NAME CMD...: run once per machine (marker /tmp/visit/NAME), log $out/NAME.txt, rc and seconds
  local name=$1; shift
  [[ -f /tmp/visit/$name ]] && return 0
  echo "== $name" >&2
  local t0=$SECONDS
  "$@" > "$out/$name.txt" 2>&1
  local rc=$?
  echo "rc=$rc wall_s=$((SECONDS - t0))" | tee -a "$out/$name.txt" >&2
  [[ $rc == 0 ]] && touch "/tmp/visit/$name"
  return $rc
}
