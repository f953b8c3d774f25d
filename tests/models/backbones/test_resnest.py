"""ResNeSt backbone: sizes and structure, its pools and split attention against the reference,
padded evaluation, and the converter's key layout for S-101 MCIBI and ImageNet checkpoints."""

import copy
import logging
import math
import os
import subprocess
import sys

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.models import build_model
from memseg_jax.models.backbones import resnest
from tests import reference_utils as ru


def reference_backbone(depth=101):
  """The reference's backbone cfg of the `mcibi_deeplabv3_resnest101os8_*` configs."""
  return {'type': 'ResNeSt', 'depth': depth, 'structure_type': f'resnest{depth}',
          'pretrained': False, 'outstride': 8, 'selected_indices': (0, 1, 2, 3)}


def project_overrides(depth=101):
  return {'model.backbone.type': 'resnest', 'model.backbone.depth': depth}


REDUCED_DEPTH = 14   # one Bottleneck per stage


@pytest.fixture
def reduced_depth(monkeypatch):
  """Registers a reduced-depth ResNeSt ("S-14", one block per stage) in ours and the reference.

  It has every kind of layer of S-101 (deep stem, pooled shortcuts at stride 1 and 2, the avd
  pool of layer2.0, split attention; at dilations 1 and 2 only, as each dilated stage's one
  block has the contracted dilation) at a fraction of the compile time.
  """
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones import resnest as torch_resnest
  monkeypatch.setitem(torch_resnest.ResNeSt.arch_settings, REDUCED_DEPTH,
                      (torch_resnest.Bottleneck, (1, 1, 1, 1)))
  monkeypatch.setitem(resnest.ARCH_SETTINGS, REDUCED_DEPTH, (1, 1, 1, 1))
  return REDUCED_DEPTH


def _torch_resnest(depth, seed=0):
  torch = pytest.importorskip('torch')
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones.resnest import ResNeSt as TorchResNeSt
  torch.manual_seed(seed)
  return TorchResNeSt(structure_type=f'resnest{depth}', depth=depth, outstride=8,
                      pretrained=False, norm_cfg={'type': 'BatchNorm2d'})


def _ceil_div(n, s):
  return -(-n // s)


# ---------------------------------------------------------------------------------- structure
def test_s101_os8_sizes_channels_blocks_and_dilations():
  model = resnest.ResNeSt(depth=101)
  x = jax.ShapeDtypeStruct((1, 97, 129, 3), jnp.float32)
  outputs, variables = jax.eval_shape(lambda x: model.init_with_output(jax.random.PRNGKey(0), x), x)
  s4 = (_ceil_div(97, 4), _ceil_div(129, 4))          # 25 x 33
  s8 = (_ceil_div(97, 8), _ceil_div(129, 8))          # 13 x 17
  assert [o.shape for o in outputs] == [(1, *s4, 256), (1, *s8, 512), (1, *s8, 1024),
                                        (1, *s8, 2048)]
  params = variables['params']
  for i, n in enumerate((3, 4, 23, 3)):
    assert {k for k in params if k.startswith(f'layer{i + 1}_')} == {
        f'layer{i + 1}_{j}' for j in range(n)}
  # Deep stem 3 -> 64 -> 64 -> 128.
  assert [params[f'stem_{i}']['kernel'].shape for i in (0, 3, 6)] == [
      (3, 3, 3, 64), (3, 3, 64, 64), (3, 3, 64, 128)]
  # Split attention of layer2.0 (width 128): grouped 3x3 (2 groups of 64 inputs), fc1 -> 64.
  sa = params['layer2_0']['conv2']
  assert sa['conv']['kernel'].shape == (3, 3, 64, 256)
  assert sa['fc1']['kernel'].shape == (1, 1, 128, 64) and sa['fc1']['bias'].shape == (64,)
  assert sa['fc2']['kernel'].shape == (1, 1, 64, 256) and sa['fc2']['bias'].shape == (256,)
  # Every layer's first block has the pooled shortcut (conv at index 1), the others none.
  for i, n in enumerate((3, 4, 23, 3)):
    assert 'downsample_1' in params[f'layer{i + 1}_0']
    assert all('downsample_1' not in params[f'layer{i + 1}_{j}'] for j in range(1, n))
  assert 'bn2' not in params['layer1_0']


def test_dilations_contract_in_the_first_block_of_dilated_stages():
  import flax.linen as nn
  from memseg_jax.models import layers
  found = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.Conv) and context.method_name == '__call__'
        and module.kernel_size == 3):
      found.append((module.dilation, module.stride, module.groups))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: resnest.ResNeSt(depth=50).init(jax.random.PRNGKey(0),
                                                          jnp.zeros((1, 32, 32, 3))))
  stem, blocks = found[:3], found[3:]
  assert stem == [(1, 2, 1), (1, 1, 1), (1, 1, 1)]
  # Every block's 3x3 is the 2-group split-attention conv at stride 1 (the avd pool strides).
  assert all(s == 1 and g == 2 for _, s, g in blocks)
  assert [d for d, _, _ in blocks] == [1] * 3 + [1] * 4 + [1] + [2] * 5 + [2, 4, 4]


def test_check_config_names_the_bad_key():
  with pytest.raises(ValueError, match=r'config\.model\.backbone\.depth=18'):
    resnest.check_config({'depth': 18, 'output_stride': 8})
  with pytest.raises(ValueError, match=r'config\.model\.backbone\.output_stride=4'):
    resnest.check_config({'depth': 101, 'output_stride': 4})
  from memseg_jax.config_validation import ConfigError, validate
  config = ru.project_config(overrides={**project_overrides(), 'model.backbone.depth': 34})
  with pytest.raises(ConfigError, match=r'config\.model\.backbone\.depth=34 is not one of 50, 101'):
    validate(config, 1)


# ------------------------------------------------------------------------ pools and attention
@pytest.mark.parametrize('h,w', [(7, 9), (8, 5), (1, 3), (6, 6)])
def test_pools_match_torch_including_odd_sizes(h, w):
  torch = pytest.importorskip('torch')
  rng = np.random.default_rng(h * w)
  x = rng.normal(size=(2, h, w, 3)).astype(np.float32)
  xt = torch.from_numpy(ru.nhwc_to_nchw(x).copy())
  shortcut = torch.nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)(xt).numpy()
  avd = torch.nn.AvgPool2d(3, 2, padding=1)(xt).numpy()
  np.testing.assert_allclose(ru.nhwc_to_nchw(resnest.avg_pool_ceil_exclude_pad(x, 2)), shortcut,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(ru.nhwc_to_nchw(resnest.avg_pool_3x3_s2(x)), avd, rtol=1e-6,
                             atol=1e-6)
  assert resnest.avg_pool_ceil_exclude_pad(x, 1) is x


def test_pools_of_the_valid_region_equal_the_unpadded_pools():
  rng = np.random.default_rng(0)
  sizes = [(7, 9), (8, 5), (1, 3)]
  padded = (100 * rng.normal(size=(3, 9, 10, 4))).astype(np.float32)
  for b, (h, w) in enumerate(sizes):
    padded[b, :h, :w] = rng.normal(size=(h, w, 4))
  valid = jnp.asarray(sizes, jnp.int32)
  for pool in (lambda x, v=None: resnest.avg_pool_ceil_exclude_pad(x, 2, v),
               resnest.avg_pool_3x3_s2):
    got = np.asarray(pool(jnp.asarray(padded), valid))
    for b, (h, w) in enumerate(sizes):
      want = np.asarray(pool(jnp.asarray(padded[b:b + 1, :h, :w])))[0]
      np.testing.assert_allclose(got[b, :want.shape[0], :want.shape[1]], want, rtol=1e-6,
                                 atol=1e-6)


@pytest.mark.parity
@pytest.mark.parametrize('train', [False, True])
def test_split_attention_matches_the_reference(train):
  """SplitAttentionConv2d (dilation 2) alone, eval and train mode (BN batch statistics)."""
  torch = pytest.importorskip('torch')
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones.resnest import SplitAttentionConv2d as TorchSA
  torch.manual_seed(0)
  width = 48
  ref = TorchSA(width, width, 3, padding=2, dilation=2, radix=2, reduction_factor=4,
                norm_cfg={'type': 'BatchNorm2d'}, act_cfg={'type': 'ReLU', 'inplace': True})
  x = torch.randn(3, width, 11, 14)
  ru.calibrate_batchnorm(ref, lambda: ref(x))
  ref.train(train)
  # Converted as a backbone module, i.e. with the ResNeSt names (`torch_module_path`).
  shapes = {(k[0], 'backbone_net', *k[1:]): v.shape for k, v in flax.traverse_util.flatten_dict(
      jax.eval_shape(lambda: resnest.SplitAttentionConv2d(width=width, dilation=2).init(
          jax.random.PRNGKey(0), jnp.zeros((1, 11, 14, width))))).items()}

  def convert_module(state_dict):
    state_dict = {f'backbone_net.{k}': v for k, v in state_dict.items()}
    variables = convert.convert_state_dict(state_dict, shapes, backbone_type='resnest')
    return {c: v['backbone_net'] for c, v in variables.items()}

  variables = convert_module(ref.state_dict())
  with torch.no_grad():
    want = ref(x).numpy()
  model = resnest.SplitAttentionConv2d(width=width, dilation=2, train=train)
  got, state = model.apply(variables, jnp.asarray(ru.nchw_to_nhwc(x.numpy())),
                           mutable=['batch_stats'])
  got = ru.nhwc_to_nchw(got)
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f'split attention (train={train}): relative max diff {err:.3g}')
  assert err <= 1e-5
  if train:   # running statistics moved like the reference's (bn0 over pixels, bn1 over B)
    after = convert_module(ref.state_dict())['batch_stats']
    for key, value in flax.traverse_util.flatten_dict(after).items():
      ours = np.asarray(flax.traverse_util.flatten_dict(state['batch_stats'])[key])
      np.testing.assert_allclose(ours, value, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------- backbone
@pytest.mark.parity
def test_backbone_matches_reference_via_the_imagenet_converter(caplog):
  """S-50 from an ImageNet-style file (the backbone's keys + `fc.*`), odd sizes at every stage."""
  torch = pytest.importorskip('torch')
  ref = _torch_resnest(50)
  images = torch.randn(2, 3, 37, 50)           # 1/4: 10 x 13 -> layer2.0 pools an odd width
  ru.calibrate_batchnorm(ref, lambda: ref(images))
  ref.eval()
  with torch.no_grad():
    ref_outs = [o.numpy() for o in ref(images)]
  state_dict = dict(ref.state_dict())
  state_dict.update({'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
  config = ru.project_config(overrides=project_overrides(50))
  with caplog.at_level(logging.DEBUG, logger='absl'):
    variables = convert.convert_imagenet({'state_dict': state_dict}, config)
  assert '2 keys the backbone does not use were ignored' in caplog.text
  assert 'ignored ImageNet keys: fc.bias, fc.weight' in caplog.text
  model = resnest.ResNeSt(depth=50)
  ours = jax.jit(model.apply)({'params': variables['params']['backbone_net'],
                               'batch_stats': variables['batch_stats']['backbone_net']},
                              jnp.asarray(ru.nchw_to_nhwc(images.numpy())))
  for i, (r, o) in enumerate(zip(ref_outs, ours)):
    o = ru.nhwc_to_nchw(o)
    assert o.shape == r.shape
    err = np.abs(o - r).max() / np.abs(r).max()
    print(f'S-50 layer{i + 1} {r.shape}: relative max diff {err:.3g}')
    assert err <= 1e-4

  del state_dict['layer2.0.conv2.fc1.bias']
  with pytest.raises(ValueError, match=r'missing keys: layer2\.0\.conv2\.fc1\.bias'):
    convert.convert_imagenet(state_dict, config)


def _distinct_images(torch, batch, size, seed):
  """Noise images with different global statistics (a scale and per-channel offsets each).

  The split attention's bn1 normalises one pooled value per image in train mode. Over 2 images
  its backward is degenerate: x_hat is +-1 up to eps, and d loss / d input is the difference of
  nearly equal terms, a fraction ~eps / var of each (measured down to 1.6e-6 in float64). The
  reference's CPU BatchNorm accumulates that in double precision, ours in float32 (like cuDNN),
  so over 2 images the float32 rounding of those terms (1e-7) reaches the stem's gradients at
  the 1e-2 level. With 4 images the fraction is >= 3e-4 and the comparison holds at 1e-3 (the
  same-seed i.i.d. images give similar figures); distinct global statistics keep the pooled
  values of the images apart.
  """
  gen = torch.Generator().manual_seed(seed)
  return (torch.randn(batch, 3, *size, generator=gen)
          * torch.linspace(0.5, 1.5, batch).view(batch, 1, 1, 1)
          + torch.randn(batch, 3, 1, 1, generator=gen))


def _backbone_gradients(depth, size, batch=4, float64_floor=False):
  """Train mode (BN batch statistics): outputs, gradients of a fixed projection of all four
  outputs, and BN running statistics, ours vs the reference's, printed and compared.

  With `float64_floor` the gradients are also computed by a float64 copy of the reference, and
  ours must be as close to those as 1e-3 or GRAD_FLOOR_FACTOR times the reference's own
  float32 error, whichever is larger (see the full-depth test).
  """
  torch = pytest.importorskip('torch')
  ref = _torch_resnest(depth)
  images = _distinct_images(torch, batch, size, seed=1)
  ru.calibrate_batchnorm(ref, lambda: ref(images))
  ref.eval()
  config = ru.project_config(overrides=project_overrides(depth))
  variables = convert.convert_imagenet(ref.state_dict(), config)
  variables = {c: v['backbone_net'] for c, v in variables.items()}
  gen = torch.Generator().manual_seed(2)
  with torch.no_grad():
    weights = [torch.randn(o.shape, generator=gen) for o in ref(images)]
  ref64_grads = None
  if float64_floor:
    ref64 = copy.deepcopy(ref).double().train()
    sum((o * w.double()).sum() for o, w in zip(ref64(images.double()), weights)).backward()
    ref64_grads = {k: p.grad.numpy() for k, p in ref64.named_parameters()}
    del ref64
  ref.train()
  ref_outs = ref(images)
  sum((o * w).sum() for o, w in zip(ref_outs, weights)).backward()
  ref_grads = {k: p.grad.numpy() for k, p in ref.named_parameters()}
  ref_stats = {c: v['backbone_net'] for c, v in
               convert.convert_imagenet(ref.state_dict(), config).items()}['batch_stats']

  model = resnest.ResNeSt(depth=depth, train=True)
  nhwc_weights = [jnp.asarray(ru.nchw_to_nhwc(w.numpy())) for w in weights]

  def loss_fn(params):
    outs, state = model.apply({**variables, 'params': params},
                              jnp.asarray(ru.nchw_to_nhwc(images.numpy())),
                              mutable=['batch_stats'])
    return sum(jnp.sum(o * w) for o, w in zip(outs, nhwc_weights)), (outs, state)

  grads, (outs, state) = jax.jit(jax.grad(loss_fn, has_aux=True))(variables['params'])
  for i, (r, o) in enumerate(zip(ref_outs, outs)):
    r = r.detach().numpy()
    assert np.abs(ru.nhwc_to_nchw(o) - r).max() <= 1e-4 * np.abs(r).max(), f'layer{i + 1}'
  ours_stats = flax.traverse_util.flatten_dict(state['batch_stats'])
  for key, value in flax.traverse_util.flatten_dict(ref_stats).items():
    assert np.abs(np.asarray(ours_stats[key]) - value).max() <= 1e-4 * np.abs(value).max(), key

  blocks = resnest.ARCH_SETTINGS[depth]
  mid, last = blocks[2] // 2, blocks[3] - 1
  names = {convert.torch_key(('params', 'backbone_net', *k), 'resnest')[len('backbone_net.'):]: k
           for k in flax.traverse_util.flatten_dict(grads)}
  flat = flax.traverse_util.flatten_dict(grads)
  worst = 0.0
  for name in ('stem.0.weight', 'stem.4.weight', 'layer2.0.downsample.1.weight',
               'layer2.0.conv2.conv.weight', f'layer3.{mid}.conv2.conv.weight',
               f'layer3.{mid}.conv2.fc1.weight', f'layer3.{mid}.conv2.fc2.bias',
               f'layer3.{mid}.conv3.weight', f'layer4.{last}.conv2.conv.weight',
               f'layer4.{last}.conv2.bn0.weight', f'layer4.{last}.conv3.weight'):
    ours = np.asarray(flat[names[name]])
    if ours.ndim == 4:
      ours = ours.transpose(3, 2, 0, 1)            # HWIO -> OIHW
    ref = ref_grads[name]
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    worst = max(worst, err)
    print(f'S-{depth} backbone grad {name}: max |ref| {np.abs(ref).max():.3g}, relative max '
          f'diff {err:.3g}', end='')
    assert np.abs(ref).max() > 0
    if ref64_grads is None:
      print()
      assert err <= 1e-3, name
    else:
      exact = ref64_grads[name]
      scale = np.abs(exact).max()
      ours64, ref_floor = np.abs(ours - exact).max() / scale, np.abs(ref - exact).max() / scale
      print(f'; vs the float64 reference: ours {ours64:.3g}, reference float32 {ref_floor:.3g}')
      assert ours64 <= max(1e-3, GRAD_FLOOR_FACTOR * ref_floor), name
  print(f'S-{depth} backbone gradients: worst relative diff {worst:.3g}')


@pytest.mark.parity
def test_backbone_gradients_match_reference_reduced_depth(reduced_depth):
  _backbone_gradients(reduced_depth, (61, 75))


# Full depth: how much worse than the reference's own float32 rounding ours may be (our BN
# accumulates in float32, the reference's CPU BN in double precision).
GRAD_FLOOR_FACTOR = 5


@pytest.mark.slow
@pytest.mark.parity
# Not strict: whether it fails depends on the CPU's SIMD width (the float32 sums of torch and
# XLA run in other orders). On an AMD EPYC with AVX2 only it passes: ours within 3.2e-4 to 4e-3
# of the float64 gradients on the named parameters, the reference's float32 up to 6.1e-2 off.
@pytest.mark.xfail(strict=False, reason=(
    'open on x86-64 with AVX-512: at batch 8 and 33x41 our gradients differ from the float64 '
    'reference by 4.7e-3 to 7.9e-3 on the named parameters (layer4.2.conv2.conv: 7.9e-3) where '
    'the float32 reference stays within 1.4e-3 to 2.9e-3 (2.8e-6 on layer4.2.conv2.conv). The '
    'full-depth train parity case of tests/models/test_resnest_parity.py holds them within '
    '4.5e-4 of float64.'))
def test_backbone_gradients_match_reference_s101_full_depth():
  """S-101 in train mode: 33 split attentions whose bn1 normalises 8 pooled values, 104 layers
  deep; the reference's own float32 gradients differ from its float64 ones by ~1e-3 (stem) to
  6e-2 (some layer3/layer4 weights), so ours are held to the float64 gradients, within
  GRAD_FLOOR_FACTOR times the reference's float32 error (or 1e-3)."""
  _backbone_gradients(101, (33, 41), batch=8, float64_floor=True)


def test_padded_forward_matches_unpadded_in_the_valid_region():
  """Zero-padded evaluation: large random values in the padding must not reach the valid region.

  Sizes where it matters: 37x50 (odd width at the layer2.0 pools, whose shortcut divides by the
  valid elements), 9x23, and the full array; the split-attention pools average over the valid
  region only.
  """
  model = resnest.ResNeSt(depth=50)
  hp, wp = 48, 64
  sizes = [(37, 50), (48, 64), (9, 23)]
  rng = np.random.default_rng(3)
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  variables = jax.tree_util.tree_map_with_path(
      lambda p, l: (rng.uniform(0.8, 1.25, l.shape) if p[-1].key in ('scale', 'var') else
                    0.1 * rng.normal(size=l.shape) if p[-1].key in ('bias', 'mean') else
                    rng.normal(size=l.shape) / np.sqrt(np.prod(l.shape[:-1]))).astype(np.float32),
      variables)
  padded = (rng.normal(size=(len(sizes), hp, wp, 3)) * 50).astype(np.float32)
  forward = jax.jit(model.apply)
  exact = []
  for b, (h, w) in enumerate(sizes):
    image = rng.normal(size=(h, w, 3)).astype(np.float32)
    padded[b, :h, :w] = image
    exact.append([np.asarray(o[0]) for o in forward(variables, image[None])])
  outs = jax.jit(lambda v, x, s: model.apply(v, x, s))(variables, padded,
                                                       np.asarray(sizes, np.int32))
  for b, (h, w) in enumerate(sizes):
    for i, (o, ref) in enumerate(zip(outs, exact[b])):
      stride = 4 if i == 0 else 8
      assert ref.shape[:2] == (_ceil_div(h, stride), _ceil_div(w, stride))
      got = np.asarray(o[b, :ref.shape[0], :ref.shape[1]])
      diff = np.abs(got - ref).max()
      print(f'{h}x{w} layer{i + 1}: max |padded - unpadded| {diff:.2e} '
            f'(max |value| {np.abs(ref).max():.2f})')
      np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


# -------------------------------------------------------------------------------- converter
def test_torch_names_of_the_split_attention_and_the_pooled_shortcut():
  key = lambda *k: convert.torch_key(k, 'resnest')
  assert key('params', 'backbone_net', 'layer2_0', 'conv2', 'conv', 'kernel') == (
      'backbone_net.layer2.0.conv2.conv.weight')
  assert key('batch_stats', 'backbone_net', 'layer3_11', 'conv2', 'bn0', 'var') == (
      'backbone_net.layer3.11.conv2.bn0.running_var')
  assert key('params', 'backbone_net', 'layer4_2', 'conv2', 'fc2', 'bias') == (
      'backbone_net.layer4.2.conv2.fc2.bias')
  assert key('params', 'backbone_net', 'layer1_0', 'downsample_2', 'scale') == (
      'backbone_net.layer1.0.downsample.2.weight')
  assert key('params', 'backbone_net', 'stem_7', 'bias') == 'backbone_net.stem.7.bias'
  # The head keeps the generic rule.
  assert key('params', 'bottleneck', 'bn', 'scale') == 'bottleneck.1.weight'


@pytest.mark.parity
def test_flax_tree_names_every_entry_of_the_reference_s101_mcibi_state_dict():
  pytest.importorskip('torch')
  build_segmentor, _ = ru.import_ssseg_builder()
  ref = build_segmentor(ru.reference_cfg(backbone=reference_backbone()), mode='TEST')
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()
                if not k.endswith('num_batches_tracked')}
  config = ru.project_config(overrides=project_overrides())
  ours = {}
  for key, shape in convert.variable_shapes(config).items():
    ours[convert.torch_key(key, 'resnest')] = ((shape[3], shape[2], shape[0], shape[1])
                                               if len(shape) == 4 else shape)
  assert ours == ref_shapes
  assert ref_shapes['backbone_net.layer2.0.conv2.conv.weight'] == (256, 64, 3, 3)


def _fake_state_dict(config, seed=0):
  """Random values with the reference's names and layouts (as a released checkpoint has)."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in convert.variable_shapes(config).items():
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    name = convert.torch_key(key, 'resnest')
    state_dict[name] = rng.normal(size=torch_shape).astype(np.float32)
    if name.endswith('running_mean'):
      state_dict[name.replace('running_mean', 'num_batches_tracked')] = np.array(3)
  return state_dict


@pytest.mark.parametrize('problem', ['missing', 'unexpected', 'shape'])
def test_bad_s101_checkpoint_fails_naming_the_key(problem):
  config = ru.project_config(num_classes=19, overrides=project_overrides())
  good_state_dict = _fake_state_dict(config)
  state_dict = dict(good_state_dict)
  if problem == 'missing':
    del state_dict['backbone_net.layer3.22.conv2.bn1.running_var']
    match = r'missing keys: backbone_net\.layer3\.22\.conv2\.bn1\.running_var'
  elif problem == 'unexpected':
    state_dict['backbone_net.layer2.0.conv2.fc3.weight'] = np.zeros((8, 8, 1, 1), np.float32)
    match = r'unexpected keys: backbone_net\.layer2\.0\.conv2\.fc3\.weight'
  else:   # an ungrouped 3x3 (a ResNet's conv2 shape) where the split attention has 2 groups
    state_dict['backbone_net.layer2.0.conv2.conv.weight'] = np.zeros((256, 128, 3, 3),
                                                                      np.float32)
    match = (r'backbone_net\.layer2\.0\.conv2\.conv\.weight has shape \(256, 128, 3, 3\), '
             r'expected \(256, 64, 3, 3\)')
  with pytest.raises(ValueError, match=match):
    convert.convert_ssseg_state_dict(state_dict, config)
  # A valid one converts completely.
  good = convert.convert_ssseg_state_dict(good_state_dict, config)
  np.testing.assert_array_equal(
      good['params']['backbone_net']['layer4_2']['conv2']['fc1']['kernel'],
      good_state_dict['backbone_net.layer4.2.conv2.fc1.weight'].transpose(2, 3, 1, 0))


@pytest.mark.parity
def test_cli_converts_s101_mcibi_and_imagenet_files(tmp_path):
  """`python -m memseg_jax.convert` on an S-101 MCIBI .pth and, with --imagenet, an S-101
  ImageNet file (backbone keys + classifier), both from the reference's own modules."""
  torch = pytest.importorskip('torch')
  build_segmentor, _ = ru.import_ssseg_builder()
  repo = ru.REPO_ROOT
  config_file = os.path.join(repo, 'configs', 'cocostuff10k_s101.py')
  from memseg_jax.config_validation import load_config
  config = load_config(config_file)
  cfg = ru.reference_cfg(num_classes=182, use_loss=False, backbone=reference_backbone())
  model = build_segmentor(cfg, mode='TEST')
  torch.save({'model': model.state_dict(), 'epoch': 150}, tmp_path / 'mcibi.pth')
  backbone = dict(model.backbone_net.state_dict())
  backbone.update({'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
  torch.save({'state_dict': backbone}, tmp_path / 'resnest101_d2.pth')
  del model, backbone
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=repo)
  for name, extra in (('mcibi.pth', []), ('resnest101_d2.pth', ['--imagenet'])):
    output = tmp_path / (name + '.flax')
    result = subprocess.run(
        [sys.executable, '-m', 'memseg_jax.convert', f'--torch_checkpoint={tmp_path / name}',
         f'--config={config_file}', f'--output={output}', *extra],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    restored = flax.traverse_util.flatten_dict(convert.restore_variables(str(output)))
    load = convert.load_imagenet_checkpoint if extra else convert.load_ssseg_checkpoint
    expected = flax.traverse_util.flatten_dict(load(str(tmp_path / name), config))
    assert set(restored) == set(expected)
    for k in expected:
      np.testing.assert_array_equal(np.asarray(restored[k]), expected[k])
    if extra:
      assert 'ignored' in result.stderr and all(k[1] == 'backbone_net' for k in expected)
    else:
      assert ('memory', 'memory_module', 'memory') in expected
    os.remove(tmp_path / name)
