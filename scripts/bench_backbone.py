"""Where a train step's time goes: the backbone alone, forward + backward, beside the reference.

    python scripts/bench_backbone.py --backbone=hrnetv2w48            # 128x128, batch 2
    python scripts/bench_backbone.py --backbone=r50 --size=512 --reps=2

`scripts/benchmark.py` times the whole train step; this times the backbone's part of it: the
backbone of the `--backbone` entry of benchmark.py's BACKBONES (its ADE20K config), in training
mode (batch statistics), forward and the backward of sum(outputs * r) for a fixed random r, with
the gradient of every parameter. Both sides use random weights (the time does not depend on the
values) and all the CPUs this process may use. The rest of the train step (head, memory, losses,
optimizer) is the benchmark's step time minus this. Printed: medians of --reps timed calls after
--warmup untimed ones, their ratio (memseg_jax / reference), the 1-minute load before and after.
"""

import argparse
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, 'scripts'))


def _median_time(fn, warmup, reps):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def time_jax(config, images, warmup, reps, forward_only=False):
  """Median seconds of the backbone's forward + backward in memseg_jax (compiled first)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import backbone_config, backbones  # pylint: disable=import-outside-toplevel
  cfg = dict(backbone_config(config))
  module = backbones.get(cfg['type']).build(cfg, train=True, conv_impl=config.model.conv_impl)
  x = jnp.asarray(images.transpose(0, 2, 3, 1))                       # NHWC
  variables = module.init(jax.random.PRNGKey(0), x)
  outs = module.apply(variables, x, mutable=['batch_stats'])[0]
  rs = [jax.random.normal(jax.random.PRNGKey(i + 1), o.shape) for i, o in enumerate(outs)]

  def loss(params, batch_stats):
    outs, new_vars = module.apply({'params': params, 'batch_stats': batch_stats}, x,
                                  mutable=['batch_stats'])
    return sum(jnp.vdot(o, r) for o, r in zip(outs, rs)), new_vars

  step = jax.jit(lambda p, s: loss(p, s)[0] if forward_only else jax.grad(loss, has_aux=True)(p, s))
  t0 = time.perf_counter()
  compiled = step.lower(variables['params'], variables.get('batch_stats', {})).compile()
  compile_s = time.perf_counter() - t0

  def run():
    jax.block_until_ready(compiled(variables['params'], variables.get('batch_stats', {})))

  median, times = _median_time(run, warmup, reps)
  return median, times, compile_s


def time_reference(ref_cfg, images, warmup, reps, context, forward_only=False):
  """Median seconds of the reference backbone's forward + backward (train mode)."""
  import torch  # pylint: disable=import-outside-toplevel
  from tests import reference_utils as ru  # pylint: disable=import-outside-toplevel
  with context():
    model = ru.build_reference(ref_cfg, 'TRAIN')
  backbone = model.backbone_net
  x = torch.as_tensor(images)
  with torch.no_grad():
    outs = backbone(x)
  gen = torch.Generator().manual_seed(1)
  rs = [torch.randn(o.shape, generator=gen) for o in outs]

  def run():
    backbone.zero_grad(set_to_none=True)
    if forward_only:
      with torch.no_grad():
        backbone(x)
      return
    loss = sum((o * r).sum() for o, r in zip(backbone(x), rs))
    loss.backward()

  median, times = _median_time(run, warmup, reps)
  return median, times


def main(argv=None):
  import benchmark  # pylint: disable=import-outside-toplevel
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--backbone', default='hrnetv2w48', choices=sorted(benchmark.BACKBONES))
  p.add_argument('--size', type=int, default=128)
  p.add_argument('--batch_size', type=int, default=2)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--conv_impl', default=None, choices=('auto', 'native', 'taps'))
  p.add_argument('--skip_reference', action='store_true')
  p.add_argument('--forward_only', action='store_true',
                 help='time the training-mode forward alone (no gradient)')
  args = p.parse_args(argv)

  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  bench_args = benchmark.parse_args(['--backbone', args.backbone])
  ctx = benchmark.Context(bench_args)
  config = ctx.config('mcibi', (args.size, args.size))
  if args.conv_impl:
    config.model.conv_impl = args.conv_impl
  images = np.random.default_rng(0).standard_normal(
      (args.batch_size, 3, args.size, args.size)).astype(np.float32)
  load0 = os.getloadavg()[0]
  what = 'forward' if args.forward_only else 'fwd+bwd'
  ref_s = None
  if not args.skip_reference:      # first: XLA's idle worker threads are not yet started
    ref_cfg = (benchmark.BACKBONES[args.backbone]['reference']('mcibi')
               or ctx.reference.reference_cfg(model='mcibi'))
    ref_s, ref_times = time_reference(ref_cfg, images, args.warmup, args.reps,
                                      ctx._reference_context,  # pylint: disable=protected-access
                                      args.forward_only)
    print(f'backbone {args.backbone} train {what} {args.size}x{args.size} b{args.batch_size}: '
          f'reference {ref_s:.3f} s ({np.round(ref_times, 3)})', flush=True)
  jax_s, jax_times, compile_s = time_jax(config, images, args.warmup, args.reps,
                                         args.forward_only)
  print(f'backbone {args.backbone} train {what} {args.size}x{args.size} b{args.batch_size}: '
        f'memseg_jax {jax_s:.3f} s (compile {compile_s:.0f} s; {np.round(jax_times, 3)})'
        + ('' if ref_s is None else f'; ratio {jax_s / ref_s:.2f}'), flush=True)
  print(f'load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after')


if __name__ == '__main__':
  main()
