#!/usr/bin/env bash
# Keeps a spot / preemptible training going until it has finished: every CHECK_SECONDS it looks
# at the TPU VM; after a preemption (state PREEMPTED or TERMINATED, or the node gone) it deletes
# what is left, creates the VM again, sets it up and restarts the training, which resumes from
# the latest checkpoint in WORKDIR (gs://). The preemption notice (SIGTERM) makes the training
# save a checkpoint at the same step on every worker before the VM goes away, so a preemption
# costs the restart time plus the steps since that checkpoint. Run it where it can stay up
# (a small always-on VM, Cloud Shell with tmux, ...).
#
#   PROVISIONING=spot ACCELERATOR_TYPE=v4-32 ./run_spot.sh
#
# gcloud commands and flags used, as documented in the gcloud reference
# (cloud.google.com/sdk/gcloud/reference/compute/tpus/...):
#   gcloud compute tpus tpu-vm describe TPU --zone --format='value(state)'  (tpu-vm/describe)
#   gcloud compute tpus tpu-vm ssh TPU --zone --worker=0 --command           (tpu-vm/ssh)
#   and those of create.sh, setup.sh, train.sh and delete.sh.
# Node states (PREEMPTED, TERMINATED, READY, ...) as listed in the Cloud TPU API reference
# (Node.State).
set -euo pipefail
here="$(dirname "${BASH_SOURCE[0]}")"
# shellcheck source-path=SCRIPTDIR source=config.sh
source "${here}/config.sh"
CHECK_SECONDS="${CHECK_SECONDS:-300}"

node_state() {
  gcloud compute tpus tpu-vm describe "${TPU_NAME}" --zone="${ZONE}" \
    ${project_flags[@]+"${project_flags[@]}"} --format='value(state)' 2>/dev/null || echo MISSING
}

# running | finished | stopped (SIGTERM, resumable) | failed | none, from worker 0.
training_status() {
  # shellcheck disable=SC2016
  tpu_ssh 0 'd="${HOME}/'"${LOG_DIR}"'"
if [[ -f "$d/train.pid" ]] && kill -0 "$(cat "$d/train.pid")" 2>/dev/null; then echo running
elif [[ ! -f "$d/train.exit" ]]; then echo none
elif [[ "$(cat "$d/train.exit")" != 0 ]]; then echo failed
elif tac "$d/train.log" | sed "/^=== /q" | grep -q "preemption: checkpoint"; then echo stopped
else echo finished; fi' 2>/dev/null | tail -n 1
}

while true; do
  state="$(node_state)"
  echo "$(date -u +%FT%TZ) ${TPU_NAME}: ${state:-unknown}"
  case "${state}" in
    READY)
      status="$(training_status || echo unknown)"
      echo "training: ${status}"
      case "${status}" in
        finished) echo "training finished; results in ${WORKDIR}"; exit 0 ;;
        failed) echo "training failed: see ./logs.sh" >&2; exit 1 ;;
        none | stopped) "${here}/train.sh" ;;
      esac
      ;;
    PREEMPTED | TERMINATED | MISSING)
      if [[ "${state}" != "MISSING" ]] || [[ "${PROVISIONING}" == "queued-spot" ]]; then
        "${here}/delete.sh" || true
      fi
      if ! { "${here}/create.sh" && "${here}/setup.sh" && "${here}/train.sh"; }; then
        echo "restart failed (no capacity?); trying again in ${CHECK_SECONDS} s" >&2
      fi
      ;;
  esac
  sleep "${CHECK_SECONDS}"
done
