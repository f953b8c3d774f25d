"""HRNetV2 backbone: sizes and channels, the two-step resampling, converter keys, reference parity."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.models.backbones import hrnet


def _conv_out(n):
  """Output length of a 3x3 stride-2 conv with padding 1 (the reference's formula)."""
  return (n - 1) // 2 + 1


@pytest.mark.parametrize('size', [(97, 129), (473, 473)])
def test_w48_returns_one_720_channel_map_at_quarter_resolution(size):
  model = hrnet.HRNet(arch='hrnetv2_w48')
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, capture_intermediates=True), x)
  quarter = tuple(_conv_out(_conv_out(n)) for n in size)
  assert [o.shape for o in outputs] == [(1, *quarter, 720)]
  assert hrnet.output_channels('hrnetv2_w48') == 720 == 48 + 96 + 192 + 384
  # Branch sizes: each new branch is a stride-2 conv of the previous one.
  inter = variables['intermediates']
  sizes = [quarter]
  for _ in range(3):
    sizes.append(tuple(_conv_out(n) for n in sizes[-1]))
  last = inter['stage4_2']['__call__'][0]
  assert [y.shape for y in last] == [(1, *s, c) for s, c in zip(sizes, (48, 96, 192, 384))]
  if size == (473, 473):          # LIP crops: 119/60/30/15, not exact halves
    assert [s[0] for s in sizes] == [119, 60, 30, 15]
  params = variables['params']
  assert {k for k in params if k.startswith('stage')} == (
      {'stage2_0'} | {f'stage3_{m}' for m in range(4)} | {f'stage4_{m}' for m in range(3)})
  assert {k for k in params['stage4_0'] if k.startswith('branches')} == {
      f'branches_{b}_{k}' for b in range(4) for k in range(4)}


def test_check_config_names_the_key():
  hrnet.check_config({'arch': 'hrnetv2_w48', 'stem_relu': False})
  with pytest.raises(ValueError, match=r'config\.model\.backbone\.arch=.hrnetv2_w99'):
    hrnet.check_config({'arch': 'hrnetv2_w99'})
  with pytest.raises(ValueError, match=r'config\.model\.backbone\.stem_relu='):
    hrnet.check_config({'arch': 'hrnetv2_w48', 'stem_relu': 'no'})


@pytest.mark.parametrize('n_in,factor,n_out', [
    (15, 8, 119),    # 120 -> 119: LIP's branch 3 into branch 0
    (60, 2, 119),
    (4, 8, 25),      # 32 -> 25 (a 97-pixel side)
    (5, 4, 17),      # 20 -> 17
    (7, 2, 14),      # exact: the second step is the identity
])
def test_fuse_upsampling_is_upsample_then_interpolate_of_pytorch(n_in, factor, n_out):
  torch = pytest.importorskip('torch')
  x = np.random.RandomState(0).randn(2, n_in, n_in + 3, 5).astype(np.float32)
  out_hw = (n_out, n_out + (3 * factor if n_out == factor * n_in else 2))
  ref = torch.nn.Upsample(scale_factor=factor, mode='bilinear', align_corners=False)(
      torch.from_numpy(x.transpose(0, 3, 1, 2)))
  ref = torch.nn.functional.interpolate(ref, size=out_hw, mode='bilinear', align_corners=False)
  ours = np.asarray(hrnet._upsample_to(jnp.asarray(x), factor, out_hw))
  ref = ref.numpy().transpose(0, 2, 3, 1)
  assert ours.shape == ref.shape
  print(f'{n_in} x{factor} -> {out_hw}: max abs diff {np.abs(ours - ref).max():.3g}')
  np.testing.assert_allclose(ours, ref, rtol=0, atol=2e-6)


def test_imagenet_hook_ignores_only_the_classification_head():
  sd = {'conv1.weight': 1, 'stage4.2.fuse_layers.3.2.0.0.weight': 2, 'classifier.weight': 3,
        'incre_modules.0.0.conv1.weight': 4, 'downsamp_modules.1.0.weight': 5,
        'final_layer.1.running_mean': 6}
  kept, ignored = hrnet.imagenet_state_dict(sd)
  assert set(kept) == {'conv1.weight', 'stage4.2.fuse_layers.3.2.0.0.weight'}
  assert ignored == sorted(set(sd) - set(kept))


# ------------------------------------------------------------------------ with the reference


def _project_config(arch, stem_relu=True):
  from tests.hrnet_reference import project_hrnet_config  # pylint: disable=import-outside-toplevel
  return project_hrnet_config(arch, stem_relu=stem_relu)


def _imagenet_like(state_dict, torch):
  """A reference backbone state_dict plus the ImageNet classification head keys (torch values)."""
  sd = dict(state_dict)
  sd['incre_modules.0.0.conv1.weight'] = torch.zeros(32, 48, 1, 1)
  sd['downsamp_modules.0.0.weight'] = torch.zeros(256, 128, 3, 3)
  sd['final_layer.0.weight'] = torch.zeros(2048, 1024, 1, 1)
  sd['final_layer.1.running_var'] = torch.ones(2048)
  sd['classifier.weight'] = torch.zeros(1000, 2048)
  sd['classifier.bias'] = torch.zeros(1000)
  return sd


@pytest.mark.parity
def test_converter_maps_every_reference_w48_key_and_names_bad_ones(caplog):
  """Every key of the reference HRNet-W48 state_dict lands on one Flax leaf of the right shape
  (via --imagenet, whose extra head keys are ignored with a count in the log); a missing,
  unexpected or wrongly shaped key is an error that names it."""
  torch = pytest.importorskip('torch')
  from tests.hrnet_reference import patched_reference  # pylint: disable=import-outside-toplevel
  with patched_reference() as ref_hrnet:
    torch.manual_seed(0)
    ref = ref_hrnet.HRNet(structure_type='hrnetv2_w48', arch='hrnetv2_w48', pretrained=False,
                          norm_cfg={'type': 'BatchNorm2d'})
  state_dict = ref.state_dict()
  config = _project_config('hrnetv2_w48')
  with caplog.at_level(logging.DEBUG, logger='absl'):
    variables = convert.convert_imagenet(_imagenet_like(state_dict, torch), config)
  assert '6 keys the backbone does not use were ignored' in caplog.text
  assert 'classifier.bias' in caplog.text and 'final_layer.1.running_var' in caplog.text
  flat = convert.flax.traverse_util.flatten_dict(variables)
  real = {k for k in state_dict if not k.endswith('num_batches_tracked')}
  # Counted by hand (conv 1 entry, BN 4): stem 10, layer1 4 x 15 + projection 5, transitions
  # 4 x 5; blocks 10 each (stage2 8, stage3 4 x 12, stage4 3 x 16); fuse CBRs 5 each (stage2 2,
  # stage3 4 x (3 up + 4 down), stage4 3 x (6 up + 10 down)).
  expected = 10 + 65 + 20 + 10 * (8 + 48 + 48) + 5 * (2 + 4 * 7 + 3 * 16)
  assert len(flat) == len(real) == expected == 1525
  # Spot checks of the layout: OIHW -> HWIO, BN statistics, the nested fuse Sequentials.
  np.testing.assert_array_equal(flat['params', 'backbone_net', 'conv1', 'kernel'],
                                state_dict['conv1.weight'].numpy().transpose(2, 3, 1, 0))
  key = 'stage4.2.fuse_layers.3.0.2.0.weight'   # output 3 from branch 0: 3rd stride-2 conv
  np.testing.assert_array_equal(
      flat['params', 'backbone_net', 'stage4_2', 'fuse_layers_3_0_2', 'conv', 'kernel'],
      state_dict[key].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(
      flat['batch_stats', 'backbone_net', 'transition3_3_0', 'bn', 'var'],
      state_dict['transition3.3.0.1.running_var'].numpy())

  missing = {k: v for k, v in state_dict.items() if k != 'stage3.2.branches.1.3.bn2.weight'}
  with pytest.raises(ValueError, match=r'missing keys: stage3\.2\.branches\.1\.3\.bn2\.weight'):
    convert.convert_imagenet(missing, config)
  extra = dict(state_dict)
  extra['stage2.0.fuse_layers.0.1.2.weight'] = torch.zeros(48, 96, 1, 1)
  with pytest.raises(ValueError, match=r'unexpected keys: stage2\.0\.fuse_layers\.0\.1\.2\.weight'):
    convert.convert_imagenet(extra, config)
  wrong = dict(state_dict)
  wrong['stage2.0.fuse_layers.0.1.0.weight'] = torch.zeros(48, 96, 3, 3)
  with pytest.raises(ValueError, match=r'stage2\.0\.fuse_layers\.0\.1\.0\.weight has shape '
                                       r'\(48, 96, 3, 3\), expected \(48, 96, 1, 1\)'):
    convert.convert_imagenet(wrong, config)


@pytest.mark.parity
@pytest.mark.parametrize('stem_relu', [True, False])
def test_backbone_matches_reference_tiny_arch(stem_relu):
  """The reference HRNet and ours from the same weights (via the ImageNet converter), at a size
  whose branches are not exact halves (73x90 -> 19x23, 10x12, 5x6, 3x3).

  stem_relu=True is SSSegmentation 1.7.0's forward. For stem_relu=False (the released
  checkpoints' stem) the reference's stem ReLU is bypassed with hooks: conv2 is fed bn1's
  output as it was before the (in-place) ReLU.
  """
  torch = pytest.importorskip('torch')
  from tests import reference_utils as ru  # pylint: disable=import-outside-toplevel
  from tests.hrnet_reference import TINY, patched_reference  # pylint: disable=import-outside-toplevel
  with patched_reference() as ref_hrnet:
    torch.manual_seed(1)
    ref = ref_hrnet.HRNet(structure_type='hrnetv2_w48', arch=TINY, pretrained=False,
                          norm_cfg={'type': 'BatchNorm2d'})
    images = torch.randn(2, 3, 73, 90, generator=torch.Generator().manual_seed(2))
    saved = {}
    if not stem_relu:
      ref.bn1.register_forward_hook(lambda m, i, o: saved.update(bn1=o.clone()))
      ref.conv2.register_forward_pre_hook(lambda m, i: (saved['bn1'],))
    ru.calibrate_batchnorm(ref, lambda: ref(images))
    ref.eval()
    with torch.no_grad():
      ref_out = ref(images)[0].numpy()
    if not stem_relu:   # the bypass is live: the stem input to conv2 has negative values
      assert saved['bn1'].min() < 0

    config = _project_config(TINY, stem_relu=stem_relu)
    variables = convert.convert_imagenet(_imagenet_like(ref.state_dict(), torch), config)
    model = hrnet.HRNet(arch=TINY, stem_relu=stem_relu)
    ours, = model.apply({'params': variables['params']['backbone_net'],
                         'batch_stats': variables['batch_stats']['backbone_net']},
                        jnp.asarray(ru.nchw_to_nhwc(images.numpy())))
  ours = ru.nhwc_to_nchw(ours)
  assert ours.shape == ref_out.shape == (2, 8 + 16 + 32 + 64, 19, 23)
  err, scale = np.abs(ours - ref_out).max(), np.abs(ref_out).max()
  print(f'HRNet tiny backbone, stem_relu={stem_relu}: max abs diff {err:.3g}, '
        f'max abs value {scale:.3g}, relative {err / scale:.3g}')
  assert err <= 1e-4 * scale
