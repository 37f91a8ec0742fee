#!/usr/bin/env bash
# The paper's protocol on one GPU host: every GPU of it, bf16, all tasks of a benchmark (or TASKS).
set -euo pipefail

BENCHMARK="${BENCHMARK:-vtab}"                       # vtab | fgvc
ROOT_WORKDIR="${ROOT_WORKDIR:-runs/$BENCHMARK}"      # a folder per task, and report.md
PRETRAINED="${PRETRAINED:-ViT-B_16.npz}"             # Google's ImageNet-21k ViT-B/16
DATA_DIR="${DATA_DIR:-}"                             # empty: the benchmark script's default
INSTALL="${INSTALL:-1}"                              # 1: pip install jax[cuda12] and the project first
PYTHON="${PYTHON:-python}"
export TASKS="${TASKS:-}"                            # space-separated; empty: all of the benchmark

USAGE="usage: launch/gpu.sh [--dry_run] [--config.KEY=VALUE ...]
Installs JAX for CUDA and the project (INSTALL=1), then runs launch/\$BENCHMARK_all.sh with every GPU
of this host (JAX uses them all: whole runs are spread over them) in bfloat16. Resumable.
Variables: BENCHMARK, ROOT_WORKDIR, PRETRAINED, DATA_DIR, INSTALL, PYTHON, TASKS."

cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source launch/common.sh
parse_args "$USAGE" "$@"
if (( INSTALL )); then
  run "$PYTHON" -m pip install -U "jax[cuda12]" -e .
fi
flags=(--config.compute_dtype=bfloat16)
if (( DRY_RUN )); then
  flags+=(--dry_run)
fi
export ROOT_WORKDIR PRETRAINED DATA_DIR PYTHON
bash "launch/${BENCHMARK}_all.sh" "${flags[@]}" "${EXTRA[@]}"
