"""Writes the fixed noise of the MCIBI++ memory read: memseg_jax/models/data/mcibipp_noise.npy.

    python scripts/make_mcibipp_noise.py            # needs torch (the 'torch' extra), CPU only
    python scripts/make_mcibipp_noise.py --check    # regenerate and compare, write nothing

The reference (`FeaturesMemoryV2.forward`, SSSegmentation 1.7.0) draws the read vector of class
c as `torch.manual_seed(c); torch.normal(mean=full((1, C), mean_c), std=full((1, C), std_c))`.
ATen computes that as z = normal_(0, 1) of a fresh (1, C) tensor, then z * std + mean; so z_c
depends only on c (and C). This script stores z for c = 0 .. 181 (COCO-Stuff's 182 classes, the
most of any config) and C = 512 (`feats_channels` of every released model) as float32, row c =
z_c. The draw is ATen's CPU normal kernel (its vectorised path for tensors of >= 16 floats), so
run it on an x86-64 CPU, as the reference runs its read (`torch.full` tensors live on the CPU).
For C a multiple of 16 below 512, z_c of width C is the first C entries of the stored row
(the kernel draws all uniforms first, then transforms them in blocks of 16); tests check this.
"""

import argparse
import os
import sys

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(REPO_ROOT, 'memseg_jax', 'models', 'data', 'mcibipp_noise.npy')
NUM_CLASSES = 182
CHANNELS = 512


def reference_noise(num_classes: int = NUM_CLASSES, channels: int = CHANNELS) -> np.ndarray:
  """(num_classes, channels) float32: row c is the reference's standard-normal draw for class c."""
  import torch  # pylint: disable=import-outside-toplevel
  rows = []
  for c in range(num_classes):
    torch.manual_seed(c)
    rows.append(torch.normal(mean=torch.zeros((1, channels)),
                             std=torch.ones((1, channels)))[0].numpy())
  return np.stack(rows).astype(np.float32)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--check', action='store_true', help='compare with the stored file only')
  p.add_argument('--output', default=OUTPUT)
  args = p.parse_args(argv)
  z = reference_noise()
  if args.check:
    stored = np.load(args.output)
    same = stored.dtype == z.dtype and stored.shape == z.shape and np.array_equal(stored, z)
    print(f'{args.output}: {"bit-identical" if same else "DIFFERENT"} to a fresh draw')
    return 0 if same else 1
  os.makedirs(os.path.dirname(args.output), exist_ok=True)
  np.save(args.output, z)
  print(f'wrote {args.output}: {z.shape} {z.dtype}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
