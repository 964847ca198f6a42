#!/usr/bin/env bash
# The fine-tuning loop on a GPU, end to end (not yet run on one): `llmcore finetune` on CUDA in bf16 and
# fp32, packed and padded, a causal LM (bf16 packed), bf16 packed with the model sharded by FSDP (torchrun,
# one rank), then a resume from the last checkpoint. Inputs from make_finetune_smoke.py
# (carry that folder); llmcore must be built in place first (benchmarks/gpu/run.sh does it).
#
#   SMOKE=build-gpu-smoke OUT=$OUT bash benchmarks/gpu/finetune_smoke.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH=$(pwd)${PYTHONPATH:+:$PYTHONPATH}
SMOKE=${SMOKE:-build-gpu-smoke}
OUT=${OUT:-build/finetune-smoke}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
status=0
args=(--data "$SMOKE/data" --per-device-train-batch-size 32 --disable-tqdm --report-to none
      --logging-steps 20 --learning-rate 1e-3 --warmup-steps 5 --save-strategy steps --save-steps 30)
summary() {  # run folder: the results' headline figures
  "$PY" -c "import json, sys; r = json.load(open(sys.argv[1] + '/results.json'))
print({k: r[k] for k in ('global_step', 'train_loss', 'train_samples_per_second', 'eval_accuracy', 'eval_perplexity',
                        'peak_memory_mb') if k in r})" "$1"
}
for prec in bf16 no-bf16; do
  for pack in pack no-pack; do
    run="$OUT/ft-$prec-$pack"
    t0=$(date +%s)
    timeout 300 "$PY" -m llmcore.cli finetune "${args[@]}" --model "$SMOKE/model" --output-dir "$run" --max-steps 60 \
      --"$prec" --"$pack" >"$run.log" 2>&1
    rc=$?; [ $rc = 0 ] || status=1
    echo "=== $prec $pack: rc $rc in $(( $(date +%s) - t0 )) s"
    grep '"loss"' "$run.log" | cut -c1-150
    [ $rc = 0 ] && summary "$run" || tail -5 "$run.log"
  done
done
# causal LM: a tiny Llama on the same texts' next tokens (Triton LM-head loss, GQA attention), bf16 packed
run="$OUT/ft-causal-lm-bf16-pack"
if [ -d "$SMOKE/llama" ]; then
  t0=$(date +%s)
  timeout 300 "$PY" -m llmcore.cli finetune "${args[@]}" --model "$SMOKE/llama" --task causal-lm \
    --output-dir "$run" --max-steps 40 --bf16 --pack --save-strategy no >"$run.log" 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  echo "=== causal-lm bf16 pack: rc $rc in $(( $(date +%s) - t0 )) s"
  grep '"loss"' "$run.log" | cut -c1-150
  [ $rc = 0 ] && summary "$run" || tail -5 "$run.log"
fi
# the model sharded by FSDP2 (nccl), one rank: the DTensor / collective path on a GPU
run="$OUT/ft-bf16-pack-fsdp"
t0=$(date +%s)
timeout 300 "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m llmcore.cli finetune "${args[@]}" \
  --model "$SMOKE/model" --output-dir "$run" --max-steps 60 --bf16 --pack --fsdp full_shard >"$run.log" 2>&1
rc=$?; [ $rc = 0 ] || status=1
echo "=== bf16 pack fsdp full_shard (torchrun, 1 rank): rc $rc in $(( $(date +%s) - t0 )) s"
grep '"loss"' "$run.log" | cut -c1-150
[ $rc = 0 ] && summary "$run" || tail -5 "$run.log"
timeout 300 "$PY" -m llmcore.cli finetune "${args[@]}" --model "$SMOKE/model" --output-dir "$OUT/ft-bf16-pack" --max-steps 80 --bf16 --pack \
  --resume-from-checkpoint true >"$OUT/resume.log" 2>&1
rc=$?; [ $rc = 0 ] || status=1
echo "=== resume bf16 pack from checkpoint-60 to step 80: rc $rc"
grep '"loss"' "$OUT/resume.log" | cut -c1-150
exit $status
