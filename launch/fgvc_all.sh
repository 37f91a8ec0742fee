#!/usr/bin/env bash
# The paper's protocol on the five FGVC data sets into one root workdir, then the report.
set -euo pipefail

ROOT_WORKDIR="${ROOT_WORKDIR:-runs/fgvc}"            # a folder per data set, and report.md
PRETRAINED="${PRETRAINED:-ViT-B_16.npz}"             # Google's ImageNet-21k ViT-B/16
DATA_DIR="${DATA_DIR:-$HOME/fgvc}"                   # the data sets' folders with their json splits
PYTHON="${PYTHON:-python}"
REPORT="${REPORT:-1}"                                # 0: no report at the end
TASKS="${TASKS:-}"                                   # space-separated; empty: all 5

USAGE="usage: launch/fgvc_all.sh [--dry_run] [--config.KEY=VALUE ...]
Runs --config.mode=protocol of configs/fgvc.py for every data set (TASKS, default all 5) into
ROOT_WORKDIR/<task>, resumable; a data set that fails is reported and skipped; then the report.
Variables: ROOT_WORKDIR, PRETRAINED, DATA_DIR, PYTHON, REPORT, TASKS. --dry_run prints the commands."

cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source launch/common.sh
parse_args "$USAGE" "$@"
protocol_all configs/fgvc.py FGVC
