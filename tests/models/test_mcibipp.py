"""MCIBI++ and UPerNet modules: variable layout, outputs, padded evaluation, the two update forms,
config checks and converter errors. (Numerical parity with the reference: test_mcibipp_parity.py.)
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert, losses
from memseg_jax.config_validation import ConfigError, load_config, validate
from memseg_jax.models import build_model, logits_stride
from tests import reference_utils as ru
from tests.models.test_mcibi import _init

K = 5
VARIANTS = ('fcn', 'pspnet', 'deeplabv3', 'upernet')


def _config(variant, **overrides):
  """configs/mcibipp/<variant>_ade20k.py (or configs/upernet_ade20k.py for 'upernet_baseline')
  on R-18 with a narrow head: the structure of the released models, small channel counts."""
  path = (f'{ru.REPO_ROOT}/configs/upernet_ade20k.py' if variant == 'upernet_baseline'
          else f'{ru.REPO_ROOT}/configs/mcibipp/{variant}_ade20k.py')
  config = load_config(path)
  m = config.model
  m.num_classes = K
  m.backbone.depth = 18
  m.head.feats_channels = m.memory.out_channels = m.auxiliary.channels = 16
  m.memory.transform_channels = 8
  m.mcibipp.fpn_feats_channels = 32
  m.mcibipp.fpn_out_channels = 16
  for key, value in overrides.items():
    *parents, leaf = key.split('.')
    node = config
    for part in parents:
      node = node[part]
    node[leaf] = value
  return config


def _variables(model, images, seed=0):
  variables = _init(model, images, seed=seed)
  if 'memory' in variables:   # a (mean, std) memory as after some training
    r = np.random.default_rng(seed + 1)
    variables['memory']['memory_module']['memory'] = np.stack(
        [r.normal(size=K), r.uniform(0.2, 1.5, size=K)], axis=1).astype(np.float32)
  return variables


def test_variable_layout_follows_the_reference_names():
  config = _config('upernet')
  model = build_model(config)
  shapes = jax.eval_shape(lambda x: model.init(jax.random.PRNGKey(0), x), jnp.zeros((1, 32, 32, 3)))
  params = shapes['params']
  assert shapes['memory']['memory_module']['memory'].shape == (K, 2)
  for name in ('decoder_pr', 'decoder_cwi', 'decoder_cls'):
    assert set(params[name]) == {'conv1', 'bn1', 'conv2'}
  assert params['decoder_cls']['conv1']['kernel'].shape == (3, 3, 3 * 16 + 32, 16)
  assert {f'lateral_convs_{i}' for i in range(3)} <= set(params)
  assert {f'fpn_convs_{i}' for i in range(3)} <= set(params)
  assert 'self_attention' not in params      # ADE20K UPerNet: no segmentor self-attention
  keys = {convert.torch_key(k) for k in flax.traverse_util.flatten_dict(shapes)}
  for key in ('memory_module.memory', 'decoder_cls.conv1.weight', 'decoder_cls.conv2.bias',
              'lateral_convs.2.0.weight', 'fpn_convs.0.1.running_var',
              'context_within_image_module.branches.3.1.weight',
              'memory_module.self_attention.key_project.1.0.weight', 'auxiliary_decoder.4.bias'):
    assert key in keys, key

  baseline = build_model(_config('upernet_baseline'))
  shapes = jax.eval_shape(lambda x: baseline.init(jax.random.PRNGKey(0), x),
                          jnp.zeros((1, 32, 32, 3)))
  keys = {convert.torch_key(k) for k in flax.traverse_util.flatten_dict(shapes)}
  for key in ('ppm_net.branches.0.1.weight', 'ppm_net.bottleneck.0.weight', 'decoder.0.weight',
              'decoder.1.running_mean', 'decoder.4.weight', 'decoder.4.bias',
              'lateral_convs.0.0.weight', 'fpn_convs.2.1.bias'):
    assert key in keys, key


@pytest.mark.parametrize('variant', VARIANTS + ('upernet_baseline',))
def test_train_outputs_and_loss_terms(variant):
  config = _config(variant)
  model = build_model(config)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 32, 40, 3))
  labels = jax.random.randint(jax.random.PRNGKey(1), (2, 32, 40), 0, K)
  variables = _variables(model, images)
  outputs, state = jax.jit(lambda v, x, y: model.apply(
      v, x, train=True, labels=y, lr=0.01, rngs={'dropout': jax.random.PRNGKey(2)},
      mutable=['batch_stats', 'memory']))(variables, images, labels)
  stride = logits_stride(config)
  assert stride == (4 if variant.startswith('upernet') else 8)
  assert outputs['logits'].shape == (2, 32 // stride, 40 // stride, K)
  terms = set(losses.compute_losses(outputs, labels, config))
  want = {'loss_cls', 'loss_aux', 'loss_total'}
  if variant != 'upernet_baseline':
    want |= {'loss_pr'} | ({'loss_cwi'} if variant != 'fcn' else set())
    # The memory moved: every class is present in these labels.
    old = variables['memory']['memory_module']['memory']
    assert np.all(np.asarray(state['memory']['memory_module']['memory']) != old)
  assert terms == want


@pytest.mark.parametrize('variant', ['upernet', pytest.param('fcn', marks=pytest.mark.slow)])
def test_fused_and_upsampling_updates_give_the_same_memory(variant):
  images = jax.random.normal(jax.random.PRNGKey(3), (2, 37, 45, 3))
  labels = jax.random.randint(jax.random.PRNGKey(4), (2, 37, 45), 0, K)
  memories = []
  for fused in (True, False):
    config = _config(variant, **{'model.memory.fused_update': fused})
    model = build_model(config)
    variables = _variables(model, images)
    _, state = model.apply(variables, images, train=True, labels=labels,
                           rngs={'dropout': jax.random.PRNGKey(2)},
                           mutable=['batch_stats', 'memory'])
    memories.append(np.asarray(state['memory']['memory_module']['memory']))
  np.testing.assert_allclose(memories[0], memories[1], rtol=0, atol=1e-6)


PADDED_CASES = {
    'fcn': ('fcn', {}),
    'pspnet': ('pspnet', {}),
    'deeplabv3': ('deeplabv3', {}),
    'upernet': ('upernet', {}),
    'upernet_baseline': ('upernet_baseline', {}),
    'downsample_before_sa_hard': ('deeplabv3', {'model.mcibipp.downsample_before_sa': True,
                                                'model.memory.use_hard_aggregate': True}),
}


# fcn and deeplabv3 add no layer the other cases lack (slow set only).
@pytest.mark.parametrize('case', [pytest.param(c, marks=pytest.mark.slow)
                                  if c in ('fcn', 'deeplabv3') else c
                                  for c in sorted(PADDED_CASES)])
def test_padded_forward_matches_unpadded_in_the_valid_region(case):
  variant, overrides = PADDED_CASES[case]
  config = _config(variant, **overrides)
  model = build_model(config)
  variables = _variables(model, jnp.zeros((1, 32, 32, 3)))
  stride = logits_stride(config)
  hp, wp = 64, 72
  sizes = [(37, 50), (64, 72), (9, 23)]
  rng = np.random.default_rng(3)
  # Large random values in the padding, so a missing mask shows up in the valid region.
  padded = (rng.normal(size=(len(sizes), hp, wp, 3)) * 50).astype(np.float32)
  exact = []
  forward = jax.jit(lambda v, x: model.apply(v, x, train=False)['logits'])
  for b, (h, w) in enumerate(sizes):
    image = rng.normal(size=(h, w, 3)).astype(np.float32)
    padded[b, :h, :w] = image
    exact.append(np.asarray(forward(variables, image[None])[0]))
  logits = np.asarray(jax.jit(lambda v, x, s: model.apply(v, x, train=False, valid_hw=s)[
      'logits'])(variables, padded, np.asarray(sizes, np.int32)))
  assert logits.shape == (len(sizes), hp // stride, wp // stride, K)
  for b, (h, w) in enumerate(sizes):
    ref = exact[b]
    assert ref.shape == (-(-h // stride), -(-w // stride), K)
    got = logits[b, :ref.shape[0], :ref.shape[1]]
    diff = np.max(np.abs(got - ref))
    print(f'{case} {h}x{w}: max |padded - unpadded| {diff:.2e} (max |logit| '
          f'{np.max(np.abs(ref)):.2f})')
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.max(np.abs(ref)))


@pytest.mark.parametrize('overrides,match', [
    ({'model.mcibipp.fpn_feats_channels': 48}, 'fpn_feats_channels=48 must equal'),
    ({'model.memory.use_context_within_image': False}, 'fpn=True needs'),
    ({'model.head.feats_channels': 24}, 'feats_channels=24'),
    ({'model.num_classes': 200}, 'num_classes=200'),
    ({'model.mcibipp.decoder_cls_kernel': 5}, 'decoder_cls_kernel=5'),
])
def test_config_errors_name_the_key(overrides, match):
  config = _config('upernet', **overrides)
  with pytest.raises(ConfigError, match=match):
    validate(config, 1)


def test_upernet_baseline_needs_a_ppm_head():
  config = _config('upernet_baseline', **{'model.head.type': 'aspp'})
  with pytest.raises(ConfigError, match="must be 'ppm' for model.name='upernet'"):
    validate(config, 1)


def test_converter_names_missing_unexpected_and_misshaped_keys():
  config = _config('deeplabv3')
  shapes = convert.variable_shapes(config)
  state = {}
  torch_shape = convert._torch_shape  # pylint: disable=protected-access
  for key, shape in shapes.items():
    state[convert.torch_key(key)] = np.zeros(torch_shape(shape, key[-1]), np.float32)
  convert.convert_ssseg_state_dict(state, config)        # complete: converts
  broken = dict(state)
  del broken['decoder_cwi.conv2.bias']
  broken['decoder_cwi.conv3.weight'] = np.zeros((1,), np.float32)
  broken['memory_module.memory'] = np.zeros((K, 1, 16), np.float32)   # an MCIBI (v1) memory
  with pytest.raises(ValueError) as e:
    convert.convert_ssseg_state_dict(broken, config)
  message = str(e.value)
  assert 'missing keys: decoder_cwi.conv2.bias' in message
  assert 'unexpected keys: decoder_cwi.conv3.weight' in message
  assert f'memory_module.memory has shape (5, 1, 16), expected ({K}, 2)' in message


def test_padded_whole_evaluation_of_stride_4_logits_matches_the_exact_path():
  """evaluate's padded whole mode with UPerNet's logits at 1/4 (models.logits_stride)."""
  from memseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  from tests.test_evaluate import _settings  # pylint: disable=import-outside-toplevel
  config = _config('upernet')
  model = build_model(config)
  variables = _variables(model, jnp.zeros((1, 32, 32, 3)))
  settings = _settings(use_probs=False, flip=True, scales=(1.0, 0.75))
  rng = np.random.default_rng(0)
  image = rng.normal(size=(37, 53, 3)).astype(np.float32)
  padded = (rng.normal(size=(64, 64, 3)) * 30).astype(np.float32)
  padded[:37, :53] = image
  exact = np.asarray(evaluate.inference(evaluate.make_forward_fn(model), variables,
                                        image[None], out_hw=(75, 104), settings=settings))[0]
  scores = np.asarray(evaluate.padded_whole_scores(
      evaluate.make_padded_forward_fn(model), variables, padded, image_hw=(37, 53),
      orig_hw=(75, 104), label_hw=(128, 128), settings=settings,
      output_stride=logits_stride(config)))
  np.testing.assert_allclose(scores[:75, :104], exact, rtol=1e-5,
                             atol=1e-5 * np.max(np.abs(exact)))
