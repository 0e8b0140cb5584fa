# Sourced by gpu_run.sh and gpu_run2.sh on the device machine: environment (carried wheels,
# compiled Triton, NCCL without NVLink multicast), $OUT, and `step NAME TIMEOUT CMD...`, which runs
# one command into $OUT/NAME.log and appends its headline figures to $OUT/summary.txt.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0 NCCL_NVLS_ENABLE=0 PYTHONPATH=$PWD:${PYTHONPATH:-}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
summary="$OUT/summary.txt"; : > "$summary"
step() {
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; local rc=$?
  local log="$OUT/$name.log"
  local tpot=$(grep -m1 'Mean TPOT' "$log" | awk '{print $NF}')
  local tput=$(grep -m1 'Output token throughput' "$log" | awk '{print $NF}')
  local dec=$(grep -m1 'decode-phase output throughput' "$log" | awk '{print $9}')
  local cap=$(grep -m1 -o 'KV capacity [0-9]*' "$log" | awk '{print $3}')
  printf '%-26s rc=%-3s %4ss TPOT=%-7s tok/s=%-9s decode tok/s=%-9s KV=%s\n' "$name" "$rc" \
    "$(( $(date +%s) - t0 ))" "${tpot:--}" "${tput:--}" "${dec:--}" "${cap:--}" | tee -a "$summary"
  [ $rc -ne 0 ] && tail -5 "$log"
}
