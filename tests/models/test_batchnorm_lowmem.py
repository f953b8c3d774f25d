"""`layers.batch_norm_train`: the hand-written BatchNorm gradient that keeps only x_hat.

Checked against JAX's autodiff of the plain formula (float32), on one device and as SyncBN
across 8 devices inside shard_map, and for what the backward pass keeps under bfloat16.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from memseg_jax.models import layers

EPS = 1e-5


def _plain(x, scale, bias, axis_name):
  """The autodiff form: float32 statistics (SyncBN via pmean), normalise, affine."""
  axes = tuple(range(x.ndim - 1))
  mean = jnp.mean(x, axis=axes)
  if axis_name:
    mean = lax.pmean(mean, axis_name)
  var = jnp.mean(jnp.square(x - mean), axis=axes)
  if axis_name:
    var = lax.pmean(var, axis_name)
  return (x - mean) * (scale * lax.rsqrt(var + EPS)) + bias


def _case(n=8):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(n, 5, 6, 7)) * 3 + 1, jnp.float32)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, 7), jnp.float32)
  bias = jnp.asarray(rng.normal(size=7), jnp.float32)
  weight = jnp.asarray(rng.normal(size=(n, 5, 6, 7)), jnp.float32)   # a non-trivial loss
  return x, scale, bias, weight


def test_gradient_equals_autodiff_on_one_device():
  x, scale, bias, weight = _case()
  ours = lambda *a: jnp.sum(layers.batch_norm_train(*a, None, EPS, jnp.float32)[0] * weight)
  ref = lambda *a: jnp.sum(_plain(*a, None) * weight)
  np.testing.assert_allclose(float(ours(x, scale, bias)), float(ref(x, scale, bias)), rtol=1e-6)
  for g, r in zip(jax.grad(ours, argnums=(0, 1, 2))(x, scale, bias),
                  jax.grad(ref, argnums=(0, 1, 2))(x, scale, bias)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_sync_gradient_equals_autodiff_across_8_devices():
  x, scale, bias, weight = _case()
  mesh = Mesh(np.asarray(jax.devices()[:8]), ('d',))

  def grads(fn):
    def local(x, w, scale, bias):
      g = jax.grad(lambda x, s, b: jnp.sum(fn(x, s, b) * w), argnums=(0, 1, 2))(x, scale, bias)
      return g[0], lax.psum(g[1], 'd'), lax.psum(g[2], 'd')
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P('d'), P('d'), P(), P()),
                                 out_specs=(P('d'), P(), P()), check_vma=False))(
                                     x, weight, scale, bias)

  ours = grads(lambda x, s, b: layers.batch_norm_train(x, s, b, 'd', EPS, jnp.float32)[0])
  ref = grads(functools.partial(_plain, axis_name='d'))
  for g, r in zip(ours, ref):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5)
  # And the statistics are those of the whole batch.
  _, mean, var, count = layers.batch_norm_train(x, scale, bias, None, EPS, jnp.float32)
  np.testing.assert_allclose(np.asarray(mean), np.asarray(x).mean((0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(var), np.asarray(x).var((0, 1, 2)), rtol=1e-4)
  assert int(count) == 8 * 5 * 6


def test_bfloat16_backward_keeps_no_float32_activation():
  block = layers.ConvBNAct(16, 3, train=True, dtype=jnp.bfloat16, conv_impl='native')
  x = jnp.zeros((2, 12, 12, 8), jnp.bfloat16)
  variables = block.init(jax.random.PRNGKey(0), x)

  def loss(params, x):
    y, _ = block.apply({'params': params, 'batch_stats': variables['batch_stats']}, x,
                       mutable=['batch_stats'])
    return jnp.sum(y)

  _, vjp = jax.vjp(loss, variables['params'], x)
  residuals = [r for r in jax.tree_util.tree_leaves(vjp) if hasattr(r, 'shape')]
  big = [(r.dtype, r.shape) for r in residuals if np.prod(r.shape) >= 2 * 12 * 12 * 8]
  assert big and all(dtype != jnp.float32 for dtype, _ in big), big


def test_bfloat16_gradient_survives_a_mean_much_larger_than_the_spread():
  """The bfloat16 residual is x_hat, not x: a channel at 100 +- 0.25 (bfloat16 spacing 0.5 there)
  still gets the float32 gradient to bfloat16 precision. Rounding x would turn x - mean into
  noise of the size of the spread."""
  x, scale, bias, weight = _case()
  x = 100.0 + 0.25 * (x - 1.0) / 3.0
  loss = lambda fn: (lambda x: jnp.sum(fn(x).astype(jnp.float32) * weight))
  ours = jax.grad(loss(lambda x: layers.batch_norm_train(x, scale, bias, None, EPS,
                                                         jnp.bfloat16)[0]))(x)
  ref = jax.grad(loss(lambda x: _plain(x, scale, bias, None)))(x)
  err = np.abs(np.asarray(ours) - np.asarray(ref)).max() / np.abs(np.asarray(ref)).max()
  assert err < 2e-2, err


def test_softmax_to_gradient_equals_autodiff_and_keeps_only_its_output():
  from memseg_jax.models import attention  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(3, 5, 9)) * 2, jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 5, 9)), jnp.float32)
  ours = jax.grad(lambda x: jnp.sum(attention.softmax_to(x, jnp.float32) * w))(x)
  ref = jax.grad(lambda x: jnp.sum(jax.nn.softmax(x, axis=-1) * w))(x)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-7)
  _, vjp = jax.vjp(lambda x: attention.softmax_to(x, jnp.bfloat16), x)
  kept = [r.dtype for r in jax.tree_util.tree_leaves(vjp) if getattr(r, 'ndim', 0) == 3]
  assert kept == [jnp.bfloat16], kept
