"""Building blocks with PyTorch semantics: BatchNorm (sync or not), conv + BN + act, Dropout2d.

What lives here is what every model file shares; the model files themselves hold no layer
definitions of their own. NHWC throughout.

- `BatchNorm` follows `torch.nn.BatchNorm2d` / `SyncBatchNorm`: normalise with the biased batch
  variance, update the running variance with the *unbiased* one, running = (1 - momentum) *
  running + momentum * batch with PyTorch's momentum (0.1), eps 1e-5. With `axis_name` set and
  the module running inside a mapped axis (shard_map / pmap), the batch statistics span every
  device on that axis (SyncBatchNorm); without it, plain BatchNorm. Statistics are float32
  whatever the compute dtype.
- Valid-region masking (`mask_invalid`, `downsample_valid`): at evaluation an image may sit in
  the top-left corner of a larger zero-padded array (fixed bucket shapes compile once). With
  `valid` = the true (h, w) of each image, every operation that mixes positions (convolutions
  with k > 1, max-pooling, global and adaptive pooling, attention keys) first zeroes its input
  outside the valid region, so the valid outputs equal those of the unpadded image: a
  convolution then reads exact zeros where the unpadded run reads its zero padding. A stride-s
  layer (any of ours: k=3/p=1 or k=1/p=0 convs, max-pool 3/2/1) maps a valid size v to
  ceil(v / s), exactly the unpadded output size.
- Convolutions use explicit symmetric padding (PyTorch `padding=d*(k-1)//2`), never 'SAME',
  and PyTorch's default initialisation (kaiming-uniform a=sqrt(5): U(-1/sqrt(fan_in), ...)),
  so a model trained from scratch starts from the reference's distribution.
"""

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

# PyTorch's default Conv2d init: kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_conv_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def downsample_valid(valid, stride: int):
  """Valid (B, 2) sizes after a stride-`stride` layer: ceil(v / stride); None stays None."""
  if valid is None or stride == 1:
    return valid
  return -(-valid // stride)


def mask_invalid(x, valid):
  """Zeroes x (B, H, W, C) outside the top-left (valid[b, 0], valid[b, 1]) of each image.

  `valid` None (the usual unpadded call) returns x unchanged.
  """
  if valid is None:
    return x
  valid = jnp.asarray(valid, jnp.int32)
  rows = jnp.arange(x.shape[1])[None, :] < valid[:, 0:1]               # (B, H)
  cols = jnp.arange(x.shape[2])[None, :] < valid[:, 1:2]               # (B, W)
  keep = rows[:, :, None, None] & cols[:, None, :, None]
  return jnp.where(keep, x, jnp.zeros((), x.dtype))


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
    elif self.dtype != jnp.float32 and not self.is_initializing():
      # Low-precision compute: the gradient keeps only x_hat (in that dtype) for the backward pass
      # (`batch_norm_train`); float32 runs keep the plain autodiff form below, unchanged.
      sync = self.axis_name is not None
      y, mean, var, count = batch_norm_train(x, scale, bias, self.axis_name if sync else None,
                                             self.epsilon, self.dtype)
      unbiased = var * (count / jnp.maximum(count - 1, 1))
      ra_mean.value = (1.0 - self.momentum) * ra_mean.value + self.momentum * mean
      ra_var.value = (1.0 - self.momentum) * ra_var.value + self.momentum * unbiased
      return y
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


def _bn_statistics(x, axis_name):
  """(mean, biased var, count) over every axis but the last, in float32, across `axis_name`."""
  xf = x.astype(jnp.float32)
  axes = tuple(range(x.ndim - 1))
  count = 1
  for a in axes:
    count *= x.shape[a]
  mean = jnp.mean(xf, axis=axes)
  if axis_name is not None:
    mean = lax.pmean(mean, axis_name)
    count = count * lax.psum(1, axis_name)
  var = jnp.mean(jnp.square(xf - mean), axis=axes)
  if axis_name is not None:
    var = lax.pmean(var, axis_name)
  return mean, var, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def batch_norm_train(x, scale, bias, axis_name, epsilon, dtype):
  """Training-mode BatchNorm of x (..., C): (y in `dtype`, batch mean, biased var, count).

  The same normalisation as `BatchNorm` (float32 statistics, two-pass variance, SyncBN across
  `axis_name` when it is set), with a hand-written gradient whose only per-element residual is
  the normalised input x_hat rounded to `dtype`. Autodiff of the plain form keeps float32
  copies of x - mean (two of them), which under bfloat16 compute are 4x the bytes of x and,
  over the 50+ BatchNorms of a ResNet, most of the train step's activation memory. The
  gradient is the usual one (cross-device sums of dy and dy * x_hat, as SyncBN's backward):
  dx = scale / std * (dy - mean(dy) - x_hat * mean(dy * x_hat)); the statistics outputs carry
  no gradient (they only feed the running averages).
  """
  y, stats, _ = _bn_train_fwd_impl(x, scale, bias, axis_name, epsilon, dtype)
  return (y,) + stats


def _bn_train_fwd_impl(x, scale, bias, axis_name, epsilon, dtype):
  mean, var, count = _bn_statistics(x, axis_name)
  rstd = lax.rsqrt(var + epsilon)
  y = (x.astype(jnp.float32) - mean) * (scale * rstd) + bias
  # The backward pass keeps the normalised x_hat = (x - mean) / std in the compute dtype (the
  # forward used x unrounded). x_hat is O(1), so rounding it costs 2^-9 relative; rounding x
  # instead would lose x - mean to cancellation wherever |mean| >> std. The empty array only
  # carries x's own dtype for the gradient.
  x_hat = ((x.astype(jnp.float32) - mean) * rstd).astype(dtype)
  return (y.astype(dtype), (mean, var, count),
          (x_hat, rstd, scale, jnp.zeros((0,), x.dtype)))


def _bn_train_fwd(x, scale, bias, axis_name, epsilon, dtype):
  y, stats, residuals = _bn_train_fwd_impl(x, scale, bias, axis_name, epsilon, dtype)
  # The barrier materialises the rounded copy in the forward pass. Without it XLA fuses the
  # cheap rounding into the backward pass's consumers instead and keeps the float32 x alive
  # until then: in the TPU compile of the ADE20K R-50 step (bfloat16, 8 images per device) the
  # float32 convolution outputs were most of what was live at the memory peak.
  residuals = (lax.optimization_barrier(residuals[0]),) + residuals[1:]
  return (y,) + stats, residuals


def _bn_train_bwd(axis_name, epsilon, dtype, residuals, cotangents):
  del epsilon, dtype
  x_hat, rstd, scale, x_dtype = residuals
  dy = cotangents[0].astype(jnp.float32)
  axes = tuple(range(x_hat.ndim - 1))
  x_hat = x_hat.astype(jnp.float32)
  sum_dy = jnp.sum(dy, axis=axes)
  sum_dy_xhat = jnp.sum(dy * x_hat, axis=axes)
  count = 1
  for a in axes:
    count *= x_hat.shape[a]
  total_dy, total_dy_xhat = sum_dy, sum_dy_xhat
  if axis_name is not None:
    total_dy = lax.psum(sum_dy, axis_name)
    total_dy_xhat = lax.psum(sum_dy_xhat, axis_name)
    count = count * lax.psum(1, axis_name)
  dx = (scale * rstd) * (dy - total_dy / count - x_hat * (total_dy_xhat / count))
  # Parameter gradients are this device's part (the train step averages them over devices).
  return dx.astype(x_dtype.dtype), sum_dy_xhat, sum_dy


batch_norm_train.defvjp(_bn_train_fwd, _bn_train_bwd)


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


def _native_conv(x, kernel, stride: int, dilation: int, padding: int, groups: int = 1):
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), [(padding, padding), (padding, padding)],
      rhs_dilation=(dilation, dilation), dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups, preferred_element_type=jnp.float32)


def _tap_layout(x_shape, k: int, stride: int, dilation: int, padding: int):
  """(oh, ow, rows, cols, taps): output size, per-axis tap extents, the taps that read input."""
  _, h, w, _ = x_shape
  oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  rows = _tap_extent(oh, h, k, stride, dilation, padding)
  cols = _tap_extent(ow, w, k, stride, dilation, padding)
  taps = [(i, j) for i in range(k) for j in range(k) if rows[i] and cols[j]]
  return oh, ow, rows, cols, taps


def _tap_window(x, rows, cols, i, j, stride):
  """(B, rn, cn, Cin): the inputs tap (i, j) reads for the outputs of its extent."""
  (_, rn, ri), (_, cn, ci) = rows[i], cols[j]
  return lax.slice(x, (0, ri, ci, 0),
                   (x.shape[0], ri + (rn - 1) * stride + 1, ci + (cn - 1) * stride + 1,
                    x.shape[3]), (1, stride, stride, 1))


def _conv_taps(x, kernel, stride: int, dilation: int, padding: int):
  """The convolution as a sum over taps of (pixels, Cin) x (Cin, Cout) matmuls, float32."""
  oh, ow, rows, cols, taps = _tap_layout(x.shape, kernel.shape[0], stride, dilation, padding)
  out = None
  for i, j in taps:
    y = jnp.einsum('bhwc,co->bhwo', _tap_window(x, rows, cols, i, j, stride), kernel[i, j],
                   preferred_element_type=jnp.float32)
    (r0, rn, _), (c0, cn, _) = rows[i], cols[j]
    if (r0, rn, c0, cn) != (0, oh, 0, ow):            # zero-pad to the output size
      y = jnp.pad(y, ((0, 0), (r0, oh - r0 - rn), (c0, ow - c0 - cn), (0, 0)))
    out = y if out is None else out + y
  return out


def _tap_weight_grad(x, dy, kernel_shape, stride: int, dilation: int, padding: int):
  """d loss / d kernel from the output cotangent: one (Cin, pixels) x (pixels, Cout) per tap."""
  k = kernel_shape[0]
  _, _, rows, cols, taps = _tap_layout(x.shape, k, stride, dilation, padding)
  grads = {}
  for i, j in taps:
    (r0, rn, _), (c0, cn, _) = rows[i], cols[j]
    # (Cout, Cin) = dy^T x, transposed after: XLA then lays out dy (Cout, pixels), not x. x is
    # often not materialised (XLA:CPU fuses the residual stream's BN/add/ReLU chain into its
    # consumers), and a transposing copy of x recomputed that chain per element in transposed
    # order (13.5 s of a 34 s DeepLabV3 step at 512x512).
    # float32 operands: XLA:CPU has no bf16 x bf16 -> f32 kernel for this product (this path
    # only runs on the CPU, where bfloat16 is emulated anyway).
    grads[i, j] = jnp.einsum('bhwo,bhwc->oc', dy[:, r0:r0 + rn, c0:c0 + cn].astype(jnp.float32),
                             _tap_window(x, rows, cols, i, j, stride).astype(jnp.float32)).T
  zero = jnp.zeros(kernel_shape[2:], jnp.float32)
  return jnp.stack([jnp.stack([grads.get((i, j), zero) for j in range(k)]) for i in range(k)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_mixed(x, kernel, stride, dilation, padding):
  """Native convolution forward and input gradient; per-tap matmuls for the weight gradient."""
  return _native_conv(x, kernel, stride, dilation, padding)


def _conv_mixed_fwd(x, kernel, stride, dilation, padding):
  return _native_conv(x, kernel, stride, dilation, padding), (x, kernel)


def _conv_mixed_bwd(stride, dilation, padding, residuals, dy):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda x_: _native_conv(x_, kernel, stride, dilation, padding), x)
  dx, = input_vjp(dy.astype(jnp.float32))
  if x.shape[-1] >= _TAP_WGRAD_MIN_CHANNELS:
    dk = _tap_weight_grad(x, dy, kernel.shape, stride, dilation, padding)
  else:
    _, kernel_vjp = jax.vjp(lambda k_: _native_conv(x, k_, stride, dilation, padding), kernel)
    dk, = kernel_vjp(dy.astype(jnp.float32))
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_mixed.defvjp(_conv_mixed_fwd, _conv_mixed_bwd)

# CPU choices, from per-layer measurements of forward + backward at 512x512 crops (2 cores,
# float32; XLA's native convolution vs the tap form vs PyTorch's oneDNN):
# - dilation >= _TAPS_MIN_DILATION (the ASPP's 12/24/36, LIP's 6 at small sizes): the tap form,
#   forward and backward. XLA's native dilated convolution is slow (1.4-1.9 s vs 0.4-0.9 s for
#   a 2048->512 branch forward on a 64x64 map) and most off-centre taps read only padding;
# - other k > 1 convolutions: native forward and input gradient (the tap form's pads and adds
#   cost up to 5x on large maps with few channels: 1.33 s vs 0.24 s for the stem's 32->32 at
#   256x256), and the weight gradient as per-tap matmuls from _TAP_WGRAD_MIN_CHANNELS input
#   channels (0.38 s vs 0.91 s native for 512->512 at 64x64), native below it;
# - 1x1 convolutions: one matmul.
_TAPS_MIN_DILATION = 6
_TAP_WGRAD_MIN_CHANNELS = 128


CONV_IMPLS = ('auto', 'native', 'taps')


def resolve_conv_impl(impl: str, platform: Optional[str] = None) -> str:
  """The convolution form for devices of `platform` ('cpu', 'tpu', 'gpu'/'cuda', ...).

  `config.model.conv_impl` is 'auto' (by platform), 'native' (XLA's convolution) or 'taps' (the
  CPU scheme of `conv2d`). 'auto' resolves here when the platform of the devices the step is
  compiled for is known (the mesh's, which may differ from the process's default backend: a CPU
  process can compile for a TPU); with `platform=None` it stays 'auto' and `conv2d` decides at
  lowering time (`lax.platform_dependent`), which also follows the compile target.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f'model.conv_impl: unknown value {impl!r} (expected one of {CONV_IMPLS})')
  if impl != 'auto' or platform is None:
    return impl
  return 'taps' if platform == 'cpu' else 'native'


def _cpu_conv(x, kernel, stride: int, dilation: int, padding: int, groups: int = 1):
  """The CPU scheme (measurements above): taps, or native forward with tap weight gradients.

  A grouped convolution runs as one convolution per group (input channels and kernel columns
  of that group) so each group gets the CPU forms of the dense case.
  """
  if groups > 1:
    cin, cout = x.shape[-1] // groups, kernel.shape[-1] // groups
    return jnp.concatenate(
        [_cpu_conv(x[..., g * cin:(g + 1) * cin], kernel[..., g * cout:(g + 1) * cout],
                   stride, dilation, padding) for g in range(groups)], axis=-1)
  if kernel.shape[0] > 1 and dilation < _TAPS_MIN_DILATION:
    return _conv_mixed(x, kernel, stride, dilation, padding)
  return _conv_taps(x, kernel, stride, dilation, padding)


def conv2d(x, kernel, *, stride: int = 1, dilation: int = 1, padding: int = 0,
           out_dtype=None, impl: str = 'auto', groups: int = 1):
  """torch Conv2d (symmetric zero padding, no bias) of NHWC `x` with an HWIO `kernel`.

  `impl` 'native' is XLA's native convolution (GPUs and TPUs). 'taps' is the CPU scheme, chosen
  per layer (measurements at `_TAPS_MIN_DILATION`): 1x1 convolutions are matmuls; strongly
  dilated ones are a sum over kernel taps of (pixels, Cin) x (Cin, Cout) matmuls, each
  restricted to the outputs whose input tap lies inside the image, so taps that only read the
  zero padding (most of them for the ASPP's dilations on small maps) cost nothing; the others
  run XLA's convolution forward with a custom gradient whose weight part is per-tap matmuls
  over B*H*W (XLA's convolution form of it is slow for small batches). 'auto' picks 'taps' when
  lowering for the CPU and 'native' otherwise (`lax.platform_dependent`: the platform of the
  compile target, not the process's default backend). All forms give the padded convolution up
  to float32 summation order (relative 1e-6).

  Products accumulate in float32 whatever the input dtype (bfloat16 compute); the result has
  `out_dtype` (default: the input's dtype). `groups` is torch's: the kernel is
  (k, k, Cin / groups, Cout), output channel block g (of Cout / groups) reads input channel
  block g (XLA's `feature_group_count`).
  """
  b, h, w, cin = x.shape
  k = kernel.shape[0]
  if cin % groups or kernel.shape[-1] % groups or kernel.shape[:3] != (k, k, cin // groups):
    raise ValueError(f'conv2d: kernel {kernel.shape} does not match input channels {cin} '
                     f'in {groups} group(s)')
  oh = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  ow = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
  if oh <= 0 or ow <= 0:
    raise ValueError(f'conv2d: input {h}x{w} too small for kernel {k}, dilation {dilation}, '
                     f'padding {padding}')
  args = (stride, dilation, padding, groups)
  if impl == 'native':
    y = _native_conv(x, kernel, *args)
  elif impl == 'taps':
    y = _cpu_conv(x, kernel, *args)
  elif impl == 'auto':
    y = lax.platform_dependent(x, kernel, cpu=lambda a, b: _cpu_conv(a, b, *args),
                               default=lambda a, b: _native_conv(a, b, *args))
  else:
    raise ValueError(f'conv2d: unknown impl {impl!r} (expected one of {CONV_IMPLS})')
  return y.astype(out_dtype or x.dtype)


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
  impl: str = 'auto'           # conv2d's form: 'auto', 'native' or 'taps' (resolve_conv_impl)
  groups: int = 1              # torch's `groups`: kernel (k, k, Cin / groups, Cout) (ResNeSt)

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    kernel = self.param('kernel', torch_conv_kernel_init,
                        (k, k, x.shape[-1] // self.groups, self.features), jnp.float32)
    y = conv2d(x.astype(self.dtype), kernel.astype(self.dtype), stride=self.stride,
               dilation=self.dilation, padding=self.padding, out_dtype=jnp.float32,
               impl=self.impl, groups=self.groups)
    if self.use_bias:
      y = y + self.param('bias', self.bias_init, (self.features,), jnp.float32)
      return y.astype(self.dtype)
    # Every bias-free convolution of the models feeds a BatchNorm, which works in float32: the
    # float32 accumulations go to it unrounded. (Under bfloat16, rounding the pre-normalisation
    # values would cost precision relative to their batch mean, which the BN subtracts; the
    # error would then be amplified by mean / std.) In training the BN keeps only a copy in the
    # compute dtype for its gradient (`batch_norm_train`), so the float32 output is transient.
    return y


def conv(features: int, kernel_size: int = 1, stride: int = 1, dilation: int = 1,
         padding: Optional[int] = None, use_bias: bool = False, in_features: Optional[int] = None,
         dtype: Any = jnp.float32, conv_impl: str = 'auto', name: Optional[str] = None,
         groups: int = 1) -> Conv:
  """nn.Conv2d with PyTorch padding and initialisation. `padding=None` -> dilation*(k-1)//2.

  `in_features` is needed only with `use_bias` (the bias init bound depends on fan-in: the
  fan-in of one group, in_features / groups * k * k, as in torch).
  """
  k = kernel_size
  p = dilation * (k - 1) // 2 if padding is None else padding
  if use_bias:
    if in_features is None:
      raise ValueError('conv(use_bias=True) needs in_features for the PyTorch bias init')
    bias_init = torch_conv_bias_init(in_features // groups * k * k)
  else:
    bias_init = nn.initializers.zeros
  return Conv(features, k, stride=stride, dilation=dilation, padding=p, use_bias=use_bias,
              bias_init=bias_init, dtype=dtype, impl=conv_impl, name=name, groups=groups)


class ConvBNAct(nn.Module):
  """conv (no bias) -> BatchNorm -> activation: the reference's 'CBR' (nn.Sequential(0, 1, 2)).

  Submodules are named `conv` and `bn`, matching indices 0 and 1 of the reference Sequential.
  With `valid` (padded evaluation, see the module docstring) a k > 1 convolution first zeroes
  its input outside the valid region.
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
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x, valid=None):
    if self.kernel_size > 1:
      x = mask_invalid(x, valid)
    x = conv(self.features, self.kernel_size, self.stride, self.dilation, self.padding,
             dtype=self.dtype, conv_impl=self.conv_impl, name='conv')(x)
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
