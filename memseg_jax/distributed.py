"""Multi-process set-up: when and how `jax.distributed` is started.

A run is one process per host (one per TPU VM worker, one per GPU machine). Every process calls
`initialize()` before any other JAX call; afterwards `jax.devices()` lists the devices of all
processes, the training mesh spans them, and each process feeds its own part of every batch
(see `train.shard_batch` and `input_pipeline.create_train_dataset`).

Which set-up applies, first match wins:

1. An explicit cluster: a coordinator address, the number of processes and this process's id,
   from `main.py`'s flags (--coordinator_address, --num_processes, --process_id) or the
   environment (MEMSEG_COORDINATOR_ADDRESS, MEMSEG_NUM_PROCESSES, MEMSEG_PROCESS_ID). This is
   the CPU / GPU cluster case. Multi-process CPU runs use gloo collectives over TCP. A coordinator
   on a loopback address (127.0.0.1, localhost) also binds there only, so local multi-process
   runs (tests) never listen on the network.
2. MEMSEG_DISTRIBUTED=1: `jax.distributed.initialize()` without arguments, letting JAX detect the
   cluster (Cloud TPU, GKE, SLURM, Open MPI, Kubernetes).
3. A Cloud TPU VM with more than one worker (a pod slice, or several slices): the same
   argument-less call; JAX reads the coordinator and the worker id from the TPU VM metadata.
   The worker count comes from TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES (GKE) or the TPU VM
   metadata server, asked only where libtpu is installed.
4. Otherwise nothing happens: single-process runs are unchanged.

`jax.distributed.initialize` also starts JAX's preemption service (SIGTERM on any process ->
`multihost_utils.reached_preemption_sync_point` agrees on a step), which `train.py` uses.
"""

import dataclasses
import importlib.util
import ipaddress
import os
import urllib.request
from typing import Callable, Optional

from absl import logging

from memseg_jax.errors import UserError

ENV_COORDINATOR = 'MEMSEG_COORDINATOR_ADDRESS'
ENV_NUM_PROCESSES = 'MEMSEG_NUM_PROCESSES'
ENV_PROCESS_ID = 'MEMSEG_PROCESS_ID'
ENV_AUTO = 'MEMSEG_DISTRIBUTED'

_METADATA_URL = 'http://{host}/computeMetadata/v1/instance/attributes/{key}'


class DistributedConfigError(UserError, ValueError):
  """Incomplete or invalid multi-process settings; the message names the flag / variable."""


@dataclasses.dataclass(frozen=True)
class ClusterSpec:
  """How this process joins the run: explicit coordinates, or JAX's auto-detection."""
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None
  auto: bool = False          # jax.distributed.initialize() without arguments
  reason: str = ''

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


def _int_setting(value, flag: str, env: str) -> Optional[int]:
  if value is None or value == '':
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DistributedConfigError(
        f'--{flag} / {env}: expected an integer, got {value!r}') from None


def _is_loopback(address: str) -> bool:
  host = address.rsplit(':', 1)[0].strip('[]')
  if host == 'localhost':
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def _tpu_metadata(key: str, timeout: float = 5.0) -> str:
  """A Cloud TPU VM metadata attribute (raises OSError off GCE)."""
  host = os.environ.get('GCE_METADATA_IP', 'metadata.google.internal')
  request = urllib.request.Request(_METADATA_URL.format(host=host, key=key),
                                   headers={'Metadata-Flavor': 'Google'})
  with urllib.request.urlopen(request, timeout=timeout) as response:
    return response.read().decode().strip()


def _libtpu_installed() -> bool:
  return importlib.util.find_spec('libtpu') is not None


def tpu_worker_count(metadata_fn: Callable[[str], str] = _tpu_metadata) -> int:
  """Hosts of this Cloud TPU run (all slices); 1 off TPU or where it cannot be told."""
  try:
    slices = max(int(os.environ.get('MEGASCALE_NUM_SLICES') or 1), 1)
  except ValueError:
    slices = 1
  for env in ('TPU_PROCESS_ADDRESSES', 'TPU_WORKER_HOSTNAMES'):   # GKE TPU node pools
    if os.environ.get(env):
      return len([h for h in os.environ[env].split(',') if h.strip()]) * slices
  # Only a jax[tpu] install can be on a TPU VM: don't ask a metadata server anywhere else.
  if not _libtpu_installed() or os.environ.get('TPU_SKIP_MDS_QUERY'):
    return 1
  try:
    endpoints = metadata_fn('worker-network-endpoints')
  except OSError as e:
    logging.warning('libtpu is installed but the TPU VM metadata server did not answer (%s); '
                    'running as a single process', e)
    return 1
  return max(len([w for w in endpoints.split(',') if w.strip()]), 1) * slices


def resolve(coordinator_address: Optional[str] = None, num_processes=None, process_id=None,
            *, environ=None, metadata_fn: Callable[[str], str] = _tpu_metadata) -> ClusterSpec:
  """Which set-up applies (see the module docstring); arguments win over the environment."""
  env = os.environ if environ is None else environ
  address = coordinator_address or env.get(ENV_COORDINATOR) or None
  count = _int_setting(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES),
                       'num_processes', ENV_NUM_PROCESSES)
  pid = _int_setting(process_id if process_id is not None else env.get(ENV_PROCESS_ID),
                     'process_id', ENV_PROCESS_ID)
  if address is not None or count is not None or pid is not None:
    missing = [f'--{flag} ({var})' for flag, var, value in (
        ('coordinator_address', ENV_COORDINATOR, address),
        ('num_processes', ENV_NUM_PROCESSES, count),
        ('process_id', ENV_PROCESS_ID, pid)) if value is None]
    if missing:
      raise DistributedConfigError(
          'a multi-process run needs the coordinator address, the number of processes and '
          f'the process id; missing: {", ".join(missing)}')
    if ':' not in address:
      raise DistributedConfigError(
          f'--coordinator_address ({ENV_COORDINATOR}): expected host:port, got {address!r}')
    if count < 1 or not 0 <= pid < count:
      raise DistributedConfigError(
          f'--process_id={pid} must be in [0, --num_processes={count})')
    return ClusterSpec(address, count, pid, reason='explicit coordinator')
  if env.get(ENV_AUTO, '') not in ('', '0'):
    return ClusterSpec(auto=True, reason=f'{ENV_AUTO}={env[ENV_AUTO]}')
  workers = tpu_worker_count(metadata_fn)
  if workers > 1:
    return ClusterSpec(auto=True, reason=f'Cloud TPU VM with {workers} workers')
  return ClusterSpec(reason='single process')


def initialize(coordinator_address: Optional[str] = None, num_processes=None, process_id=None,
               **resolve_kwargs) -> bool:
  """Starts jax.distributed when this is a multi-process run; True if it did.

  Must run before anything touches a JAX backend (jax.devices(), an array, a jit call).
  """
  spec = resolve(coordinator_address, num_processes, process_id, **resolve_kwargs)
  if not spec.explicit and not spec.auto:
    return False
  import jax  # pylint: disable=import-outside-toplevel
  if jax.distributed.is_initialized():
    return True
  # gloo is JAX's default for CPU collectives today; naming it keeps multi-process CPU runs
  # working where another default applies. An explicit JAX setting is left as it is.
  if 'JAX_CPU_COLLECTIVES_IMPLEMENTATION' not in os.environ:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  if spec.auto:
    logging.info('starting jax.distributed (%s)', spec.reason)
    jax.distributed.initialize()
  else:
    kwargs = {}
    if _is_loopback(spec.coordinator_address):
      kwargs['coordinator_bind_address'] = spec.coordinator_address
    logging.info('starting jax.distributed: process %d of %d, coordinator %s',
                 spec.process_id, spec.num_processes, spec.coordinator_address)
    jax.distributed.initialize(coordinator_address=spec.coordinator_address,
                               num_processes=spec.num_processes, process_id=spec.process_id,
                               **kwargs)
  logging.info('process %d of %d: %d local / %d global devices', jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True
