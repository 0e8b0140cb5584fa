#!/usr/bin/env bash
# One device call: GPU tests, then the bench runs of the GPU issues. Logs under $OUT, a table last.
# Usage on the device machine:  bash benchmarks/gpu_run.sh [quick]
set -u
source "$(dirname "$0")/gpu_common.sh"
BENCH="task=bench task.num_prompts=128 task.input_len=2 task.output_len=512 task.num_warmups=16 scheduler.max_num_seqs=128 print_config=false hydra.run.dir=$OUT/hydra"
MODE=${1:-all}   # all | quick (tests + one bench) | bench (benches only) | profile
[ "$MODE" = all -o "$MODE" = quick ] && step gpu_tests 300 python3 -m pytest -q -m gpu tests -x -p no:cacheprovider
[ "$MODE" != bench ] && step tiny_verify_torch 120 python3 cli.py task=verify model.dtype=float32 attention=torch graph=eager print_config=false hydra.run.dir=$OUT/hydra
[ "$MODE" != bench ] && step tiny_verify_triton_graph 120 python3 cli.py task=verify model.dtype=float32 attention=triton graph=cuda print_config=false hydra.run.dir=$OUT/hydra
[ "$MODE" = profile ] && {
  step moe_gpu_tests 200 python3 -m pytest -q -m gpu tests/kernels/test_fused_moe.py -p no:cacheprovider
  step moe_bench 200 python3 benchmarks/moe_bench.py --out $OUT/moe.json
  step mla_decode_bench 200 python3 benchmarks/mla_decode_bench.py --out $OUT/mla.json
  step step_profile 300 python3 benchmarks/step_profile.py
}
step dsv2lite_graph 300 python3 cli.py model=dsv2lite $BENCH
[ "$MODE" = quick ] && { cat "$summary"; exit 0; }
[ "$MODE" != profile ] && step dsv2lite_eager 300 python3 cli.py model=dsv2lite graph=eager $BENCH
step qwen_graph 200 python3 cli.py model=qwen2_5_1_5b $BENCH
step dsv2lite_batch1 200 python3 cli.py model=dsv2lite task=bench task.num_prompts=4 task.input_len=2 task.output_len=256 task.num_warmups=1 task.max_concurrency=1 scheduler.max_num_seqs=1 print_config=false hydra.run.dir=$OUT/hydra
echo; echo "=== summary"; cat "$summary"
