"""The optimizer against torch.optim.SGD, and one sharded train step on 8 devices against
independent single-device / numpy computations (spec sections 2, 3 item 4, 5).

Tolerances: parameters, gradients and BN statistics are float32 results of the same math
summed in a different order (SyncBN over 8 shards vs BN over one batch of 8), so they are
compared to 2e-4 of each tensor's largest magnitude; the memory to 1e-4 relative / 1e-5 absolute
against a float64 numpy re-derivation of the update rule.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from memseg_jax import losses as losses_lib
from memseg_jax import schedules, train
from memseg_jax.config_validation import load_config
from memseg_jax.models import build_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
IGNORE = 255
NUM_DEVICES = 8


def tiny_config(num_classes=5):
  """A small MCIBI (R-18, narrow head) on 32x32 crops, batch 8; no dropout, no weight decay."""
  config = load_config(CONFIGS + '/default.py')
  m = config.model
  m.num_classes = num_classes
  m.backbone.depth = 18
  m.head.feats_channels = 16
  m.head.dilations = (1, 2, 3, 4)
  m.head.dropout = 0.0
  m.memory.transform_channels = 8
  m.memory.out_channels = 16
  m.auxiliary.channels = 16
  m.auxiliary.dropout = 0.0
  config.data.crop_size = (32, 32)
  config.train.batch_size = NUM_DEVICES
  config.train.num_train_steps = 10
  config.train.weight_decay = 0.0
  return config


# -------------------------------------------------------------------------------- optimizer
def test_optimizer_matches_torch_sgd_with_coupled_weight_decay_and_changing_lr():
  config = load_config(CONFIGS + '/ade20k.py')   # momentum 0.9, weight decay 5e-4
  total = 5
  schedule = schedules.create_lr_schedule(config, total)
  tx = train.create_optimizer(config, schedule)
  rng = np.random.default_rng(0)
  params = {'conv': {'kernel': rng.normal(size=(3, 3, 2, 4)).astype(np.float32)},
            'bn': {'scale': rng.normal(size=(4,)).astype(np.float32),
                   'bias': rng.normal(size=(4,)).astype(np.float32)}}
  grads = [jax.tree_util.tree_map(lambda p: rng.normal(size=p.shape).astype(np.float32), params)
           for _ in range(4)]

  torch_params = {k: torch.tensor(v) for k, v in
                  {'k': params['conv']['kernel'], 's': params['bn']['scale'],
                   'b': params['bn']['bias']}.items()}
  for p in torch_params.values():
    p.requires_grad_(True)
  sgd = torch.optim.SGD(list(torch_params.values()), lr=config.train.lr, momentum=0.9,
                        weight_decay=5e-4, nesterov=False, dampening=0)
  lrs = []
  for t, g in enumerate(grads):
    lr = 0.01 * 0.99 * (1 - t / total) ** 0.9 + 1e-4   # spec section 5, computed here in float
    lrs.append(lr)
    for group in sgd.param_groups:
      group['lr'] = lr
    for key, value in (('k', g['conv']['kernel']), ('s', g['bn']['scale']),
                       ('b', g['bn']['bias'])):
      torch_params[key].grad = torch.tensor(value)
    sgd.step()

  opt_state = tx.init(params)
  jparams = params
  for g in grads:
    updates, opt_state = tx.update(g, opt_state, jparams)
    jparams = optax.apply_updates(jparams, updates)

  assert lrs[0] == pytest.approx(0.01) and lrs[-1] < lrs[0]
  for key, value in (('k', jparams['conv']['kernel']), ('s', jparams['bn']['scale']),
                     ('b', jparams['bn']['bias'])):
    np.testing.assert_allclose(np.asarray(value), torch_params[key].detach().numpy(),
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------- numpy memory update
def _numpy_update(memory, feats, labels, momentum, ignore_index=IGNORE):
  """Spec section 3 for n = 1, cosine_similarity, loop over classes, float64."""
  memory = memory.astype(np.float64).copy()
  x = feats.reshape(-1, feats.shape[-1]).astype(np.float64)
  y = labels.reshape(-1)
  for c in np.unique(y):
    if c == ignore_index:
      continue
    xc = x[y == c]
    if np.all(memory[c, 0] == 0):
      memory[c, 0] = xc.mean(0)
      continue
    m = memory[c, 0]
    cos = (xc / np.maximum(np.linalg.norm(xc, axis=1, keepdims=True), 1e-8)) @ (
        m / max(np.linalg.norm(m), 1e-8))
    w = (1 - cos) / np.sum(1 - cos)
    memory[c, 0] = (1 - momentum) * m + momentum * (w[:, None] * xc).sum(0)
  return memory


def _upsample_torch(feats_nhwc, size):
  """Bilinear, align_corners=False, with PyTorch (independent of memseg_jax.ops)."""
  x = torch.tensor(np.asarray(feats_nhwc, np.float64)).permute(0, 3, 1, 2)
  y = torch.nn.functional.interpolate(x, size=size, mode='bilinear', align_corners=False)
  return y.permute(0, 2, 3, 1).numpy()


def _labels():
  """8 images of 32x32: class 0 everywhere; 1 only on shards 0-3, 2 only on 4-7, 3 only on 5,
  4 nowhere; the first row of every image ignored (same count per shard)."""
  labels = np.zeros((NUM_DEVICES, 32, 32), np.int32)
  for d in range(NUM_DEVICES):
    y0, x0 = 3 + d, 2 + 2 * d
    labels[d, y0:y0 + 12, x0:x0 + 10] = 1 if d < 4 else 2
  labels[5, 20:28, 4:12] = 3
  labels[:, 0, :] = IGNORE
  return labels


def _leaf_close(a, b, what, rel=2e-4):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  scale = max(np.abs(b).max(), 1e-12)
  err = np.abs(a - b).max() / scale
  assert err <= rel, f'{what}: max |diff| / max |ref| = {err:.2e}'


@pytest.mark.slow
def test_one_sharded_step_matches_single_device_batch_and_per_shard_memory_mean():
  assert jax.device_count() == NUM_DEVICES
  config = tiny_config()
  mesh = train.create_mesh()
  schedule = schedules.create_lr_schedule(config, config.train.num_train_steps)
  tx = train.create_optimizer(config, schedule)
  state = train.create_train_state(config, jax.random.PRNGKey(0), tx)

  # Classes 0-2 start with a stored vector (cosine update), 3 and 4 with zeros (lazy init / none).
  k, c = config.model.num_classes, config.model.head.feats_channels
  memory0 = np.zeros((k, 1, c), np.float32)
  memory0[:3, 0] = np.random.default_rng(1).normal(size=(3, c))
  mem_path = [p for p, _ in jax.tree_util.tree_flatten_with_path(state.memory)[0]]
  assert len(mem_path) == 1
  state = state.replace(memory=jax.tree_util.tree_map(lambda _: jnp.asarray(memory0), state.memory))

  rng = np.random.default_rng(2)
  images = rng.normal(size=(NUM_DEVICES, 32, 32, 3)).astype(np.float32)
  labels = _labels()
  lr = float(schedule(0))
  momentum = float(schedules.memory_momentum(config, lr))
  assert momentum == pytest.approx(0.9)

  # Single device, whole batch: plain BN over the 8 images = SyncBN over 8 shards of 1.
  single = build_model(config, axis_name=None)

  def loss_fn(params):
    outputs, new_vars = single.apply(
        {'params': params, 'batch_stats': state.batch_stats, 'memory': state.memory}, images,
        train=True, labels=labels, lr=lr, memory_loss=False,
        rngs={'dropout': jax.random.PRNGKey(3)}, mutable=['batch_stats', 'memory'])
    return losses_lib.compute_losses(outputs, labels, config)['loss_total'], (outputs, new_vars)

  (_, (outputs, ref_vars)), ref_grads = jax.jit(
      jax.value_and_grad(loss_fn, has_aux=True))(state.params)

  step = train.make_train_step(config, build_model(config, axis_name='data'), tx, schedule,
                               mesh, memory_loss=False)
  params0 = jax.device_get(state.params)
  new_state, metrics = step(train.replicate(state, mesh),
                            train.shard_batch({'image': images, 'label': labels}, mesh))
  new_state = jax.device_get(new_state)

  # Gradients: with weight decay 0 the first SGD momentum buffer is exactly the gradient.
  # The memory read's gradient (towards decoder_stage1, the bottleneck and the backbone) is
  # taken with the memory after this step's update, and on each device that is its own local
  # update, as under the reference's DDP (models/mcibi.py, `_update_memory`); the whole-batch
  # run updates from all 8 images. So only the parameters after the read (and the auxiliary
  # head) have the whole-batch gradient; the others must differ from it.
  grads = new_state.opt_state[1][0].trace
  flat_ref = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(ref_grads))[0])
  after_read = ('decoder_stage2', 'memory_module', 'auxiliary_decoder')
  differ, checked = [], 0
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    if jax.tree_util.keystr(path).startswith(tuple(f"['{n}']" for n in after_read)):
      _leaf_close(g, flat_ref[path], f'grad {jax.tree_util.keystr(path)}')
      checked += 1
    else:
      ref = np.asarray(flat_ref[path])
      differ.append(np.abs(np.asarray(g) - ref).max() / max(np.abs(ref).max(), 1e-30))
  assert checked >= 10 and differ and max(differ) > 1e-2, (checked, differ)
  # ... and the parameters moved by -lr * grad.
  for (path, p1), p0, g in zip(jax.tree_util.tree_flatten_with_path(new_state.params)[0],
                               jax.tree_util.tree_leaves(params0), jax.tree_util.tree_leaves(grads)):
    np.testing.assert_allclose(p1, p0 - lr * g, rtol=1e-5, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))

  # BN running statistics (incl. decoder_stage2's) equal the whole-batch ones.
  flat_bn = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(ref_vars['batch_stats']))[0])
  for path, v in jax.tree_util.tree_flatten_with_path(new_state.batch_stats)[0]:
    _leaf_close(v, flat_bn[path], f'batch_stats {jax.tree_util.keystr(path)}')

  # Memory: each shard updates from its own image, then the mean over the 8 shards.
  feats = _upsample_torch(jax.device_get(outputs['memory_input']), (32, 32))   # (8, 32, 32, C)
  per_shard = [_numpy_update(memory0, feats[d:d + 1], labels[d:d + 1], momentum)
               for d in range(NUM_DEVICES)]
  expected = np.mean(per_shard, axis=0)
  got = np.asarray(jax.tree_util.tree_leaves(new_state.memory)[0])
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # The properties the numbers encode: class 3 (one shard) is 1/8 of its lazy-init mean,
  # class 4 (no shard) stays exactly zero, and a whole-batch update would differ.
  np.testing.assert_allclose(got[3, 0], feats[5][labels[5] == 3].mean(0) / 8, rtol=1e-4,
                             atol=1e-6)
  assert np.all(got[4] == 0)
  whole_batch = _numpy_update(memory0, feats, labels, momentum)
  assert np.abs(whole_batch - expected).max() > 100 * np.abs(got - expected).max()
  # The memory the single-device forward produced is the whole-batch update (sanity of inputs).
  np.testing.assert_allclose(np.asarray(jax.tree_util.tree_leaves(ref_vars['memory'])[0]),
                             whole_batch, rtol=1e-4, atol=1e-5)

  assert int(new_state.step) == 1
  assert float(metrics['lr']) == pytest.approx(lr)
  assert np.isfinite(float(metrics['loss_total']))
