#!/usr/bin/env bash
# Creates the TPU VM (one host) or pod slice (several hosts) named in config.sh.
#
#   ./create.sh                                 # PROVISIONING=on-demand by default
#   PROVISIONING=spot ACCELERATOR_TYPE=v4-32 ./create.sh
#
# gcloud commands and flags used, as documented in the gcloud reference
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/...):
#   gcloud compute tpus tpu-vm create TPU --zone --accelerator-type --version
#       [--spot | --preemptible]                                   (tpu-vm/create)
#   gcloud compute tpus queued-resources create QUEUED_RESOURCE --zone --node-id
#       --accelerator-type --runtime-version --spot                (queued-resources/create)
#   gcloud compute tpus queued-resources describe QUEUED_RESOURCE --zone --format
#   --project and --format are gcloud-wide flags.
# Note: tpu-vm create names the software image --version, queued-resources create names it
# --runtime-version; both take RUNTIME_VERSION (e.g. tpu-ubuntu2204-base, v2-alpha-tpuv5-lite).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=config.sh
source "$(dirname "${BASH_SOURCE[0]}")/config.sh"

case "${PROVISIONING}" in
  on-demand | spot | preemptible)
    extra=()
    if [[ "${PROVISIONING}" != "on-demand" ]]; then
      extra=(--"${PROVISIONING}")
    fi
    gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
      ${project_flags[@]+"${project_flags[@]}"} \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" \
      ${extra[@]+"${extra[@]}"}
    ;;
  queued-spot)
    gcloud compute tpus queued-resources create "${QUEUED_RESOURCE}" --zone="${ZONE}" \
      ${project_flags[@]+"${project_flags[@]}"} \
      --node-id="${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" \
      --runtime-version="${RUNTIME_VERSION}" --spot
    # The request waits in a queue until capacity is free; the node exists once it is ACTIVE.
    while true; do
      state="$(gcloud compute tpus queued-resources describe "${QUEUED_RESOURCE}" \
        --zone="${ZONE}" ${project_flags[@]+"${project_flags[@]}"} \
        --format='value(state.state)')"
      echo "queued resource ${QUEUED_RESOURCE}: ${state}"
      case "${state}" in
        ACTIVE) break ;;
        FAILED | SUSPENDED) exit 1 ;;
      esac
      sleep 60
    done
    ;;
  *)
    echo "PROVISIONING must be on-demand, spot, preemptible or queued-spot, got '${PROVISIONING}'" >&2
    exit 2
    ;;
esac
echo "created ${TPU_NAME} (${ACCELERATOR_TYPE}, ${PROVISIONING}) in ${ZONE}; next: ./setup.sh"
