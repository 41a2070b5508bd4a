#!/usr/bin/env bash
# Sample one checkpoint at several temperatures (and top-k / top-p values, if given), one file per
# setting, each under a header naming the checkpoint, the seed and every sampling setting.
#
#   bash sweep.sh                                   # checkpoints/best.pt at T = 0.5 0.8 1.0 1.2
#   TEMPS="0.7 1.0" TOP_KS="0 40" TOP_PS="1.0 0.9" SEED=7 bash sweep.sh checkpoints/last.pt
#
# SEED, NUM_SAMPLES, MAX_NEW_TOKENS and PROMPT are passed on only when set, so a sweep file holds
# what a plain generate.py call with the same settings writes.
set -euo pipefail

checkpoint=${1:-checkpoints/best.pt}
out_dir=${OUT_DIR:-samples}
here=$(cd "$(dirname "$0")" && pwd)

given=()
[ -n "${SEED:-}" ] && given+=(--seed "$SEED")
[ -n "${NUM_SAMPLES:-}" ] && given+=(--num_samples "$NUM_SAMPLES")
[ -n "${MAX_NEW_TOKENS:-}" ] && given+=(--max_new_tokens "$MAX_NEW_TOKENS")
[ -n "${PROMPT:-}" ] && given+=(--prompt "$PROMPT")

mkdir -p "$out_dir"
for t in ${TEMPS:-0.5 0.8 1.0 1.2}; do
  for k in ${TOP_KS:-0}; do
    for p in ${TOP_PS:-1.0}; do
      name="samples_T${t}"
      [ "$k" != 0 ] && name+="_k${k}"
      [ "$p" != 1.0 ] && [ "$p" != 1 ] && name+="_p${p}"
      python "$here/generate.py" "$checkpoint" ${given[@]+"${given[@]}"} \
        --temperature "$t" --top_k "$k" --top_p "$p" --output_file "$out_dir/$name.txt" > /dev/null
      echo "wrote $out_dir/$name.txt"
    done
  done
done
