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

from memseg_jax import ops
from memseg_jax.models import memory as memory_lib


def cross_entropy(logits, labels, ignore_index: int = 255):
  """Mean CE over non-ignored pixels; 0 when every pixel is ignored.

  Args:
    logits: (B, h, w, K) logits at any resolution.
    labels: (B, H, W) integer labels; `ignore_index` marks pixels without a label.
  """
  logits = ops.resize_bilinear(logits.astype(jnp.float32), labels.shape[1:3])   # (B, H, W, K)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  valid = labels != ignore_index
  safe_labels = jnp.where(valid, labels, 0).astype(jnp.int32)
  nll = -jnp.take_along_axis(log_probs, safe_labels[..., None], axis=-1)[..., 0]
  count = jnp.sum(valid)
  total = jnp.sum(jnp.where(valid, nll, 0.0))
  return jnp.where(count > 0, total / jnp.maximum(count, 1), 0.0)


def compute_losses(outputs, labels, config) -> Dict[str, jnp.ndarray]:
  """Loss terms and their weighted sum 'loss_total' for the outputs of a training forward.

  MCIBI: 'loss_stage2', 'loss_stage1', 'loss_aux' (if the aux head is on) and, when the
  forward produced 'preds_memory', 'loss_memory'. DeepLabV3 and UPerNet: 'loss_cls' and
  'loss_aux'. MCIBI++: 'loss_cls', 'loss_pr', 'loss_cwi' (with a context) and 'loss_aux'.
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

  losses = {name: cross_entropy(logits, labels, ignore_index)
            for name, (logits, _) in terms.items()}
  total = sum(weight * losses[name] for name, (_, weight) in terms.items())
  if 'preds_memory' in outputs:
    losses['loss_memory'] = memory_lib.memory_loss(outputs['preds_memory'],
                                                   config.model.memory.num_feats_per_cls)
    total = total + w.memory * losses['loss_memory']
  losses['loss_total'] = total
  return losses
