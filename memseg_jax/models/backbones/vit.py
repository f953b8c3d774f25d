"""Vision Transformer backbone (ViT-Large/16 of the MCIBI ViT-L configs), plain and unpyramided.

Reference: `ssseg/modules/models/backbones/vit.py` (`VisionTransformer`, structure
`jx_vit_large_p16_384`) and its bricks (`bricks/transformer/{embed,mha,ffn}.py`):

    x  = AdaptivePadding('corner')(images)          # zeros right/bottom to a multiple of 16
    x  = patch_embed.projection(x)                  # Conv 16x16 stride 16 with bias -> tokens
    x  = concat([cls_token, x]) + pos_embed         # pos_embed resized when the grid differs
    x  = Dropout(drop_rate)(x)
    24 x: x = x + Dropout(MHA(ln1(x)));  x = x + Dropout(fc2(Dropout(GELU(fc1(ln2(x))))))
    outputs after the blocks in `out_indices`, cls token removed: (B, H/16, W/16, C) each

There is no final norm, no neck and no multi-level aggregation: every output has stride 16
(the segmentor's `norm_layers` LayerNorms come after, in models/mcibi.py). LayerNorms use eps
1e-6, GELU is the exact (erf) form, attention has torch `nn.MultiheadAttention` semantics
(fused q;k;v input projection, q scaled by head_dim^-0.5 before the product, out projection).

Parameter names mirror the reference state_dict, so `memseg_jax.convert` maps them with its
generic rule: `cls_token`, `pos_embed` (1, 1 + gh*gw, C) with (gh, gw) = img_size / patch_size,
`patch_embed/projection/{kernel,bias}`, `layers_i/ln1`, `layers_i/attn/attn/in_proj_weight`
(3C, C) and `in_proj_bias` (3C,), `layers_i/attn/attn/out_proj`, `layers_i/ln2`,
`layers_i/ffn/layers_0_0` (fc1) and `layers_i/ffn/layers_1` (fc2). The fused input projection
is kept as torch stores it, a bare (out, in) parameter of `nn.MultiheadAttention` (not a
Linear), so it converts without renaming or transposing; every Dense keeps Flax's (in, out).

The position embedding is resized (bilinear, align_corners=False, `ops.resize_bilinear`)
whenever the token count of the input differs from the embedding's, exactly like the
reference's `posembeding`; an ImageNet checkpoint's 24x24 grid is resized to (gh, gw) once at
conversion (`imagenet_state_dict`, the reference's `resizeposembed` + `vitconvert`).

Padded evaluation (`valid`) is not supported: attention mixes all tokens, and the reference pads
to a multiple of 16 only, so a larger padded canvas would change the result. ViT configs use
slide inference on fixed windows anyway.
"""

import math
from typing import Any, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from memseg_jax import ops
from memseg_jax.models.attention import softmax_to
from memseg_jax.models.layers import torch_conv_bias_init, torch_conv_kernel_init

SUPPORTS_VALID_HW = False

# The architecture fields of `config.model.backbone` (type 'vit') and their ViT-L/16 values.
DEFAULTS = dict(img_size=(512, 512), patch_size=16, embed_dims=1024, num_layers=24,
                num_heads=16, mlp_ratio=4, out_indices=(9, 14, 19, 23), drop_rate=0.0,
                norm_eps=1e-6)


def _cfg(cfg):
  out = dict(DEFAULTS)
  out.update({k: v for k, v in cfg.items() if k in DEFAULTS})
  return out


def check_config(cfg) -> None:
  """Raises ValueError naming the `config.model.backbone` key this backbone cannot build."""
  c = _cfg(cfg)
  for key in ('patch_size', 'embed_dims', 'num_layers', 'num_heads', 'mlp_ratio'):
    if not isinstance(c[key], int) or c[key] <= 0:
      raise ValueError(f'config.model.backbone.{key}={c[key]!r} must be a positive integer')
  if c['embed_dims'] % c['num_heads']:
    raise ValueError(f"config.model.backbone.num_heads={c['num_heads']!r} does not divide "
                     f"embed_dims={c['embed_dims']!r}")
  img = tuple(c['img_size'])
  if len(img) != 2 or any(int(s) != s or s < c['patch_size'] for s in img):
    raise ValueError(f'config.model.backbone.img_size={img!r} must be two integers >= '
                     f"patch_size={c['patch_size']}")
  idx = tuple(c['out_indices'])
  if not idx or any(int(i) != i or not 0 <= i < c['num_layers'] for i in idx):
    raise ValueError(f'config.model.backbone.out_indices={idx!r} must be block indices in '
                     f"[0, num_layers={c['num_layers']})")
  if not 0 <= c['drop_rate'] < 1:
    raise ValueError(f"config.model.backbone.drop_rate={c['drop_rate']!r} must be in [0, 1)")


def output_strides(cfg) -> Tuple[int, ...]:
  """Every output has the patch size as stride (ceil: the input is padded to a multiple)."""
  c = _cfg(cfg)
  return (int(c['patch_size']),) * len(tuple(c['out_indices']))


def build(cfg, *, train=False, dtype=jnp.float32, name=None, **unused) -> 'VisionTransformer':
  """The ViT of `config.model.backbone` (type 'vit'); `cfg['remat']` rematerialises each block.

  BatchNorm settings (`axis_name`, `bn_*`) and `conv_impl` do not apply: there is neither BN
  nor a spatial convolution here (the patch embedding is a matmul over patches).
  """
  del unused
  c = _cfg(cfg)
  return VisionTransformer(
      img_size=tuple(int(s) for s in c['img_size']), patch_size=int(c['patch_size']),
      embed_dims=int(c['embed_dims']), num_layers=int(c['num_layers']),
      num_heads=int(c['num_heads']), mlp_ratio=int(c['mlp_ratio']),
      out_indices=tuple(int(i) for i in c['out_indices']), drop_rate=float(c['drop_rate']),
      norm_eps=float(c['norm_eps']), remat=bool(cfg.get('remat', False)), train=train,
      dtype=dtype, name=name)


# ------------------------------------------------------------------ ImageNet (timm) checkpoints
# Keys of a timm ViT checkpoint that the reference's `strict=False` load leaves unused: the
# classifier, and the final norm (`norm.*` becomes `ln1.*`, which exists only with final_norm).
_IGNORED_PREFIXES = ('head.', 'ln1.', 'pre_logits.')


def timm_to_reference_key(key: str) -> Optional[str]:
  """The reference's `vitconvert` for one key (None: the classifier, which it drops)."""
  if key.startswith('head'):
    return None
  if key.startswith('norm'):
    return key.replace('norm.', 'ln1.')
  if key.startswith('patch_embed'):
    return key.replace('proj', 'projection') if 'proj' in key else key
  if key.startswith('blocks'):
    for old, new in (('norm', 'ln'), ('mlp.fc1', 'ffn.layers.0.0'), ('mlp.fc2', 'ffn.layers.1'),
                     ('attn.qkv.', 'attn.attn.in_proj_'), ('attn.proj', 'attn.attn.out_proj')):
      if old in key:
        key = key.replace(old, new)
        break
    return key.replace('blocks.', 'layers.')
  return key


def resize_pos_embed(pos_embed: np.ndarray, grid_hw: Tuple[int, int],
                     pos_hw: Tuple[int, int]) -> np.ndarray:
  """(1, 1 + ph*pw, C) -> (1, 1 + gh*gw, C): cls entry kept, grid resized bilinearly."""
  c = pos_embed.shape[-1]
  ph, pw = pos_hw
  grid = jnp.asarray(pos_embed[:, -ph * pw:], jnp.float32).reshape(1, ph, pw, c)
  grid = ops.resize_bilinear(grid, tuple(grid_hw)).reshape(1, -1, c)
  return np.concatenate([np.asarray(pos_embed[:, :1], np.float32), np.asarray(grid)], axis=1)


def imagenet_state_dict(state_dict, cfg=None):
  """A timm ViT checkpoint (`jx_vit_large_p16_384`) in the reference backbone's key layout.

  The reference's `loadpretrainedweights`: keys renamed by `vitconvert` (the fused `qkv` stays
  fused as `in_proj_weight` / `in_proj_bias`, q;k;v rows as torch's MHA expects), and a square
  position embedding of another grid (24x24 at 384) resized to img_size / patch_size. Returns
  (state_dict, ignored keys): the classifier `head.*` and the final `norm.*`, unused here.
  """
  c = _cfg(cfg or {})
  out, ignored = {}, []
  for key, value in state_dict.items():
    new = timm_to_reference_key(key)
    if new is None or new.startswith(_IGNORED_PREFIXES):
      ignored.append(key)
      continue
    out[new] = value
  if 'pos_embed' in out:
    value = out['pos_embed']
    value = value.detach().cpu().numpy() if hasattr(value, 'detach') else np.asarray(value)
    gh, gw = (int(s) // int(c['patch_size']) for s in c['img_size'])
    if value.shape[1] != 1 + gh * gw:
      side = int(math.sqrt(value.shape[1] - 1))
      out['pos_embed'] = resize_pos_embed(value, (gh, gw), (side, side))
  return out, sorted(ignored)


# ------------------------------------------------------------------------------------ modules
def _linear(features: int, in_features: int, dtype, name: str) -> nn.Dense:
  """torch nn.Linear initialisation: U(+-1/sqrt(in)) for the weight and the bias."""
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32,
                  kernel_init=torch_conv_kernel_init, bias_init=torch_conv_bias_init(in_features),
                  name=name)


def layer_norm(eps: float, dtype, name: str) -> nn.LayerNorm:
  """torch nn.LayerNorm: biased variance around the mean (not E[x^2] - E[x]^2), float32 stats."""
  return nn.LayerNorm(epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                      name=name)


class PatchProjection(nn.Module):
  """Conv2d(3, C, p, stride p, bias) on a multiple-of-p input, as one matmul over patches."""
  patch_size: int
  embed_dims: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, gh*p, gw*p, Cin)
    p, c = self.patch_size, self.embed_dims
    b, h, w, cin = x.shape
    kernel = self.param('kernel', torch_conv_kernel_init, (p, p, cin, c), jnp.float32)
    bias = self.param('bias', torch_conv_bias_init(p * p * cin), (c,), jnp.float32)
    patches = x.reshape(b, h // p, p, w // p, p, cin).astype(self.dtype)
    y = jnp.einsum('bhpwqc,pqco->bhwo', patches, kernel.astype(self.dtype),
                   preferred_element_type=jnp.float32)
    return y + bias                                                    # (B, gh, gw, C) float32


class PatchEmbed(nn.Module):
  """AdaptivePadding('corner') (zeros right/bottom to a multiple of p), then `projection`."""
  patch_size: int
  embed_dims: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, H, W, Cin) -> (B, ceil(H/p), ceil(W/p), C)
    p = self.patch_size
    h, w = x.shape[1:3]
    x = jnp.pad(x, ((0, 0), (0, -h % p), (0, -w % p), (0, 0)))
    return PatchProjection(p, self.embed_dims, dtype=self.dtype, name='projection')(x)


class TorchMultiheadAttention(nn.Module):
  """torch nn.MultiheadAttention(C, heads, bias=True) self-attention on (B, L, C) tokens.

  The attention weights (B, heads, L, L) are the largest tensor, as in the reference (which
  materialises them as (B * heads, L, L), and once more averaged over heads).
  """
  embed_dims: int
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, L, C)
    c, heads = self.embed_dims, self.num_heads
    head_dim = c // heads
    bound = math.sqrt(6.0 / (c + 3 * c))          # xavier_uniform of the (3C, C) weight
    w = self.param('in_proj_weight',
                   lambda key, shape, dt: jax.random.uniform(key, shape, dt, -bound, bound),
                   (3 * c, c), jnp.float32)
    b = self.param('in_proj_bias', nn.initializers.zeros, (3 * c,), jnp.float32)
    qkv = jnp.einsum('blc,oc->blo', x.astype(self.dtype), w.astype(self.dtype),
                     preferred_element_type=jnp.float32) + b              # (B, L, 3C)
    bsz, length = x.shape[:2]
    q, k, v = jnp.split(qkv.reshape(bsz, length, 3, heads, head_dim), 3, axis=2)
    # torch scales q (not the product) by head_dim^-0.5, in float32.
    q = (q[:, :, 0] * jnp.float32(math.sqrt(1.0 / head_dim))).astype(self.dtype)
    k, v = k[:, :, 0].astype(self.dtype), v[:, :, 0].astype(self.dtype)  # (B, L, heads, hd)
    logits = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    if self.dtype == jnp.float32:
      weights = jax.nn.softmax(logits, axis=-1)                           # (B, heads, L, L)
    else:   # low precision: the backward pass keeps only these probabilities, in self.dtype
      weights = softmax_to(logits, self.dtype)
    out = jnp.einsum('bhqk,bkhd->bqhd', weights, v, preferred_element_type=jnp.float32)
    out = out.reshape(bsz, length, c).astype(self.dtype)
    # torch zero-initialises the out projection's bias (its weight keeps Linear's init).
    return nn.Dense(c, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=torch_conv_kernel_init, name='out_proj')(out)


class MultiheadAttention(nn.Module):
  """The reference's MHA brick: torch attention (`attn`), then proj_drop (drop_rate)."""
  embed_dims: int
  num_heads: int
  drop_rate: float = 0.0
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    out = TorchMultiheadAttention(self.embed_dims, self.num_heads, dtype=self.dtype,
                                  name='attn')(x)
    return nn.Dropout(self.drop_rate, deterministic=not self.train)(out)


class FFN(nn.Module):
  """fc1 (C -> ratio*C) -> GELU (erf) -> Dropout -> fc2 -> Dropout (the reference's FFN brick)."""
  embed_dims: int
  feedforward_channels: int
  drop_rate: float = 0.0
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    drop = lambda y: nn.Dropout(self.drop_rate, deterministic=not self.train)(y)
    h = _linear(self.feedforward_channels, self.embed_dims, self.dtype, 'layers_0_0')(x)
    h = drop(jax.nn.gelu(h, approximate=False))
    h = _linear(self.embed_dims, self.feedforward_channels, self.dtype, 'layers_1')(h)
    return drop(h)


class EncoderLayer(nn.Module):
  """Pre-LN block: x + attn(ln1(x)), then + ffn(ln2(x)). The residual stream stays float32."""
  embed_dims: int
  num_heads: int
  feedforward_channels: int
  drop_rate: float = 0.0
  norm_eps: float = 1e-6
  train: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):  # x: (B, L, C) float32
    kw = dict(drop_rate=self.drop_rate, train=self.train, dtype=self.dtype)
    h = layer_norm(self.norm_eps, self.dtype, 'ln1')(x)
    x = x + MultiheadAttention(self.embed_dims, self.num_heads, name='attn', **kw)(h)
    h = layer_norm(self.norm_eps, self.dtype, 'ln2')(x)
    return x + FFN(self.embed_dims, self.feedforward_channels, name='ffn', **kw)(h)


class VisionTransformer(nn.Module):
  """ViT: images (B, H, W, 3) -> tuple of (B, ceil(H/p), ceil(W/p), C), one per out_index."""
  img_size: Tuple[int, int] = (512, 512)
  patch_size: int = 16
  embed_dims: int = 1024
  num_layers: int = 24
  num_heads: int = 16
  mlp_ratio: int = 4
  out_indices: Sequence[int] = (9, 14, 19, 23)
  drop_rate: float = 0.0
  norm_eps: float = 1e-6
  remat: bool = False
  train: bool = False
  dtype: Any = jnp.float32

  def _pos_embed(self, pos_embed, grid_hw):
    """The embedding for a (gh, gw) token grid: resized when the token count differs.

    Like the reference, the test is on the count: a grid of the same count but another shape
    (e.g. 16x64 for a 32x32 embedding) takes the embedding as it is.
    """
    gh, gw = grid_hw
    if pos_embed.shape[1] == 1 + gh * gw:
      return pos_embed
    ph, pw = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
    c = pos_embed.shape[-1]
    grid = ops.resize_bilinear(pos_embed[:, -ph * pw:].reshape(1, ph, pw, c), (gh, gw))
    return jnp.concatenate([pos_embed[:, :1], grid.reshape(1, gh * gw, c)], axis=1)

  @nn.compact
  def __call__(self, x, valid=None):  # x: (B, H, W, 3)
    if valid is not None:
      raise ValueError('the ViT backbone does not support padded evaluation (valid sizes)')
    c = self.embed_dims
    tokens = PatchEmbed(self.patch_size, c, dtype=self.dtype, name='patch_embed')(x)
    b, gh, gw, _ = tokens.shape
    ph, pw = self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size
    cls_token = self.param('cls_token', nn.initializers.zeros, (1, 1, c), jnp.float32)
    pos_embed = self.param('pos_embed', nn.initializers.zeros, (1, 1 + ph * pw, c), jnp.float32)
    x = jnp.concatenate([jnp.broadcast_to(cls_token, (b, 1, c)), tokens.reshape(b, gh * gw, c)],
                        axis=1)                                          # (B, 1 + gh*gw, C)
    x = x + self._pos_embed(pos_embed, (gh, gw))
    x = nn.Dropout(self.drop_rate, deterministic=not self.train)(x)
    layer_cls = nn.remat(EncoderLayer) if self.remat else EncoderLayer
    outputs = []
    for i in range(self.num_layers):
      x = layer_cls(c, self.num_heads, self.mlp_ratio * c, drop_rate=self.drop_rate,
                    norm_eps=self.norm_eps, train=self.train, dtype=self.dtype,
                    name=f'layers_{i}')(x)
      if i in self.out_indices:
        outputs.append(x[:, 1:].reshape(b, gh, gw, c).astype(self.dtype))
    return tuple(outputs)
