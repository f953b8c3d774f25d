#!/usr/bin/env bash
# Runs ON a TPU VM worker (started by train.sh on every worker): starts the training detached
# from the SSH session (setsid + nohup; stdin closed, output to a log file), records its pid
# and, when it ends, its exit status, and returns at once. Settings arrive as environment variables (see config.sh); extra
# arguments are passed to memseg_jax.main (e.g. --config.train.batch_size=32).
#
# On a pod slice every worker runs the same command; memseg_jax.distributed starts
# jax.distributed by itself (Cloud TPU VM metadata), nothing else is needed.
set -euo pipefail
: "${REMOTE_DIR:?}" "${REMOTE_VENV:?}" "${CONFIG:?}" "${WORKDIR:?}" "${DATA_DIR:?}" "${LOG_DIR:?}"
case "${DATA_DIR}" in
  /* | *://*) ;;
  *) DATA_DIR="${HOME}/${DATA_DIR}" ;;
esac
log_dir="${HOME}/${LOG_DIR}"
mkdir -p "${log_dir}"
pid_file="${log_dir}/train.pid"
if [[ -f "${pid_file}" ]] && kill -0 "$(cat "${pid_file}")" 2>/dev/null; then
  echo "training already running on $(hostname) (pid $(cat "${pid_file}"))"
  exit 0
fi
cd "${HOME}/${REMOTE_DIR}"
# Each start appends to the same log: a resumed run continues the story of the previous one.
echo "=== $(date -u +%FT%TZ) start on $(hostname)" >> "${log_dir}/train.log"
export PID_FILE="${pid_file}" EXIT_FILE="${log_dir}/train.exit"
rm -f "${EXIT_FILE}"
# The inner bash records the trainer's pid (what stop.sh signals) and, when it ends, its exit
# status (what run_spot.sh reads).
# shellcheck disable=SC2016
setsid nohup bash -c '"$@" & echo $! > "${PID_FILE}"; wait $!; echo $? > "${EXIT_FILE}"' _ \
  "${HOME}/${REMOTE_VENV}/bin/python" -m memseg_jax.main \
  --config="${CONFIG}" --workdir="${WORKDIR}" --config.data.data_dir="${DATA_DIR}" "$@" \
  < /dev/null >> "${log_dir}/train.log" 2>&1 &
sleep 1
echo "training started on $(hostname) (pid $(cat "${pid_file}" 2>/dev/null)), log ${log_dir}/train.log"
