#!/usr/bin/env bash
# Starts training on every worker at once (worker_train.sh): each process runs detached from the
# SSH session (setsid + nohup), so closing this terminal does not stop it. Arguments go to
# memseg_jax.main, e.g. ./train.sh --config.train.batch_size=32. Running it again while the
# training runs does nothing; after a stop or a preemption it resumes from the latest
# checkpoint in WORKDIR.
#
#   ./train.sh && ./logs.sh
#
# gcloud commands and flags used, as documented in the gcloud reference
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/tpu-vm/...):
#   gcloud compute tpus tpu-vm scp SRC... TPU: --zone --worker=all                     (scp)
#   gcloud compute tpus tpu-vm ssh TPU --zone --worker=all --command                  (ssh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

copy_worker_scripts
DATA_DIR="$(remote_data_dir)"
export DATA_DIR
settings="$(remote_env REMOTE_DIR REMOTE_VENV CONFIG WORKDIR DATA_DIR LOG_DIR)"
args=""
if (($# > 0)); then
  args="$(printf ' %q' "$@")"
fi
tpu_ssh all "${settings} bash ./worker_train.sh${args}"
echo "training on every worker of ${TPU_NAME}; ./logs.sh follows worker 0"
