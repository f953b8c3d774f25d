#!/usr/bin/env bash
# Installs everything on every worker of the TPU VM (worker_setup.sh): a Python venv with
# jax[tpu], this project (a checkout of REPO_URL at REPO_REF, installed editable) and, with
# DATA_MODE=copy, the prepared dataset copied from DATA_GCS to local disk. Safe to run again.
#
#   ./setup.sh
#
# gcloud commands and flags used, as documented in the gcloud reference
# (cloud.google.com/sdk/gcloud/reference/...):
#   gcloud compute tpus tpu-vm scp SRC... TPU: --zone --worker=all        (compute/tpus/tpu-vm/scp)
#   gcloud compute tpus tpu-vm ssh TPU --zone --worker=all --command      (compute/tpus/tpu-vm/ssh)
#   on the workers: gcloud storage cp --recursive SOURCE DESTINATION       (storage/cp)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

copy_worker_scripts
settings="$(remote_env REPO_URL REPO_REF PYTHON REMOTE_DIR REMOTE_VENV DATA_MODE DATA_GCS \
  DATASET DATA_LOCAL LOG_DIR)"
echo "setting up every worker of ${TPU_NAME} ..."
tpu_ssh all "${settings} bash ./worker_setup.sh"
echo "set up ${TPU_NAME}; next: ./train.sh"
