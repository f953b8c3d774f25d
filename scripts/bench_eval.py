"""Eval time per image: memseg_jax inference next to the reference's (SSSegmentation 1.7.0).

    python scripts/bench_eval.py                   # both cases, ADE20K R-50 MCIBI, random weights
    python scripts/bench_eval.py --cases=whole --reps=3

Cases (spec section 7):
  whole  a 512x512 image, whole mode, single scale (the ADE20K protocol);
  slide  a 1024x2048 image, slide mode with 512x1024 windows and stride 341 (15 windows; the
         Cityscapes protocol at one scale), `config.inference.windows_per_call` windows a call.

Both sides run the same converted random weights (the reference built by tests/reference_utils,
its state_dict converted by memseg_jax.convert) on the same normalised input and include the
tester's last step (upsampling to the original size). The first memseg_jax call per case
compiles; it is reported apart from the steady-state time. The script also prints the largest
probability difference of the two outputs as a sanity check. Needs the 'parity' extra (torch,
sssegmentation). Keep repetitions small on shared CPUs.
"""

import argparse
import os
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from tests import reference_utils as ru  # noqa: E402  pylint: disable=wrong-import-position

CASES = {
    'whole': dict(shape=(512, 512), mode='whole', crop=(512, 512), stride=(341, 341)),
    'slide': dict(shape=(1024, 2048), mode='slide', crop=(512, 1024), stride=(341, 341)),
}


def _reference_predict(reference, image_nhwc, case):
  import torch
  import torch.nn.functional as F
  reference.cfg['inference'] = {
      'forward': {'mode': case['mode'], 'cropsize': case['crop'], 'stride': case['stride']},
      'tta': {'multiscale': [1.0], 'flip': False, 'use_probs_before_resize': True}}
  images = torch.from_numpy(ru.nhwc_to_nchw(image_nhwc).copy())
  with torch.no_grad():
    views = reference.auginference(images)
    views = [F.interpolate(v, size=case['shape'], mode='bilinear', align_corners=False)
             for v in views]
    return (sum(views) / len(views)).numpy()


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--cases', default='whole,slide')
  parser.add_argument('--reps', type=int, default=1, help='timed repetitions per case and side')
  parser.add_argument('--depth', type=int, default=50)
  parser.add_argument('--windows_per_call', type=int, default=4)
  args = parser.parse_args()

  import jax
  import torch
  from memseg_jax import convert, evaluate
  from memseg_jax.models import build_model

  print(f'jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} '
        f'({torch.get_num_threads()} threads), {os.cpu_count()} CPUs')
  cfg = ru.reference_cfg(depth=args.depth)
  reference = ru.build_reference(cfg, 'TEST')
  reference.cfg['dataset'] = {'train': {'data_pipelines': []}}
  config = ru.project_config(depth=args.depth)
  variables = convert.convert_ssseg_state_dict(ru.to_numpy_state_dict(reference), config)
  variables = jax.device_put(jax.tree_util.tree_map(np.asarray, variables))
  forward_fn = evaluate.make_forward_fn(build_model(config))

  rows = []
  for name in args.cases.split(','):
    case = CASES[name]
    settings = evaluate.InferenceSettings(
        mode=case['mode'], crop_size=case['crop'], stride=case['stride'],
        windows_per_call=args.windows_per_call, scales=(1.0,), flip=False,
        use_probs_before_resize=True, flip_swap_pairs=())
    image = np.random.RandomState(0).randn(1, *case['shape'], 3).astype(np.float32)

    def ours():
      scores = evaluate.inference(forward_fn, variables, image, out_hw=case['shape'],
                                  settings=settings)
      return jax.block_until_ready(scores)

    t = time.perf_counter()
    out = ours()
    first = time.perf_counter() - t
    times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      out = ours()
      times.append(time.perf_counter() - t)
    ref_times = []
    for _ in range(args.reps):
      t = time.perf_counter()
      ref = _reference_predict(reference, image, case)
      ref_times.append(time.perf_counter() - t)
    diff = float(np.abs(np.asarray(out) - ru.nchw_to_nhwc(ref)).max())
    del out, ref
    rows.append((name, first, min(times), min(ref_times), diff))
    print(f'{name}: first call (compile + run) {first:.1f} s, memseg_jax {min(times):.2f} s, '
          f'reference {min(ref_times):.2f} s, max |prob diff| {diff:.2g}', flush=True)

  print('\ncase   input       memseg_jax s/img  reference s/img  ratio (ours/ref)  compile+1st s')
  for name, first, ours_t, ref_t, _ in rows:
    shape = 'x'.join(str(s) for s in CASES[name]['shape'])
    print(f'{name:6s} {shape:11s} {ours_t:16.2f} {ref_t:16.2f} {ours_t / ref_t:17.2f} '
          f'{first:14.1f}')


if __name__ == '__main__':
  main()
