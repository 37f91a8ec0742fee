# Shared by the launch scripts (sourced, not run): the dry-run switch and the all-task loop.
# shellcheck shell=bash

DRY_RUN=0
EXTRA=()

# Reads --dry_run and -h/--help; every other argument is passed on to each training command.
parse_args() {
  local usage=$1
  shift
  for arg in "$@"; do
    case "$arg" in
      --dry_run) DRY_RUN=1 ;;
      -h|--help) echo "$usage"; exit 0 ;;
      *) EXTRA+=("$arg") ;;
    esac
  done
}

# Runs a command, or with --dry_run prints it (quoted, one line) instead.
run() {
  if (( DRY_RUN )); then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# protocol_all CONFIG TABLE: the protocol of every task in TASKS (default: all of e2vpt_jax.paper.TABLE) into
# ROOT_WORKDIR/<task>, resumable; a task that fails is reported and skipped; then the report (unless REPORT=0).
protocol_all() {
  local config=$1 table=$2 tasks failed=()
  read -r -a tasks <<< "${TASKS:-$("$PYTHON" -c "from e2vpt_jax import paper; print(*paper.$table)")}"
  for task in "${tasks[@]}"; do
    if ! run "$PYTHON" -m e2vpt_jax.main --config="$config:task=$task" --config.mode=protocol \
        --config.pretrained="$PRETRAINED" --config.data.data_dir="$DATA_DIR" --workdir="$ROOT_WORKDIR/$task" \
        "${EXTRA[@]}"; then
      echo "$task failed (see its error above); going on with the other tasks" >&2
      failed+=("$task")
    fi
  done
  if (( REPORT )); then
    run "$PYTHON" -m e2vpt_jax.report "$ROOT_WORKDIR"
  fi
  if (( ${#failed[@]} )); then
    echo "failed: ${failed[*]}; fix them (e.g. prepare their data) and run the same command: finished runs are kept" >&2
    return 1
  fi
}
