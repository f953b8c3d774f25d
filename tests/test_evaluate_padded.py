"""Padded whole-mode evaluation (`evaluate.padded_whole_scores`) against the exact-shape path.

The exact path (`evaluate.inference` on the unpadded image) is itself checked against the
reference's tester in test_evaluate.py / test_evaluate_parity.py; here the padded, masked,
fixed-shape path must give the same scores on a real (small) MCIBI network, with the padding
filled with large random values.
"""

import jax
import numpy as np
import pytest

from memseg_jax import evaluate
from tests.models.test_mcibi import _config
from tests.models.test_padded import _variables
from tests.test_evaluate import _settings

SETTINGS = {
    'whole': dict(),
    'two_scales_flip_swap': dict(scales=(0.75, 1.25), flip=True, swap_pairs=((1, 3),)),
    'logits_flip': dict(use_probs=False, flip=True, scales=(1.0, 0.5)),
}


@pytest.fixture(scope='module')
def mcibi():
  config = _config(name='mcibi')
  return _variables(config)


@pytest.mark.parametrize('name', sorted(SETTINGS))
@pytest.mark.parametrize('image_hw,orig_hw', [((37, 53), (75, 104)), ((64, 64), (64, 64))])
def test_padded_whole_scores_match_the_exact_path(mcibi, name, image_hw, orig_hw):
  model, variables = mcibi
  settings = _settings(**SETTINGS[name])
  rng = np.random.default_rng(0)
  h, w = image_hw
  image = rng.normal(size=(h, w, 3)).astype(np.float32)
  padded = (rng.normal(size=(64, 64, 3)) * 30).astype(np.float32)   # one 64x64 bucket
  padded[:h, :w] = image
  label_hw = (-(-orig_hw[0] // 64) * 64, -(-orig_hw[1] // 64) * 64)
  exact = np.asarray(evaluate.inference(evaluate.make_forward_fn(model), variables,
                                        image[None], out_hw=orig_hw, settings=settings))[0]
  scores = np.asarray(evaluate.padded_whole_scores(
      evaluate.make_padded_forward_fn(model), variables, padded, image_hw=image_hw,
      orig_hw=orig_hw, label_hw=label_hw, settings=settings))
  assert scores.shape == label_hw + (exact.shape[-1],)
  got = scores[:orig_hw[0], :orig_hw[1]]
  diff = np.max(np.abs(got - exact))
  print(f'{name} {image_hw}->{orig_hw}: max |padded - exact| {diff:.2e} '
        f'(max |score| {np.max(np.abs(exact)):.2f})')
  np.testing.assert_allclose(got, exact, rtol=1e-5, atol=1e-5 * np.max(np.abs(exact)))


def test_tables_follow_resize_bilinear_and_flip():
  """Host tables: scaling then flipping an image equals resize_bilinear + [:, ::-1]."""
  from memseg_jax.ops import resize_bilinear
  settings = _settings(scales=(0.75,), flip=True)
  (view_hw, tables), = evaluate.padded_whole_tables((37, 53), (64, 64), (75, 104), (128, 128),
                                                    settings)
  assert view_hw == (64, 64)     # floor(64 * .75) = 48, rounded up to 32s
  np.testing.assert_array_equal(tables['valid'], [[27, 39], [27, 39]])
  image = np.random.default_rng(1).normal(size=(64, 64, 3)).astype(np.float32)
  views = np.asarray(evaluate._padded_views(image, jax.tree_util.tree_map(np.asarray, tables)))
  want = np.asarray(resize_bilinear(image[:37, :53], scale_factor=0.75))
  # Same weights and order; XLA may contract the lerp differently (float32 rounding only).
  np.testing.assert_allclose(views[0, :27, :39], want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(views[1, :27, :39], want[:, ::-1], rtol=1e-6, atol=1e-6)
  assert not views[:, 27:].any() and not views[:, :, 39:].any()


def test_padded_evaluation_compiles_the_network_once_per_bucket(mcibi):
  model, variables = mcibi
  forward = evaluate.make_padded_forward_fn(model)
  settings = _settings()
  before = forward._cache_size()  # pylint: disable=protected-access
  for h, w in [(33, 47), (50, 61), (64, 64), (20, 9)]:
    padded = np.zeros((64, 64, 3), np.float32)
    evaluate.padded_whole_scores(forward, variables, padded, image_hw=(h, w), orig_hw=(h, w),
                                 label_hw=(64, 64), settings=settings)
  assert forward._cache_size() - before <= 1  # pylint: disable=protected-access
