#!/usr/bin/env bash
# One device call on two GPUs (nvidia-h200-x2), made of parts run in the order given (default:
# seed long). One-GPU runs use GPU 0. Logs under $OUT, the summary table last.
# Usage:  bash benchmarks/gpu_run2.sh [PART...]
#   tests     GPU-marked tests, float32 tiny verify on TP2+DCP2 (ag_rs, fused)
#   gputests  GPU-marked tests only
#   mla       MLA decode kernel bench at pages of 16 and 64 tokens, with its tile sweep at batch
#             128 (4k and 8k contexts; MLA_ARGS, e.g. "--tune-contexts 256 4096 --block-sizes 16")
#   prefill   prefill attention bench (SDPA kernels, masked / causal / V padded to the q/k width)
#   moe       MoE layer bench: Triton fused MoE vs torch._grouped_mm, batch 1..256, I=1408 and 704
#   tune      MoE tile sweep (paste into fused_moe.py); TUNE_ARGS, default: the TP2 width
#             (I=704) at batches 64..256
#   profiles  step profiles of the seed workload (batch 128) on TP1 and DCP2 (fused)
#   profile1  the TP1 step profile only, at contexts of ~40 and (as the seed bench) ~258 tokens
#   profile_long  step profiles at 4096-token contexts (TP2 batch 64, DCP2 batch 128)
#   teacher   teacher-forced bf16 logits of TP1 / TP2 / DCP2 (each comm mode), compared
#   seed      the seed workload on TP1, TP2 and DCP2 (each comm mode)
#   seed1     the seed workload on TP1 only, plus batch 1
#   seed2     the seed workload on TP2 and DCP2 (each comm mode)
#   qwen      the seed workload on TP1 with model=qwen2_5_1_5b (GQA)
#   long      long context where KV capacity binds: TP2 vs DCP2 (LONG_PROMPTS, default 256)
set -u
source "$(dirname "$0")/gpu_common.sh"
Q="print_config=false hydra.run.dir=$OUT/hydra"
SEED="task=bench task.num_prompts=128 task.input_len=2 task.output_len=512 task.num_warmups=16 scheduler.max_num_seqs=128 $Q"
# KV budget: TP2 holds exactly 64 requests of 4096 + 1024 tokens (64 * 5120 / 16 blocks per rank)
LONG_KV="block_table.num_blocks=20480"
for part in ${*:-seed long}; do case $part in
tests)
  step gpu_tests 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider
  step tiny_fp32_dcp2_ag_rs 150 python3 cli.py task=verify model.dtype=float32 parallel.dcp=2 parallel.dcp_comm=ag_rs $Q
  step tiny_fp32_dcp2_fused 150 python3 cli.py task=verify model.dtype=float32 parallel.dcp=2 parallel.dcp_comm=fused $Q ;;
gputests)
  step gpu_tests 240 python3 -m pytest -q -m gpu tests -p no:cacheprovider ;;
mla)
  step mla_decode_bench 300 python3 benchmarks/mla_decode_bench.py --tune ${MLA_ARGS:-} --out $OUT/mla.json
  grep -A60 '^ *page' $OUT/mla_decode_bench.log ;;
prefill)
  step prefill_attention_bench 120 python3 benchmarks/prefill_attention_bench.py --out $OUT/prefill.json
  grep -A30 '^shape' $OUT/prefill_attention_bench.log ;;
moe)
  step moe_bench 240 python3 benchmarks/moe_bench.py --out $OUT/moe.json
  grep -A16 '^ *I batch' $OUT/moe_bench.log ;;
tune)
  step moe_tune 500 python3 benchmarks/moe_bench.py --tune ${TUNE_ARGS:---intermediate-sizes 704 --batches 64 128 256} --out $OUT/moe_tune.json
  grep -E -A12 'best configs|^ *I |tuning' $OUT/moe_tune.log ;;
profile1)
  CUDA_VISIBLE_DEVICES=0 step profile_tp1 150 python3 benchmarks/step_profile.py
  CUDA_VISIBLE_DEVICES=0 step profile_tp1_ctx258 150 python3 benchmarks/step_profile.py --prompt-len 230
  grep -A12 '^step' $OUT/profile_tp1.log; grep -A80 '^step' $OUT/profile_tp1_ctx258.log ;;
profiles)
  CUDA_VISIBLE_DEVICES=0 step profile_tp1 150 python3 benchmarks/step_profile.py
  step profile_dcp2_fused 150 python3 benchmarks/step_profile.py parallel.dcp=2
  for f in profile_tp1 profile_dcp2_fused; do
    echo "=== $f"; grep -A14 '^step' $OUT/$f.log; done ;;
profile_long)
  step profile_long_tp2 200 python3 benchmarks/step_profile.py --prompt-len 4096 parallel.tp=2 scheduler.max_num_seqs=64 $LONG_KV
  step profile_long_dcp2 200 python3 benchmarks/step_profile.py --prompt-len 4096 parallel.dcp=2 scheduler.max_num_seqs=128 $LONG_KV
  for f in profile_long_tp2 profile_long_dcp2; do echo "=== $f"; grep -A24 '^step' $OUT/$f.log; done ;;
teacher)
  TF="python3 benchmarks/teacher_forced.py model=dsv2lite scheduler.max_num_seqs=8"
  CUDA_VISIBLE_DEVICES=0 step tf_tp1 120 $TF --save /tmp/tp1.pt
  step tf_tp2 120 $TF --save /tmp/tp2.pt parallel.tp=2
  for comm in fused ag_rs a2a; do
    step tf_dcp2_$comm 120 $TF --save /tmp/dcp2_$comm.pt parallel.dcp=2 parallel.dcp_comm=$comm
  done
  (cd /tmp && python3 $OLDPWD/benchmarks/teacher_forced.py --compare tp1.pt tp2.pt dcp2_fused.pt \
    dcp2_ag_rs.pt dcp2_a2a.pt) | tee $OUT/teacher_forced.txt ;;
seed1)
  CUDA_VISIBLE_DEVICES=0 step tp1 200 python3 cli.py model=dsv2lite $SEED
  CUDA_VISIBLE_DEVICES=0 step tp1_batch1 200 python3 cli.py model=dsv2lite task=bench task.num_prompts=4 task.input_len=2 task.output_len=256 task.num_warmups=1 task.max_concurrency=1 scheduler.max_num_seqs=1 $Q ;;
qwen)
  CUDA_VISIBLE_DEVICES=0 step qwen_tp1 200 python3 cli.py model=qwen2_5_1_5b $SEED ;;
seed|seed2)
  [ $part = seed ] && CUDA_VISIBLE_DEVICES=0 step tp1 200 python3 cli.py model=dsv2lite $SEED
  step tp2 200 python3 cli.py model=dsv2lite parallel.tp=2 $SEED
  for comm in fused ag_rs a2a; do
    step dcp2_$comm 200 python3 cli.py model=dsv2lite parallel.dcp=2 parallel.dcp_comm=$comm $SEED
  done ;;
long)
  LONG="model=dsv2lite task=bench task.input_len=4096 task.output_len=1024 task.num_prompts=${LONG_PROMPTS:-256} scheduler.max_num_seqs=256 $LONG_KV $Q"
  step long_tp2 590 python3 cli.py parallel.tp=2 $LONG
  step long_dcp2 590 python3 cli.py parallel.dcp=2 $LONG ;;
*) echo "unknown part $part"; exit 2 ;;
esac; done
echo; echo "=== summary"; cat "$summary"
