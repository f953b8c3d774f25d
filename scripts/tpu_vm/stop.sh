#!/usr/bin/env bash
# Stops the training on every worker the way a preemption does: SIGTERM to the recorded
# training process; every process saves a checkpoint at the same step and exits with status 0.
# ./train.sh resumes from it.
#
# gcloud command and flags used, as documented in the gcloud reference:
#   gcloud compute tpus tpu-vm ssh TPU --zone --worker=all --command (compute/tpus/tpu-vm/ssh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

# shellcheck disable=SC2016
tpu_ssh all 'pid_file="${HOME}/'"${LOG_DIR}"'/train.pid"
if [[ -f "${pid_file}" ]] && kill -0 "$(cat "${pid_file}")" 2>/dev/null; then
  kill -TERM "$(cat "${pid_file}")" && echo "SIGTERM sent on $(hostname)"
else
  echo "no training running on $(hostname)"
fi'
