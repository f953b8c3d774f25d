"""One process of a (multi-process) training + evaluation run, for tests/test_multihost.py.

    python tests/multihost_worker.py --data_dir=D --workdir=W --steps=3 --out=state.npz \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I] \
        [--eval_dir=E [--eval_checkpoint=CKPT_DIR]] [--mutations=rows,mean3]

Every process feeds its rows of the same global batches: the single-process training stream of
the config (the real input pipeline with process_count=1), rows [p * B / P, (p + 1) * B / P) on
process p. A run of P processes thus trains on exactly the batches of a 1-process run whatever
P, so their final states must agree. The worker saves this process's copy of the final
replicated params / batch_stats / memory to --out (one npz key per leaf; process 0 also writes
the step-0 state to <out>_init.npz), then optionally evaluates (`evaluate.evaluate_checkpoint`,
eval_results.json in --eval_dir).

--mutations trains once more per listed error, each into <workdir>_<name> and
<out>_<name>_<process>.npz, so that a test can show that its comparison catches a real error:
'rows' feeds the last device of the last process a copy of its neighbour's rows; 'mean3'
divides the cross-device sums of train.py's step (gradients, BN statistics) by 3 instead of
averaging them over the 4 devices.

The device count per process comes from XLA_FLAGS (--xla_force_host_platform_device_count).
"""

import argparse
import faulthandler
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def global_batches_sliced(config, wrong_rows: bool = False):
  """dataset_fn for train.train_and_evaluate: this process's rows of the 1-process stream.

  `wrong_rows`: the last device of the last process gets its neighbour's rows (an error).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  p, n = jax.process_index(), jax.process_count()
  b_host = config.train.batch_size // n
  b_device = config.train.batch_size // jax.device_count()

  def dataset_fn(start_step):
    for batch in input_pipeline.create_train_dataset(config, start_step=start_step):
      rows = {k: v[p * b_host:(p + 1) * b_host].copy() for k, v in batch.items()}
      if wrong_rows and p == n - 1:
        for v in rows.values():
          v[-b_device:] = v[-2 * b_device:-b_device]
      yield rows
  return dataset_fn


class _LaxMeanOverThree:
  """train.py's `lax` with `pmean` replaced by psum / 3 (an error on a 4-device axis)."""

  def __init__(self, lax):
    self._lax = lax
    self.calls = 0

  def __getattr__(self, name):
    return getattr(self._lax, name)

  def pmean(self, x, axis_name):
    import jax  # pylint: disable=import-outside-toplevel
    self.calls += 1
    return jax.tree_util.tree_map(lambda v: self._lax.psum(v, axis_name) / 3, x)


def save_state(path, state, with_step=True):
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  leaves = {f'{name}{key}': value
            for name in ('params', 'batch_stats', 'memory')
            for key, value in local_copy(getattr(state, name)).items()}
  if with_step:
    leaves['step'] = np.asarray(jax.device_get(state.step.addressable_data(0)))
  np.savez(path, **leaves)


def local_copy(tree):
  """{'params/...': np.ndarray} of a replicated state, from this process's own shard."""
  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): np.asarray(leaf.addressable_data(0)) for path, leaf in flat}


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--data_dir', required=True)
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--lr', type=float, default=0.0, help='overrides config.train.lr if > 0')
  parser.add_argument('--out', default='')
  parser.add_argument('--coordinator_address', default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--eval_dir', default='')
  parser.add_argument('--eval_checkpoint', default='')
  parser.add_argument('--mutations', default='', help="comma-separated: 'rows', 'mean3'")
  args = parser.parse_args(argv)
  # `kill -USR1 PID` prints every thread's stack: a hung multi-process test can be diagnosed.
  faulthandler.register(signal.SIGUSR1)

  sys.path.insert(0, REPO)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.INFO)
  from memseg_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  import jax  # pylint: disable=import-outside-toplevel
  from memseg_jax import evaluate, input_pipeline, main as main_lib, train  # pylint: disable=import-outside-toplevel
  main_lib.enable_compilation_cache()    # MEMSEG_COMPILATION_CACHE=DIR shares compiled programs
  input_pipeline.hide_accelerators_from_tf()
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tiny_run_config  # pylint: disable=import-outside-toplevel
  config = tiny_run_config.get_config(args.data_dir, args.steps)
  if args.lr > 0:
    config.train.lr = args.lr
  if args.steps > 0:
    state = train.train_and_evaluate(config, args.workdir,
                                     dataset_fn=global_batches_sliced(config))
    if args.out:
      save_state(args.out.replace('.npz', f'_{jax.process_index()}.npz'), state)
      if jax.process_index() == 0:
        # The run's step-0 state (train_and_evaluate's: the config seed, no pretrained file).
        init = train.create_train_state(config, jax.random.PRNGKey(config.seed),
                                        train.create_optimizer(config, lambda step: 0.0))
        save_state(args.out.replace('.npz', '_init.npz'), init, with_step=False)
    for name in filter(None, args.mutations.split(',')):
      workdir = f'{args.workdir}_{name}'
      if name == 'rows':
        state = train.train_and_evaluate(
            config, workdir, dataset_fn=global_batches_sliced(config, wrong_rows=True))
      elif name == 'mean3':
        train.lax = _LaxMeanOverThree(train.lax)
        try:
          state = train.train_and_evaluate(config, workdir,
                                           dataset_fn=global_batches_sliced(config))
          # If train.py stopped calling lax.pmean, the mutation would silently do nothing.
          assert train.lax.calls > 0, 'train.py no longer calls lax.pmean'
        finally:
          train.lax = train.lax._lax  # pylint: disable=protected-access
      else:
        raise ValueError(f'--mutations: unknown {name!r}')
      save_state(args.out.replace('.npz', f'_{name}_{jax.process_index()}.npz'), state)
  if args.eval_dir:
    config.eval.checkpoint = args.eval_checkpoint or args.workdir
    evaluate.evaluate_checkpoint(config, args.eval_dir)
  print(f'process {jax.process_index()} of {jax.process_count()} done', flush=True)


if __name__ == '__main__':
  main()
