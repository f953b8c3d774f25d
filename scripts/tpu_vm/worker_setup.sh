#!/usr/bin/env bash
# Runs ON a TPU VM worker (copied there and started by setup.sh on every worker): creates the
# Python venv, checks out this project, installs it with jax[tpu], and copies the dataset.
# Settings arrive as environment variables (see config.sh); safe to run again.
#
# Commands used: gcloud storage cp --recursive SOURCE DESTINATION (gcloud reference:
# storage/cp); the jax[tpu] install follows the Cloud TPU guide "Run JAX code on TPU slices"
# (cloud.google.com/tpu/docs/jax-pods), with the libtpu releases page as an extra index.
set -euo pipefail
: "${REPO_URL:?}" "${REPO_REF:?}" "${PYTHON:?}" "${REMOTE_DIR:?}" "${REMOTE_VENV:?}"
: "${DATA_MODE:?}" "${DATA_GCS:?}" "${DATASET:?}" "${DATA_LOCAL:?}" "${LOG_DIR:?}"
cd "${HOME}"

venv="${HOME}/${REMOTE_VENV}"
if [[ ! -x "${venv}/bin/python" ]]; then
  sudo apt-get update -qq
  sudo apt-get install -y -qq "${PYTHON}" "${PYTHON}-venv" git
  "${PYTHON}" -m venv "${venv}"
fi
"${venv}/bin/python" -m pip install -q --upgrade pip

if [[ -d "${REMOTE_DIR}/.git" ]]; then
  git -C "${REMOTE_DIR}" fetch -q origin
  git -C "${REMOTE_DIR}" checkout -q "${REPO_REF}"
  # A branch moves on; a tag or commit does not (then there is nothing to pull).
  git -C "${REMOTE_DIR}" pull -q --ff-only 2>/dev/null || true
else
  git clone -q "${REPO_URL}" "${REMOTE_DIR}"
  git -C "${REMOTE_DIR}" checkout -q "${REPO_REF}"
fi
# The project's [tpu] extra pins jax[tpu] to the jax version the project is tested with.
"${venv}/bin/python" -m pip install -q -e "./${REMOTE_DIR}[tpu]" \
  -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
"${venv}/bin/python" -c 'import jax, memseg_jax; print("jax", jax.__version__, "installed")'

mkdir -p "${HOME}/${LOG_DIR}"
if [[ "${DATA_MODE}" == "copy" ]]; then
  mkdir -p "${HOME}/${DATA_LOCAL}"
  if [[ ! -d "${HOME}/${DATA_LOCAL}/${DATASET}" ]]; then
    gcloud storage cp --recursive "${DATA_GCS}/${DATASET}" "${HOME}/${DATA_LOCAL}/"
  fi
fi
echo "worker $(hostname) ready"
