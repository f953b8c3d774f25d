"""MCIBI / DeepLabV3 modules: outputs per mode, the training-time memory path, SyncBN plumbing.

(Numerical parity with the reference is in test_mcibi_parity.py.)
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from memseg_jax import ops
from memseg_jax.models import build_model
from memseg_jax.models import memory as memory_lib
from tests import reference_utils as ru

K = 5


def _config(name='mcibi', **kwargs):
  config = ru.project_config(model=name, num_classes=K, depth=18, **kwargs)
  m = config.model
  # Narrow heads keep these tests fast; the structure is unchanged.
  m.head.feats_channels = m.memory.out_channels = m.auxiliary.channels = 32
  m.memory.transform_channels = 16
  return config


def _init(model, images, seed=0):
  """Random variables of the model's shapes (numpy; `model.init` would compile the RNG-heavy
  initialiser, slow on the CPU and irrelevant here): fan-in scaled kernels, BN near identity."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), images)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      return rng.normal(size=leaf.shape).astype(np.float32) / np.sqrt(np.prod(leaf.shape[:-1]))
    if name in ('scale', 'var'):
      return rng.uniform(0.8, 1.25, size=leaf.shape).astype(np.float32)
    if name in ('bias', 'mean'):
      return 0.1 * rng.normal(size=leaf.shape).astype(np.float32)
    return np.zeros(leaf.shape, np.float32)    # the memory starts empty

  return jax.tree_util.tree_map_with_path(fill, shapes)


def _images(b=2, h=32, w=40, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, h, w, 3))


def _labels(b=2, h=32, w=40, seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, h, w), 0, K)


@pytest.mark.parametrize('name', ['mcibi', 'deeplabv3'])
def test_eval_and_train_outputs(name):
  config = _config(name, dropout=0.0, aux_dropout=0.0)
  model = build_model(config)
  images = _images(h=29, w=42)
  variables = _init(model, images)
  expected = {'params', 'batch_stats', 'memory'} if name == 'mcibi' else {'params', 'batch_stats'}
  assert set(variables) == expected
  low = (2, math.ceil(29 / 8), math.ceil(42 / 8), K)
  out = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  assert set(out) == {'logits'} and out['logits'].shape == low
  out, _ = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images)
  keys = {'logits', 'preds_aux'} | ({'preds_stage1', 'memory_input'} if name == 'mcibi' else set())
  assert set(out) == keys
  assert all(out[k].shape == low for k in keys - {'memory_input'})


def test_training_forward_updates_memory_and_runs_decoder_stage2_on_it():
  config = _config(dropout=0.0, aux_dropout=0.0)
  model = build_model(config)
  images, labels = _images(), _labels()
  variables = _init(model, images)
  lr = 0.005

  def run(memory_loss):
    return jax.jit(lambda v: model.apply(v, images, train=True, labels=labels, lr=lr,
                                         memory_loss=memory_loss,
                                         mutable=['batch_stats', 'memory']))(variables)

  out, state = run(True)
  out_no_loss, state_no_loss = run(False)
  memory = state['memory']['memory_module']['memory']
  # The update equals the pure function on the bottleneck features upsampled to the labels.
  features = ops.resize_bilinear(out['memory_input'].astype(jnp.float32), labels.shape[1:])
  expected = memory_lib.update_memory(
      variables['memory']['memory_module']['memory'], features, labels,
      momentum=memory_lib.momentum_at(lr, base_momentum=0.9, base_lr=0.01,
                                      adjust_by_learning_rate=True))
  np.testing.assert_allclose(memory, expected, rtol=1e-6, atol=1e-6)
  assert np.abs(np.asarray(memory)).sum() > 0
  # The memory loss classifies the *updated* rows with decoder_stage2 (train-mode BN).
  assert out['preds_memory'].shape == (K, K)
  # decoder_stage2's BN statistics move a second time (over the K memory rows); no other BN does.
  flat = flax.traverse_util.flatten_dict(state['batch_stats'])
  flat_no_loss = flax.traverse_util.flatten_dict(state_no_loss['batch_stats'])
  moved = {k[:-1] for k in flat if not np.array_equal(flat[k], flat_no_loss[k])}
  assert moved == {('decoder_stage2', 'bn')}
  row_mean = memory.reshape(K, -1) @ variables['params']['decoder_stage2']['conv']['kernel'][0, 0]
  np.testing.assert_allclose(
      flat[('decoder_stage2', 'bn', 'mean')],
      0.9 * flat_no_loss[('decoder_stage2', 'bn', 'mean')] + 0.1 * row_mean.mean(0),
      rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(out['logits'], out_no_loss['logits'])


def test_memory_loss_gradient_reaches_decoder_stage2_only_through_params():
  config = _config(dropout=0.0, aux_dropout=0.0)
  model = build_model(config)
  images, labels = _images(), _labels()
  variables = _init(model, images)
  variables = {**variables, 'memory': jax.tree_util.tree_map(
      lambda m: jax.random.uniform(jax.random.PRNGKey(5), m.shape), variables['memory'])}

  def loss(params):
    out, _ = model.apply({**variables, 'params': params}, images, train=True, labels=labels,
                         lr=0.01, memory_loss=True, mutable=['batch_stats', 'memory'])
    return memory_lib.memory_loss(out['preds_memory'], 1)

  grads = flax.traverse_util.flatten_dict(jax.jit(jax.grad(loss))(variables['params']))
  nonzero = {k[0] for k, g in grads.items() if np.abs(np.asarray(g)).max() > 0}
  # The updated memory is detached data: only decoder_stage2 sees this loss.
  assert nonzero == {'decoder_stage2'}


def test_sync_batchnorm_over_a_mesh_matches_one_device_with_the_whole_batch():
  config = _config(dropout=0.0, aux_dropout=0.0)
  images = _images(b=4, h=32, w=32)
  single = build_model(config)
  variables = _init(single, images)
  ref, ref_state = jax.jit(lambda v, x: single.apply(v, x, train=True, mutable=['batch_stats']))(
      variables, images)

  synced = build_model(config, axis_name='data')
  mesh = Mesh(np.array(jax.devices()[:4]), ('data',))

  def step(v, x):
    out, state = synced.apply(v, x, train=True, mutable=['batch_stats'])
    return out['logits'], state['batch_stats']

  logits, stats = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(P(), P('data')),
                                        out_specs=(P('data'), P()), check_vma=False))(
                                            variables, images)
  np.testing.assert_allclose(logits, ref['logits'], rtol=1e-4, atol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(stats), jax.tree_util.tree_leaves(ref_state)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
