"""Preemption: SIGTERM makes a training process save a checkpoint and exit with status 0
within 30 s; starting it again resumes and ends exactly where an uninterrupted run ends.

The runs are real `python -m memseg_jax.main` processes on tests/tiny_run_config.py (2 virtual
CPU devices each); they share a compilation cache, so only the first one compiles.
"""

import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memseg_jax import checkpoint as ckpt_lib
from memseg_jax import schedules, train

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import tiny_run_config  # pylint: disable=wrong-import-position

STEPS = 40


@pytest.fixture(scope='module')
def data_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('tfds'))
  tiny_run_config.prepare_dataset(path)
  return path


def _env(cache_dir):
  env = dict(os.environ)
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             MEMSEG_COMPILATION_CACHE=str(cache_dir), TF_CPP_MIN_LOG_LEVEL='2')
  for name in ('MEMSEG_DISTRIBUTED', 'MEMSEG_COORDINATOR_ADDRESS', 'MEMSEG_NUM_PROCESSES',
               'MEMSEG_PROCESS_ID'):
    env.pop(name, None)
  return env


def _start(workdir, data_dir, log_path, env):
  log = open(log_path, 'a')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, '-m', 'memseg_jax.main', f'--config={HERE}/tiny_run_config.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       f'--config.train.num_train_steps={STEPS}'],
      cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
  proc.log_file = log
  return proc


def _finish(proc, timeout):
  try:
    return proc.wait(timeout=timeout)
  finally:
    if proc.poll() is None:
      proc.kill()
    proc.log_file.close()


def _wait_for_step(proc, log_path, step, timeout=600):
  pattern = re.compile(rf'step (\d+)/{STEPS}')
  deadline = time.time() + timeout
  while time.time() < deadline:
    assert proc.poll() is None, open(log_path).read()[-3000:]
    with open(log_path) as f:
      done = [int(m) for m in pattern.findall(f.read())]
    if done and max(done) >= step:
      return max(done)
    time.sleep(0.1)
  raise AssertionError(f'no step {step} within {timeout} s')


def _restore(workdir, config, step):
  mesh = train.create_mesh()
  tx = train.create_optimizer(config, schedules.create_lr_schedule(config, STEPS))
  abstract = train.abstract_train_state(config, tx, mesh)
  manager = ckpt_lib.create_manager(str(workdir), config, read_only=True)
  try:
    return manager.all_steps(), manager.restore(step, args=ocp.args.StandardRestore(abstract))
  finally:
    manager.close()


@pytest.mark.slow
def test_sigterm_saves_exits_0_within_30_s_and_the_restart_ends_like_an_uninterrupted_run(
    tmp_path, data_dir):
  env = _env(tmp_path / 'xla_cache')
  log_path = tmp_path / 'interrupted.log'
  proc = _start(tmp_path / 'interrupted', data_dir, log_path, env)
  seen = _wait_for_step(proc, log_path, 3)
  sent = time.time()
  proc.send_signal(signal.SIGTERM)
  rc = _finish(proc, timeout=60)
  seconds = time.time() - sent
  log = log_path.read_text()
  assert rc == 0, log[-3000:]
  print(f'SIGTERM to exit: {seconds:.1f} s')
  assert seconds < 30, seconds
  saved = [int(s) for s in re.findall(r'preemption: checkpoint of step (\d+) saved', log)]
  assert len(saved) == 1 and seen <= saved[0] < STEPS, (seen, saved)
  assert 'Traceback' not in log

  config = tiny_run_config.get_config(data_dir, STEPS)
  steps, _ = _restore(tmp_path / 'interrupted', config, saved[0])
  assert steps == [saved[0]]           # exactly the preemption checkpoint, complete

  # The next start resumes from it and runs to the end.
  proc = _start(tmp_path / 'interrupted', data_dir, log_path, env)
  assert _finish(proc, timeout=600) == 0, log_path.read_text()[-3000:]
  assert f'resuming from the checkpoint of step {saved[0]}' in log_path.read_text()

  straight_log = tmp_path / 'straight.log'
  proc = _start(tmp_path / 'straight', data_dir, straight_log, env)
  assert _finish(proc, timeout=600) == 0, straight_log.read_text()[-3000:]
  assert 'preemption' not in straight_log.read_text()

  _, resumed = _restore(tmp_path / 'interrupted', config, STEPS)
  _, straight = _restore(tmp_path / 'straight', config, STEPS)
  for field in ('params', 'batch_stats', 'memory', 'opt_state', 'rng', 'step'):
    a = jax.tree_util.tree_flatten_with_path(jax.device_get(getattr(straight, field)))[0]
    b = jax.tree_util.tree_leaves(jax.device_get(getattr(resumed, field)))
    assert len(a) == len(b) > 0, field
    for (path, x), y in zip(a, b):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=f'{field}{jax.tree_util.keystr(path)}')
  # The memory really moved: the comparison is not between two zero memories.
  assert np.abs(np.asarray(jax.tree_util.tree_leaves(straight.memory)[0])).max() > 0
