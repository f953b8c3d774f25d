"""The self-attention block of MCIBI (the reference's `SelfAttentionBlock` as MCIBI configures it).

query = two 1x1 CBR on the query input; key = two 1x1 CBR (own weights) on the key input;
value = one 1x1 CBR on the key input; A = softmax_keys(T^-1/2 q k^T); out = 1x1 CBR(A v).
No residual. Attention spans all H*W positions of each image; with `valid` (zero-padded
evaluation, layers.py) only the keys inside each image's valid region. Submodule names follow the
reference state_dict (`query_project_0` <-> `query_project.0`, `value_project` <->
`value_project`, ...).
"""

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from memseg_jax.models.layers import ConvBNAct


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def softmax_to(x, dtype):
  """softmax over the last axis computed in float32, returned in `dtype`.

  Its gradient keeps only that `dtype` output. Autodiff of `softmax(x).astype(dtype)` keeps the
  float32 probabilities besides: (B, HW, HW) per attention block, 0.25 GiB per 4 images at
  64x64 features, the largest float32 tensors of a bfloat16 train step.
  """
  return jax.nn.softmax(x.astype(jnp.float32), axis=-1).astype(dtype)


def _softmax_to_fwd(x, dtype):
  # Materialised here (the barrier): otherwise XLA fuses the softmax into its consumers in the
  # backward pass and keeps the float32 similarities (and their max-shifted copy) alive instead.
  p = jax.lax.optimization_barrier(softmax_to(x, dtype))
  return p, p


def _softmax_to_bwd(dtype, p, dp):
  del dtype
  p = p.astype(jnp.float32)
  dp = dp.astype(jnp.float32)
  return (p * (dp - jnp.sum(dp * p, axis=-1, keepdims=True)),)


softmax_to.defvjp(_softmax_to_fwd, _softmax_to_bwd)


class SelfAttentionBlock(nn.Module):
  transform_channels: int = 256
  out_channels: int = 512
  act: str = 'relu'
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _cbr(self, features, name):
    return ConvBNAct(features, 1, act=self.act, train=self.train, axis_name=self.axis_name,
                     bn_momentum=self.bn_momentum, bn_eps=self.bn_eps, dtype=self.dtype,
                     conv_impl=self.conv_impl, name=name)

  @nn.compact
  def __call__(self, query_feats, key_feats, valid=None):
    b, h, w, _ = query_feats.shape
    t = self.transform_channels
    q = self._cbr(t, 'query_project_1')(self._cbr(t, 'query_project_0')(query_feats))
    k = self._cbr(t, 'key_project_1')(self._cbr(t, 'key_project_0')(key_feats))
    v = self._cbr(t, 'value_project')(key_feats)
    q = q.reshape(b, h * w, t)                                   # (B, N, T)
    k = k.reshape(b, -1, t)                                      # (B, M, T)
    v = v.reshape(b, -1, t)                                      # (B, M, T)
    # Similarities accumulate and the softmax runs in float32 whatever the compute dtype.
    sim = jnp.einsum('bnt,bmt->bnm', q, k, preferred_element_type=jnp.float32) * (t ** -0.5)
    if valid is not None:
      rows = jnp.arange(h)[None, :, None] < valid[:, 0, None, None]
      cols = jnp.arange(w)[None, None, :] < valid[:, 1, None, None]
      keys = (rows & cols).reshape(b, 1, h * w)
      sim = jnp.where(keys, sim, -jnp.inf)
    if v.dtype == jnp.float32:
      sim = nn.softmax(sim, axis=-1)
    else:   # low-precision compute: the backward pass keeps the probabilities in v's dtype
      sim = softmax_to(sim, v.dtype)
    context = jnp.einsum('bnm,bmt->bnt', sim, v).reshape(b, h, w, t)
    return self._cbr(self.out_channels, 'out_project')(context)
