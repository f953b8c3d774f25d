"""scripts/tpu_vm/*.sh parse (`bash -n`) and pass shellcheck (when it is installed)."""

import glob
import os
import shutil
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(REPO, 'scripts', 'tpu_vm', '*.sh')))


def test_the_tpu_vm_scripts_exist():
  names = {os.path.basename(p) for p in SCRIPTS}
  assert {'config.sh', 'create.sh', 'setup.sh', 'train.sh', 'logs.sh', 'stop.sh',
          'delete.sh', 'run_spot.sh', 'worker_setup.sh', 'worker_train.sh'} <= names


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_bash_parses_the_script(path):
  proc = subprocess.run(['bash', '-n', path], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which('shellcheck') is None,
                    reason='shellcheck is not installed (Debian: apt-get install shellcheck)')
def test_shellcheck_finds_nothing():
  # -x follows `source config.sh`; run from the repo root like the CI would.
  proc = subprocess.run(['shellcheck', '-x', '--severity=style', *SCRIPTS], cwd=REPO,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize('path', [p for p in SCRIPTS if not p.endswith('config.sh')],
                         ids=os.path.basename)
def test_every_script_names_the_documented_gcloud_flags_it_uses(path):
  with open(path) as f:
    text = f.read()
  header = text.split('set -euo pipefail')[0]
  for command in ('tpu-vm create', 'queued-resources create', 'tpu-vm ssh', 'tpu-vm scp',
                  'tpu-vm describe', 'tpu-vm delete', 'queued-resources delete',
                  'gcloud storage cp'):
    body = text[len(header):]
    if command in body:
      assert command in header, f'{os.path.basename(path)} uses {command!r} without noting it'
