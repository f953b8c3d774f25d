"""Eval forward of ViT-L MCIBI (configs/ade20k_vitl.py) beside the reference, on the CPU.

    python scripts/bench_vit.py                       # 512x512, 1 warm-up + 3 timed calls each
    python scripts/bench_vit.py --reps=5 --output=/tmp/bench_vit.json
    python scripts/bench_vit.py --layers=4            # a shallower ViT of the same width

Both sides hold the same numbers: the reference (SSSegmentation 1.7.0 `VisionTransformer` +
MCIBI with its ViT-L head additions, built as tests/reference_utils.py builds it: random
weights, calibrated BN, random cls token / position embedding / LayerNorms) and its state_dict
converted with `memseg_jax.convert`. memseg_jax is compiled ahead of time
(`jit(...).lower(...).compile()`, compile time reported apart); each side runs --warmup untimed
calls, then --reps timed calls of one 512x512 image to the logits (1/16 resolution); the
medians and their ratio (memseg_jax / reference; <= 1.1 is the target) are printed with the
1-minute load average before and after and the max relative difference of the logits. Both
sides use all the CPUs this process may use (XLA's pool; `torch.set_num_threads`). Keep the
machine otherwise idle: the ratio is only meaningful at a low load.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--size', type=int, default=512, help='square image size')
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--reps', type=int, default=3)
  p.add_argument('--layers', type=int, default=24, help='ViT blocks (24: ViT-L)')
  p.add_argument('--output', default='', help='JSON file for every number')
  return p.parse_args(argv)


def _time_calls(fn, warmup, reps):
  warm, times = [], []
  for _ in range(warmup):
    t = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - t)
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {'median': statistics.median(times), 'times': times, 'warmup_times': warm}


def main(argv=None):
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  import torch
  from memseg_jax import convert, evaluate
  from memseg_jax.models import build_model
  from tests import reference_utils as ru

  threads = len(os.sched_getaffinity(0))
  torch.set_num_threads(threads)
  load_before = os.getloadavg()[0]
  sizes = {}
  if args.layers != 24:
    sizes = dict(num_layers=args.layers,
                 out_indices=tuple(range(args.layers - 4, args.layers)) if args.layers >= 4
                 else tuple(range(args.layers)))
  cfg, config = ru.vit_mcibi_cfgs(**sizes)
  image = np.random.RandomState(3).randn(1, 3, args.size, args.size).astype(np.float32)
  ref = ru.build_reference(cfg, calibration_images=image, random_memory=True,
                           prepare=ru.randomize_vit)
  variables = jax.device_put(convert.convert_ssseg_state_dict(ref.state_dict(), config))
  _, input_structure = ru.import_ssseg_builder()
  x_ref = torch.from_numpy(image)
  x = jax.device_put(image.transpose(0, 2, 3, 1))

  def ref_call():
    with torch.no_grad():
      return ref(input_structure(images=x_ref, mode='TEST')).seg_logits

  forward = evaluate.make_forward_fn(build_model(config))
  start = time.perf_counter()
  compiled = forward.lower(variables, x).compile()
  compile_s = time.perf_counter() - start
  ours = _time_calls(lambda: compiled(variables, x).block_until_ready(), args.warmup, args.reps)
  print(f'memseg_jax: median {ours["median"]:.2f} s {["%.2f" % t for t in ours["times"]]} '
        f'(compile {compile_s:.0f} s)', flush=True)
  theirs = _time_calls(ref_call, args.warmup, args.reps)
  print(f'reference:  median {theirs["median"]:.2f} s {["%.2f" % t for t in theirs["times"]]}',
        flush=True)
  a = np.asarray(compiled(variables, x)).transpose(0, 3, 1, 2)
  b = ref_call().numpy()
  rel = float(np.abs(a - b).max() / np.abs(b).max())
  load_after = os.getloadavg()[0]
  ratio = ours['median'] / theirs['median']
  print(f'eval forward ViT-L MCIBI ({args.layers} blocks) {args.size}x{args.size}: memseg_jax '
        f'{ours["median"]:.2f} s, reference {theirs["median"]:.2f} s, ratio {ratio:.2f} '
        f'(target <= 1.1); logits max rel diff {rel:.2g}; {threads} threads; load '
        f'{load_before:.2f} -> {load_after:.2f}')
  if args.output:
    with open(args.output, 'w') as f:
      json.dump({'size': args.size, 'layers': args.layers, 'threads': threads,
                 'compile_s': compile_s, 'jax': ours, 'ref': theirs, 'ratio': ratio,
                 'logits_max_rel_diff': rel, 'load_before': load_before,
                 'load_after': load_after}, f, indent=2)


if __name__ == '__main__':
  main()
