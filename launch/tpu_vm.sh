#!/usr/bin/env bash
# The paper's protocol on a Cloud TPU VM or pod slice: create it, copy the code to every worker, install,
# run every task's protocol on all workers as one JAX job (data and workdir in a GCS bucket), delete it.
set -euo pipefail

PROJECT="${PROJECT:-my-project}"                     # gcloud project
ZONE="${ZONE:-us-central2-b}"                        # a zone with the accelerator type
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"         # v4-8 is one host; v4-32 and up are pods (many workers)
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
TPU_NAME="${TPU_NAME:-e2vpt}"
BUCKET="${BUCKET:-gs://my-bucket}"                   # holds ViT-B_16.npz, tensorflow_datasets/ (or fgvc/); gets runs/
BENCHMARK="${BENCHMARK:-vtab}"                       # vtab | fgvc
export TASKS="${TASKS:-}"                            # space-separated; empty: all of the benchmark
MOUNT=/tmp/bucket                                    # where each worker mounts the bucket (gcsfuse)

USAGE="usage: launch/tpu_vm.sh [--dry_run] [--config.KEY=VALUE ...]
Creates TPU VM \$TPU_NAME (\$ACCELERATOR_TYPE in \$ZONE), copies this checkout to every worker, installs
jax[tpu] and the project, mounts \$BUCKET with gcsfuse, runs launch/\$BENCHMARK_all.sh on all workers with
--config.distributed=True (one job over every chip; resumable: run the script again after a preemption),
writes the report from worker 0, and deletes the VM. --dry_run prints the commands (and what each worker runs).
Variables: PROJECT, ZONE, ACCELERATOR_TYPE, RUNTIME_VERSION, TPU_NAME, BUCKET, BENCHMARK, TASKS."

cd "$(dirname "$0")/.."
# shellcheck source-path=SCRIPTDIR/..
source launch/common.sh
parse_args "$USAGE" "$@"
data_dir=$MOUNT/tensorflow_datasets
if [[ "$BENCHMARK" == fgvc ]]; then
  data_dir=$MOUNT/fgvc
fi
tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")
every=(--worker=all)
code=/tmp/e2vpt_jax.tar.gz                            # this checkout's committed files
fuse="echo 'deb https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main' | sudo tee /etc/apt/sources.list.d/gcsfuse.list && curl -s https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo apt-key add - && sudo apt-get update -q && sudo apt-get install -yq gcsfuse"
setup="mkdir -p ~/e2vpt_jax && tar -xzf ~/e2vpt_jax.tar.gz -C ~/e2vpt_jax && pip install -U 'jax[tpu]' -e ~/e2vpt_jax && $fuse && mkdir -p $MOUNT && gcsfuse --implicit-dirs ${BUCKET#gs://} $MOUNT"
job=(env ROOT_WORKDIR="$MOUNT/runs/$BENCHMARK" PRETRAINED="$MOUNT/ViT-B_16.npz" DATA_DIR="$data_dir"
     TASKS="$TASKS" REPORT=0 PYTHON=python3 bash "launch/${BENCHMARK}_all.sh" --config.distributed=True
     --config.compute_dtype=bfloat16 "${EXTRA[@]}")
report=(python3 -m e2vpt_jax.report "$MOUNT/runs/$BENCHMARK")

run "${tpu[@]}" create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" --version="$RUNTIME_VERSION"
run git archive --format=tar.gz -o "$code" HEAD
run "${tpu[@]}" scp "$code" "$TPU_NAME:~/e2vpt_jax.tar.gz" "${every[@]}"
run "${tpu[@]}" ssh "$TPU_NAME" "${every[@]}" --command="$setup"
run "${tpu[@]}" ssh "$TPU_NAME" "${every[@]}" --command="cd ~/e2vpt_jax && ${job[*]@Q}"
run "${tpu[@]}" ssh "$TPU_NAME" --worker=0 --command="cd ~/e2vpt_jax && ${report[*]@Q}"
run "${tpu[@]}" delete "$TPU_NAME" --quiet
if (( DRY_RUN )); then
  echo "# each worker runs:"
  ROOT_WORKDIR="$MOUNT/runs/$BENCHMARK" PRETRAINED="$MOUNT/ViT-B_16.npz" DATA_DIR="$data_dir" REPORT=0 \
      bash "launch/${BENCHMARK}_all.sh" --dry_run --config.distributed=True --config.compute_dtype=bfloat16 \
      "${EXTRA[@]}"
fi
