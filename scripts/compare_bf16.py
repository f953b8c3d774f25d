"""Train the demo twice, in float32 and in bfloat16 compute, and print both validation mIoUs.

    python scripts/compare_bf16.py --workdir=/tmp/memseg_bf16            # 2 x the demo (320 steps)
    python scripts/compare_bf16.py --workdir=/tmp/memseg_bf16 --steps=100   # quicker, noisier

Both runs use configs/demo.py unchanged except `model.dtype` (and `train.num_train_steps` with
--steps): same seed, same data order, same schedule. With `model.dtype = 'bfloat16'` the
convolutions and matmuls run in bfloat16 while the parameters, the BatchNorm statistics, the
memory, the softmax and the losses stay float32 (memseg_jax.models), so the two mIoUs should be
comparable (within the run-to-run noise of a short demo, a few points). Each run writes its own
workdir (`<workdir>/float32`, `<workdir>/bfloat16`); an existing one is resumed, so a finished
run only re-evaluates. The numbers are also written to `<workdir>/compare_bf16.json`.

On a CPU without native bfloat16 arithmetic the bfloat16 run is slower than the float32 one
(XLA emulates it); the switch is meant for accelerators. The point here is the accuracy.
"""

import argparse
import json
import os
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--workdir', required=True, help='parent folder of the two run workdirs')
  p.add_argument('--config', default=os.path.join(REPO_ROOT, 'configs', 'demo.py'))
  p.add_argument('--steps', type=int, default=-1,
                 help='train.num_train_steps override (-1: the config\'s epochs)')
  p.add_argument('--dtypes', default='float32,bfloat16', help='comma list of model.dtype values')
  return p.parse_args(argv)


def run_one(config_path, dtype, workdir, steps):
  """Trains (or resumes) one run and returns its evaluation results (with 'mIoU')."""
  from memseg_jax import main as memseg_main  # pylint: disable=import-outside-toplevel
  from memseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  from memseg_jax.config_validation import load_config  # pylint: disable=import-outside-toplevel
  config = load_config(config_path)
  config.model.dtype = dtype
  if steps > 0:
    config.train.num_train_steps = steps
  # Evaluated once below (evaluate_checkpoint returns the numbers), not inside the loop too.
  config.train.final_eval = False
  t0 = time.time()
  # The library entry of `python -m memseg_jax.main`: validates the config and generates the
  # demo's synthetic_scenes on first use before training.
  memseg_main.run(config, workdir)
  train_s = time.time() - t0
  results = evaluate.evaluate_checkpoint(config, workdir)
  return {'dtype': dtype, 'workdir': workdir, 'train_seconds': train_s,
          'mIoU': float(results['mIoU']), 'mAcc': float(results.get('mAcc', float('nan'))),
          'aAcc': float(results.get('aAcc', float('nan')))}


def main(argv=None):
  args = parse_args(argv)
  dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  for d in dtypes:
    if d not in ('float32', 'bfloat16'):
      raise ValueError(f'--dtypes: unknown dtype {d!r} (expected float32 or bfloat16)')
  os.makedirs(args.workdir, exist_ok=True)
  rows = [run_one(args.config, d, os.path.join(os.path.abspath(args.workdir), d), args.steps)
          for d in dtypes]
  print(f"{'dtype':10s} {'mIoU':>7s} {'mAcc':>7s} {'aAcc':>7s} {'train s':>8s}")
  for r in rows:
    print(f"{r['dtype']:10s} {r['mIoU']:7.4f} {r['mAcc']:7.4f} {r['aAcc']:7.4f} "
          f"{r['train_seconds']:8.0f}")
  if len(rows) == 2:
    print(f"mIoU difference ({rows[1]['dtype']} - {rows[0]['dtype']}): "
          f"{rows[1]['mIoU'] - rows[0]['mIoU']:+.4f}")
  with open(os.path.join(args.workdir, 'compare_bf16.json'), 'w') as f:
    json.dump({'steps': args.steps, 'config': args.config, 'runs': rows}, f, indent=2)
  return rows


if __name__ == '__main__':
  main()
