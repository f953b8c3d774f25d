"""One process of a (multi-process) training + evaluation run, for tests/test_multihost.py.

    python tests/multihost_worker.py --data_dir=D --workdir=W --steps=3 --out=state.npz \
        [--coordinator_address=127.0.0.1:PORT --num_processes=2 --process_id=I] \
        [--eval_dir=E [--eval_checkpoint=CKPT_DIR]]

Every process feeds its rows of the same global batches: the single-process training stream of
the config (the real input pipeline with process_count=1), rows [p * B / P, (p + 1) * B / P) on
process p. A run of P processes thus trains on exactly the batches of a 1-process run whatever
P, so their final states must agree. The worker saves this process's copy of the final
replicated params / batch_stats / memory to --out (one npz key per leaf), then optionally
evaluates (`train.evaluate_checkpoint`, eval_results.json in --eval_dir).

The device count per process comes from XLA_FLAGS (--xla_force_host_platform_device_count).
"""

import argparse
import faulthandler
import os
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def global_batches_sliced(config):
  """dataset_fn for train.train_and_evaluate: this process's rows of the 1-process stream."""
  import jax  # pylint: disable=import-outside-toplevel
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  p, n = jax.process_index(), jax.process_count()
  b_host = config.train.batch_size // n

  def dataset_fn(start_step):
    for batch in input_pipeline.create_train_dataset(config, start_step=start_step):
      yield {k: v[p * b_host:(p + 1) * b_host] for k, v in batch.items()}
  return dataset_fn


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
  args = parser.parse_args(argv)
  # `kill -USR1 PID` prints every thread's stack: a hung multi-process test can be diagnosed.
  faulthandler.register(signal.SIGUSR1)

  sys.path.insert(0, REPO)
  from absl import logging  # pylint: disable=import-outside-toplevel
  logging.set_verbosity(logging.INFO)
  from memseg_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)

  import jax  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from memseg_jax import input_pipeline, main as main_lib, train  # pylint: disable=import-outside-toplevel
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
      leaves = {f'{name}{key}': value
                for name in ('params', 'batch_stats', 'memory')
                for key, value in local_copy(getattr(state, name)).items()}
      leaves['step'] = np.asarray(jax.device_get(state.step.addressable_data(0)))
      np.savez(args.out.replace('.npz', f'_{jax.process_index()}.npz'), **leaves)
  if args.eval_dir:
    config.eval.checkpoint = args.eval_checkpoint or args.workdir
    train.evaluate_checkpoint(config, args.eval_dir)
  print(f'process {jax.process_index()} of {jax.process_count()} done', flush=True)


if __name__ == '__main__':
  main()
