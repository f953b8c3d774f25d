"""The MCIBI++ distribution memory (memory.py, second part) against independent numpy code.

`_numpy_update` re-derives the reference rule (wave-2 spec 5.1) with a plain loop over classes
in float64; the JAX update is vectorised in float32. The read is checked bit for bit against
numpy's two float32 roundings.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from memseg_jax import ops
from memseg_jax.models import memory as mem_lib

IGNORE = 255


def _numpy_update(memory, feats, labels, momentum, ignore_index=IGNORE):
  """Loop over the classes present: mean of their pixels, then its mean and unbiased std."""
  memory = memory.astype(np.float64).copy()
  k = memory.shape[0]
  x = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
  y = labels.reshape(-1)
  for c in np.unique(y):
    if c == ignore_index or not 0 <= c < k:
      continue
    f = x[y == c].mean(0)
    memory[c] = (1 - momentum) * memory[c] + momentum * np.array([f.mean(), f.std(ddof=1)])
  return memory


def _memory(k, seed):
  r = np.random.RandomState(seed)
  return np.stack([r.randn(k), r.uniform(0.1, 2.0, k)], axis=1).astype(np.float32)


def _inputs(seed, k=6, c=16, b=2, h=5, w=7, size=None):
  r = np.random.RandomState(seed)
  size = size or (h, w)
  feats = r.randn(b, h, w, c).astype(np.float32)
  labels = r.randint(0, k - 1, size=(b, *size)).astype(np.int32)    # class k-1 absent
  labels[:, 0, :2] = IGNORE
  return _memory(k, seed + 100), feats, labels


def test_initial_memory_is_mean_zero_std_one():
  np.testing.assert_array_equal(np.asarray(mem_lib.init_distribution_memory(4)),
                                [[0, 1]] * 4)


@pytest.mark.parametrize('k,c', [(150, 512), (19, 64)])
def test_read_is_two_float32_roundings_not_a_fused_multiply_add(k, c):
  memory = _memory(k, 0)
  noise = mem_lib.memory_noise(k, c)
  want = (noise * memory[:, 1:2]).astype(np.float32) + memory[:, 0:1]
  fma = (noise.astype(np.float64) * memory[:, 1:2] + memory[:, 0:1]).astype(np.float32)
  assert np.sum(want != fma) > 0      # the two forms do differ on these inputs
  got = np.asarray(jax.jit(mem_lib.read_distribution_memory)(memory, noise))
  np.testing.assert_array_equal(got, want)


def test_noise_rows_are_standard_normal_and_narrow_widths_are_prefixes():
  z = mem_lib.memory_noise(182, 512)
  assert z.shape == (182, 512) and z.dtype == np.float32
  assert abs(float(z.mean())) < 0.01 and abs(float(z.std()) - 1) < 0.01
  np.testing.assert_array_equal(mem_lib.memory_noise(20, 64), z[:20, :64])


@pytest.mark.parametrize('k,c,key', [(183, 512, 'model.num_classes=183'),
                                     (150, 24, 'model.head.feats_channels=24'),
                                     (150, 528, 'model.head.feats_channels=528')])
def test_noise_sizes_outside_the_table_are_refused_naming_the_key(k, c, key):
  with pytest.raises(ValueError, match=key):
    mem_lib.memory_noise(k, c)


@pytest.mark.parametrize('momentum', [0.1, 1.0])
def test_update_matches_numpy(momentum):
  memory, feats, labels = _inputs(0)
  got = np.asarray(mem_lib.update_distribution_memory(memory, feats, labels, momentum=momentum))
  want = _numpy_update(memory, feats, labels, momentum)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  np.testing.assert_array_equal(got[-1], memory[-1])       # absent: bit-identical
  assert np.all(got[:-1] != memory[:-1])


def test_ignored_and_out_of_range_labels_do_not_contribute():
  memory, feats, labels = _inputs(1)
  noisy = labels.copy()
  noisy[:, 1, :3] = IGNORE
  noisy[:, 2, :2] = 77        # not a class: the reference would fail; skipped here
  got = np.asarray(mem_lib.update_distribution_memory(memory, feats, noisy, momentum=0.1))
  keep = (noisy != IGNORE) & (noisy != 77)
  want = _numpy_update(memory, feats[keep][None, :, None], noisy[keep][None, :, None], 0.1)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_all_ignored_labels_leave_the_memory_unchanged():
  memory, feats, labels = _inputs(2)
  got = mem_lib.update_distribution_memory(memory, feats, np.full_like(labels, IGNORE),
                                           momentum=0.1)
  np.testing.assert_array_equal(np.asarray(got), memory)


@pytest.mark.parametrize('low,high', [((5, 7), (37, 53)), ((8, 8), (64, 64)), ((4, 6), (4, 6)),
                                      ((3, 5), (23, 11))])
def test_fused_update_equals_upsample_then_update(low, high):
  memory, feats, _ = _inputs(3, h=low[0], w=low[1])
  labels = np.random.RandomState(4).randint(0, 5, size=(2, *high)).astype(np.int32)
  labels[:, :2] = IGNORE
  naive = mem_lib.update_distribution_memory(
      memory, ops.resize_bilinear(feats, high), labels, momentum=0.1)
  fused = jax.jit(functools.partial(mem_lib.update_distribution_memory_fused, momentum=0.1))(
      memory, feats, labels)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(naive), rtol=0, atol=1e-6)
  # ... and both equal the numpy rule on torch-free upsampled features.
  up = np.asarray(ops.resize_bilinear(feats, high), np.float64)
  np.testing.assert_allclose(np.asarray(fused), _numpy_update(memory, up, labels, 0.1),
                             rtol=0, atol=1e-6)


def test_update_rejects_bad_shapes_naming_them():
  memory, feats, labels = _inputs(5)
  with pytest.raises(ValueError, match='must share'):
    mem_lib.update_distribution_memory(memory, feats, labels[:, :3], momentum=0.1)
  with pytest.raises(ValueError, match=r'\(K, 2\)'):
    mem_lib.update_distribution_memory(memory[:, :1], feats, labels, momentum=0.1)


def test_per_shard_update_then_pmean_over_8_devices():
  """Each device updates from its own image; the synced memory is the mean of the 8 results,
  so a class seen on one shard only moves by 1/8 of its single-shard step."""
  assert jax.device_count() == 8
  k, c = 5, 16
  memory = _memory(k, 6)
  r = np.random.RandomState(7)
  feats = r.randn(8, 4, 4, c).astype(np.float32)
  labels = np.zeros((8, 16, 16), np.int32)
  labels[:4, 4:, 4:] = 1
  labels[4:, :6] = 2
  labels[5, 10:, 10:] = 3                       # class 3 on shard 5 only; class 4 nowhere
  mesh = Mesh(np.asarray(jax.devices()), ('data',))

  def step(m, f, y):
    new = mem_lib.update_distribution_memory_fused(m, f, y, momentum=0.1)
    return mem_lib.sync_memory(new, 'data')

  got = np.asarray(jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                         out_specs=P(), check_vma=False))(memory, feats, labels))
  up = np.asarray(ops.resize_bilinear(feats, (16, 16)), np.float64)
  per_shard = [_numpy_update(memory, up[d:d + 1], labels[d:d + 1], 0.1) for d in range(8)]
  np.testing.assert_allclose(got, np.mean(per_shard, axis=0), rtol=0, atol=1e-6)
  single = _numpy_update(memory, up[5:6], labels[5:6], 0.1)
  np.testing.assert_allclose(got[3], memory[3] + (single[3] - memory[3]) / 8, atol=1e-6)
  # Class 4 (no shard): the mean of 8 equal rows (pmean sums, then divides: last-bit rounding).
  np.testing.assert_allclose(got[4], memory[4], rtol=1e-6, atol=0)


def _module(k=5, c=16, **kw):
  return mem_lib.FeaturesMemoryV2(k, feats_channels=c, transform_channels=8, out_channels=12,
                                  **kw)


def test_module_variables_follow_the_reference_names():
  module = _module(downsample_before_sa=True)
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, 5, 4, 16)), jnp.zeros((1, 5, 4, 5)))
  assert set(v) == {'params', 'batch_stats', 'memory'}
  np.testing.assert_array_equal(np.asarray(v['memory']['memory']), [[0, 1]] * 5)
  assert set(v['params']) == {'self_attention', 'bottleneck', 'downsample_before_sa'}


def test_module_update_writes_the_memory_collection_and_init_keeps_it_initial():
  module = _module()
  memory, feats, labels = _inputs(8, k=5, h=4, w=4, size=(16, 16))
  preds = jnp.zeros((2, 4, 4, 5))

  def fwd_update(module, f, y):
    module(f, preds)
    return module.update(f, y, momentum=0.1)

  v = module.init(jax.random.PRNGKey(0), feats, labels, method=fwd_update)
  np.testing.assert_array_equal(np.asarray(v['memory']['memory']), [[0, 1]] * 5)
  v = {**v, 'memory': {'memory': jnp.asarray(memory)}}
  new, state = module.apply(v, feats, labels, method=fwd_update, mutable=['memory'])
  want = mem_lib.update_distribution_memory_fused(memory, feats, labels, momentum=0.1)
  np.testing.assert_array_equal(np.asarray(state['memory']['memory']), np.asarray(want))
  np.testing.assert_array_equal(np.asarray(new), np.asarray(want))


def test_gradient_reaches_the_gathering_logits_through_the_read():
  """The reference does not detach softmax(logits) before the gather; neither do we."""
  module = _module()
  r = np.random.RandomState(9)
  feats = jnp.asarray(r.randn(1, 3, 4, 16).astype(np.float32))
  preds = jnp.asarray(r.randn(1, 3, 4, 5).astype(np.float32))
  v = module.init(jax.random.PRNGKey(0), feats, preds)
  v = {**v, 'memory': {'memory': jnp.asarray(_memory(5, 10))}}
  weights = jnp.asarray(r.randn(1, 3, 4, 12).astype(np.float32))
  grad = jax.grad(lambda p: jnp.sum(module.apply(v, feats, p)[1] * weights))(preds)
  assert float(jnp.abs(grad).max()) > 1e-3
  # With the memory rows all equal the gathered vector no longer depends on the weights.
  flat = {**v, 'memory': {'memory': jnp.asarray(np.tile([[0.5, 0.0]], (5, 1)), jnp.float32)}}
  grad = jax.grad(lambda p: jnp.sum(module.apply(flat, feats, p)[1] * weights))(preds)
  assert float(jnp.abs(grad).max()) < 1e-6


def test_read_is_constant_data_without_gradient_to_the_memory():
  module = _module()
  feats = jnp.ones((1, 2, 2, 16))
  preds = jnp.ones((1, 2, 2, 5))
  v = module.init(jax.random.PRNGKey(0), feats, preds)
  grad = jax.grad(lambda m: jnp.sum(module.apply({**v, 'memory': {'memory': m}}, feats,
                                                 preds)[1]))(jnp.asarray(_memory(5, 11)))
  assert float(jnp.abs(grad).max()) == 0.0


def test_without_contraction_is_the_identity_on_every_value():
  x = jnp.asarray([0.0, -0.0, 1.5, -np.inf, np.inf, np.nan], jnp.float32)
  got = np.asarray(jax.jit(mem_lib._without_contraction)(x))  # pylint: disable=protected-access
  np.testing.assert_array_equal(got, np.asarray(x))
  assert np.signbit(got[1])
