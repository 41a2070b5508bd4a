#!/usr/bin/env bash
# Sample one checkpoint at several temperatures (and optionally top-k / top-p values),
# one file per setting, each with a header naming the checkpoint, seed and parameters.
#
#   bash sweep.sh                                   # checkpoints/best.pt, T = 0.5 0.8 1.0 1.2
#   TEMPS="0.7 1.0" TOP_KS="0 40" TOP_PS="1.0 0.9" SEED=7 bash sweep.sh checkpoints/last.pt
#
# Same seed, same machine, same files: a sweep is reproducible.
set -euo pipefail

checkpoint=${1:-checkpoints/best.pt}
temps=${TEMPS:-"0.5 0.8 1.0 1.2"}
top_ks=${TOP_KS:-0}
top_ps=${TOP_PS:-1.0}
seed=${SEED:-42}
num_samples=${NUM_SAMPLES:-3}
max_new_tokens=${MAX_NEW_TOKENS:-300}
prompt=${PROMPT:-}
out_dir=${OUT_DIR:-samples}
here=$(cd "$(dirname "$0")" && pwd)

mkdir -p "$out_dir"
for t in $temps; do
  for k in $top_ks; do
    for p in $top_ps; do
      name="samples_T${t}"
      [ "$k" != 0 ] && name+="_k${k}"
      [ "$p" != 1.0 ] && name+="_p${p}"
      python "$here/generate.py" --checkpoint "$checkpoint" --prompt "$prompt" --seed "$seed" \
        --num_samples "$num_samples" --max_new_tokens "$max_new_tokens" \
        --temperature "$t" --top_k "$k" --top_p "$p" --output_file "$out_dir/$name.txt" > /dev/null
      echo "wrote $out_dir/$name.txt"
    done
  done
done
