#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2): the one-GPU benches on GPU 0, then TP2 / DCP2
# (each comm mode) on both, then the long-context capacity run. Logs under $OUT, a table last.
# Usage:  bash benchmarks/gpu_run2.sh [short|long|all|profile]
#   profile: GPU tests, MLA decode kernel bench, step profiles (TP1, TP2+DCP2 fused) and the
#   teacher-forced bf16 logits of TP1 / TP2 / DCP2 (each comm mode) compared.
set -u
source "$(dirname "$0")/gpu_common.sh"
MODE=${1:-all}
Q="print_config=false hydra.run.dir=$OUT/hydra"
SEED="task=bench task.num_prompts=128 task.input_len=2 task.output_len=512 task.num_warmups=16 scheduler.max_num_seqs=128 $Q"
if [ "$MODE" = profile ]; then
  step gpu_tests 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider
  step mla_decode_bench 120 python3 benchmarks/mla_decode_bench.py --out $OUT/mla.json
  CUDA_VISIBLE_DEVICES=0 step profile_tp1 150 python3 benchmarks/step_profile.py
  step profile_dcp2_fused 150 python3 benchmarks/step_profile.py parallel.dcp=2
  TF="python3 benchmarks/teacher_forced.py model=dsv2lite scheduler.max_num_seqs=8"
  CUDA_VISIBLE_DEVICES=0 step tf_tp1 120 $TF --save /tmp/tp1.pt
  step tf_tp2 120 $TF --save /tmp/tp2.pt parallel.tp=2
  for comm in fused ag_rs a2a; do
    step tf_dcp2_$comm 120 $TF --save /tmp/dcp2_$comm.pt parallel.dcp=2 parallel.dcp_comm=$comm
  done
  (cd /tmp && python3 $OLDPWD/benchmarks/teacher_forced.py --compare tp1.pt tp2.pt dcp2_fused.pt \
    dcp2_ag_rs.pt dcp2_a2a.pt) | tee $OUT/teacher_forced.txt
  for f in profile_tp1 profile_dcp2_fused mla_decode_bench; do echo "=== $f"; tail -45 $OUT/$f.log; done
  echo; echo "=== summary"; cat "$summary"; exit 0
fi
if [ "$MODE" != long ]; then
  step gpu_kernel_tests 200 python3 -m pytest -q -m gpu tests/kernels/test_rms_norm.py -p no:cacheprovider
  step tiny_fp32_tp2_dcp2 150 python3 cli.py task=verify model.dtype=float32 parallel.tp=2 parallel.dcp=2 $Q
  step tiny_fp32_fused 150 python3 cli.py task=verify model.dtype=float32 parallel.tp=2 parallel.dcp=2 parallel.dcp_comm=fused $Q
  CUDA_VISIBLE_DEVICES=0 step tp1 200 python3 cli.py model=dsv2lite $SEED
  step tp2 200 python3 cli.py model=dsv2lite parallel.tp=2 $SEED
  step dcp2_ag_rs 200 python3 cli.py model=dsv2lite parallel.dcp=2 $SEED
  step dcp2_a2a 200 python3 cli.py model=dsv2lite parallel.dcp=2 parallel.dcp_comm=a2a $SEED
  step dcp2_fused 200 python3 cli.py model=dsv2lite parallel.dcp=2 parallel.dcp_comm=fused $SEED
fi
if [ "$MODE" != short ]; then
  # KV budget: TP2 holds exactly 64 requests of 4096 + 1024 tokens (64 * 5120 / 16 blocks per rank)
  LONG="model=dsv2lite task=bench task.input_len=4096 task.output_len=1024 task.num_prompts=${LONG_PROMPTS:-256} scheduler.max_num_seqs=256 block_table.num_blocks=20480 $Q"
  step long_tp2 590 python3 cli.py parallel.tp=2 $LONG
  step long_dcp2 590 python3 cli.py parallel.dcp=2 $LONG
fi
echo; echo "=== summary"; cat "$summary"
