"""Entry point: flags, config, distributed set-up; calls training or evaluation.

    python -m memseg_jax.main --config=configs/demo.py --workdir=/tmp/memseg_demo
    python -m memseg_jax.main --config=configs/ade20k.py --workdir=DIR --config.train.batch_size=8
    python -m memseg_jax.main --mode=eval --config=configs/ade20k.py --workdir=DIR

Multi-host runs start one process per host with the same flags; `memseg_jax.distributed`
explains how the processes find each other (automatic on Cloud TPU VM pod slices):

    # CPU / GPU cluster, on host i of N (the coordinator is process 0's host):
    python -m memseg_jax.main --config=configs/ade20k.py --workdir=gs://BUCKET/run \
        --coordinator_address=HOST0:1234 --num_processes=N --process_id=i

A SIGTERM (preemption) makes every process save a checkpoint at the same step and exit with
status 0; starting the same command again resumes from it. The workdir may be `gs://...`.

`--mode=train` trains (resuming from the workdir's latest checkpoint) and, when
config.train.final_eval is set, evaluates at the end; `--mode=eval` evaluates
config.eval.checkpoint or the latest checkpoint of the workdir (`evaluate.evaluate_checkpoint`,
which restores only the model's variables: no optimizer, no TrainState). The config is
validated and the workdir checked for writing before anything is compiled. Bad input (an
unknown flag or config key, a wrong value, a dataset that is not prepared, a checkpoint that
does not fit the config, a workdir that cannot be written, a checkpoint write that fails) ends
the run with one `error: ...` line and a non-zero exit status, without a traceback
(`memseg_jax.errors`).
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from memseg_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'config file (configs/*.py); override values with --config.x.y=value',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'directory for checkpoints, logs and results')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval'], 'train (then evaluate) or eval only')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None,
    'multi-process runs on CPU/GPU clusters: host:port of process 0 (or env '
    'MEMSEG_COORDINATOR_ADDRESS); not needed on Cloud TPU VMs')
_NUM_PROCESSES = flags.DEFINE_integer(
    'num_processes', None, 'multi-process runs: number of processes (or env MEMSEG_NUM_PROCESSES)')
_PROCESS_ID = flags.DEFINE_integer(
    'process_id', None, 'multi-process runs: this process, 0..N-1 (or env MEMSEG_PROCESS_ID)')


def _prepare_synthetic_data(config):
  """The built-in synthetic_scenes dataset is generated on first use (no download involved)."""
  if not config.data.name.startswith('synthetic_scenes'):
    return
  from memseg_jax import datasets  # pylint: disable=import-outside-toplevel
  builder = datasets.get_builder(config.data.name, config.data.data_dir or None)
  if not datasets.is_prepared(builder):
    logging.info('generating %s into %s (first use)', config.data.name, builder.data_dir)
    datasets.download_and_prepare(builder)


def enable_compilation_cache():
  """A persistent XLA compilation cache (~/.cache/memseg_jax/xla or $MEMSEG_COMPILATION_CACHE).

  Evaluation runs the network on each image's exact test size (see memseg_jax/evaluate.py), so
  it compiles once per distinct image size; the cache lets later evaluations, restarts and
  resumed runs reuse those programs. MEMSEG_COMPILATION_CACHE=0 turns it off; a cache directory
  set through JAX's own configuration is left as it is.
  """
  import jax  # pylint: disable=import-outside-toplevel
  where = os.environ.get('MEMSEG_COMPILATION_CACHE', '~/.cache/memseg_jax/xla')
  if where == '0' or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update('jax_compilation_cache_dir', os.path.expanduser(where))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)


def run(config, workdir: str, mode: str = 'train'):
  """Validates `config`, then trains or evaluates (library entry, also used by the notebook).

  Bad input raises a `memseg_jax.errors.UserError` (or an OSError) with a one-line message.
  """
  import jax  # pylint: disable=import-outside-toplevel
  from memseg_jax import checkpoint, config_validation  # pylint: disable=import-outside-toplevel
  config_validation.validate(config, jax.device_count())
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  # tf.data must not grab the accelerators JAX uses.
  input_pipeline.hide_accelerators_from_tf()
  if mode == 'eval':
    from memseg_jax import evaluate  # pylint: disable=import-outside-toplevel
    return evaluate.evaluate_checkpoint(config, workdir)
  config_validation.check_num_classes(config)
  # Before the dataset is generated: an unwritable workdir should fail in seconds.
  checkpoint.check_writable(workdir)
  _prepare_synthetic_data(config)
  from memseg_jax import train  # pylint: disable=import-outside-toplevel
  return train.train_and_evaluate(config, workdir)


def _config_name(config) -> str:
  try:
    return config_flags.get_config_filename(flags.FLAGS['config'])
  except Exception:  # pylint: disable=broad-except
    return f'the {config.data.name} config'


def out_of_memory_message(config, error: BaseException, mode: str = 'train') -> str:
  """The one-line message for a RESOURCE_EXHAUSTED `error` (memseg_jax.resources)."""
  import jax  # pylint: disable=import-outside-toplevel
  from memseg_jax import resources  # pylint: disable=import-outside-toplevel
  needed, available = resources.parse_out_of_memory(str(error))
  if available is None:
    try:
      available = jax.local_devices()[0].memory_stats().get('bytes_limit')
    except Exception:  # pylint: disable=broad-except
      available = None
  batch = config.train.batch_size if mode == 'train' else config.eval.batch_size
  per_device = max(int(batch) // max(jax.device_count(), 1), 1)
  return resources.out_of_memory_message(
      _config_name(config), per_device, needed, available, dtype=config.model.dtype,
      has_remat='remat' in config.model,
      what='the train step' if mode == 'train' else 'the evaluation')


def main(argv):
  """The program (run through `errors.run_program`, which reports bad input in one line)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  if _CONFIG.value is None or not _WORKDIR.value:
    raise app.UsageError('--config and --workdir are required')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  logging.set_verbosity(logging.INFO)
  from memseg_jax import distributed  # pylint: disable=import-outside-toplevel
  # Before any other JAX call: the backend must see the whole cluster.
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  errors.quiet_orbax_logs()
  enable_compilation_cache()
  from memseg_jax import resources  # pylint: disable=import-outside-toplevel
  try:
    run(_CONFIG.value, _WORKDIR.value, _MODE.value)
  except Exception as e:  # pylint: disable=broad-except
    if resources.is_gpu_tiling_failure(e):
      errors.fail(resources.gpu_tiling_message(
          _config_name(_CONFIG.value),
          'the train step' if _MODE.value == 'train' else 'the evaluation'))
    if not resources.is_resource_exhausted(e):
      raise
    # Device memory: what does not fit, by how much, and what to change (no traceback).
    errors.fail(out_of_memory_message(_CONFIG.value, e, _MODE.value))


if __name__ == '__main__':
  errors.run_program(main)
