"""The features memories of MCIBI and MCIBI++: state, read, update rule, and MCIBI's loss.

This file tells the paper's central idea end to end ("Mining Contextual Information Beyond
Image", spec sections 1.2 item 5, 2, 3, 4 and 8), then its follow-up's distribution memory
(last section below). Everything numeric is a pure, jittable function; `FeaturesMemory`
(MCIBI) and `FeaturesMemoryV2` (MCIBI++) are the Linen modules, owning the parameters of the
read path and the memory variable.

State (spec 1.4, 3)
  M: (K, n, C) float32, one (n = `num_feats_per_cls` = 1 in every shipped config) C-vector per
  class, zeros at the start. It lives in the Flax collection `'memory'` (next to `batch_stats`),
  never in `params`: no gradient, optimizer step or weight decay ever touches it, as in the
  reference (an `nn.Parameter(requires_grad=False)` that SGD skips). Checkpoints carry it.

Read (`aggregate`, `FeaturesMemory.__call__`; spec 1.2 item 5)
  P = softmax over classes of the coarse logits `preds_stage1` (or its one-hot argmax);
  G_i = P @ M[:, i, :] per pixel; G'_i = SelfAttention(query=F, key/value=G_i); fused by a 1x1
  CBR when n > 1; O1 = 3x3 CBR([F, G']); with context within the image,
  O = 3x3 CBR([SelfAttention(F, feats_ms), O1]). The memory is read as data
  (`stop_gradient`); the module returns (M, O).

Update (`momentum_at`, `update_memory`, `FeaturesMemory.update`; spec 3, 8 items 1-6)
  After the forward, with F upsampled bilinearly (align_corners=False) to label resolution and
  the full-resolution labels, for each class c present in the local batch (labels equal to
  `ignore_index` skipped):
    - lazy init: if every entry of a slot of M[c] is exactly 0, the first such slot becomes the
      mean of the class's pixels and nothing else happens to c this step;
    - otherwise, `cosine_similarity` strategy: s_i = cos(x_i, M[c]) with torch's eps semantics,
      w_i = (1 - s_i) / sum_j (1 - s_j) (dissimilar pixels weigh more), a_c = sum_i w_i x_i;
      `mean` strategy: a_c = mean_i x_i;
    - M[c] <- (1 - m) M[c] + m a_c with m = base_momentum * lr_t / base_lr (`momentum_at`).
  With n > 1 every pixel goes to its most cosine-similar slot and every slot gets the same
  weighted update from its own pixels; a slot that receives no pixel gets a_c = 0 (the
  reference's empty sum) and so decays to (1 - m) M. Classes absent from the batch keep their
  rows bit for bit. The update is vectorised over classes (one-hot contractions), so it is a
  fixed-shape graph that jits once.

  `update_memory_fused` gives the same result from the low-resolution F without building the
  (B, H, W, C) upsampled tensor (bilinear upsampling is linear; see its docstring).

Multi-device semantics (spec 3 item 4, 8 item 6)
  The reference updates on every device from that device's own images, then replaces M by the
  average of the per-device memories. The train step reproduces this: inside its shard_map /
  pmap, each device calls `FeaturesMemory.update` on its local batch (inside `apply`, so the
  memory loss of that step sees the local updated M, as the reference's does), then it calls
  `sync_memory` (a `pmean`) on the returned `'memory'` collection before storing it. Hence the
  effective momentum of a class is scaled by the fraction of devices that saw it, and a lazily
  initialised class is averaged with the zeros of the devices that did not see it.

Loss (`memory_loss`; spec 4)
  The memory rows pushed through decoder_stage2 (in train mode, by the segmentor) are classified
  against their own class: mean cross-entropy with target k for the n rows of class k.

Known difference from the reference: when every pixel of a class (or slot) has cosine
similarity exactly 1 with the stored vector, the reference divides 0 by 0 and writes NaN into
that row, which the next read spreads to every pixel; here that class takes the plain mean of
its pixels instead. Nothing else changes.

The distribution memory of MCIBI++ (TPAMI 2022; reference `FeaturesMemoryV2`, wave-2 spec 5.1)
  State: (K, 2) float32, row c = [mean_c, std_c], initialised to (0, 1); the same `'memory'`
  collection, never a parameter. There is no lazy initialisation and no memory loss.
  Read (`read_distribution_memory`, `FeaturesMemoryV2.__call__`): the C-vector of class c is
  mean_c + std_c * z_c, where z is a fixed (K, C) standard-normal matrix. The reference draws
  it on every forward with `torch.manual_seed(c); torch.normal(...)`, which ATen computes as
  z_c = normal_(0, 1) then `mul_(std).add_(mean)`: z_c depends on c only. z ships with the
  package (`data/mcibipp_noise.npy`, drawn once with PyTorch by scripts/make_mcibipp_noise.py)
  and the read is the same two float32 operations, so it is bit-identical to the reference's.
  Then soft (or hard) gathering with softmax(gathering logits) @ read, gradients flowing
  through the softmax; SelfAttention(query=F, key/value=gathered), optionally after a shared
  stride-2 3x3 CBR on both and bilinearly resized back; 3x3 CBR([F, attended]).
  Update (`update_distribution_memory`, `..._fused`): for each class c present in the local
  batch, f_c = mean of its pixels of F upsampled bilinearly to the labels (a C-vector);
  mean_c <- (1 - m) mean_c + m * mean(f_c), std_c <- (1 - m) std_c + m * std(f_c) (unbiased
  over the C entries), m = 0.1 fixed by the configs. Multi-device: per device, then
  `sync_memory` (pmean), as for MCIBI.
  Known difference: the reference's `torch.manual_seed(c)` in every forward also reseeds
  torch's global CPU and CUDA generators (to K - 1), so its dropout masks repeat every
  iteration (and its data-loader workers' seeds repeat every epoch). That side effect is not
  reproduced: the read here needs no random numbers, and dropout keeps its per-step keys.
"""

import functools
import os
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from memseg_jax import ops
from memseg_jax.models.attention import SelfAttentionBlock
from memseg_jax.models.heads import resize_bilinear_valid
from memseg_jax.models.layers import ConvBNAct, downsample_valid

# torch.nn.functional.cosine_similarity divides each vector by max(norm, 1e-8);
# F.normalize (used to assign pixels to slots when n > 1) by max(norm, 1e-12).
COSINE_EPS = 1e-8
NORMALIZE_EPS = 1e-12

STRATEGIES = ('cosine_similarity', 'mean')
_HIGHEST = lax.Precision.HIGHEST


# ------------------------------------------------------------------------------------- momentum
def momentum_at(lr, *, base_momentum: float, base_lr: float, adjust_by_learning_rate: bool):
  """Memory momentum for the current learning rate: base_momentum * lr / base_lr if adjusted.

  `lr` may be a Python float or a traced scalar (the train step passes the schedule's value).
  With Cityscapes/COCO-Stuff settings (base_lr < lr0) the first steps have m = 1.0.
  """
  if not adjust_by_learning_rate:
    return base_momentum
  if base_lr <= 0:
    raise ValueError(f'model.memory.base_lr must be positive, got {base_lr}')
  return base_momentum / base_lr * lr


# ----------------------------------------------------------------------------------------- read
def aggregate(memory, preds, *, use_hard: bool = False, grad_memory=None):
  """Per-pixel memory read: class probabilities of `preds` times each memory slot.

  Args:
    memory: (K, n, C) float32.
    preds: (B, H, W, K) logits (the coarse `preds_stage1`).
    use_hard: use the one-hot of the most probable class instead of the softmax.
    grad_memory: None, or the (K, n, C) memory the backward of the read uses in place of
      `memory` (training: the memory after this step's update, `_read_with_grad_memory`).

  Returns:
    (n, B, H, W, C) float32: for slot i, softmax(preds) @ memory[:, i, :].
  """
  k = memory.shape[0]
  if preds.shape[-1] != k:
    raise ValueError(f'aggregate: preds has {preds.shape[-1]} classes on its last axis, '
                     f'memory has {k}')
  weight = jax.nn.softmax(preds.astype(jnp.float32), axis=-1)         # (B, H, W, K)
  if use_hard:
    # The reference takes argmax of the softmax (not of the logits); ties resolve the same way.
    weight = jax.nn.one_hot(jnp.argmax(weight, axis=-1), k, dtype=jnp.float32)
  # Default matmul precision, like every other product of the forward pass (the update, which
  # accumulates statistics over many pixels, asks for full float32 instead).
  if grad_memory is None:
    return jnp.einsum('bhwk,knc->nbhwc', weight, memory.astype(jnp.float32))
  return _read_with_grad_memory(weight, memory.astype(jnp.float32),
                                grad_memory.astype(jnp.float32))


@jax.custom_vjp
def _read_with_grad_memory(weight, memory, grad_memory):
  """weight @ memory, whose gradient w.r.t. `weight` is taken with `grad_memory` instead.

  The reference's read saves a view of the memory storage for its backward, and the update
  then overwrites that storage in place (through `.data`, which autograd does not track); so
  the gradient reaching the softmax weights (decoder_stage1, the bottleneck, the backbone) is
  computed with the memory *after* this step's update. `grad_memory` is that memory.
  """
  del grad_memory
  return jnp.einsum('bhwk,knc->nbhwc', weight, memory)


def _read_fwd(weight, memory, grad_memory):
  return _read_with_grad_memory(weight, memory, grad_memory), (memory, grad_memory)


def _read_bwd(residuals, g):
  memory, grad_memory = residuals
  d_weight = jnp.einsum('nbhwc,knc->bhwk', g, grad_memory)
  return d_weight, jnp.zeros_like(memory), jnp.zeros_like(grad_memory)


_read_with_grad_memory.defvjp(_read_fwd, _read_bwd)


# --------------------------------------------------------------------------------------- update
def _check_update_args(memory, labels, strategy):
  if memory.ndim != 3:
    raise ValueError(f'update_memory: memory must be (K, n, C), got shape {memory.shape}')
  if strategy not in STRATEGIES:
    raise ValueError(f'update_memory: strategy must be one of {STRATEGIES}, got {strategy!r}')
  if strategy == 'mean' and memory.shape[1] > 1:
    raise ValueError("update_memory: strategy 'mean' is only defined for num_feats_per_cls == 1 "
                     '(the reference asserts this too)')
  if labels.ndim != 3:
    raise ValueError(f'update_memory: labels must be (B, H, W), got shape {labels.shape}')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'update_memory: labels must be integers, got dtype {labels.dtype}')


def _valid_labels(labels, num_classes, ignore_index):
  # Labels outside [0, K) other than the ignore label make the reference fail with an index
  # error; the data pipeline never produces them. Here they are simply not counted.
  return (labels != ignore_index) & (labels >= 0) & (labels < num_classes)


def _combine(memory, present, class_mean, slot_update, momentum):
  """Lazy init / momentum step / untouched, chosen per class and slot.

  memory (K, n, C); present (K,) bool; class_mean (K, C); slot_update (K, n, C) the a_c of each
  slot (only read for classes that are present and have no all-zero slot).
  """
  n = memory.shape[1]
  zero_slot = jnp.all(memory == 0, axis=-1)                            # (K, n)
  has_zero = jnp.any(zero_slot, axis=-1)                               # (K,)
  first_zero = jnp.argmax(zero_slot, axis=-1)                          # (K,) first True
  init = (present & has_zero)[:, None] & (jnp.arange(n)[None, :] == first_zero[:, None])
  step = jnp.broadcast_to((present & ~has_zero)[:, None], zero_slot.shape)
  m = jnp.asarray(momentum, jnp.float32)
  stepped = (1 - m) * memory + m * slot_update
  new = jnp.where(step[..., None], stepped, memory)
  return jnp.where(init[..., None], class_mean[:, None, :].astype(jnp.float32), new)


def _safe_divide(num, den):
  return num / jnp.where(den == 0, 1, den)


def update_memory(memory, features, labels, *, momentum, ignore_index: int = 255,
                  strategy: str = 'cosine_similarity'):
  """The reference's `FeaturesMemory.update` as one fixed-shape graph (spec section 3).

  Args:
    memory: (K, n, C) float32, the current memory.
    features: (B, H, W, C) pixel representations F already at label resolution (the segmentor
      upsamples them bilinearly, align_corners=False). Used in float32.
    labels: (B, H, W) integer labels; `ignore_index` and values outside [0, K) are skipped.
    momentum: scalar m (Python float or traced), see `momentum_at`.
    ignore_index: the ignore label (255 in this project).
    strategy: 'cosine_similarity' (the paper) or 'mean' (n == 1 only).

  Returns:
    The new (K, n, C) float32 memory. This is the per-device update; averaging across devices
    is `sync_memory`'s job.
  """
  _check_update_args(memory, labels, strategy)
  if features.shape[:3] != labels.shape:
    raise ValueError(f'update_memory: features {features.shape} and labels {labels.shape} must '
                     'share (B, H, W): upsample the features to the label size first')
  k, n, c = memory.shape
  if features.shape[-1] != c:
    raise ValueError(f'update_memory: features have {features.shape[-1]} channels, memory {c}')
  memory = memory.astype(jnp.float32)
  x = features.astype(jnp.float32).reshape(-1, c)                      # (N, C)
  y = labels.reshape(-1)
  valid = _valid_labels(y, k, ignore_index)                            # (N,)
  y_safe = jnp.where(valid, y, 0)

  if strategy == 'mean':
    onehot = jax.nn.one_hot(jnp.where(valid, y, k), k, dtype=jnp.float32)   # (N, K)
    sums = jnp.einsum('nk,nc->kc', onehot, x, precision=_HIGHEST)
    counts = jnp.sum(onehot, axis=0)
    mean = _safe_divide(sums, counts[:, None])
    return _combine(memory, counts > 0, mean, mean[:, None, :], momentum)

  x_norm = jnp.sqrt(jnp.sum(x * x, axis=-1))                           # (N,)
  x_hat = x / jnp.maximum(x_norm, COSINE_EPS)[:, None]
  mem_norm = jnp.sqrt(jnp.sum(memory * memory, axis=-1, keepdims=True))
  mem_hat = memory / jnp.maximum(mem_norm, COSINE_EPS)                 # (K, n, C)
  if n == 1:
    slot = jnp.zeros_like(y_safe)
  else:
    # F.normalize's eps differs from the cosine's; only the argmax matters here.
    mem_unit = memory / jnp.maximum(mem_norm, NORMALIZE_EPS)
    x_unit = x / jnp.maximum(x_norm, NORMALIZE_EPS)[:, None]
    relation = jnp.einsum('nc,nsc->ns', x_unit, mem_unit[y_safe], precision=_HIGHEST)
    slot = jnp.argmax(relation, axis=-1)                               # (N,) first max
  seg = y_safe * n + slot                                              # (N,) in [0, K*n)
  # s_i against the pixel's own slot; a per-pixel gather instead of an (N, K) product.
  sim = jnp.sum(x_hat * mem_hat.reshape(k * n, c)[seg], axis=-1)       # (N,)
  onehot = jax.nn.one_hot(jnp.where(valid, seg, k * n), k * n, dtype=jnp.float32)  # (N, K*n)
  dissim = jnp.where(valid, 1 - sim, 0)
  total = jnp.einsum('ns,n->s', onehot, dissim, precision=_HIGHEST)    # (K*n,)
  weight = jnp.where(valid, dissim / jnp.where(total == 0, 1, total)[seg], 0)
  # One pass over the pixels gives both the weighted and the plain per-slot sums.
  both = jnp.einsum('ns,nc->sc', jnp.concatenate([onehot * weight[:, None], onehot], axis=1), x,
                    precision=_HIGHEST)
  weighted, slot_sums = both[:k * n], both[k * n:]                     # (K*n, C) each
  counts = jnp.sum(onehot, axis=0)                                     # (K*n,)
  slot_mean = _safe_divide(slot_sums, counts[:, None])
  # total == 0: either an empty slot (slot_mean is then 0, the reference's empty sum) or every
  # pixel exactly aligned with the stored vector (the reference's 0/0 NaN; see module doc).
  slot_update = jnp.where((total != 0)[:, None], weighted, slot_mean).reshape(k, n, c)
  class_counts = counts.reshape(k, n).sum(axis=1)
  class_mean = _safe_divide(slot_sums.reshape(k, n, c).sum(axis=1), class_counts[:, None])
  return _combine(memory, class_counts > 0, class_mean, slot_update, momentum)


def _bilinear_taps(in_size: int, out_size: int):
  """(i0 (out,), w0 (out,), w1 (out,)): output o = w0 * in[i0] + w1 * in[i0 + 1].

  Read off `ops.interp_matrix` so the fused update uses exactly the resize's weights. When the
  second tap falls outside the input (the clamped last row), its weight is 0 and index i0 + 1
  points into one row of edge padding.
  """
  mat = ops.interp_matrix(in_size, out_size)                           # (out, in)
  if np.any(np.count_nonzero(mat, axis=1) > 2):
    raise ValueError(f'fused memory update: resizing {in_size} -> {out_size} is not a 2-tap '
                     'bilinear interpolation')
  i0 = np.argmax(mat != 0, axis=1)
  rows = np.arange(out_size)
  w0 = mat[rows, i0]
  nxt = np.minimum(i0 + 1, in_size - 1)
  w1 = np.where(i0 + 1 < in_size, mat[rows, nxt], 0.0).astype(np.float32)
  return i0, w0.astype(np.float32), w1


def update_memory_fused(memory, features_lowres, labels, *, momentum, ignore_index: int = 255,
                        strategy: str = 'cosine_similarity'):
  """`update_memory` on features bilinearly upsampled to the labels, without upsampling them.

  Equals `update_memory(memory, ops.resize_bilinear(features_lowres, labels.shape[1:]), labels)`
  up to float32 rounding. Upsampling is linear: every output pixel is x_p = sum_t a_pt f_t over
  its 2x2 low-resolution neighbourhood (weights from `ops.interp_matrix`). So
    - per-class sums sum_{p in c} w_p x_p = sum_t (sum_{p in c} w_p a_pt) f_t come from a
      low-resolution per-class weight map (a scatter of 4 scalars per pixel) contracted with f;
    - <x_p, M_c> = sum_t a_pt <f_t, M_c> needs only the (b, h, w, K) low-resolution dot products;
    - |x_p|^2 = sum_{t,t'} a_pt a_pt' <f_t, f_t'> needs the Gram entries of the 2x2
      neighbourhoods (10 low-resolution maps).
  The largest full-resolution arrays are a handful of (B, H, W) scalar maps; nothing of size
  (B, H, W, C) or (B, H, W, K) is formed.

  Limits: num_feats_per_cls == 1 only (n > 1 falls back to the naive form, upsampling the
  features). The squared norm from the Gram expansion loses relative precision for pixels whose
  norm is tiny compared with their neighbours' (cancellation); the cosine clamps norms at 1e-8
  like torch, so agreement with the naive form assumes feature norms well above that (always the
  case for post-ReLU 512-d features that are not exactly zero).

  Args:
    memory: (K, n, C) float32.
    features_lowres: (B, h, w, C) pixel representations at feature resolution.
    labels: (B, H, W) integer labels at full resolution.
    momentum, ignore_index, strategy: as in `update_memory`.
  """
  _check_update_args(memory, labels, strategy)
  k, n, c = memory.shape
  b, h, w, cf = features_lowres.shape
  if cf != c:
    raise ValueError(f'update_memory_fused: features have {cf} channels, memory {c}')
  if labels.shape[0] != b:
    raise ValueError(f'update_memory_fused: features batch {b} != labels batch {labels.shape[0]}')
  out_h, out_w = labels.shape[1:]
  if n > 1:
    return update_memory(memory, ops.resize_bilinear(features_lowres, (out_h, out_w)), labels,
                         momentum=momentum, ignore_index=ignore_index, strategy=strategy)
  memory = memory.astype(jnp.float32)
  f = features_lowres.astype(jnp.float32)
  # One row/column of edge padding so that the second tap index i0 + 1 always exists.
  f_pad = jnp.pad(f, ((0, 0), (0, 1), (0, 1), (0, 0)), mode='edge')   # (B, h+1, w+1, C)
  hi0, hw0, hw1 = _bilinear_taps(h, out_h)
  wi0, ww0, ww1 = _bilinear_taps(w, out_w)
  # The four taps of every output pixel: (row offset, column offset, weight (H, W)).
  taps = [(0, 0, np.outer(hw0, ww0)), (0, 1, np.outer(hw0, ww1)),
          (1, 0, np.outer(hw1, ww0)), (1, 1, np.outer(hw1, ww1))]
  y = labels
  valid = _valid_labels(y, k, ignore_index)                            # (B, H, W)
  y_safe = jnp.where(valid, y, 0)
  bidx = jnp.arange(b)[:, None, None]
  rows = jnp.asarray(hi0)[None, :, None]
  cols = jnp.asarray(wi0)[None, None, :]
  hp, wp = h + 1, w + 1

  def flat_index(dr, dc):                                              # (B, H, W) into (B, hp, wp)
    return (bidx * hp + rows + dr) * wp + cols + dc

  def scatter_maps(pixel_weights):
    """sum_p [y_p = c] v_p a_pt for each low-res t: (B, hp, wp, K) per pixel weight map v_p."""
    acc = jnp.zeros((b * hp * wp * (k + 1),), jnp.float32)
    cls = jnp.where(valid, y, k)                                       # bin K collects the rest
    for dr, dc, a in taps:
      idx = flat_index(dr, dc) * (k + 1) + cls
      acc = acc.at[idx.reshape(-1)].add((pixel_weights * jnp.asarray(a)).reshape(-1))
    return acc.reshape(b, hp, wp, k + 1)[..., :k]

  def contract(weight_map):                                            # -> (K, C)
    return jnp.einsum('bhwk,bhwc->kc', weight_map, f_pad, precision=_HIGHEST)

  ones = valid.astype(jnp.float32)
  counts = jnp.zeros((k + 1,), jnp.float32).at[jnp.where(valid, y, k).reshape(-1)].add(
      ones.reshape(-1))[:k]
  mean = _safe_divide(contract(scatter_maps(ones)), counts[:, None])   # (K, C)
  if strategy == 'mean':
    return _combine(memory, counts > 0, mean, mean[:, None, :], momentum)

  mem = memory[:, 0, :]                                                # (K, C)
  mem_hat = mem / jnp.maximum(jnp.sqrt(jnp.sum(mem * mem, -1, keepdims=True)), COSINE_EPS)
  dots = jnp.einsum('bhwc,kc->bhwk', f_pad, mem_hat, precision=_HIGHEST).reshape(-1)
  # <x_p, m_hat_{y_p}> and |x_p|^2 from low-resolution quantities.
  dot = 0.0
  for dr, dc, a in taps:
    dot = dot + jnp.asarray(a) * dots[flat_index(dr, dc) * k + y_safe]
  corners = [(0, 0), (0, 1), (1, 0), (1, 1)]
  shifted = [f_pad[:, dr:, dc:][:, :h, :w] for dr, dc in corners]     # f at (i+dr, j+dc)
  shifted = [jnp.pad(s, ((0, 0), (0, 1), (0, 1), (0, 0))) for s in shifted]  # back to (hp, wp)
  sq_norm = 0.0
  for t1 in range(4):
    for t2 in range(t1, 4):
      gram = jnp.sum(shifted[t1] * shifted[t2], axis=-1).reshape(-1)   # (B*hp*wp,)
      coef = taps[t1][2] * taps[t2][2] * (1.0 if t1 == t2 else 2.0)
      sq_norm = sq_norm + jnp.asarray(coef, jnp.float32) * gram[flat_index(0, 0)]
  x_norm = jnp.sqrt(jnp.maximum(sq_norm, 0.0))
  sim = dot / jnp.maximum(x_norm, COSINE_EPS)                          # (B, H, W)
  dissim = jnp.where(valid, 1 - sim, 0)
  total = jnp.zeros((k + 1,), jnp.float32).at[jnp.where(valid, y, k).reshape(-1)].add(
      dissim.reshape(-1))[:k]
  weight = jnp.where(valid, dissim / jnp.where(total == 0, 1, total)[y_safe], 0)
  weighted = contract(scatter_maps(weight))
  slot_update = jnp.where((total != 0)[:, None], weighted, mean)[:, None, :]
  return _combine(memory, counts > 0, mean, slot_update, momentum)


def sync_memory(memory, axis_name: str):
  """Average the per-device memories over `axis_name` (inside shard_map / pmap).

  `memory` is the (K, n, C) array or any pytree of them (e.g. a whole `'memory'` collection).

  This is the reference's all-reduce of M / world_size after every update. Because each device
  updated M from its own images only: a class absent on a device enters the mean with that
  device's unchanged row (effective momentum m * #devices-with-c / #devices), and a class
  lazily initialised on some devices is averaged with the zeros of the others (the synced row
  is non-zero, so it never re-enters the init branch). The reference divides before summing;
  `pmean` sums then divides, a last-bit rounding difference.
  """
  return lax.pmean(memory, axis_name)


# ----------------------------------------------------------------------------------------- loss
def memory_loss(preds_memory, num_feats_per_cls: int):
  """Representation-consistency loss: memory rows classified as their own class (spec 4).

  Args:
    preds_memory: (K * n, K) logits of decoder_stage2 applied to the memory rows in (k, slot)
      order, i.e. `memory.reshape(K * n, C)`.
    num_feats_per_cls: n.

  Returns:
    Mean cross-entropy, float32, with target k for rows k*n ... k*n + n - 1.
  """
  rows, k = preds_memory.shape
  if rows != k * num_feats_per_cls:
    raise ValueError(f'memory_loss: got {rows} rows of {k} logits, expected '
                     f'K * num_feats_per_cls = {k * num_feats_per_cls}')
  logp = jax.nn.log_softmax(preds_memory.astype(jnp.float32), axis=-1)
  target = jnp.repeat(jnp.arange(k), num_feats_per_cls)
  return -jnp.mean(jnp.take_along_axis(logp, target[:, None], axis=-1))


# --------------------------------------------------------------------------------------- module
class FeaturesMemory(nn.Module):
  """The memory module of MCIBI: memory variable + the read path's parameters (spec 1.2 item 5).

  Variables: `memory/memory` (K, n, C) float32 zeros; params and batch_stats of the submodules
  'self_attention' (n == 1) or 'self_attentions_{i}' + 'fuse_memory_conv' (n > 1), 'bottleneck',
  and with context within the image 'self_attention_ms', 'bottleneck_ms' (names follow the
  reference's `memory_module.*` state_dict).
  """
  num_classes: int
  feats_channels: int = 512
  transform_channels: int = 256
  out_channels: int = 512
  num_feats_per_cls: int = 1
  use_hard_aggregate: bool = False
  use_context_within_image: bool = True
  act: str = 'relu'
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _memory_shape(self):
    return (self.num_classes, self.num_feats_per_cls, self.feats_channels)

  def _attention(self, name):
    return SelfAttentionBlock(transform_channels=self.transform_channels,
                              out_channels=self.feats_channels, act=self.act, train=self.train,
                              axis_name=self.axis_name, bn_momentum=self.bn_momentum,
                              bn_eps=self.bn_eps, dtype=self.dtype, conv_impl=self.conv_impl,
                              name=name)

  def _cbr(self, features, kernel_size, name):
    return ConvBNAct(features, kernel_size, act=self.act, train=self.train,
                     axis_name=self.axis_name, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                     dtype=self.dtype, conv_impl=self.conv_impl, name=name)

  @nn.compact
  def __call__(self, feats, preds, feats_ms=None, valid=None, *,
               memory_values=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Read the memory and fuse it with the pixel representations.

    Args:
      feats: (B, H, W, C) pixel representations F (the head's bottleneck output).
      preds: (B, H, W, K) coarse logits (decoder_stage1).
      feats_ms: (B, H, W, C) context-within-image features (ASPP/PPM); required when
        `use_context_within_image`.
      valid: None, or (B, 2) the true sizes of zero-padded inputs (layers.py): attention keys
        and 3x3 inputs are then restricted to the valid region.
      memory_values: None (read the memory variable), or (memory before, memory after) this
        step's update when the update already ran (training): the read uses the first, its
        gradient the second (`_read_with_grad_memory`).

    Returns:
      (memory (K, n, C) float32 as data, memory_output (B, H, W, out_channels)).
    """
    if self.num_feats_per_cls < 1:
      raise ValueError(f'model.memory.num_feats_per_cls must be >= 1, got {self.num_feats_per_cls}')
    if feats.shape[-1] != self.feats_channels:
      raise ValueError(f'FeaturesMemory: feats have {feats.shape[-1]} channels, '
                       f'feats_channels is {self.feats_channels}')
    if preds.shape[:3] != feats.shape[:3] or preds.shape[-1] != self.num_classes:
      raise ValueError(f'FeaturesMemory: preds {preds.shape} must be (B, H, W, num_classes='
                       f'{self.num_classes}) with the (B, H, W) of feats {feats.shape}')
    memory = self.variable('memory', 'memory',
                           lambda: jnp.zeros(self._memory_shape(), jnp.float32))
    memory_value, grad_memory = lax.stop_gradient(memory.value), None
    if memory_values is not None:
      memory_value, grad_memory = (lax.stop_gradient(m) for m in memory_values)
    gathered = aggregate(memory_value, preds, use_hard=self.use_hard_aggregate,
                         grad_memory=grad_memory)                                 # (n,B,H,W,C)
    gathered = gathered.astype(self.dtype)
    if self.num_feats_per_cls > 1:
      attended = [self._attention(f'self_attentions_{i}')(feats, gathered[i], valid)
                  for i in range(self.num_feats_per_cls)]
      selected = self._cbr(self.feats_channels, 1, 'fuse_memory_conv')(
          jnp.concatenate(attended, axis=-1))
    else:
      selected = self._attention('self_attention')(feats, gathered[0], valid)
    memory_output = self._cbr(self.out_channels, 3, 'bottleneck')(
        jnp.concatenate([feats, selected], axis=-1), valid)
    if self.use_context_within_image:
      if feats_ms is None:
        raise ValueError('FeaturesMemory: use_context_within_image is on but feats_ms is None')
      attended_ms = self._attention('self_attention_ms')(feats, feats_ms, valid)
      # Order as in the reference: the attended context first, then the memory output.
      memory_output = self._cbr(self.out_channels, 3, 'bottleneck_ms')(
          jnp.concatenate([attended_ms, memory_output], axis=-1), valid)
    return memory_value, memory_output

  def update(self, features, labels, *, momentum, ignore_index: int = 255,
             strategy: str = 'cosine_similarity', fused: bool = False):
    """Update the memory variable from this device's batch and return the new memory.

    `features` are F at label resolution ((B, H, W, C), as `update_memory` takes them), or with
    `fused=True` F at feature resolution ((B, h, w, C), `update_memory_fused`). Call it inside
    `apply(..., mutable=['memory', ...])` (a parent module calls
    `self.memory_module.update(...)`), before `__call__` with `memory_values=(old, new)` (the
    segmentor does: the update does not depend on the read, and the read's gradient needs the
    new memory, `_read_with_grad_memory`) or after a plain `__call__`. During `init` the
    memory stays zero (as the reference's starts), whatever the init call does. Averaging
    across devices is left to the train step (`sync_memory`).
    """
    if self.has_variable('memory', 'memory'):
      memory = self.get_variable('memory', 'memory')
    else:
      memory = jnp.zeros(self._memory_shape(), jnp.float32)
      self.put_variable('memory', 'memory', memory)
    if self.is_initializing():
      return memory
    fn = update_memory_fused if fused else update_memory
    new_memory = fn(memory, lax.stop_gradient(features), labels, momentum=momentum,
                    ignore_index=ignore_index, strategy=strategy)
    self.put_variable('memory', 'memory', new_memory)
    return new_memory


# ============================================================= MCIBI++: the distribution memory
NOISE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'data',
                          'mcibipp_noise.npy')


@functools.lru_cache(maxsize=1)
def _noise_table() -> np.ndarray:
  if not os.path.exists(NOISE_FILE):
    raise FileNotFoundError(f'{NOISE_FILE} is missing: reinstall memseg_jax or run '
                            'scripts/make_mcibipp_noise.py')
  table = np.load(NOISE_FILE)
  table.setflags(write=False)
  return table


def memory_noise(num_classes: int, channels: int) -> np.ndarray:
  """The fixed (K, C) standard-normal matrix z of the MCIBI++ read (float32, read-only).

  Row c is the reference's draw after `torch.manual_seed(c)`. The stored table has 182 rows
  and 512 columns; a narrower C (a multiple of 16) is a prefix of each row, exactly what the
  reference draws for that width (ATen's vectorised normal kernel; see
  scripts/make_mcibipp_noise.py). Other widths are refused: the reference's draw for them is
  not a prefix, and no released model uses one.
  """
  table = _noise_table()
  rows, cols = table.shape
  if not 0 < num_classes <= rows:
    raise ValueError(f'model.num_classes={num_classes}: the MCIBI++ memory noise is stored for '
                     f'at most {rows} classes ({NOISE_FILE})')
  if not (0 < channels <= cols and channels % 16 == 0):
    raise ValueError(f'model.head.feats_channels={channels}: the MCIBI++ memory noise exists '
                     f'for multiples of 16 up to {cols} channels')
  return table[:num_classes, :channels]


def init_distribution_memory(num_classes: int):
  """(K, 2) float32 [mean, std] = (0, 1) per class, the reference's initial memory."""
  return jnp.tile(jnp.asarray([[0.0, 1.0]], jnp.float32), (num_classes, 1))


def _without_contraction(x):
  """x, in a form the compiler cannot fuse with a following add into a fused multiply-add.

  XLA:CPU always allows LLVM to contract a multiply and an add into an FMA (one rounding
  instead of two), and fuses `z * std + mean` into one loop, where that happens (measured:
  ~25k of 93k entries then differ from PyTorch's two-op result in the last bit). A select on
  the product's NaN-ness returns the product itself for every value, but stands between the
  multiply and the add, so codegen keeps the two roundings.
  """
  return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def read_distribution_memory(memory, noise):
  """The (K, C) read vectors mean_c + std_c * z_c, rounded as the reference rounds them.

  Args:
    memory: (K, 2) float32 [mean, std].
    noise: (K, C) float32 z (`memory_noise`).
  """
  if memory.ndim != 2 or memory.shape[1] != 2 or noise.shape[0] != memory.shape[0]:
    raise ValueError(f'read_distribution_memory: memory {memory.shape} must be (K, 2) and the '
                     f'noise {noise.shape} (K, C)')
  memory = memory.astype(jnp.float32)
  # torch: normal_(0, 1), then mul_(std), then add_(mean): two float32 roundings.
  scaled = _without_contraction(jnp.asarray(noise, jnp.float32) * memory[:, 1:2])
  return scaled + memory[:, 0:1]


def _distribution_step(memory, class_mean, counts, momentum):
  """(K, 2) memory after the momentum step of every class with counts > 0 (others bit-equal)."""
  c = class_mean.shape[-1]
  mu = jnp.mean(class_mean, axis=-1)                                     # (K,)
  sigma = jnp.sqrt(jnp.sum(jnp.square(class_mean - mu[:, None]), axis=-1) / (c - 1))
  m = jnp.asarray(momentum, jnp.float32)
  stepped = (1 - m) * memory + m * jnp.stack([mu, sigma], axis=-1)
  return jnp.where((counts > 0)[:, None], stepped, memory)


def _check_distribution_args(memory, labels, what):
  if memory.ndim != 2 or memory.shape[1] != 2:
    raise ValueError(f'{what}: memory must be (K, 2) [mean, std], got shape {memory.shape}')
  if labels.ndim != 3:
    raise ValueError(f'{what}: labels must be (B, H, W), got shape {labels.shape}')
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f'{what}: labels must be integers, got dtype {labels.dtype}')


def update_distribution_memory(memory, features, labels, *, momentum, ignore_index: int = 255):
  """The reference's `FeaturesMemoryV2.update` on features at label resolution (one graph).

  Args:
    memory: (K, 2) float32 [mean, std].
    features: (B, H, W, C) pixel representations, already upsampled to the labels.
    labels: (B, H, W) integers; `ignore_index` and values outside [0, K) are skipped.
    momentum: m (Python float or traced scalar).
    ignore_index: the ignore label.

  Returns:
    The new (K, 2) memory of this device (averaging across devices: `sync_memory`).
  """
  what = 'update_distribution_memory'
  _check_distribution_args(memory, labels, what)
  if features.shape[:3] != labels.shape:
    raise ValueError(f'{what}: features {features.shape} and labels {labels.shape} must share '
                     '(B, H, W): upsample the features to the label size first')
  k, c = memory.shape[0], features.shape[-1]
  x = features.astype(jnp.float32).reshape(-1, c)                        # (N, C)
  y = labels.reshape(-1)
  valid = _valid_labels(y, k, ignore_index)
  onehot = jax.nn.one_hot(jnp.where(valid, y, k), k, dtype=jnp.float32)  # (N, K)
  sums = jnp.einsum('nk,nc->kc', onehot, x, precision=_HIGHEST)
  counts = jnp.sum(onehot, axis=0)
  return _distribution_step(memory.astype(jnp.float32),
                            _safe_divide(sums, counts[:, None]), counts, momentum)


def _upsampled_class_sums(features_lowres, labels, num_classes: int, ignore_index: int):
  """(sums (K, C), counts (K,)) of F upsampled bilinearly to the labels, without upsampling.

  Output pixel p of the upsampled map is x_p = sum_t a_pt f_t over its 2x2 low-resolution
  neighbourhood (weights of `ops.interp_matrix`), so sum_{p in c} x_p = sum_t W_c[t] f_t with
  the low-resolution weight map W_c[t] = sum_{p in c} a_pt: a scatter of four scalars per
  pixel, then one (K, pixels) x (pixels, C) product. Nothing of size (B, H, W, C) is formed.
  """
  k = num_classes
  b, h, w, _ = features_lowres.shape
  out_h, out_w = labels.shape[1:]
  f_pad = jnp.pad(features_lowres.astype(jnp.float32), ((0, 0), (0, 1), (0, 1), (0, 0)),
                  mode='edge')                                           # (B, h+1, w+1, C)
  hi0, hw0, hw1 = _bilinear_taps(h, out_h)
  wi0, ww0, ww1 = _bilinear_taps(w, out_w)
  valid = _valid_labels(labels, k, ignore_index)                         # (B, H, W)
  cls = jnp.where(valid, labels, k)                                      # bin K collects the rest
  hp, wp = h + 1, w + 1
  base = ((jnp.arange(b)[:, None, None] * hp + jnp.asarray(hi0)[None, :, None]) * wp
          + jnp.asarray(wi0)[None, None, :])                 # (B, H, W) indices into (B, hp, wp)
  weights = jnp.zeros((b * hp * wp * (k + 1),), jnp.float32)
  for dr, dc, a in ((0, 0, np.outer(hw0, ww0)), (0, 1, np.outer(hw0, ww1)),
                    (1, 0, np.outer(hw1, ww0)), (1, 1, np.outer(hw1, ww1))):
    idx = ((base + dr * wp + dc) * (k + 1) + cls).reshape(-1)
    weights = weights.at[idx].add(jnp.broadcast_to(jnp.asarray(a), labels.shape).reshape(-1))
  weights = weights.reshape(b, hp, wp, k + 1)[..., :k]
  sums = jnp.einsum('bhwk,bhwc->kc', weights, f_pad, precision=_HIGHEST)
  counts = jnp.zeros((k + 1,), jnp.float32).at[cls.reshape(-1)].add(1.0)[:k]
  return sums, counts


def update_distribution_memory_fused(memory, features_lowres, labels, *, momentum,
                                     ignore_index: int = 255):
  """`update_distribution_memory` of the upsampled features, from the low-resolution ones.

  Equals `update_distribution_memory(memory, ops.resize_bilinear(features_lowres,
  labels.shape[1:]), labels, ...)` up to float32 summation order: the class mean is linear in
  the features (`_upsampled_class_sums`), and the update reads nothing else.

  Args:
    memory: (K, 2) float32.
    features_lowres: (B, h, w, C) pixel representations at feature resolution.
    labels: (B, H, W) integer labels at full resolution.
    momentum, ignore_index: as in `update_distribution_memory`.
  """
  what = 'update_distribution_memory_fused'
  _check_distribution_args(memory, labels, what)
  if features_lowres.shape[0] != labels.shape[0]:
    raise ValueError(f'{what}: features batch {features_lowres.shape[0]} != labels batch '
                     f'{labels.shape[0]}')
  sums, counts = _upsampled_class_sums(features_lowres, labels, memory.shape[0], ignore_index)
  return _distribution_step(memory.astype(jnp.float32),
                            _safe_divide(sums, counts[:, None]), counts, momentum)


class FeaturesMemoryV2(nn.Module):
  """The MCIBI++ memory module: (K, 2) memory variable + the read path's parameters.

  Variables: `memory/memory` (K, 2) float32 = (0, 1); params and batch_stats of
  'self_attention', 'bottleneck' and, with `downsample_before_sa`, 'downsample_before_sa'
  (the reference's `memory_module.*` names).
  """
  num_classes: int
  feats_channels: int = 512
  transform_channels: int = 256
  out_channels: int = 512
  use_hard_aggregate: bool = False
  downsample_before_sa: bool = False
  act: str = 'relu'
  train: bool = False
  axis_name: Optional[str] = None
  bn_momentum: float = 0.1
  bn_eps: float = 1e-5
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def _cbr(self, features, kernel_size, name, stride=1):
    return ConvBNAct(features, kernel_size, stride=stride, act=self.act, train=self.train,
                     axis_name=self.axis_name, bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                     dtype=self.dtype, conv_impl=self.conv_impl, name=name)

  @nn.compact
  def __call__(self, feats, preds, valid=None) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """Read the memory and fuse it with the pixel representations.

    Args:
      feats: (B, H, W, C) pixel representations F.
      preds: (B, H, W, K) gathering logits (decoder_pr's or decoder_cwi's).
      valid: None, or (B, 2) the true sizes of zero-padded inputs (layers.py).

    Returns:
      (the (K, C) float32 read vectors, memory_output (B, H, W, out_channels)).
    """
    if feats.shape[-1] != self.feats_channels:
      raise ValueError(f'FeaturesMemoryV2: feats have {feats.shape[-1]} channels, '
                       f'feats_channels is {self.feats_channels}')
    if preds.shape[:3] != feats.shape[:3] or preds.shape[-1] != self.num_classes:
      raise ValueError(f'FeaturesMemoryV2: preds {preds.shape} must be (B, H, W, num_classes='
                       f'{self.num_classes}) with the (B, H, W) of feats {feats.shape}')
    noise = memory_noise(self.num_classes, self.feats_channels)
    memory = self.variable('memory', 'memory', lambda: init_distribution_memory(self.num_classes))
    read = read_distribution_memory(lax.stop_gradient(memory.value), noise)   # (K, C)
    # The gathering weights are not detached: gradients reach the decoder of `preds`.
    selected = aggregate(read[:, None, :], preds, use_hard=self.use_hard_aggregate)[0]
    selected = selected.astype(self.dtype)                               # (B, H, W, C)
    feats_in, selected_in, valid_in = feats, selected, valid
    if self.downsample_before_sa:
      # One module applied to both inputs (its BN statistics move twice per training step).
      down = self._cbr(self.feats_channels, 3, 'downsample_before_sa', stride=2)
      feats_in, selected_in = down(feats, valid), down(selected, valid)
      valid_in = downsample_valid(valid, 2)
    attention = SelfAttentionBlock(transform_channels=self.transform_channels,
                                   out_channels=self.feats_channels, act=self.act,
                                   train=self.train, axis_name=self.axis_name,
                                   bn_momentum=self.bn_momentum, bn_eps=self.bn_eps,
                                   dtype=self.dtype, conv_impl=self.conv_impl,
                                   name='self_attention')
    selected = attention(feats_in, selected_in, valid_in)
    if self.downsample_before_sa:
      selected = resize_bilinear_valid(selected, feats.shape[1:3], valid_in, valid)
    memory_output = self._cbr(self.out_channels, 3, 'bottleneck')(
        jnp.concatenate([feats, selected], axis=-1), valid)
    return read, memory_output

  def update(self, features, labels, *, momentum, ignore_index: int = 255, fused: bool = True):
    """Update the memory variable from this device's batch and return the new (K, 2) memory.

    `features` are F at feature resolution ((B, h, w, C)) with `fused` (default), else
    already upsampled to the labels. Call it inside `apply(..., mutable=['memory', ...])` after
    `__call__`; during `init` the memory keeps its initial (0, 1).
    """
    if self.has_variable('memory', 'memory'):
      memory = self.get_variable('memory', 'memory')
    else:
      memory = init_distribution_memory(self.num_classes)
      self.put_variable('memory', 'memory', memory)
    if self.is_initializing():
      return memory
    fn = update_distribution_memory_fused if fused else update_distribution_memory
    new_memory = fn(memory, lax.stop_gradient(features), labels, momentum=momentum,
                    ignore_index=ignore_index)
    self.put_variable('memory', 'memory', new_memory)
    return new_memory
