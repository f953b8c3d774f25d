"""scripts/accelerator_check.sh --platform=cpu: every piece of the on-chip check runs, here."""

import json
import os
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_script_parses():
  proc = subprocess.run(['bash', '-n', os.path.join(REPO, 'scripts', 'accelerator_check.sh')],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr


@pytest.mark.slow
def test_accelerator_check_on_the_cpu_writes_a_passing_report(tmp_path):
  out = tmp_path / 'report.json'
  env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=REPO,
             MEMSEG_DATA_DIR=str(tmp_path / 'tfds'))
  start = time.time()
  proc = subprocess.run(['bash', os.path.join(REPO, 'scripts', 'accelerator_check.sh'),
                         '--platform=cpu', f'--out={out}', f'--workdir={tmp_path / "work"}'],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=5400)
  print(proc.stdout[-3000:])
  print(f'accelerator_check --platform=cpu: {time.time() - start:.0f} s')
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  report = json.loads(out.read_text())
  pieces = report['pieces']
  assert set(pieces) == {'parity', 'benchmark', 'demo', 'step_time'}
  assert all(p['ok'] for p in pieces.values()), pieces
  assert pieces['parity']['counts'].get('passed', 0) >= 1
  assert pieces['parity']['counts'].get('failed', 0) == 0
  assert pieces['benchmark']['numbers']
  assert 0.0 <= pieces['demo']['mIoU'] <= 1.0 and pieces['demo']['num_images'] == 8
  step = pieces['step_time']
  assert step['step_seconds_median'] > 0 and step['flops_per_device'] > 0
  # No bf16 peak is listed for a CPU, so there is no prediction, and the report says why.
  assert step['predicted_step_seconds'] is None and step['prediction_note']
