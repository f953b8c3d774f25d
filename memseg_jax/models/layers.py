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


def _tap_extent(out_size: int, in_size: int, kernel_size: int, stride: int, dilation: int,
                padding: int):
  """Per kernel tap t along one axis: (first output, number of outputs, first input) or None.

  Output o reads input o * stride + t * dilation - padding; only the outputs whose input lies
  inside [0, in_size) are listed (the others read the zero padding). None: the tap never does.
  """
  extents = []
  for t in range(kernel_size):
    off = t * dilation - padding
    first = max(0, -(off // stride))                  # ceil(-off / stride) for off < 0
    last = min(out_size - 1, (in_size - 1 - off) // stride)
    n = last - first + 1
    extents.append((first, n, first * stride + off) if n > 0 else None)
  return extents


def conv2d(x, kernel, *, stride: int = 1, dilation: int = 1, padding: int = 0,
           out_dtype=None, native: Optional[bool] = None):
  """torch Conv2d (symmetric zero padding, no bias) of NHWC `x` with an HWIO `kernel`.

  Computed as a sum over kernel taps of (pixels, Cin) x (Cin, Cout) matmuls, each restricted to
  the outputs whose input tap lies inside the image. Two reasons (measured on the CPU, where
  XLA's native convolution is the alternative):
    - the ASPP's large dilations (12, 24, 36 on 64x64 maps at 512x512, on 16x16 maps for
      128x128 crops) put most off-centre taps in the zero padding; those products are skipped
      (a tap entirely in the padding costs nothing, so on small maps ASPP branches shrink to
      1x1 convolutions), exactly like the padded convolution;
    - the weight gradients become plain matmuls over B*H*W, where XLA's convolution form runs
      them as convolutions with the batch as feature dimension (slow for small batches).
  The result equals the padded convolution up to float32 summation order (relative differences
  of order 1e-6). With very few input channels (the 3-channel stem) the taps are concatenated
  into one matmul instead (im2col), so the contraction is not 3 wide.

  Products accumulate in float32 whatever the input dtype (bfloat16 compute); the result has
  `out_dtype` (default: the input's dtype).
  """
  b, h, w, cin = x.shape
  k = kernel.shape[0]
  if kernel.shape[:3] != (k, k, cin):
    raise ValueError(f'conv2d: kernel {kernel.shape} does not match input channels {cin}')
  oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  if oh <= 0 or ow <= 0:
    raise ValueError(f'conv2d: input {h}x{w} too small for kernel {k}, dilation {dilation}, '
                     f'padding {padding}')
  if native is None:
    # The tap decomposition was measured faster on the CPU only; GPUs and TPUs keep XLA's
    # native convolution (same numbers up to float32 summation order).
    native = jax.default_backend() != 'cpu'
  if native:
    y = lax.conv_general_dilated(
        x, kernel, (stride, stride), [(padding, padding), (padding, padding)],
        rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
        preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)
  rows = _tap_extent(oh, h, k, stride, dilation, padding)
  cols = _tap_extent(ow, w, k, stride, dilation, padding)
  taps = [(i, j) for i in range(k) for j in range(k) if rows[i] and cols[j]]

  def window(i, j):                                   # (B, rows, cols, Cin) read by tap (i, j)
    (_, rn, ri), (_, cn, ci) = rows[i], cols[j]
    return lax.slice(x, (0, ri, ci, 0),
                     (b, ri + (rn - 1) * stride + 1, ci + (cn - 1) * stride + 1, cin),
                     (1, stride, stride, 1))

  def place(y, i, j):                                 # zero-pad a tap's outputs to (oh, ow)
    (r0, rn, _), (c0, cn, _) = rows[i], cols[j]
    if (r0, rn, c0, cn) == (0, oh, 0, ow):
      return y
    return jnp.pad(y, ((0, 0), (r0, oh - r0 - rn), (c0, ow - c0 - cn), (0, 0)))

  if cin * len(taps) <= _IM2COL_MAX_DEPTH and len(taps) > 1:
    # im2col over the zero-padded input: one matmul with a contraction of k*k*Cin.
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    span_h, span_w = (oh - 1) * stride + 1, (ow - 1) * stride + 1
    cols_ = [lax.slice(xp, (0, i * dilation, j * dilation, 0),
                       (b, i * dilation + span_h, j * dilation + span_w, cin),
                       (1, stride, stride, 1)) for i in range(k) for j in range(k)]
    patches = jnp.concatenate(cols_, axis=-1)          # (B, oh, ow, k*k*Cin), tap-major
    y = jnp.einsum('bhwc,co->bhwo', patches, kernel.reshape(k * k * cin, -1),
                   preferred_element_type=jnp.float32)
    return y.astype(out_dtype or x.dtype)

  out = None
  for i, j in taps:
    y = jnp.einsum('bhwc,co->bhwo', window(i, j), kernel[i, j],
                   preferred_element_type=jnp.float32)
    y = place(y, i, j)
    out = y if out is None else out + y
  return out.astype(out_dtype or x.dtype)


# Contraction depth below which the taps are gathered into one matmul (the 3-channel stem).
_IM2COL_MAX_DEPTH = 64


class Conv(nn.Module):
  """nn.Conv2d in NHWC computed by `conv2d`: params `kernel` (k, k, Cin, Cout) and `bias` (Cout,).

  Same parameter names, shapes and initialisers as `flax.linen.Conv`, so checkpoints and the
  converter do not depend on which of the two computes the layer. Parameters are float32; the
  computation runs in `dtype`.
  """
  features: int
  kernel_size: int = 1
  stride: int = 1
  dilation: int = 1
  padding: int = 0
  use_bias: bool = False
  bias_init: Callable = nn.initializers.zeros
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', torch_conv_kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
               dilation=self.dilation, padding=self.padding, out_dtype=jnp.float32)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32)
      return y.astype(self.dtype)
    # Every bias-free convolution of the models feeds a BatchNorm, which works in float32: the
    # float32 accumulations go to it unrounded. (Under bfloat16, rounding the pre-normalisation
    # values would cost precision relative to their batch mean, which the BN subtracts; the
    # error would then be amplified by mean / std.) With float32 compute nothing changes.
    return y


def conv(features: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1,
         padding: Optional[int] = None, use_bias: bool = False, in_features: Optional[int] = None,
         dtype: Any = jnp.float32, name: Optional[str] = None) -> Conv:
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
  return Conv(features, k, stride=stride, dilation=dilation, padding=p, use_bias=use_bias,
              bias_init=bias_init, dtype=dtype, name=name)


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
