"""The memory's update rule, read, loss and multi-device mean against independent numpy code.

`_numpy_update` re-derives the reference rule (spec section 3) with a plain loop over classes
in float64; the JAX update is vectorised over classes in float32, so agreement is checked to
1e-5 and exact bit equality where the rule says "untouched".
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from memseg_jax import ops
from memseg_jax.models import memory as mem_lib

IGNORE = 255


# ----------------------------------------------------------------------------- numpy reference
def _cos(x, m, eps=1e-8):
  """torch.nn.functional.cosine_similarity(x (N, C), m (C,)): each vector over max(norm, eps)."""
  xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
  mn = m / max(np.linalg.norm(m), eps)
  return xn @ mn


def _numpy_update(memory, feats, labels, momentum, ignore_index=IGNORE,
                  strategy='cosine_similarity'):
  """Loop-over-classes re-derivation of the reference update (float64)."""
  memory = memory.astype(np.float64).copy()
  k, n, c = memory.shape
  x = feats.reshape(-1, c).astype(np.float64)
  y = labels.reshape(-1)
  for cls in np.unique(y):
    if cls == ignore_index or cls < 0 or cls >= k:
      continue
    xc = x[y == cls]
    initialised = False
    for i in range(n):
      if np.all(memory[cls, i] == 0):
        memory[cls, i] = xc.mean(0)
        initialised = True
        break
    if initialised:
      continue
    if n == 1:
      if strategy == 'mean':
        a = xc.mean(0)
      else:
        d = 1 - _cos(xc, memory[cls, 0])
        a = ((d / d.sum())[:, None] * xc).sum(0)
      memory[cls, 0] = (1 - momentum) * memory[cls, 0] + momentum * a
    else:
      xu = xc / np.maximum(np.linalg.norm(xc, axis=1, keepdims=True), 1e-12)
      mu = memory[cls] / np.maximum(np.linalg.norm(memory[cls], axis=1, keepdims=True), 1e-12)
      assign = np.argmax(xu @ mu.T, axis=1)
      old = memory[cls].copy()
      for i in range(n):
        xi = xc[assign == i]
        if len(xi) == 0:
          a = np.zeros(c)     # the reference's empty weighted sum
        else:
          d = 1 - _cos(xi, old[i])
          a = ((d / d.sum())[:, None] * xi).sum(0)
        memory[cls, i] = old[i] * (1 - momentum) + a * momentum
  return memory


def _inputs(seed, k=5, n=1, c=8, b=2, h=6, w=7, zero_classes=(), ignore_frac=0.0):
  r = np.random.RandomState(seed)
  memory = r.randn(k, n, c).astype(np.float32)
  for cls in zero_classes:
    memory[cls] = 0
  feats = r.randn(b, h, w, c).astype(np.float32)
  labels = r.randint(0, k, size=(b, h, w)).astype(np.int32)
  if ignore_frac:
    labels[r.rand(b, h, w) < ignore_frac] = IGNORE
  return memory, feats, labels


def _update(memory, feats, labels, momentum, **kw):
  return np.asarray(mem_lib.update_memory(jnp.asarray(memory), jnp.asarray(feats),
                                          jnp.asarray(labels), momentum=momentum, **kw))


# --------------------------------------------------------------------------------- momentum
def test_momentum_at_scales_with_learning_rate():
  assert mem_lib.momentum_at(0.005, base_momentum=0.9, base_lr=0.01,
                             adjust_by_learning_rate=True) == pytest.approx(0.45)
  assert mem_lib.momentum_at(0.01, base_momentum=0.9, base_lr=0.009,
                             adjust_by_learning_rate=True) == pytest.approx(1.0)
  assert mem_lib.momentum_at(0.005, base_momentum=0.9, base_lr=0.01,
                             adjust_by_learning_rate=False) == 0.9


# ------------------------------------------------------------------------------- update rule
def test_lazy_init_sets_class_mean_and_skips_momentum_step():
  memory, feats, labels = _inputs(0, zero_classes=(1, 3))
  ours = _update(memory, feats, labels, 0.7)
  ref = _numpy_update(memory, feats, labels, 0.7)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
  x, y = feats.reshape(-1, 8), labels.reshape(-1)
  np.testing.assert_allclose(ours[1, 0], x[y == 1].mean(0), atol=1e-6)   # no momentum applied


@pytest.mark.parametrize('momentum', [0.5716, 1.0])
def test_cosine_strategy_matches_numpy(momentum):
  memory, feats, labels = _inputs(1)
  ours = _update(memory, feats, labels, momentum)
  ref = _numpy_update(memory, feats, labels, momentum)
  assert np.abs(ours - ref).max() <= 1e-5


def test_cosine_weights_favour_dissimilar_pixels():
  """Hand-worked: pixels (1,0) and (0,1), memory (1,0): s = (1, 0), w = (0, 1), a = (0, 1)."""
  memory = np.array([[[1.0, 0.0]]], np.float32)
  feats = np.array([[[[1.0, 0.0], [0.0, 1.0]]]], np.float32)
  labels = np.zeros((1, 1, 2), np.int32)
  ours = _update(memory, feats, labels, 0.5)
  np.testing.assert_allclose(ours[0, 0], [0.5, 0.5], atol=1e-7)


def test_mean_strategy_matches_numpy():
  memory, feats, labels = _inputs(2, zero_classes=(0,), ignore_frac=0.2)
  ours = _update(memory, feats, labels, 0.3, strategy='mean')
  ref = _numpy_update(memory, feats, labels, 0.3, strategy='mean')
  assert np.abs(ours - ref).max() <= 1e-5


def test_absent_classes_are_bit_identical():
  memory, feats, labels = _inputs(3, k=6)
  labels[labels == 2] = 0
  labels[labels == 4] = IGNORE
  ours = _update(memory, feats, labels, 0.9)
  assert np.array_equal(ours[2], memory[2]) and np.array_equal(ours[4], memory[4])
  assert not np.allclose(ours[0], memory[0])


def test_ignored_pixels_do_not_contribute():
  memory, feats, labels = _inputs(4, zero_classes=(2,), ignore_frac=0.3)
  poisoned = feats.copy()
  poisoned[labels == IGNORE] = 1e6          # would dominate any class they leaked into
  ours = _update(memory, poisoned, labels, 0.6)
  ref = _numpy_update(memory, feats, labels, 0.6)
  assert np.abs(ours - ref).max() <= 1e-5


def test_labels_all_ignored_leave_memory_unchanged():
  memory, feats, _ = _inputs(5, zero_classes=(0,))
  labels = np.full((2, 6, 7), IGNORE, np.int32)
  assert np.array_equal(_update(memory, feats, labels, 0.9), memory)


def test_out_of_range_labels_are_skipped():
  memory, feats, labels = _inputs(6)
  clean = labels.copy()
  labels[0, 0, :3] = [5, 17, -1]          # K = 5: all invalid, the reference would crash
  feats_bad = feats.copy()
  feats_bad[0, 0, :3] = 1e6
  ours = _update(memory, feats_bad, labels, 0.4)
  clean[0, 0, :3] = IGNORE
  ref = _numpy_update(memory, feats, clean, 0.4)
  assert np.abs(ours - ref).max() <= 1e-5


def test_all_pixels_aligned_with_memory_take_the_mean_instead_of_nan():
  # Every pixel parallel to the stored vector: the reference divides 0 by 0; see module doc.
  memory = np.array([[[1.0, 2.0]], [[3.0, -1.0]]], np.float32)
  feats = np.array([[[[2.0, 4.0], [0.5, 1.0], [1.0, 1.0]]]], np.float32)
  labels = np.array([[[0, 0, 1]]], np.int32)
  ours = _update(memory, feats, labels, 0.5)
  assert np.all(np.isfinite(ours))
  np.testing.assert_allclose(ours[0, 0], 0.5 * memory[0, 0] + 0.5 * np.array([1.25, 2.5]),
                             atol=1e-6)
  np.testing.assert_allclose(ours[1], _numpy_update(memory, feats, labels, 0.5)[1], atol=1e-6)


def test_two_slots_per_class_match_numpy():
  memory, feats, labels = _inputs(7, n=2, k=4, zero_classes=())
  memory[3, 1] = 0                          # class 3: lazy init of its second slot only
  ours = _update(memory, feats, labels, 0.8)
  ref = _numpy_update(memory, feats, labels, 0.8)
  assert np.abs(ours - ref).max() <= 1e-5
  np.testing.assert_array_equal(ours[3, 0], memory[3, 0])
  np.testing.assert_allclose(ours[3, 1], feats.reshape(-1, 8)[labels.reshape(-1) == 3].mean(0),
                             atol=1e-6)


def test_two_slots_empty_slot_decays_by_one_minus_momentum():
  r = np.random.RandomState(8)
  c = 6
  memory = np.zeros((2, 2, c), np.float32)
  memory[:, 0] = np.abs(r.randn(2, c)) + 0.1       # positive directions
  memory[:, 1] = -(np.abs(r.randn(2, c)) + 0.1)    # opposite: no positive pixel picks it
  feats = np.abs(r.randn(1, 4, 5, c)).astype(np.float32)
  labels = r.randint(0, 2, size=(1, 4, 5)).astype(np.int32)
  m = 0.3
  ours = _update(memory, feats, labels, m)
  np.testing.assert_allclose(ours[:, 1], (1 - m) * memory[:, 1], rtol=1e-6, atol=0)
  assert np.abs(ours - _numpy_update(memory, feats, labels, m)).max() <= 1e-5


def test_mean_strategy_with_two_slots_is_rejected():
  memory, feats, labels = _inputs(9, n=2)
  with pytest.raises(ValueError, match='mean'):
    mem_lib.update_memory(memory, feats, labels, momentum=0.5, strategy='mean')


def test_mismatched_feature_size_names_shapes():
  memory, feats, labels = _inputs(9)
  with pytest.raises(ValueError, match='label size'):
    mem_lib.update_memory(memory, feats[:, :3], labels, momentum=0.5)


def test_update_jits_with_traced_momentum():
  memory, feats, labels = _inputs(10, zero_classes=(4,), ignore_frac=0.1)
  fn = jax.jit(functools.partial(mem_lib.update_memory, ignore_index=IGNORE))
  for m in (0.25, 0.75):                    # one compilation, momentum traced
    jitted = np.asarray(fn(memory, feats, labels, momentum=jnp.float32(m)))
    np.testing.assert_allclose(jitted, _update(memory, feats, labels, m), atol=1e-6, rtol=0)
    assert np.abs(jitted - _numpy_update(memory, feats, labels, m)).max() <= 1e-5
  assert fn._cache_size() == 1


# -------------------------------------------------------------------------------------- read
@pytest.mark.parametrize('use_hard', [False, True])
def test_aggregate_matches_numpy(use_hard):
  r = np.random.RandomState(11)
  memory = r.randn(5, 2, 4).astype(np.float32)
  preds = (r.randn(2, 3, 4, 5) * 3).astype(np.float32)
  p = np.exp(preds - preds.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  if use_hard:
    p = np.eye(5)[p.argmax(-1)]
  ref = np.stack([p @ memory[:, i, :] for i in range(2)])
  ours = np.asarray(mem_lib.aggregate(memory, preds, use_hard=use_hard))
  assert ours.shape == (2, 2, 3, 4, 4)
  np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=1e-5)


def test_aggregate_with_grad_memory_reads_memory_but_differentiates_with_grad_memory():
  # The reference's read: forward with this step's memory, backward (w.r.t. the softmax
  # weights) with the memory its in-place update left behind. Checked against numpy:
  # d/dpreds of sum(G * g) = softmax Jacobian^T (g @ M'^T), M' the grad memory.
  r = np.random.RandomState(12)
  memory, new = r.randn(2, 5, 1, 4).astype(np.float32)
  preds = (r.randn(2, 3, 4, 5) * 2).astype(np.float32)
  g = r.randn(1, 2, 3, 4, 4).astype(np.float32)
  out, vjp = jax.vjp(lambda x: mem_lib.aggregate(memory, x, grad_memory=new), preds)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(mem_lib.aggregate(memory, preds)))
  d_preds, = vjp(g)
  p = np.exp(preds - preds.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  d_p = g[0] @ new[:, 0, :].T                                        # (B, H, W, K)
  expected = p * (d_p - (d_p * p).sum(-1, keepdims=True))
  np.testing.assert_allclose(np.asarray(d_preds), expected, atol=1e-5, rtol=1e-4)
  # ... which differs from the plain read's gradient (the memories differ).
  _, plain_vjp = jax.vjp(lambda x: mem_lib.aggregate(memory, x), preds)
  assert np.abs(np.asarray(plain_vjp(g)[0]) - expected).max() > 1e-2


# -------------------------------------------------------------------------------------- loss
@pytest.mark.parametrize('n', [1, 3])
def test_memory_loss_is_cross_entropy_against_row_class(n):
  k = 4
  logits = np.random.RandomState(12).randn(k * n, k).astype(np.float32) * 2
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  target = np.repeat(np.arange(k), n)
  ref = -logp[np.arange(k * n), target].mean()
  np.testing.assert_allclose(float(mem_lib.memory_loss(logits, n)), ref, rtol=1e-6)


# ----------------------------------------------------------------- multi-device mean (8 shards)
def test_per_shard_update_then_mean_matches_numpy_over_8_devices():
  devices = jax.devices()
  assert len(devices) >= 8, 'tests/conftest.py provides 8 virtual CPU devices'
  mesh = Mesh(np.array(devices[:8]), ('data',))
  k, c = 5, 6
  r = np.random.RandomState(13)
  memory = r.randn(k, 1, c).astype(np.float32)
  memory[4] = 0                                   # lazy init where class 4 appears
  feats = r.randn(8, 4, 4, c).astype(np.float32)
  labels = r.randint(0, 3, size=(8, 4, 4)).astype(np.int32)   # classes 0-2 on every shard
  labels[[1, 5], 0, :2] = 3                       # class 3 on two shards only
  labels[[2, 3, 6], 1, 1:3] = 4                   # class 4 (zero row) on three shards only
  labels[0, 2] = IGNORE
  m = 0.6

  def step(memory, feats, labels):
    new = mem_lib.update_memory(memory, feats, labels, momentum=m)
    return mem_lib.sync_memory(new, 'data')

  sharded = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                  out_specs=P(), check_vma=False))
  ours = np.asarray(sharded(memory, feats, labels))
  per_shard = [_numpy_update(memory, feats[s:s + 1], labels[s:s + 1], m) for s in range(8)]
  ref = np.mean(per_shard, axis=0)
  assert np.abs(ours - ref).max() <= 1e-5
  # The spec's consequences: class 3 moves by m * (2/8) of its shards' steps, and class 4 is the
  # mean of its three shards' class means divided by 8 (the other shards contribute zeros).
  steps3 = [per_shard[s][3] - memory[3] for s in (1, 5)]
  np.testing.assert_allclose(ours[3], memory[3] + np.sum(steps3, axis=0) / 8, atol=1e-5)
  means4 = [feats[s][labels[s] == 4].mean(0) for s in (2, 3, 6)]
  np.testing.assert_allclose(ours[4, 0], np.sum(means4, axis=0) / 8, atol=1e-5)
  # The whole batch on one device is a different update (why the per-shard form matters).
  assert np.abs(_numpy_update(memory, feats, labels, m) - ref).max() > 1e-3


# ------------------------------------------------------------------------------------ module
class _Parent(nn.Module):
  """A minimal segmentor-like parent: forward, then update the memory from the same apply."""
  k: int = 4
  c: int = 8

  @nn.compact
  def __call__(self, feats, preds, feats_ms, labels, momentum):
    memory_module = mem_lib.FeaturesMemory(self.k, feats_channels=self.c, transform_channels=4,
                                           out_channels=self.c, name='memory_module')
    stored, out = memory_module(feats, preds, feats_ms)
    new = memory_module.update(feats, labels, momentum=momentum)
    return stored, out, new


def test_module_update_from_parent_apply_writes_memory_collection():
  r = np.random.RandomState(14)
  feats = r.randn(1, 3, 3, 8).astype(np.float32)
  preds = r.randn(1, 3, 3, 4).astype(np.float32)
  labels = np.array([[[0, 0, 1], [1, 2, 2], [IGNORE, 0, 1]]], np.int32)
  model = _Parent()
  variables = model.init(jax.random.PRNGKey(0), feats, preds, feats, labels, 0.5)
  assert variables['memory']['memory_module']['memory'].shape == (4, 1, 8)
  assert not np.any(np.asarray(variables['memory']['memory_module']['memory']))  # init: zeros
  start = r.randn(4, 1, 8).astype(np.float32)
  variables = {**variables, 'memory': {'memory_module': {'memory': jnp.asarray(start)}}}
  (stored, out, new), mutated = model.apply(variables, feats, preds, feats, labels, 0.5,
                                            mutable=['memory'])
  assert out.shape == (1, 3, 3, 8)
  np.testing.assert_array_equal(np.asarray(stored), start)     # the read saw the old memory
  expected = _numpy_update(start, feats, labels, 0.5)
  assert np.abs(np.asarray(mutated['memory']['memory_module']['memory']) - expected).max() <= 1e-5
  np.testing.assert_array_equal(np.asarray(new), mutated['memory']['memory_module']['memory'])
  with pytest.raises(Exception, match='memory'):               # memory must be mutable
    model.apply(variables, feats, preds, feats, labels, 0.5)


def test_module_rejects_wrong_channel_count():
  module = mem_lib.FeaturesMemory(4, feats_channels=8, transform_channels=4, out_channels=8)
  feats = jnp.zeros((1, 2, 2, 6))
  with pytest.raises(ValueError, match='feats_channels'):
    module.init(jax.random.PRNGKey(0), feats, jnp.zeros((1, 2, 2, 4)), feats)


@pytest.mark.parametrize('n', [1, 2])
def test_module_variable_names_follow_reference(n):
  module = mem_lib.FeaturesMemory(3, feats_channels=8, transform_channels=4, out_channels=8,
                                  num_feats_per_cls=n)
  feats = jnp.ones((1, 2, 2, 8))
  variables = module.init(jax.random.PRNGKey(0), feats, jnp.zeros((1, 2, 2, 3)), feats)
  names = set(variables['params'])
  expected = {'bottleneck', 'self_attention_ms', 'bottleneck_ms'}
  expected |= ({'self_attention'} if n == 1 else
               {'self_attentions_0', 'self_attentions_1', 'fuse_memory_conv'})
  assert names == expected
  assert variables['memory']['memory'].shape == (3, n, 8)


# ------------------------------------------------------------------------------ fused update
@pytest.mark.parametrize('low,high', [((4, 5), (32, 40)), ((5, 7), (37, 50)), ((3, 3), (3, 3)),
                                      ((6, 4), (13, 9))])
@pytest.mark.parametrize('strategy', ['cosine_similarity', 'mean'])
def test_fused_update_equals_upsample_then_update(low, high, strategy):
  r = np.random.RandomState(15)
  k, c = 5, 8
  memory = r.randn(k, 1, c).astype(np.float32)
  memory[2] = 0
  feats = np.maximum(r.randn(2, *low, c), 0).astype(np.float32) + 0.01   # post-ReLU-like
  labels = r.randint(0, k, size=(2, *high)).astype(np.int32)
  labels[labels == 3] = IGNORE
  naive = mem_lib.update_memory(memory, ops.resize_bilinear(feats, high), labels, momentum=0.7,
                                strategy=strategy)
  fused = jax.jit(functools.partial(mem_lib.update_memory_fused, strategy=strategy))(
      memory, feats, labels, momentum=0.7)
  assert np.abs(np.asarray(fused) - np.asarray(naive)).max() <= 1e-5
  np.testing.assert_array_equal(np.asarray(fused)[3], memory[3])


def test_fused_update_with_two_slots_falls_back_to_naive():
  memory, feats, labels = _inputs(16, n=2)
  labels = np.repeat(np.repeat(labels, 2, axis=1), 2, axis=2)
  naive = mem_lib.update_memory(memory, ops.resize_bilinear(feats, labels.shape[1:]), labels,
                                momentum=0.5)
  fused = mem_lib.update_memory_fused(memory, feats, labels, momentum=0.5)
  np.testing.assert_allclose(np.asarray(fused), np.asarray(naive), atol=1e-6, rtol=0)


def test_fused_update_with_signed_features():
  r = np.random.RandomState(17)
  memory = r.randn(4, 1, 8).astype(np.float32)
  feats = r.randn(1, 7, 9, 8).astype(np.float32)
  labels = r.randint(0, 4, size=(1, 50, 69)).astype(np.int32)
  naive = mem_lib.update_memory(memory, ops.resize_bilinear(feats, (50, 69)), labels, momentum=0.9)
  fused = mem_lib.update_memory_fused(memory, feats, labels, momentum=0.9)
  assert np.abs(np.asarray(fused) - np.asarray(naive)).max() <= 1e-5


def test_module_fused_update_method_writes_the_fused_result():
  r = np.random.RandomState(18)
  module = mem_lib.FeaturesMemory(4, feats_channels=8, transform_channels=4, out_channels=8)
  feats = r.randn(1, 3, 4, 8).astype(np.float32)
  labels = r.randint(0, 4, size=(1, 24, 32)).astype(np.int32)
  variables = module.init(jax.random.PRNGKey(0), feats, np.zeros((1, 3, 4, 4), np.float32), feats)
  start = r.randn(4, 1, 8).astype(np.float32)
  variables = {**variables, 'memory': {'memory': jnp.asarray(start)}}
  new, mutated = module.apply(variables, feats, labels, momentum=0.4, fused=True,
                              method=mem_lib.FeaturesMemory.update, mutable=['memory'])
  expected = _numpy_update(start, np.asarray(ops.resize_bilinear(feats, (24, 32))), labels, 0.4)
  assert np.abs(np.asarray(mutated['memory']['memory']) - expected).max() <= 1e-5
  np.testing.assert_array_equal(np.asarray(new), mutated['memory']['memory'])
