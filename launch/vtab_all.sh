#!/usr/bin/env bash
# The paper's protocol on every VTAB-1k task into one root workdir, then the report.
set -euo pipefail

ROOT_WORKDIR="${ROOT_WORKDIR:-runs/vtab}"            # a folder per task, and report.md
PRETRAINED="${PRETRAINED:-ViT-B_16.npz}"             # Google's ImageNet-21k ViT-B/16
DATA_DIR="${DATA_DIR:-$HOME/tensorflow_datasets}"    # where e2vpt_jax.data.prepare put the tasks
PYTHON="${PYTHON:-python}"
REPORT="${REPORT:-1}"                                # 0: no report at the end
TASKS="${TASKS:-}"                                   # space-separated; empty: all 19

USAGE="usage: launch/vtab_all.sh [--dry_run] [--config.KEY=VALUE ...]
Runs --config.mode=protocol of configs/vtab.py for every task (TASKS, default all 19) into
ROOT_WORKDIR/<task>, resumable: run it again after a failure or preemption. A task that fails
(e.g. its data is not prepared) is reported and skipped. Then python -m e2vpt_jax.report ROOT_WORKDIR.
Variables: ROOT_WORKDIR, PRETRAINED, DATA_DIR, PYTHON, REPORT, TASKS. --dry_run prints the commands."

cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source launch/common.sh
parse_args "$USAGE" "$@"
protocol_all configs/vtab.py VTAB
