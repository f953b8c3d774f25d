"""BatchNorm / SyncBatchNorm, conv padding and Dropout2d against PyTorch semantics."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from memseg_jax.models import layers

torch = pytest.importorskip('torch')


def _torch_bn_train(x_nhwc, gamma, beta, rm, rv, momentum=0.1, eps=1e-5):
  bn = torch.nn.BatchNorm2d(x_nhwc.shape[-1], eps=eps, momentum=momentum)
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(gamma))
    bn.bias.copy_(torch.from_numpy(beta))
    bn.running_mean.copy_(torch.from_numpy(rm))
    bn.running_var.copy_(torch.from_numpy(rv))
  bn.train()
  y = bn(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
  return (y.detach().numpy().transpose(0, 2, 3, 1), bn.running_mean.numpy(),
          bn.running_var.numpy())


def _bn_vars(c, seed):
  r = np.random.RandomState(seed)
  gamma = r.uniform(0.5, 1.5, c).astype(np.float32)
  beta = r.randn(c).astype(np.float32)
  rm = r.randn(c).astype(np.float32)
  rv = r.uniform(0.5, 2.0, c).astype(np.float32)
  return gamma, beta, rm, rv


def test_batchnorm_train_matches_torch_including_unbiased_running_var():
  c = 6
  x = (np.random.RandomState(0).randn(3, 5, 7, c) * 3 + 1).astype(np.float32)
  gamma, beta, rm, rv = _bn_vars(c, 1)
  bn = layers.BatchNorm(use_running_average=False)
  variables = {'params': {'scale': gamma, 'bias': beta},
               'batch_stats': {'mean': rm, 'var': rv}}
  y, new = bn.apply(variables, x, mutable=['batch_stats'])
  ty, trm, trv = _torch_bn_train(x, gamma, beta, rm, rv)
  np.testing.assert_allclose(np.asarray(y), ty, atol=2e-5)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['mean']), trm, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new['batch_stats']['var']), trv, rtol=1e-5)


def test_batchnorm_eval_uses_running_statistics_like_torch():
  c = 4
  x = np.random.RandomState(2).randn(2, 3, 3, c).astype(np.float32)
  gamma, beta, rm, rv = _bn_vars(c, 3)
  y = layers.BatchNorm(use_running_average=True).apply(
      {'params': {'scale': gamma, 'bias': beta}, 'batch_stats': {'mean': rm, 'var': rv}}, x)
  expected = (x - rm) / np.sqrt(rv + 1e-5) * gamma + beta
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)


def test_sync_batchnorm_over_8_devices_equals_one_device_on_the_global_batch():
  assert jax.device_count() >= 8, 'tests/conftest.py provides 8 virtual CPU devices'
  c = 5
  x = np.random.RandomState(4).randn(16, 4, 3, c).astype(np.float32) * 2 + 0.5
  gamma, beta, rm, rv = _bn_vars(c, 5)
  variables = {'params': {'scale': gamma, 'bias': beta}, 'batch_stats': {'mean': rm, 'var': rv}}
  mesh = Mesh(np.array(jax.devices()[:8]), ('data',))
  sync_bn = layers.BatchNorm(use_running_average=False, axis_name='data')

  @jax.jit
  @functools.partial(jax.shard_map, mesh=mesh, in_specs=(P(), P('data')),
                     out_specs=(P('data'), P()))
  def sharded(v, xs):
    y, new = sync_bn.apply(v, xs, mutable=['batch_stats'])
    return y, new

  y_sync, new_sync = sharded(variables, x)
  ty, trm, trv = _torch_bn_train(x, gamma, beta, rm, rv)
  np.testing.assert_allclose(np.asarray(y_sync), ty, atol=2e-5)
  np.testing.assert_allclose(np.asarray(new_sync['batch_stats']['mean']), trm, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new_sync['batch_stats']['var']), trv, rtol=1e-5)


@pytest.mark.parametrize('k,stride,dilation', [(3, 1, 1), (3, 2, 1), (3, 1, 4), (1, 2, 1), (3, 2, 2)])
def test_conv_uses_torch_symmetric_padding(k, stride, dilation):
  r = np.random.RandomState(k * 10 + stride + dilation)
  x = r.randn(1, 11, 9, 3).astype(np.float32)
  conv = layers.conv(4, k, stride, dilation)
  params = conv.init(jax.random.PRNGKey(0), x)
  w = np.asarray(params['params']['kernel'])  # (k, k, in, out)
  y = np.asarray(conv.apply(params, x))
  ty = torch.nn.functional.conv2d(
      torch.from_numpy(x.transpose(0, 3, 1, 2).copy()),
      torch.from_numpy(w.transpose(3, 2, 0, 1).copy()), stride=stride,
      padding=dilation * (k - 1) // 2, dilation=dilation).numpy().transpose(0, 2, 3, 1)
  assert y.shape == ty.shape
  np.testing.assert_allclose(y, ty, atol=1e-5)


def test_conv_init_follows_torch_default_bound():
  conv = layers.conv(64, 3, use_bias=True, in_features=32)
  params = conv.init(jax.random.PRNGKey(1), jnp.zeros((1, 8, 8, 32)))['params']
  bound = 1.0 / np.sqrt(32 * 9)
  for name in ('kernel', 'bias'):
    v = np.asarray(params[name])
    assert np.abs(v).max() <= bound
    assert np.abs(v).max() > 0.9 * bound  # uniform over the whole interval, not a narrower one


def test_dropout2d_drops_whole_channels_per_sample():
  x = jnp.ones((4, 6, 5, 32))
  y = layers.Dropout2d(0.5, deterministic=False).apply({}, x, rngs={'dropout': jax.random.PRNGKey(0)})
  y = np.asarray(y)
  per_channel = y.reshape(4, 30, 32)
  # each (sample, channel) is either all zero or all 1/(1-p)
  assert np.all((per_channel == 0).all(1) | (per_channel == 2.0).all(1))
  assert 0 < (per_channel[:, 0, :] == 0).mean() < 1
  np.testing.assert_array_equal(
      np.asarray(layers.Dropout2d(0.5, deterministic=True).apply({}, x)), np.asarray(x))


@pytest.mark.parametrize('cin,k,stride,dilation,padding,hw', [
    (3, 3, 2, 1, 1, (17, 12)),     # the stem: native forward, native weight gradient
    (16, 3, 1, 2, 2, (9, 11)),
    (128, 3, 1, 1, 1, (9, 11)),    # native forward, per-tap weight gradient
    (128, 3, 2, 2, 2, (10, 7)),
    (16, 3, 1, 12, 12, (16, 16)),  # ASPP on a small map: off-centre taps read only padding
    (16, 3, 1, 24, 24, (16, 10)),
    (16, 1, 2, 1, 0, (9, 9)),      # strided 1x1 shortcut
    (8, 7, 2, 1, 3, (13, 8)),
])
def test_cpu_convolution_forms_equal_the_native_convolution(cin, k, stride, dilation, padding, hw):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, *hw, cin)).astype(np.float32))
  kernel = jnp.asarray(rng.normal(size=(k, k, cin, 5)).astype(np.float32))
  kw = dict(stride=stride, dilation=dilation, padding=padding)
  taps = layers.conv2d(x, kernel, impl='taps', **kw)
  native = layers.conv2d(x, kernel, impl='native', **kw)
  assert taps.shape == native.shape
  np.testing.assert_allclose(taps, native, rtol=1e-5, atol=1e-5)
  # Weight and input gradients too (they are what the training step uses).
  loss = lambda impl: lambda xx, kk: jnp.sum(layers.conv2d(xx, kk, impl=impl, **kw) ** 2)
  g_taps = jax.grad(loss('taps'), argnums=(0, 1))(x, kernel)
  g_native = jax.grad(loss('native'), argnums=(0, 1))(x, kernel)
  for a, b in zip(g_taps, g_native):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
