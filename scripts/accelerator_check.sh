#!/usr/bin/env bash
# One command for whoever has a real GPU or TPU: installs the matching extra, then runs on the
# chip the parity tests (matmul precision 'highest'), the 512x512 benchmark, 200 demo steps in
# bfloat16 with the final mIoU, and the demo step time beside aot_check's prediction, into one
# JSON report (about 10 minutes on one H100). scripts/accelerator_check.py has the details.
#
#   bash scripts/accelerator_check.sh --platform=gpu [--out=report.json] [--no_install]
#   bash scripts/accelerator_check.sh --platform=tpu
#   bash scripts/accelerator_check.sh --platform=cpu      # tiny settings, no install: the check
#                                                         # of the check (tests/test_scripts.py)
set -euo pipefail
cd "$(dirname "$0")/.."

platform=""
install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --platform=*) platform="${arg#--platform=}"; args+=("$arg") ;;
    --no_install) install=0 ;;
    *) args+=("$arg") ;;
  esac
done
case "$platform" in
  gpu) extra="cuda" ;;
  tpu) extra="tpu" ;;
  cpu) extra=""; install=0 ;;
  *) echo "usage: $0 --platform=gpu|tpu|cpu [--out=FILE] [--no_install]" >&2; exit 2 ;;
esac
python="${PYTHON:-python3}"
if [ "$install" = 1 ]; then
  "$python" -m pip install -q -e ".[test,parity,${extra}]"
fi
exec "$python" scripts/accelerator_check.py "${args[@]}"
