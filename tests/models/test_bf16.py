"""bfloat16 compute (`model.dtype = 'bfloat16'`): what stays float32, and how close it gets.

The switch runs convolutions and matmuls in bfloat16 while parameters, BatchNorm statistics,
the memory (its read weights, update and storage), softmax and losses stay float32. The
references here are the same module in float32 on the same variables.

A randomly initialised network with identity BN statistics gives logits that are mostly noise
(tiny margins between classes), which says little about a trained model. `_trained_like`
therefore calibrates every BN to the statistics of its actual inputs (one train-mode forward
with momentum 1: running = batch statistics), fills the memory with class vectors taken from
the features, and feeds piecewise-constant "scenes", so activations have realistic scales and
the logits clear winners.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import losses as losses_lib
from memseg_jax.models import build_model
from tests import reference_utils as ru

K = 8
SIZE = 64


def _config(dtype, bn_momentum=0.1):
  # configs/demo.py's network: ResNet-18-D8 with a 64-channel head (small, same structure).
  config = ru.project_config(model='mcibi', num_classes=K, depth=18, dropout=0.0, aux_dropout=0.0,
                             base_lr=0.05)
  m = config.model
  m.head.feats_channels = m.memory.out_channels = m.auxiliary.channels = 64
  m.head.dilations = (1, 2, 4, 6)
  m.memory.transform_channels = 32
  m.dtype = dtype
  m.bn_momentum = bn_momentum
  return config


def _scenes(b=2, seed=0):
  """(images (B, 64, 64, 3) normalised, labels (B, 64, 64)): class colours (varying a little
  from image to image) on 8x8-pixel blocks, plus noise."""
  rng = np.random.RandomState(seed)
  colours = rng.randn(K, 3).astype(np.float32) + 0.3 * rng.randn(b, K, 3).astype(np.float32)
  labels = np.repeat(np.repeat(rng.randint(0, K, (b, 8, 8)), 8, axis=1), 8, axis=2)
  images = (np.take_along_axis(colours, labels.reshape(b, -1, 1), axis=1).reshape(b, SIZE, SIZE, 3)
            + 0.2 * rng.randn(b, SIZE, SIZE, 3).astype(np.float32))
  return jnp.asarray(images), jnp.asarray(labels.astype(np.int32))


def _trained_like(images, labels):
  """float32 variables with calibrated BN statistics and a filled memory (see module doc)."""
  model = build_model(_config('float32', bn_momentum=1.0))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(images)
  calibrate = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  outputs, new = calibrate(variables, images)
  variables = {**variables, 'batch_stats': new['batch_stats']}
  # Memory rows: the class means of the calibrated pixel representations (what the lazy init
  # of the first update stores). F does not depend on the memory, so they stay valid below.
  feats = np.asarray(outputs['memory_input'], np.float32)                  # (B, 8, 8, C)
  low = np.asarray(labels)[:, ::8, ::8]
  rows = np.stack([feats[low == c].mean(0) if np.any(low == c) else feats.mean((0, 1, 2))
                   for c in range(K)])
  variables['memory'] = {'memory_module': {'memory': jnp.asarray(rows[:, None, :])}}
  # Again with the memory in place: the read path's BN saw only zeros the first time.
  _, new = calibrate(variables, images)
  return {**variables, 'batch_stats': new['batch_stats']}


@pytest.fixture(scope='module')
def trained_like():
  # Statistics from 8 scenes (a batch of 2 gives degenerate BN variances, e.g. in the ASPP's
  # global-pool branch, which would amplify any rounding); the tests run on 2 of them.
  images, labels = _scenes(b=8, seed=2)
  return images[:2], labels[:2], _trained_like(images, labels)


def _dtypes(tree):
  return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree)}


@pytest.mark.slow
def test_bfloat16_keeps_params_batch_stats_memory_and_outputs_float32():
  images, labels = _scenes()
  model = build_model(_config('bfloat16'))
  variables = jax.jit(lambda x: model.init(jax.random.PRNGKey(0), x))(images)
  assert _dtypes(variables) == {'float32'}

  def train_forward(v, x, y):
    return model.apply(v, x, train=True, labels=y, lr=0.05, memory_loss=True,
                       mutable=['batch_stats', 'memory'], rngs={'dropout': jax.random.PRNGKey(1)})

  outputs, new = jax.jit(train_forward)(variables, images, labels)
  assert _dtypes(new['batch_stats']) == {'float32'}
  assert _dtypes(new['memory']) == {'float32'}
  # The update really ran (lazy init from zeros) and was stored at float32 precision: the
  # stored rows are not all representable in bfloat16.
  memory = np.asarray(new['memory']['memory_module']['memory'])
  assert np.any(memory != 0)
  assert np.any(memory != memory.astype(jnp.bfloat16).astype(np.float32))
  for key in ('logits', 'preds_stage1', 'preds_aux', 'preds_memory'):
    assert outputs[key].dtype == jnp.float32, key
  losses = losses_lib.compute_losses(outputs, labels, _config('bfloat16'))
  assert _dtypes(losses) == {'float32'}

  # The computation itself is bfloat16: the convolutions (native, or per-tap matmuls) take
  # bfloat16 operands (accumulating in float32), and no float32 matmul is left apart from the
  # memory read.
  jaxpr = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
  dots = []

  def walk(jp):
    for e in jp.eqns:
      if e.primitive.name in ('dot_general', 'conv_general_dilated'):
        dots.append(tuple(str(v.aval.dtype) for v in e.invars))
      for param in e.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, 'eqns'):
            walk(sub)
          elif hasattr(sub, 'jaxpr') and hasattr(sub.jaxpr, 'eqns'):
            walk(sub.jaxpr)

  walk(jaxpr.jaxpr)
  bf16 = [d for d in dots if d == ('bfloat16', 'bfloat16')]
  f32 = [d for d in dots if d == ('float32', 'float32')]
  assert len(bf16) > 50
  assert len(f32) <= 1, f32          # aggregate(): softmax(preds) @ memory, float32 on purpose


@pytest.mark.slow
def test_bfloat16_eval_logits_close_to_float32(trained_like):
  """bf16 compute moves the logits about as much as bf16 *storage* of the weights does.

  How far bfloat16 may move the logits depends on the network's own sensitivity, so the
  yardstick is computed, not assumed: the float32 network run with its parameters rounded to
  bfloat16 (8 significant bits, the precision every bf16 operand has). This small random
  network is sensitive (even rounding only the input image to bf16 moves its logits by ~12% of
  their range, mostly through the memory attention's sharp softmax), so a fixed bound would
  either fail here or say nothing elsewhere. bf16 compute must stay within twice that
  yardstick's RMS error and lose at most 5 points of argmax agreement against it.
  """
  images, _, variables = trained_like
  f32 = build_model(_config('float32'))
  bf16 = build_model(_config('bfloat16'))
  run32 = jax.jit(lambda v, x: f32.apply(v, x, train=False)['logits'])
  ref = np.asarray(run32(variables, images))
  out = np.asarray(jax.jit(lambda v, x: bf16.apply(v, x, train=False)['logits'])(variables,
                                                                                   images))
  assert out.dtype == np.float32
  to_bf16 = lambda a: jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32)
  rounded = {**variables, 'params': jax.tree_util.tree_map(to_bf16, variables['params'])}
  yard = np.asarray(run32(rounded, images))

  def rms(a):
    return float(np.sqrt(np.mean((a - ref) ** 2)) / ref.std())

  def agreement(a):
    return float(np.mean(a.argmax(-1) == ref.argmax(-1)))

  print(f'bf16 compute: rms error {rms(out):.3f} of the logits std, argmax agreement '
        f'{agreement(out):.3f}; f32 with bf16-rounded params: {rms(yard):.3f}, '
        f'{agreement(yard):.3f}')
  # Not vacuous: the prediction varies over the image, and bfloat16 did change the numbers.
  assert np.unique(ref.argmax(-1)).size > 1
  assert rms(out) > 1e-4
  assert rms(out) <= 2 * rms(yard)
  assert agreement(out) >= agreement(yard) - 0.05


@pytest.mark.slow
def test_bfloat16_train_step_losses_finite_and_close_to_float32(trained_like):
  images, labels, variables = trained_like
  results = {}
  for dtype in ('float32', 'bfloat16'):
    config = _config(dtype)
    model = build_model(config)

    def loss_fn(params, model=model, config=config):
      outputs, new = model.apply(
          {**variables, 'params': params}, images, train=True, labels=labels, lr=0.05,
          memory_loss=True, mutable=['batch_stats', 'memory'],
          rngs={'dropout': jax.random.PRNGKey(0)})
      losses = losses_lib.compute_losses(outputs, labels, config)
      return losses['loss_total'], (losses, new)

    (_, (losses, new)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables['params'])
    results[dtype] = (jax.tree_util.tree_map(float, losses), grads, new)

  (l32, g32, n32), (l16, g16, n16) = results['float32'], results['bfloat16']
  assert set(l16) == set(l32) == {'loss_stage2', 'loss_stage1', 'loss_aux', 'loss_memory',
                                  'loss_total'}
  for name, value in l16.items():
    assert np.isfinite(value), name
    # Cross-entropies of order 1-2: bfloat16 logits move them by well under 5 %.
    assert abs(value - l32[name]) <= 5e-2 * abs(l32[name]) + 1e-3, (name, value, l32[name])
  assert _dtypes(g16) == {'float32'}
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(g16))
  assert jax.tree_util.tree_structure(g16) == jax.tree_util.tree_structure(g32)
  # The updated memory matches the float32 update closely (it is computed in float32 from
  # bfloat16 features).
  m16 = np.asarray(n16['memory']['memory_module']['memory'])
  m32 = np.asarray(n32['memory']['memory_module']['memory'])
  assert m16.dtype == np.float32
  assert np.abs(m16 - m32).max() <= 5e-2 * np.abs(m32).max()
