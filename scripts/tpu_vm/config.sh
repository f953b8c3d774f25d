# shellcheck shell=bash
# Settings shared by the scripts in scripts/tpu_vm/ (sourced by each of them). Every value can
# be overridden from the environment, e.g. `TPU_NAME=big ACCELERATOR_TYPE=v4-32 ./create.sh`.
#
#   create.sh      create the TPU VM or pod slice (on-demand, spot, or a spot queued resource)
#   setup.sh       on every worker: Python venv, jax[tpu], this project; the dataset copy
#   train.sh       start training on every worker, detached from the SSH session
#   logs.sh        follow the training log of one worker
#   stop.sh        SIGTERM the training on every worker (it checkpoints and exits)
#   run_spot.sh    keep a spot / preemptible run going: recreate, set up and resume after
#                  every preemption until the run has finished
#   delete.sh      delete the TPU VM (and its queued resource)

# --- where and what --------------------------------------------------------------------------
PROJECT="${PROJECT:-}"                          # '' -> the gcloud default project
TPU_NAME="${TPU_NAME:-memseg-tpu}"              # TPU VM (node) name
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-8}"    # v4-8: one host; v4-32: a 4-host pod slice
RUNTIME_VERSION="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
# on-demand | spot | preemptible | queued-spot (a queued resource of spot capacity)
PROVISIONING="${PROVISIONING:-on-demand}"
QUEUED_RESOURCE="${QUEUED_RESOURCE:-${TPU_NAME}-qr}"

# --- software --------------------------------------------------------------------------------
REPO_URL="${REPO_URL:-https://github.com/YOUR_ORG/memseg_jax.git}"
REPO_REF="${REPO_REF:-main}"
PYTHON="${PYTHON:-python3.11}"                  # jax 0.10 needs Python >= 3.11 (apt package)
REMOTE_DIR="${REMOTE_DIR:-memseg_jax}"          # checkout, relative to the home directory
REMOTE_VENV="${REMOTE_VENV:-memseg_venv}"       # virtual environment, relative to home

# --- data and outputs ------------------------------------------------------------------------
# The prepared tfds data dir (scripts/prepare_datasets.py), uploaded once with
#   gcloud storage cp --recursive ~/tensorflow_datasets/ade20k gs://BUCKET/tfds/
DATA_GCS="${DATA_GCS:-gs://YOUR_BUCKET/tfds}"
# copy: `gcloud storage cp` to DATA_LOCAL on every worker (fast local reads);
# gcs:  read DATA_GCS in place (tf.data reads gs:// itself; nothing to copy).
DATA_MODE="${DATA_MODE:-copy}"
DATA_LOCAL="${DATA_LOCAL:-tensorflow_datasets}" # relative to the home directory
DATASET="${DATASET:-ade20k}"                    # folder under DATA_GCS to copy
CONFIG="${CONFIG:-configs/ade20k.py}"
WORKDIR="${WORKDIR:-gs://YOUR_BUCKET/runs/mcibi_ade20k}"   # checkpoints, summaries, results
LOG_DIR="${LOG_DIR:-memseg_logs}"               # on every worker, relative to home

# --- helpers ---------------------------------------------------------------------------------
project_flags=()
if [[ -n "${PROJECT}" ]]; then
  project_flags=(--project="${PROJECT}")
fi

# Runs a shell command on the given worker(s) (0, 1, ... or all) of the TPU VM.
tpu_ssh() {
  local worker="$1" command="$2"
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" ${project_flags[@]+"${project_flags[@]}"} \
    --worker="${worker}" --command="${command}"
}

# Copies the worker_*.sh scripts into the home directory of every worker.
copy_worker_scripts() {
  local here
  here="$(dirname "${BASH_SOURCE[0]}")"
  gcloud compute tpus tpu-vm scp "${here}/worker_setup.sh" "${here}/worker_train.sh" \
    "${TPU_NAME}:" --zone="${ZONE}" ${project_flags[@]+"${project_flags[@]}"} --worker=all
}

# "NAME=value ..." for the named settings, quoted for the remote bash.
remote_env() {
  local name out=""
  for name in "$@"; do
    out+="${name}=$(printf '%q' "${!name}") "
  done
  printf '%s' "${out}"
}

# The data dir the training reads on the workers (a relative path is taken from home there).
remote_data_dir() {
  if [[ "${DATA_MODE}" == "gcs" ]]; then
    printf '%s' "${DATA_GCS}"
  else
    printf '%s' "${DATA_LOCAL}"
  fi
}
