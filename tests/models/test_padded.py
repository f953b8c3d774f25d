"""Zero-padded evaluation (`valid_hw`): the valid region equals the unpadded forward.

The padded area of each input is filled with large random values (not zeros), so a missing
mask anywhere in the network shows up in the valid region's logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax.models import build_model
from memseg_jax.models.heads import (adaptive_pool_matrix, adaptive_pool_matrix_valid,
                                     upsample_matrix_valid)
from memseg_jax.models.layers import downsample_valid, mask_invalid
from memseg_jax import ops
from tests.models.test_mcibi import K, _config, _init


def _variables(config, seed=0):
  model = build_model(config)
  variables = _init(model, jnp.zeros((1, 32, 32, 3)), seed=seed)
  if 'memory' in variables:   # a filled memory, so the memory read matters
    rng = np.random.default_rng(seed + 1)
    memory = variables['memory']['memory_module']['memory']
    variables['memory']['memory_module']['memory'] = rng.normal(
        size=memory.shape).astype(np.float32)
  return model, variables


CASES = {
    'mcibi_aspp': dict(name='mcibi'),
    'mcibi_ppm': dict(name='mcibi', head_type='ppm'),
    'mcibi_two_slots': dict(name='mcibi', num_feats_per_cls=2),
    'deeplabv3': dict(name='deeplabv3'),
}


@pytest.mark.parametrize('case', sorted(CASES))
def test_padded_forward_matches_unpadded_in_the_valid_region(case):
  config = _config(**CASES[case])
  model, variables = _variables(config)
  hp, wp = 64, 72
  sizes = [(37, 50), (64, 72), (9, 23)]      # odd, full, tiny (1x... at stride 8: 2x3)
  rng = np.random.default_rng(3)
  padded = (rng.normal(size=(len(sizes), hp, wp, 3)) * 50).astype(np.float32)
  exact = []
  for b, (h, w) in enumerate(sizes):
    image = rng.normal(size=(h, w, 3)).astype(np.float32)
    padded[b, :h, :w] = image
    exact.append(np.asarray(model.apply(variables, image[None], train=False)['logits'][0]))
  logits = np.asarray(jax.jit(lambda v, x, s: model.apply(v, x, train=False, valid_hw=s)[
      'logits'])(variables, padded, np.asarray(sizes, np.int32)))
  assert logits.shape == (len(sizes), 8, 9, K)
  for b, (h, w) in enumerate(sizes):
    ref = exact[b]
    assert ref.shape == (-(-h // 8), -(-w // 8), K)
    got = logits[b, :ref.shape[0], :ref.shape[1]]
    diff = np.max(np.abs(got - ref))
    print(f'{case} {h}x{w}: max |padded - unpadded| {diff:.2e} (max |logit| '
          f'{np.max(np.abs(ref)):.2f})')
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))


def test_valid_region_helpers_against_numpy():
  valid = np.asarray([[5, 3], [8, 8], [1, 7]], np.int32)
  x = np.random.default_rng(0).normal(size=(3, 8, 8, 2)).astype(np.float32)
  got = np.asarray(mask_invalid(jnp.asarray(x), valid))
  for b, (h, w) in enumerate(valid):
    want = np.zeros_like(x[b])
    want[:h, :w] = x[b, :h, :w]
    np.testing.assert_array_equal(got[b], want)
  np.testing.assert_array_equal(np.asarray(downsample_valid(jnp.asarray(valid), 2)),
                                [[3, 2], [4, 4], [1, 4]])
  lengths = np.asarray([1, 5, 7, 13, 16], np.int32)
  for s in (1, 2, 3, 6):
    pool = np.asarray(adaptive_pool_matrix_valid(jnp.asarray(lengths), 16, s))
    up = np.asarray(upsample_matrix_valid(jnp.asarray(lengths), s, 16))
    for b, v in enumerate(lengths):
      np.testing.assert_allclose(pool[b, :, :v], adaptive_pool_matrix(int(v), s), rtol=1e-6)
      assert not pool[b, :, v:].any()
      np.testing.assert_allclose(up[b, :v], ops.interp_matrix(s, int(v)), atol=1e-6)


def test_valid_hw_is_refused_in_training():
  config = _config(name='deeplabv3')
  model, variables = _variables(config)
  with pytest.raises(ValueError, match='valid_hw is for evaluation only'):
    model.apply(variables, jnp.zeros((1, 32, 32, 3)), train=True,
                valid_hw=np.asarray([[32, 32]], np.int32), mutable=['batch_stats'],
                rngs={'dropout': jax.random.PRNGKey(0)})
