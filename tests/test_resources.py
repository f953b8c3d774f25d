"""Out of device memory: XLA's messages are read, and the user gets one message, no traceback."""

import os
import subprocess
import sys

import pytest

from memseg_jax import resources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = float(1 << 30)

# The TPU compiler's message (libtpu 0.0.42.1, shortened) and the GPU runtime's.
TPU_OOM = ('RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory '
           'space hbm. Used 17.51G of 15.75G hbm. Exceeded hbm capacity by 1.76G.')
GPU_OOM = ('RESOURCE_EXHAUSTED: Out of memory while trying to allocate 2147483648 bytes.')


def test_needed_and_available_bytes_are_read_from_the_tpu_message():
  needed, available = resources.parse_out_of_memory(TPU_OOM)
  assert needed == pytest.approx(17.51 * GIB)
  assert available == pytest.approx(15.75 * GIB)


def test_the_gpu_message_gives_the_failed_allocation_only():
  needed, available = resources.parse_out_of_memory(GPU_OOM)
  assert needed == 2147483648 and available is None
  assert resources.is_resource_exhausted(RuntimeError(GPU_OOM))
  assert not resources.is_resource_exhausted(ValueError('shapes do not match'))


def test_the_message_names_config_batch_sizes_and_options():
  msg = resources.out_of_memory_message('configs/ade20k.py', 8, 17.51 * GIB, 15.75 * GIB,
                                        dtype='float32', has_remat=True)
  assert '\n' not in msg
  for part in ('configs/ade20k.py', '8 images per device', 'needs 17.51 GiB',
               'has 15.75 GiB', 'smaller per-device batch', 'model.dtype=bfloat16',
               'model.remat', 'bigger slice'):
    assert part in msg, part
  # bf16 is not offered to a run already in bf16, nor remat to a model without it.
  msg = resources.out_of_memory_message('c.py', 8, None, None, dtype='bfloat16')
  assert 'bfloat16' not in msg and 'remat' not in msg and 'needs unknown' in msg


_MAIN_WITH_OOM = '''
import sys
import jax
from absl import app
from memseg_jax import main
MESSAGE = sys.argv.pop()
def run(config, workdir, mode='train'):
  raise jax.errors.JaxRuntimeError(MESSAGE)
main.run = run
app.run(main.main)
'''


@pytest.mark.parametrize('error', [TPU_OOM, GPU_OOM], ids=['tpu', 'gpu'])
def test_main_turns_resource_exhausted_into_one_message(tmp_path, error):
  """`main` as a user runs it, with the step failing as XLA fails when memory runs out."""
  proc = subprocess.run(
      [sys.executable, '-c', _MAIN_WITH_OOM, f'--config={REPO}/configs/ade20k.py',
       f'--workdir={tmp_path}', error], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-2000:]
  # 16 images over the 8 virtual devices of the tests.
  assert 'configs/ade20k.py' in lines[0] and '2 images per device' in lines[0]
  if error == TPU_OOM:
    assert 'needs 17.51 GiB' in lines[0] and 'has 15.75 GiB' in lines[0]


def test_other_runtime_errors_still_raise(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-c', _MAIN_WITH_OOM, f'--config={REPO}/configs/ade20k.py',
       f'--workdir={tmp_path}', 'INTERNAL: something else'], cwd=REPO, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode != 0 and 'Traceback' in proc.stderr


# XLA's GPU compiler, finding no Triton tiling for a fused matmul (jax 0.10.2, shortened).
GPU_TILING = ("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.873 = "
              'bf16[2050,1024]{1,0} dot(%bitcast.5387, %parameter_1.4)')


def test_main_turns_a_gpu_tiling_failure_into_one_message_with_the_workaround(tmp_path):
  assert resources.is_gpu_tiling_failure(RuntimeError(GPU_TILING))
  assert not resources.is_gpu_tiling_failure(RuntimeError('INTERNAL: something else'))
  assert not resources.is_resource_exhausted(RuntimeError(GPU_TILING))
  proc = subprocess.run(
      [sys.executable, '-c', _MAIN_WITH_OOM, f'--config={REPO}/configs/ade20k_vitl.py',
       f'--workdir={tmp_path}', GPU_TILING], cwd=REPO, capture_output=True, text=True,
      timeout=300, env=dict(os.environ, PYTHONPATH=REPO))
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  lines = [l for l in proc.stderr.splitlines() if l.startswith('error: ')]
  assert len(lines) == 1, proc.stderr[-2000:]
  assert 'configs/ade20k_vitl.py' in lines[0] and 'the train step' in lines[0]
  assert 'XLA_FLAGS=--xla_gpu_enable_triton_gemm=false' in lines[0]
