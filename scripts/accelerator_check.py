"""The pieces of scripts/accelerator_check.sh, each run on the chip, into one JSON report.

    python scripts/accelerator_check.py --platform=gpu --out=report.json    # (the .sh installs)
    python scripts/accelerator_check.py --platform=cpu --out=report.json    # tiny settings

Pieces (each a subprocess on `--platform`'s devices, its time and result in the report):
  parity     the parity tests (tests/models/*parity*, tests/test_evaluate_parity.py) with
             jax_default_matmul_precision=highest, the CPU tolerances unchanged;
  benchmark  scripts/benchmark.py at 512x512 (train and eval of the ADE20K R-50 MCIBI; the
             PyTorch reference beside it when torch sees a CUDA GPU);
  demo       configs/demo.py for 200 steps in bfloat16, then its evaluation: the final mIoU;
  step_time  the demo's bfloat16 train step on this chip, timed, beside the prediction from
             its FLOPs (XLA's cost analysis here, or scripts/aot_check.py's TPU count when the
             chip's compiler gives none) at 40 % and 60 % of the chip's bfloat16 peak.
With --platform=cpu every piece runs with tiny settings (a few parity tests, 128x128 benchmark,
4 demo steps on 8 images), so the whole path is exercised without an accelerator.
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

# bfloat16 dense peak per chip (TFLOP/s) by the device_kind JAX reports.
PEAK_TFLOPS = {'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5': 459.0,
               'TPU v5p': 459.0, 'NVIDIA H100 80GB HBM3': 989.0, 'NVIDIA H200': 989.0}
CPU_PARITY = ['tests/models/test_memory_parity.py', '-k', 'update_matches_reference and init']


def _platform_env(platform: str) -> dict:
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  env['JAX_PLATFORMS'] = {'gpu': 'cuda', 'tpu': 'tpu', 'cpu': 'cpu'}[platform]
  return env


def _run(cmd, env, timeout):
  start = time.time()
  try:
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    rc, out = proc.returncode, proc.stdout + proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, out = 124, (e.stdout or b'').decode(errors='replace') if isinstance(e.stdout, bytes) \
        else (e.stdout or '')
  return rc, out, time.time() - start


def piece_parity(args, env):
  env = dict(env, JAX_DEFAULT_MATMUL_PRECISION='highest')
  tests = (CPU_PARITY if args.platform == 'cpu' else
           ['-m', 'parity', 'tests/models/', 'tests/test_evaluate_parity.py'])
  rc, out, seconds = _run([sys.executable, '-m', 'pytest', '-q', '-p', 'no:cacheprovider',
                           *tests], env, args.timeout)
  counts = {k: int(n) for n, k in re.findall(r'(\d+) (passed|failed|error|errors|skipped)', out)}
  return {'ok': rc == 0 and counts.get('passed', 0) > 0, 'returncode': rc, 'seconds': seconds,
          'counts': counts, 'tail': out[-1500:]}


def piece_benchmark(args, env):
  size = 128 if args.platform == 'cpu' else 512
  out_json = os.path.join(args.workdir, 'benchmark.json')
  cmd = [sys.executable, 'scripts/benchmark.py', f'--train_sizes={size}', f'--eval_size={size}',
         '--models=mcibi', '--skip_slide', '--skip_update', f'--output={out_json}']
  if args.platform == 'cpu':
    cmd += ['--batch_size=1', '--reps=1', '--warmup=0']
  try:
    import torch  # pylint: disable=import-outside-toplevel
    has_cuda_torch = bool(torch.cuda.is_available())
  except ImportError:
    has_cuda_torch = False
  if not (has_cuda_torch or args.platform == 'cpu'):
    cmd.append('--skip_reference')       # the reference on a CPU beside a chip says nothing
  if args.platform == 'cpu':
    cmd.append('--skip_reference')       # minutes on a CPU; the piece itself is what is checked
  rc, out, seconds = _run(cmd, env, args.timeout)
  result = {'ok': rc == 0 and os.path.exists(out_json), 'returncode': rc, 'seconds': seconds,
            'reference': has_cuda_torch and args.platform != 'cpu', 'tail': out[-1500:]}
  if os.path.exists(out_json):
    with open(out_json) as f:
      result['numbers'] = json.load(f)
  return result


def piece_demo(args, env):
  workdir = os.path.join(args.workdir, 'demo_bf16')
  steps = 4 if args.platform == 'cpu' else 200
  cmd = [sys.executable, '-m', 'memseg_jax.main', '--config=configs/demo.py',
         f'--workdir={workdir}', '--config.model.dtype=bfloat16',
         f'--config.train.num_train_steps={steps}', '--config.train.log_every_steps=2']
  if args.platform == 'cpu':
    cmd += ['--config.eval.max_images=8']
  env = dict(env, MEMSEG_COMPILATION_CACHE='0')
  rc, out, seconds = _run(cmd, env, args.timeout)
  result = {'ok': False, 'returncode': rc, 'seconds': seconds, 'steps': steps,
            'tail': out[-1500:]}
  path = os.path.join(workdir, 'eval_results.json')
  if rc == 0 and os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
    result.update(ok=results.get('mIoU') is not None, mIoU=results.get('mIoU'),
                  num_images=results.get('num_images'))
  return result


_STEP_TIME = r'''
import json, sys, time
import jax, jax.numpy as jnp, numpy as np
from memseg_jax import schedules, train
from memseg_jax.config_validation import load_config
config = load_config('configs/demo.py')
config.model.dtype = 'bfloat16'
devices = jax.local_devices()
n = len(devices)
per_device = int(sys.argv[1])
config.train.batch_size = per_device * n
mesh = train.create_mesh(devices)
lr = schedules.create_lr_schedule(config, 1000)
tx = train.create_optimizer(config, lr)
from memseg_jax.models import build_model
model = build_model(config, axis_name=train.AXIS, platform=devices[0].platform)
state = train.replicate(train.create_train_state(config, jax.random.PRNGKey(0), tx), mesh)
step = train.make_train_step(config, model, tx, lr, mesh, memory_loss=True)
h, w = config.data.crop_size
rng = np.random.default_rng(0)
b = config.train.batch_size
batch = train.shard_batch({'image': rng.normal(size=(b, h, w, 3)).astype(np.float32),
                           'label': rng.integers(0, 8, (b, h, w)).astype(np.int32)}, mesh)
compiled = step.lower(state, batch).compile()
cost = compiled.cost_analysis()
cost = cost[0] if isinstance(cost, list) else cost
flops = float(cost['flops']) if cost and 'flops' in cost else None
times = []
for i in range(int(sys.argv[2])):
  t = time.perf_counter()
  state, metrics = compiled(state, batch)
  jax.block_until_ready(metrics)
  times.append(time.perf_counter() - t)
print(json.dumps({'device_kind': devices[0].device_kind, 'devices': n,
                  'per_device_batch': per_device, 'flops_per_device': flops, 'times': times}))
'''


def piece_step_time(args, env):
  reps = 3 if args.platform == 'cpu' else 20
  rc, out, seconds = _run([sys.executable, '-c', _STEP_TIME, str(args.per_device_batch),
                           str(reps)], env, args.timeout)
  result = {'ok': False, 'returncode': rc, 'seconds': seconds}
  if rc != 0:
    result['tail'] = out[-1500:]
    return result
  # The JSON line of the child (its log lines on stderr come after it in `out`).
  line = next((l for l in reversed(out.splitlines()) if l.startswith('{"device_kind"')), None)
  if line is None:
    result['tail'] = out[-1500:]
    return result
  measured = json.loads(line)
  times = sorted(measured.pop('times')[1:] or [float('nan')])
  result.update(measured, ok=True, step_seconds_median=times[len(times) // 2])
  flops = measured['flops_per_device']
  source = 'cost_analysis on this chip'
  if flops is None:
    flops, source = _aot_flops(args, env), 'scripts/aot_check.py (v5e-8, same per-device batch)'
  peak = PEAK_TFLOPS.get(measured['device_kind'])
  result['flops_source'] = source if flops else None
  if flops and peak:
    result['predicted_step_seconds'] = {f'{int(f * 100)}%': flops / (f * peak * 1e12)
                                        for f in (0.4, 0.6)}
  else:
    result['predicted_step_seconds'] = None
    result['prediction_note'] = ('no bf16 peak for this device kind' if flops else
                                 'no FLOP count (the aot extra is not installed)')
  return result


def _aot_flops(args, env):
  """The TPU FLOP count of the same step from aot_check (needs the aot extra)."""
  out_json = os.path.join(args.workdir, 'aot.json')
  rc, _, _ = _run([sys.executable, 'scripts/aot_check.py', '--configs=demo', '--targets=v5e-8',
                   '--steps=train_mem', '--dtypes=bfloat16',
                   f'--per_device_batch={args.per_device_batch}', f'--json_out={out_json}'],
                  dict(env, JAX_PLATFORMS='cpu'), args.timeout)
  if rc != 0 or not os.path.exists(out_json):
    return None
  with open(out_json) as f:
    rows = json.load(f)['rows']
  return rows[0]['tflop'] * 1e12 if rows and rows[0].get('tflop') else None


PIECES = {'parity': piece_parity, 'benchmark': piece_benchmark, 'demo': piece_demo,
          'step_time': piece_step_time}


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--platform', required=True, choices=('gpu', 'tpu', 'cpu'))
  p.add_argument('--out', default='accelerator_check.json')
  p.add_argument('--workdir', default='/tmp/memseg_accelerator_check')
  p.add_argument('--pieces', default=','.join(PIECES))
  p.add_argument('--per_device_batch', type=int, default=8)
  p.add_argument('--timeout', type=int, default=0,
                 help='seconds per piece (default 900 on a chip, 1800 on a CPU)')
  args = p.parse_args(argv)
  if args.platform == 'cpu':
    args.per_device_batch = 1
  args.timeout = args.timeout or (1800 if args.platform == 'cpu' else 900)
  os.makedirs(args.workdir, exist_ok=True)
  env = _platform_env(args.platform)
  report = {'platform': args.platform, 'started': time.strftime('%Y-%m-%d %H:%M:%S'),
            'pieces': {}}
  start = time.time()
  for name in [x.strip() for x in args.pieces.split(',') if x.strip()]:
    if name not in PIECES:
      raise SystemExit(f'--pieces: unknown piece {name!r} (expected some of {list(PIECES)})')
    print(f'accelerator_check: {name} ...', flush=True)
    report['pieces'][name] = result = PIECES[name](args, env)
    print(f'accelerator_check: {name} {"ok" if result["ok"] else "FAILED"} '
          f'({result["seconds"]:.0f} s)', flush=True)
  report['seconds'] = time.time() - start
  report['ok'] = all(r['ok'] for r in report['pieces'].values())
  with open(args.out, 'w') as f:
    json.dump(report, f, indent=1)
  print(f'accelerator_check: report in {args.out}; {"all ok" if report["ok"] else "FAILED"} '
        f'({report["seconds"]:.0f} s)')
  return 0 if report['ok'] else 1


if __name__ == '__main__':
  sys.exit(main())
