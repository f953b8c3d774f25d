#!/usr/bin/env bash
# Follows the training log of one worker (default 0, which also writes the summaries; the
# others log the same steps). Ctrl-C stops following, not the training.
#
#   ./logs.sh          # worker 0
#   ./logs.sh 3        # worker 3 of a pod slice
#
# gcloud command and flags used, as documented in the gcloud reference:
#   gcloud compute tpus tpu-vm ssh TPU --zone --worker=N --command  (compute/tpus/tpu-vm/ssh)
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

worker="${1:-0}"
tpu_ssh "${worker}" "tail -n 200 -F \"\${HOME}/${LOG_DIR}/train.log\""
