#!/usr/bin/env bash
# Deletes the TPU VM (with PROVISIONING=queued-spot: its queued resource and the node in it).
# The WORKDIR on Cloud Storage (checkpoints, summaries, results) is kept.
#
# gcloud commands and flags used, as documented in the gcloud reference
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/...):
#   gcloud compute tpus tpu-vm delete TPU --zone                     (tpu-vm/delete)
#   gcloud compute tpus queued-resources delete QUEUED_RESOURCE --zone --force
#                                                                    (queued-resources/delete)
#   --quiet (no prompt) and --project are gcloud-wide flags.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

if [[ "${PROVISIONING}" == "queued-spot" ]]; then
  gcloud compute tpus queued-resources delete "${QUEUED_RESOURCE}" --zone="${ZONE}" \
    ${project_flags[@]+"${project_flags[@]}"} --force --quiet
else
  gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" \
    ${project_flags[@]+"${project_flags[@]}"} --quiet
fi
