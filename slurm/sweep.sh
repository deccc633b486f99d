#!/usr/bin/env bash
# An ablation sweep as a SLURM job array: one job per line of FILE, each line a set of extra
# overrides for train.py (blank lines and # comments are skipped). Every job gets the same
# resources and its own run directory (named after its overrides), is requeued on preemption
# like any run of slurm/train.sbatch, and resumes by itself.
#
#   slurm/sweep.sh FILE [SBATCH_OPTION ...] [-- OVERRIDE ...]
#   slurm/sweep.sh sweeps/lr.txt --nodes=1 --ntasks-per-node=8 --gpus-per-node=8 --array=%4 -- experiment=...
#   python slurm/collect.py outputs/train > results.md      # when they are done: one table
#
# `--array=%P` limits how many run at once (the index range is filled in here).
set -euo pipefail
file=${1:?usage: sweep.sh FILE [SBATCH_OPTION ...] [-- OVERRIDE ...]}
shift
opts=() overrides=() limit=""
while [[ $# -gt 0 ]]; do
  case $1 in
    --) shift; overrides=("$@"); break ;;
    --array=%*) limit=${1#--array=}; shift ;;
    *) opts+=("$1"); shift ;;
  esac
done
here=$(cd "$(dirname "$0")" && pwd)
export KONTEXT_ROOT=${KONTEXT_ROOT:-$(dirname "$here")}  # the checkout the jobs run from
mkdir -p outputs/sweeps
lines=outputs/sweeps/$(basename "${file%.*}")-$(date +%Y%m%d-%H%M%S).txt
grep -v -E '^[[:space:]]*(#|$)' "$file" > "$lines"
n=$(wc -l < "$lines")
[[ $n -gt 0 ]] || { echo "no runs in $file" >&2; exit 2; }
echo "submitting $n runs of $file (lines kept in $lines)"
sbatch --array="0-$((n - 1))${limit}" --export="ALL,KONTEXT_SWEEP=$(realpath "$lines")" "${opts[@]}" \
  "$here/train.sbatch" "${overrides[@]}"
