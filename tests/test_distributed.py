"""memseg_jax.distributed: which runs start jax.distributed, with which arguments, and the
one-line errors for incomplete multi-process settings."""

import os
import subprocess
import sys

import jax
import pytest

from memseg_jax import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ENV_VARS = (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
             distributed.ENV_PROCESS_ID, distributed.ENV_AUTO, 'TPU_WORKER_HOSTNAMES',
             'TPU_PROCESS_ADDRESSES', 'MEGASCALE_NUM_SLICES', 'TPU_SKIP_MDS_QUERY')


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
  for name in _ENV_VARS:
    monkeypatch.delenv(name, raising=False)
  # As on a machine without jax[tpu]: the metadata server is never asked.
  monkeypatch.setattr(distributed, '_libtpu_installed', lambda: False)


def _no_metadata(key):
  raise AssertionError(f'metadata server asked for {key}')


def test_a_plain_run_stays_single_process():
  spec = distributed.resolve(metadata_fn=_no_metadata)
  assert not spec.explicit and not spec.auto


def test_flags_win_over_the_environment(monkeypatch):
  monkeypatch.setenv(distributed.ENV_COORDINATOR, 'envhost:1')
  monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, '8')
  monkeypatch.setenv(distributed.ENV_PROCESS_ID, '7')
  assert distributed.resolve(metadata_fn=_no_metadata) == distributed.ClusterSpec(
      'envhost:1', 8, 7, reason='explicit coordinator')
  spec = distributed.resolve('flaghost:2', 4, 0, metadata_fn=_no_metadata)
  assert (spec.coordinator_address, spec.num_processes, spec.process_id) == ('flaghost:2', 4, 0)


@pytest.mark.parametrize('args, missing', [
    (('h:1', None, None), ['--num_processes', '--process_id']),
    ((None, 2, 0), ['--coordinator_address']),
    ((None, None, 0), ['--coordinator_address', '--num_processes']),
])
def test_incomplete_settings_name_every_missing_flag_and_variable(args, missing):
  with pytest.raises(distributed.DistributedConfigError) as e:
    distributed.resolve(*args, metadata_fn=_no_metadata)
  message = str(e.value)
  for flag in missing:
    assert flag in message
  for flag in {'--coordinator_address', '--num_processes', '--process_id'} - set(missing):
    assert flag not in message
  assert 'MEMSEG_' in message


@pytest.mark.parametrize('args, expected', [
    (('h:1', 2, 2), '--process_id=2 must be in [0, --num_processes=2)'),
    (('h:1', 'two', 0), "--num_processes / MEMSEG_NUM_PROCESSES: expected an integer, got 'two'"),
    (('nohost', 2, 0), "expected host:port, got 'nohost'"),
])
def test_bad_values_are_named(args, expected):
  with pytest.raises(distributed.DistributedConfigError, match=expected.replace('[', r'\[')
                     .replace('(', r'\(').replace(')', r'\)')):
    distributed.resolve(*args, metadata_fn=_no_metadata)


def test_memseg_distributed_asks_jax_to_detect_the_cluster(monkeypatch):
  monkeypatch.setenv(distributed.ENV_AUTO, '1')
  assert distributed.resolve(metadata_fn=_no_metadata).auto
  monkeypatch.setenv(distributed.ENV_AUTO, '0')
  assert not distributed.resolve(metadata_fn=_no_metadata).auto


def test_tpu_pod_workers_are_detected_from_gke_variables_or_the_vm_metadata(monkeypatch):
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1,w2,w3')
  spec = distributed.resolve(metadata_fn=_no_metadata)
  assert spec.auto and '4 workers' in spec.reason
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0')             # one host: unchanged
  assert not distributed.resolve(metadata_fn=_no_metadata).auto
  monkeypatch.delenv('TPU_WORKER_HOSTNAMES')

  # A jax[tpu] install on a TPU VM: the worker list comes from the metadata server.
  monkeypatch.setattr(distributed, '_libtpu_installed', lambda: True)
  asked = []

  def metadata(key):
    asked.append(key)
    return '10.0.0.2,10.0.0.3'
  spec = distributed.resolve(metadata_fn=metadata)
  assert spec.auto and '2 workers' in spec.reason and asked == ['worker-network-endpoints']
  monkeypatch.setenv('MEGASCALE_NUM_SLICES', '2')
  assert '4 workers' in distributed.resolve(metadata_fn=metadata).reason

  def unreachable(key):
    raise OSError('no route to metadata.google.internal')
  monkeypatch.delenv('MEGASCALE_NUM_SLICES')
  assert not distributed.resolve(metadata_fn=unreachable).auto   # warns, stays single
  monkeypatch.setenv('TPU_SKIP_MDS_QUERY', '1')
  assert not distributed.resolve(metadata_fn=_no_metadata).auto


def _record_initialize(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, 'initialize', lambda **kw: calls.append(kw))
  monkeypatch.setattr(jax.distributed, 'is_initialized', lambda: False)
  return calls


def test_initialize_binds_a_loopback_coordinator_to_loopback_only(monkeypatch):
  calls = _record_initialize(monkeypatch)
  assert distributed.initialize('127.0.0.1:5555', 2, 1)
  assert calls == [dict(coordinator_address='127.0.0.1:5555', num_processes=2, process_id=1,
                        coordinator_bind_address='127.0.0.1:5555')]
  assert jax.config.jax_cpu_collectives_implementation == 'gloo'
  calls.clear()
  assert distributed.initialize('head.cluster:5555', 4, 0)
  assert calls == [dict(coordinator_address='head.cluster:5555', num_processes=4, process_id=0)]


def test_initialize_does_nothing_for_a_single_process_and_no_arguments_on_a_pod(monkeypatch):
  calls = _record_initialize(monkeypatch)
  assert not distributed.initialize(metadata_fn=_no_metadata)
  assert calls == []
  monkeypatch.setenv('TPU_WORKER_HOSTNAMES', 'w0,w1')
  assert distributed.initialize(metadata_fn=_no_metadata)
  assert calls == [{}]


def test_main_reports_incomplete_distributed_flags_in_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS}
  proc = subprocess.run(
      [sys.executable, '-m', 'memseg_jax.main', f'--config={REPO}/configs/demo.py',
       f'--workdir={tmp_path}/w', '--process_id=1'],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert ('error: a multi-process run needs the coordinator address, the number of processes '
          'and the process id; missing: --coordinator_address (MEMSEG_COORDINATOR_ADDRESS), '
          '--num_processes (MEMSEG_NUM_PROCESSES)') in proc.stderr
