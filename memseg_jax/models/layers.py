"""Building blocks with PyTorch semantics: BatchNorm (sync or not), conv + BN + act, Dropout2d.

What lives here is what every model file shares; the model files themselves hold no layer
definitions of their own. NHWC throughout.

- `BatchNorm` follows `torch.nn.BatchNorm2d` / `SyncBatchNorm`: normalise with the biased batch
  variance, update the running variance with the *unbiased* one, running = (1 - momentum) *
  running + momentum * batch with PyTorch's momentum (0.1), eps 1e-5. With `axis_name` set and
  the module running inside a mapped axis (shard_map / pmap), the batch statistics span every
  device on that axis (SyncBatchNorm); without it, plain BatchNorm. Statistics are float32
  whatever the compute dtype.
- Convolutions use explicit symmetric padding (PyTorch `padding=d*(k-1)//2`), never 'SAME',
  and PyTorch's default initialisation (kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), ...)),
  so a model trained from scratch starts from the reference's distribution.
"""

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_conv_bias_init(fan_in: int):
  bound = 1.0 / (fan_in ** 0.5)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def get_activation(name: str) -> Callable:
  if name == 'relu':
    return nn.relu
  if name == 'leaky_relu':
    return lambda x: nn.leaky_relu(x, negative_slope=0.01)
  if name in ('identity', 'none', None):
    return lambda x: x
  raise ValueError(f"model.act: unknown activation {name!r} (expected 'relu' or 'leaky_relu')")


class BatchNorm(nn.Module):
  """BatchNorm2d / SyncBatchNorm over the last axis of an NHWC tensor, PyTorch semantics."""
  use_running_average: bool = True
  axis_name: Optional[str] = None
  momentum: float = 0.1      # PyTorch convention
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros((c,), jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones((c,), jnp.float32))

    if self.use_running_average:
      mean, var = ra_mean.value, ra_var.value
    else:
      xf = x.astype(jnp.float32)
      reduce_axes = tuple(range(x.ndim - 1))
      count = 1
      for a in reduce_axes:
        count *= x.shape[a]
      sync = self.axis_name is not None and not self.is_initializing()
      mean = jnp.mean(xf, axis=reduce_axes)
      if sync:
        # Equal per-device batches: the global mean is the mean of the local means.
        mean = lax.pmean(mean, self.axis_name)
        count = count * lax.psum(1, self.axis_name)
      # Two-pass variance around the global mean (no E[x^2] - E[x]^2 cancellation).
      var = jnp.mean(jnp.square(xf - mean), axis=reduce_axes)
      if sync:
        var = lax.pmean(var, self.axis_name)
      if not self.is_initializing():
        unbiased = var * (count / jnp.maximum(count - 1, 1))
        ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
        ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased

    inv = scale * lax.rsqrt(var + self.epsilon)
    y = (x.astype(jnp.float32) - mean) * inv + bias
    return y.astype(self.dtype)


def conv(features: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1,
         padding: Optional[int] = None, use_bias: bool = False, in_features: Optional[int] = None,
         dtype: Any = jnp.float32, name: Optional[str] = None) -> nn.Conv:
  """nn.Conv2d with PyTorch padding and initialisation. `padding=None` -> dilation*(k-1)//2.

  `in_features` is needed only with `use_bias` (the bias init bound depends on fan-in).
  """
  k = kernel_size
  p = dilation * (k - 1) // 2 if padding is None else padding
  if use_bias:
    if in_features is None:
      raise ValueError('conv(use_bias=True) needs in_features for the PyTorch bias init')
    bias_init = torch_conv_bias_init(in_features * k * k)
  else:
    bias_init = nn.initializers.zeros
  return nn.Conv(features, (k, k), strides=(stride, stride), padding=((p, p), (p, p)),
                 kernel_dilation=(dilation, dilation), use_bias=use_bias, dtype=dtype,
                 param_dtype=jnp.float32, kernel_init=torch_conv_kernel_init,
                 bias_init=bias_init, name=name)


class ConvBNAct(nn.Module):
  """conv (no bias) -> BatchNorm -> activation: the reference's 'CBR' (nn.Sequential(0, 1, 2)).

  Submodules are named `conv` and `bn`, matching indices 0 and 1 of the reference Sequential.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  padding: Optional[int] = None
  act: str = 'relu'
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = conv(self.features, self.kernel_size, self.stride, self.dilation, self.padding,
             dtype=self.dtype, name='conv')(x)
    x = BatchNorm(use_running_average=not self.train, axis_name=self.axis_name,
                  momentum=self.bn_momentum, epsilon=self.bn_eps, dtype=self.dtype, name='bn')(x)
    return get_activation(self.act)(x)


class Dropout2d(nn.Module):
  """torch.nn.Dropout2d in NHWC: whole channels are dropped per sample (broadcast over H, W)."""
  rate: float
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):
    if self.rate == 0.0 or self.deterministic:
      return x
    return nn.Dropout(self.rate, broadcast_dims=(x.ndim - 3, x.ndim - 2),
                      deterministic=False)(x)
