"""Parity of the whole evaluation path with the reference's own inference (CPU, float32).

The reference MCIBI (SSSegmentation 1.7.0) gets small random weights (tests/reference_utils),
including a random feature memory; the project's converter turns its state_dict into our
variables. Both then run their own test-time inference on the same normalised image:
the reference through `BaseSegmentor.inference` / `auginference` plus the tester's final step
(every view upsampled to the original size, averaged), ours through `evaluate.inference`.

The network is the ADE20K recipe (150 classes, ASPP, memory, DeepLabV3 head) with a ResNet-18
backbone instead of ResNet-50, only to keep the CPU time small; inference does not depend on
the depth. Acceptance: final probabilities within 1e-4 and identical argmax except at near-ties
(top-2 gap below 1e-4).
"""

import numpy as np
import pytest

from tests import reference_utils as ru

pytestmark = pytest.mark.parity

TOL = 1e-4


@pytest.fixture(scope='module')
def models():
  import jax
  import torch
  from memseg_jax import convert, evaluate
  from memseg_jax.models import build_model
  cfg = ru.reference_cfg(depth=18)
  reference = ru.build_reference(cfg, 'TEST')
  # A memory with content, so the memory read matters. Scale 0.1 keeps the logits at a
  # realistic size (|logit| <= ~8); at scale 1 they reach ~40 and the float32 differences of
  # the two networks (~6e-5 relative, not an inference matter) give ~3e-4 in probabilities.
  with torch.no_grad():
    gen = torch.Generator().manual_seed(3)
    reference.memory_module.memory.copy_(
        0.1 * torch.randn(reference.memory_module.memory.shape, generator=gen))
  reference.cfg['dataset'] = {'train': {'data_pipelines': []}}
  config = ru.project_config(depth=18)
  variables = convert.convert_ssseg_state_dict(ru.to_numpy_state_dict(reference), config)
  variables = jax.tree_util.tree_map(np.asarray, variables)
  forward_fn = evaluate.make_forward_fn(build_model(config))
  return reference, forward_fn, variables


def _reference_scores(reference, image_nhwc, out_hw, *, mode, crop=(0, 0), stride=(0, 0),
                      scales=(1.0,), flip=False, use_probs=True):
  import torch
  import torch.nn.functional as F
  reference.cfg['inference'] = {
      'forward': {'mode': mode, 'cropsize': crop, 'stride': stride},
      'tta': {'multiscale': list(scales), 'flip': flip, 'use_probs_before_resize': use_probs}}
  images = torch.from_numpy(ru.nhwc_to_nchw(image_nhwc).copy())
  with torch.no_grad():
    views = reference.auginference(images)
    views = [F.interpolate(v, size=tuple(out_hw), mode='bilinear', align_corners=False)
             for v in views]
    scores = sum(views) / len(views)
  return ru.nchw_to_nhwc(scores.numpy())


def _check(ours, ref):
  ours, ref = np.asarray(ours), np.asarray(ref)
  assert ours.shape == ref.shape
  diff = np.abs(ours - ref).max()
  print(f'max |probability difference| = {diff:.3g}')
  assert diff < TOL
  top2 = np.sort(ref, axis=-1)[..., -2:]
  clear = (top2[..., 1] - top2[..., 0]) > TOL
  assert clear.mean() > 0.9   # the comparison is not vacuous
  np.testing.assert_array_equal(ours.argmax(-1)[clear], ref.argmax(-1)[clear])


def _run(models, shape, out_hw, seed, **kwargs):
  from memseg_jax import evaluate
  reference, forward_fn, variables = models
  image = np.random.RandomState(seed).randn(*shape).astype(np.float32)
  settings = evaluate.InferenceSettings(
      mode=kwargs.get('mode', 'whole'), crop_size=kwargs.get('crop', (0, 0)),
      stride=kwargs.get('stride', (0, 0)), windows_per_call=3,
      scales=kwargs.get('scales', (1.0,)), flip=kwargs.get('flip', False),
      use_probs_before_resize=kwargs.get('use_probs', True), flip_swap_pairs=())
  ours = evaluate.inference(forward_fn, variables, image, out_hw=out_hw, settings=settings)
  _check(ours, _reference_scores(reference, image, out_hw, **kwargs))


def test_whole_mode_at_an_odd_size_matches_reference(models):
  # Test-resized 75x99 image of an original 113x149 image.
  _run(models, (1, 75, 99, 3), (113, 149), seed=0, mode='whole')


def test_slide_mode_on_a_non_square_image_matches_reference(models):
  # 100x130 is not a multiple of the stride 40: 2 x 4 windows of 64x48, clamped at the border.
  _run(models, (1, 100, 130, 3), (100, 130), seed=1, mode='slide', crop=(64, 48),
       stride=(40, 40))


def test_multiscale_flip_two_scales_matches_reference(models):
  # Scales 0.75 and 1.25 of a 75x99 image give 56x74 and 93x123 views (non-integer sizes:
  # PyTorch's 1/scale coordinate mapping matters).
  _run(models, (1, 75, 99, 3), (101, 133), seed=2, mode='whole', scales=(0.75, 1.25),
       flip=True)


@pytest.mark.slow
def test_slide_multiscale_flip_matches_reference(models):
  _run(models, (1, 70, 90, 3), (70, 90), seed=3, mode='slide', crop=(64, 48), stride=(40, 40),
       scales=(0.75, 1.25), flip=True)
