"""Faults during training, each ending where an uninterrupted run ends (all slow tests):

- SIGTERM (preemption) makes a training process save a checkpoint and exit with status 0
  within 30 s; starting it again resumes and ends exactly where an uninterrupted run ends.
- The same across two processes x two devices: SIGTERM to one of them, both save the same
  step and exit 0, the restart of both ends bitwise equal to an uninterrupted 2-process run.
- SIGKILL while a checkpoint is being written: the restart resumes from the last complete
  checkpoint and its final evaluation equals the uninterrupted run's.
- A disk that fills up at the 2nd checkpoint (tests/disk_full_main.py): the run stops with one
  `error:` line naming the step, checkpoint 1 stays restorable and the next start resumes from
  it to the uninterrupted run's end.

The runs are real `python -m memseg_jax.main` processes on tests/tiny_run_config.py (2 virtual
CPU devices each); they share a compilation cache, so each program compiles once.
"""

import json
import os
import re
import signal
import socket
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

# Its processes rendezvous under timeouts; CI runs it alone (the `serial` marker, .ci/run).
pytestmark = pytest.mark.serial

STEPS = 16


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


def _start(workdir, data_dir, log_path, env, *extra, program=('-m', 'memseg_jax.main')):
  log = open(log_path, 'a')  # pylint: disable=consider-using-with
  proc = subprocess.Popen(
      [sys.executable, *program, f'--config={HERE}/tiny_run_config.py',
       f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
       f'--config.train.num_train_steps={STEPS}', *extra],
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


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _start_pair(workdir, data_dir, tag, env, tmp_path, *extra):
  """Two processes (ids 0, 1) of one run; their logs go to tmp_path/<tag>_<id>.log."""
  port = _free_port()
  procs, logs = [], []
  for pid in range(2):
    logs.append(tmp_path / f'{tag}_{pid}.log')
    procs.append(_start(workdir, data_dir, logs[-1], env, f'--coordinator_address=127.0.0.1:{port}',
                        '--num_processes=2', f'--process_id={pid}', *extra))
  return procs, logs


def _assert_states_equal(a, b, fields=('params', 'batch_stats', 'memory', 'opt_state', 'rng',
                                       'step')):
  for field in fields:
    x_leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(getattr(a, field)))[0]
    y_leaves = jax.tree_util.tree_leaves(jax.device_get(getattr(b, field)))
    assert len(x_leaves) == len(y_leaves) > 0, field
    for (path, x), y in zip(x_leaves, y_leaves):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                    err_msg=f'{field}{jax.tree_util.keystr(path)}')
  # The memory really moved: the comparison is not between two zero memories.
  assert np.abs(np.asarray(jax.tree_util.tree_leaves(a.memory)[0])).max() > 0


def _restore(workdir, config, step):
  mesh = train.create_mesh()
  tx = train.create_optimizer(config, schedules.create_lr_schedule(config, STEPS))
  abstract = train.abstract_train_state(config, tx, mesh)
  manager = ckpt_lib.create_manager(str(workdir), config, read_only=True)
  try:
    return manager.all_steps(), manager.restore(step, args=ocp.args.StandardRestore(abstract))
  finally:
    manager.close()


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory):
  return tmp_path_factory.mktemp('xla_cache')


@pytest.fixture(scope='module')
def straight(tmp_path_factory, data_dir, xla_cache):
  """An uninterrupted 1-process run with its final evaluation: (workdir, final state, results)."""
  workdir = tmp_path_factory.mktemp('straight')
  log_path = workdir / 'log.txt'
  proc = _start(workdir / 'run', data_dir, log_path, _env(xla_cache),
                '--config.train.final_eval=True')
  assert _finish(proc, timeout=900) == 0, log_path.read_text()[-3000:]
  assert 'preemption' not in log_path.read_text()
  _, state = _restore(workdir / 'run', tiny_run_config.get_config(data_dir, STEPS), STEPS)
  with open(workdir / 'run' / 'eval_results.json') as f:
    results = json.load(f)
  return workdir / 'run', state, results


@pytest.mark.slow
def test_sigterm_saves_exits_0_within_30_s_and_the_restart_ends_like_an_uninterrupted_run(
    tmp_path, data_dir, xla_cache, straight):
  env = _env(xla_cache)
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

  _, resumed = _restore(tmp_path / 'interrupted', config, STEPS)
  _assert_states_equal(straight[1], resumed)


@pytest.mark.slow
def test_sigterm_to_one_of_two_processes_saves_one_step_on_both_and_resumes_bitwise(
    tmp_path, data_dir, xla_cache):
  """2 processes x 2 devices; SIGTERM to process 1 after step 3."""
  # No shared compilation cache: only process 0 writes it, and a restart where one process
  # loads a program the other compiles lets gloo's 30 s rendezvous of the first collective time
  # out (seen on a loaded 2-core machine). Compiling on both keeps them in step.
  del xla_cache
  env = _env('0')
  procs, logs = _start_pair(tmp_path / 'interrupted', data_dir, 'interrupted', env, tmp_path)
  try:
    seen = _wait_for_step(procs[1], logs[1], 3)
  except BaseException:
    for proc in procs:
      proc.kill()
    raise
  procs[1].send_signal(signal.SIGTERM)
  codes = [_finish(proc, timeout=120) for proc in procs]
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], [text[-3000:] for text in texts]
  saved = [[int(s) for s in re.findall(r'preemption: checkpoint of step (\d+) saved', text)]
           for text in texts]
  assert len(saved[0]) == 1 and saved[0] == saved[1], saved
  step = saved[0][0]
  assert seen <= step < STEPS, (seen, step)
  assert all('Traceback' not in text for text in texts)
  print(f'SIGTERM to process 1 after step {seen}: both processes saved step {step}')

  config = tiny_run_config.get_config(data_dir, STEPS)
  steps, _ = _restore(tmp_path / 'interrupted', config, step)
  assert steps == [step]

  # Both restart, resume from that step and run to the end.
  procs, logs = _start_pair(tmp_path / 'interrupted', data_dir, 'resumed', env, tmp_path)
  codes = [_finish(proc, timeout=900) for proc in procs]
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], [text[-3000:] for text in texts]
  assert all(f'resuming from the checkpoint of step {step}' in text for text in texts)

  procs, logs = _start_pair(tmp_path / 'straight', data_dir, 'straight', env, tmp_path)
  codes = [_finish(proc, timeout=900) for proc in procs]
  texts = [log.read_text() for log in logs]
  assert codes == [0, 0], [text[-3000:] for text in texts]
  assert all('preemption' not in text for text in texts)

  _, resumed = _restore(tmp_path / 'interrupted', config, STEPS)
  _, uninterrupted = _restore(tmp_path / 'straight', config, STEPS)
  _assert_states_equal(uninterrupted, resumed)


def _kill_while_writing(proc, checkpoints, log_path, after_step, timeout=600):
  """SIGKILL as soon as a checkpoint write of a step > after_step is seen in progress.

  Returns the name of the step folder being written, or None if the process ended first.
  """
  _wait_for_step(proc, log_path, after_step, timeout=timeout)
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    try:
      names = os.listdir(checkpoints)
    except FileNotFoundError:
      names = []
    writing = [n for n in names if '.orbax-checkpoint-tmp' in n
               and int(n.split('.')[0]) > after_step]
    if writing:
      proc.kill()
      return writing[0]
    time.sleep(0.002)
  return None


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_resumes_from_the_last_complete_one(
    tmp_path, data_dir, xla_cache, straight):
  env = _env(xla_cache)
  workdir = tmp_path / 'killed'
  checkpoints = workdir / 'checkpoints'
  every_step = ('--config.train.checkpoint_every_steps=1', '--config.train.final_eval=True')
  cut = None
  for attempt, after_step in enumerate((3, 8, 12)):  # a write that finished first: try later
    log_path = tmp_path / f'killed_{attempt}.log'
    proc = _start(workdir, data_dir, log_path, env, *every_step)
    cut = _kill_while_writing(proc, checkpoints, log_path, after_step)
    _finish(proc, timeout=60)
    assert proc.returncode != 0, log_path.read_text()[-3000:]
    if cut is not None and cut in os.listdir(checkpoints):
      break
  assert cut is not None and cut in os.listdir(checkpoints), 'no write was caught in progress'
  complete = sorted(ocp.utils.checkpoint_steps(str(checkpoints)))
  cut_step = int(cut.split('.')[0])
  assert complete and max(complete) < cut_step, (complete, cut)
  print(f'killed while writing step {cut_step}; last complete checkpoint: {max(complete)}')

  # The restart resumes from the last complete checkpoint and ends like the straight run.
  log_path = tmp_path / 'restart.log'
  proc = _start(workdir, data_dir, log_path, env, *every_step)
  assert _finish(proc, timeout=900) == 0, log_path.read_text()[-3000:]
  assert f'resuming from the checkpoint of step {max(complete)}' in log_path.read_text()
  with open(workdir / 'eval_results.json') as f:
    results = json.load(f)
  expected = dict(straight[2])
  for r in (results, expected):
    r.pop('seconds')
  assert results == expected
  assert results['step'] == STEPS and results['num_images'] == 4
  config = tiny_run_config.get_config(data_dir, STEPS)
  _, resumed = _restore(workdir, config, STEPS)
  _assert_states_equal(straight[1], resumed)


@pytest.mark.slow
def test_a_disk_full_at_the_second_checkpoint_stops_and_the_next_start_resumes(
    tmp_path, data_dir, xla_cache, straight):
  env = _env(xla_cache)
  workdir = tmp_path / 'disk_full'
  log_path = tmp_path / 'disk_full.log'
  proc = _start(workdir, data_dir, log_path, env, '--config.train.checkpoint_every_steps=2',
                program=(os.path.join(HERE, 'disk_full_main.py'), '2'))
  assert _finish(proc, timeout=900) == 1, log_path.read_text()[-3000:]
  log = log_path.read_text()
  assert 'Traceback' not in log, log[-6000:]
  lines = [line for line in log.splitlines() if line.strip()]
  assert lines[-1].startswith(f'error: writing checkpoint 4 to {workdir}/checkpoints failed '
                              '(OSError: [Errno 28] No space left on device'), lines[-3:]
  assert lines[-1].endswith('training stopped, the last complete checkpoint is step 2 (the '
                            'next start resumes from it)'), lines[-1]
  assert f'step {STEPS}/{STEPS}' not in log     # stopped before the end
  # Checkpoint 2 is still restorable, and only it.
  config = tiny_run_config.get_config(data_dir, STEPS)
  steps, restored = _restore(workdir, config, 2)
  assert steps == [2] and int(restored.step) == 2

  proc = _start(workdir, data_dir, log_path, env, '--config.train.checkpoint_every_steps=2')
  assert _finish(proc, timeout=900) == 0, log_path.read_text()[-3000:]
  assert 'resuming from the checkpoint of step 2' in log_path.read_text()
  _, resumed = _restore(workdir, config, STEPS)
  _assert_states_equal(straight[1], resumed)
