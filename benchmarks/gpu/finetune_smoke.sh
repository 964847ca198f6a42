#!/usr/bin/env bash
# The fine-tuning loop on a GPU, end to end (one run of it so far, cut by run.sh's time): `llmcore finetune` on
# CUDA, bf16 packed, then its resume from the last checkpoint, a causal LM (bf16 packed), bf16 packed with the
# model sharded by FSDP (torchrun, one rank), then padded and fp32. Inputs from make_finetune_smoke.py
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
# Each run at most 300 s and, where run.sh gives a deadline (SMOKE_END, epoch seconds), none past it: a run with
# no time left is skipped (rc 124), and a TERM (run.sh's own timeout) stops the run in progress too (a timeout
# started from a script is a process group of its own, which outlived run.sh's and held the GPU).
END=${SMOKE_END:-0}
child=
trap '[ -n "$child" ] && kill -TERM "$child" 2>/dev/null; exit 124' TERM INT
limited() {  # command...: run under the limits above; its exit status
  local t=300
  if [ "$END" -gt 0 ]; then
    t=$(( END - $(date +%s) )); [ $t -gt 300 ] && t=300
    [ $t -lt 10 ] && { echo "(no time left: not run)"; return 124; }
  fi
  timeout "$t" "$@" & child=$!
  wait "$child"; local rc=$?; child=
  return $rc
}
finetune() {  # title, log file, run folder (summarized when it ends well), finetune command...
  local title=$1 log=$2 run=$3; shift 3
  local t0 rc
  t0=$(date +%s)
  limited "$@" >"$log" 2>&1
  rc=$?; [ $rc = 0 ] || status=1
  echo "=== $title: rc $rc in $(( $(date +%s) - t0 )) s"
  grep '"loss"' "$log" | cut -c1-150
  if [ $rc = 0 ] && [ -n "$run" ]; then summary "$run"; else tail -5 "$log"; fi
}
# In order of what each adds, so that a short time still runs the first ones (run.sh keeps about 90 s; one run
# took 47 s on the H200): the main path, its resume, the causal LM, FSDP, then padded and fp32.
finetune "bf16 pack" "$OUT/ft-bf16-pack.log" "$OUT/ft-bf16-pack" "$PY" -m llmcore.cli finetune "${args[@]}" \
  --model "$SMOKE/model" --output-dir "$OUT/ft-bf16-pack" --max-steps 60 --bf16 --pack
if [ -d "$OUT/ft-bf16-pack/checkpoint-60" ]; then
  finetune "resume bf16 pack from checkpoint-60 to step 80" "$OUT/resume.log" "" "$PY" -m llmcore.cli finetune \
    "${args[@]}" --model "$SMOKE/model" --output-dir "$OUT/ft-bf16-pack" --max-steps 80 --bf16 --pack \
    --resume-from-checkpoint true
fi
# causal LM: a tiny Llama on the same texts' next tokens (Triton LM-head loss, GQA attention), bf16 packed
if [ -d "$SMOKE/llama" ]; then
  finetune "causal-lm bf16 pack" "$OUT/ft-causal-lm-bf16-pack.log" "$OUT/ft-causal-lm-bf16-pack" \
    "$PY" -m llmcore.cli finetune "${args[@]}" --model "$SMOKE/llama" --task causal-lm \
    --output-dir "$OUT/ft-causal-lm-bf16-pack" --max-steps 40 --bf16 --pack --save-strategy no
fi
# the model sharded by FSDP2 (nccl), one rank: the DTensor / collective path on a GPU
finetune "bf16 pack fsdp full_shard (torchrun, 1 rank)" "$OUT/ft-bf16-pack-fsdp.log" "$OUT/ft-bf16-pack-fsdp" \
  "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 -m llmcore.cli finetune "${args[@]}" \
  --model "$SMOKE/model" --output-dir "$OUT/ft-bf16-pack-fsdp" --max-steps 60 --bf16 --pack --fsdp full_shard
for run in "bf16 no-pack" "no-bf16 pack" "no-bf16 no-pack"; do
  prec=${run% *} pack=${run#* }
  finetune "$prec $pack" "$OUT/ft-$prec-$pack.log" "$OUT/ft-$prec-$pack" "$PY" -m llmcore.cli finetune "${args[@]}" \
    --model "$SMOKE/model" --output-dir "$OUT/ft-$prec-$pack" --max-steps 60 --"$prec" --"$pack"
done
exit $status
