"""Training losses of MCIBI / DeepLabV3: pixel cross-entropies and the memory loss.

Every pixel loss upsamples the low-resolution logits to the label size (bilinear,
align_corners=False, through `ops.resize_bilinear`) and averages the float32 cross-entropy over
the pixels whose label is not `ignore_index`, like the reference's `CrossEntropyLoss`. The
memory ("representation consistency") loss lives with the memory in
`memseg_jax.models.memory.memory_loss`; `compute_losses` only weights and sums the terms.
"""

from typing import Dict

import jax
import jax.numpy as jnp
import numpy as np

from memseg_jax import ops
from memseg_jax.models import memory as memory_lib


# Elements of one block of upsampled logits (B x rows x W x K float32) in `cross_entropy`.
_CE_BLOCK_ELEMENTS = 1 << 24


def _ce_block_rows(b: int, h: int, w: int, k: int) -> int:
  return max(1, min(h, _CE_BLOCK_ELEMENTS // max(b * w * k, 1)))


def cross_entropy(logits, labels, ignore_index: int = 255):
  """Mean CE over non-ignored pixels; 0 when every pixel is ignored.

  Args:
    logits: (B, h, w, K) logits at any resolution.
    labels: (B, H, W) integer labels; `ignore_index` marks pixels without a label.

  The logits are upsampled to the label size (`ops.resize_bilinear`'s weights, rows then
  columns) one block of rows at a time, and the block's cross-entropy is recomputed in the
  backward pass (`jax.checkpoint` inside a `lax.scan`): the (B, H, W, K) float32 logits and
  their gradient never exist whole. At 512x512 with 150 classes they would be 0.6 GiB per
  4 images and per head, live at the memory peak of the train step (the start of the backward
  pass). The arithmetic per pixel is that of upsampling everything first; only the order of
  the final sum over pixels differs.
  """
  logits = logits.astype(jnp.float32)
  b, h, w, k = logits.shape
  out_h, out_w = labels.shape[1:3]
  rows = _ce_block_rows(b, out_h, out_w, k)
  blocks = -(-out_h // rows)
  padded = blocks * rows
  i0, i1, lam = ops.resize_taps(h, out_h)
  if h == out_h:     # resize_bilinear's identity
    i0 = i1 = np.arange(out_h)
    lam = np.zeros(out_h, np.float32)
  pad = padded - out_h
  # Rows past the label's read row 0 with weight 0 and carry the ignore label.
  row_tables = (np.pad(i0, (0, pad)).reshape(blocks, rows).astype(np.int32),
                np.pad(i1, (0, pad)).reshape(blocks, rows).astype(np.int32),
                np.pad(lam, (0, pad)).reshape(blocks, rows).astype(np.float32))
  labels = jnp.pad(labels, ((0, 0), (0, pad), (0, 0)), constant_values=ignore_index)
  labels = labels.reshape(b, blocks, rows, out_w).transpose(1, 0, 2, 3)     # (n, B, rows, W)

  @jax.checkpoint
  def block_sum(logits, r0, r1, rl, block_labels):
    x = (jnp.take(logits, r0, axis=1) * (1 - rl[None, :, None, None])
         + jnp.take(logits, r1, axis=1) * rl[None, :, None, None])         # (B, rows, w, K)
    x = ops.resize_bilinear_axis(x, 2, out_w)                               # (B, rows, W, K)
    log_probs = jax.nn.log_softmax(x, axis=-1)
    valid = block_labels != ignore_index
    safe = jnp.where(valid, block_labels, 0).astype(jnp.int32)
    nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid)

  def body(carry, xs):
    total, count = carry
    block_total, block_count = block_sum(logits, *xs)
    return (total + block_total, count + block_count), None

  init = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
  (total, count), _ = jax.lax.scan(body, init, tuple(jnp.asarray(t) for t in row_tables)
                                   + (labels,))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def compute_losses(outputs, labels, config) -> Dict[str, jnp.ndarray]:
  """Loss terms and their weighted sum 'loss_total' for the outputs of a training forward.

  MCIBI: 'loss_stage2', 'loss_stage1', 'loss_aux' (if the aux head is on; 'loss_aux1',
  'loss_aux2', ... with several auxiliary heads) and, when the forward produced
  'preds_memory', 'loss_memory'. DeepLabV3 and UPerNet: 'loss_cls' and 'loss_aux'. MCIBI++:
  'loss_cls', 'loss_pr', 'loss_cwi' (with a context) and 'loss_aux'.
  Weights come from `config.loss` (stage2 also weights 'loss_cls', stage1 'loss_pr').
  """
  w = config.loss
  ignore_index = config.data.ignore_index
  if config.model.name in ('deeplabv3', 'upernet'):
    terms = {'loss_cls': (outputs['logits'], w.stage2)}
  elif config.model.name == 'mcibipp':
    terms = {'loss_cls': (outputs['logits'], w.stage2), 'loss_pr': (outputs['preds_pr'], w.stage1)}
    if 'preds_cwi' in outputs:
      terms['loss_cwi'] = (outputs['preds_cwi'], w.cwi)
  else:
    terms = {'loss_stage2': (outputs['logits'], w.stage2),
             'loss_stage1': (outputs['preds_stage1'], w.stage1)}
  if 'preds_aux' in outputs:
    terms['loss_aux'] = (outputs['preds_aux'], w.aux)
  i = 1
  while f'preds_aux{i}' in outputs:     # several auxiliary heads (ViT-L), each weighted w.aux
    terms[f'loss_aux{i}'] = (outputs[f'preds_aux{i}'], w.aux)
    i += 1

  losses = {name: cross_entropy(logits, labels, ignore_index)
            for name, (logits, _) in terms.items()}
  total = sum(weight * losses[name] for name, (_, weight) in terms.items())
  if 'preds_memory' in outputs:
    losses['loss_memory'] = memory_lib.memory_loss(outputs['preds_memory'],
                                                   config.model.memory.num_feats_per_cls)
    total = total + w.memory * losses['loss_memory']
  losses['loss_total'] = total
  return losses
