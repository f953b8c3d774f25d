"""ResNet-v1c backbone: output sizes, channels, dilation settings, and parity with the reference."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.models import layers
from memseg_jax.models.backbones import resnet


def _conv_out(n, stride=2):
  """Output length of a 3x3 conv / max-pool with padding 1 (the reference's formula)."""
  return (n + 2 - 3) // stride + 1


def _shapes(depth, size, output_stride=8):
  model = resnet.ResNet(depth=depth, output_stride=output_stride, out_indices=(0, 1, 2, 3))
  x = jax.ShapeDtypeStruct((1, *size, 3), jnp.float32)
  outputs, variables = jax.eval_shape(
      lambda x: model.init_with_output(jax.random.PRNGKey(0), x, capture_intermediates=True), x)
  stem = variables['intermediates']['stem_7']['__call__'][0]
  return stem.shape, [o.shape for o in outputs], variables


@pytest.mark.parametrize('size', [(64, 64), (512, 683)])
def test_resnet50_os8_sizes_follow_strided_conv_arithmetic(size):
  stem, stages, _ = _shapes(50, size)
  s2 = tuple(_conv_out(n) for n in size)             # stem conv, stride 2
  s4 = tuple(_conv_out(n) for n in s2)               # max-pool
  s8 = tuple(_conv_out(n) for n in s4)               # layer2's strided 3x3
  assert stem == (1, *s2, 64)
  assert stages == [(1, *s4, 256), (1, *s8, 512), (1, *s8, 1024), (1, *s8, 2048)]
  if size == (64, 64):
    assert (s2, s4, s8) == ((32, 32), (16, 16), (8, 8))
  else:
    assert s8 == (64, 86)


@pytest.mark.parametrize('output_stride,strides', [(16, (1, 2, 2, 1)), (32, (1, 2, 2, 2))])
def test_output_stride_16_and_32_stride_the_later_stages(output_stride, strides):
  _, stages, _ = _shapes(50, (64, 64), output_stride)
  size = 16
  for stage, stride in zip(stages, strides):
    size = _conv_out(size, stride) if stride == 2 else size
    assert stage[1:3] == (size, size)


def test_block_counts_and_channels_per_depth():
  for depth, blocks, channels in [(18, (2, 2, 2, 2), (64, 128, 256, 512)),
                                  (50, (3, 4, 6, 3), (256, 512, 1024, 2048)),
                                  (101, (3, 4, 23, 3), (256, 512, 1024, 2048))]:
    _, stages, variables = _shapes(depth, (32, 32))
    names = variables['params'].keys()
    for i, n in enumerate(blocks):
      assert {k for k in names if k.startswith(f'layer{i + 1}_')} == {
          f'layer{i + 1}_{j}' for j in range(n)}
    assert tuple(s[-1] for s in stages) == channels
    assert resnet.stage_channels(depth) == channels


def _conv_dilations_3x3(model, size=(32, 32)):
  """Dilation of every 3x3 convolution in call order, recorded as each layer runs.

  (The layers compute convolutions as sums of per-tap matmuls, `layers.conv2d`, so there is no
  convolution primitive to read the dilation from; the interceptor sees each `layers.Conv` as
  it is called during `init`.)
  """
  x = jnp.zeros((1, *size, 3))
  found = []

  def record(next_fun, args, kwargs, context):
    module = context.module
    if (isinstance(module, layers.Conv) and context.method_name == '__call__'
        and module.kernel_size == 3):
      found.append(module.dilation)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x))
  return found


def test_contract_dilation_halves_the_first_block_of_dilated_stages():
  found = _conv_dilations_3x3(resnet.ResNet(depth=50, output_stride=8))
  stem, layer1, layer2, layer3, layer4 = (found[:3], found[3:6], found[6:10], found[10:16],
                                          found[16:])
  assert stem == [1, 1, 1] and layer1 == [1] * 3 and layer2 == [1] * 4
  assert layer3 == [1, 2, 2, 2, 2, 2]
  assert layer4 == [2, 4, 4]
  no_contract = _conv_dilations_3x3(resnet.ResNet(depth=50, output_stride=8,
                                                  contract_dilation=False))
  assert no_contract[10:] == [2] * 6 + [4] * 3


def test_basic_block_dilates_only_its_first_conv():
  # Reference BasicBlock: conv1 has the stage dilation, conv2 always dilation 1.
  found = _conv_dilations_3x3(resnet.ResNet(depth=18, output_stride=8))
  layer3, layer4 = found[3 + 4 + 4:3 + 4 + 4 + 4], found[3 + 12:]
  assert layer3 == [1, 1, 2, 1] and layer4 == [2, 1, 4, 1]


@pytest.mark.parity
@pytest.mark.parametrize('depth,output_stride,size', [(18, 8, (40, 56)), (50, 16, (48, 40))])
def test_backbone_matches_reference_resnet(depth, output_stride, size):
  """The reference ResNet and ours from the same weights (via the ImageNet converter)."""
  torch = pytest.importorskip('torch')
  from tests import reference_utils as ru
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones.resnet import ResNet as TorchResNet
  torch.manual_seed(depth)
  ref = TorchResNet(structure_type=f'resnet{depth}conv3x3stem', depth=depth,
                    outstride=output_stride, pretrained=False, norm_cfg={'type': 'BatchNorm2d'})
  images = torch.randn(2, 3, *size)
  ru.calibrate_batchnorm(ref, lambda: ref(images))
  ref.eval()
  with torch.no_grad():
    ref_outs = [o.numpy() for o in ref(images)]

  config = ru.project_config(depth=depth)
  config.model.backbone.output_stride = output_stride
  state_dict = {k: v for k, v in ref.state_dict().items()}
  state_dict['fc.weight'] = torch.zeros(1000, 2048)   # ImageNet classifier: dropped
  variables = convert.convert_imagenet({'state_dict': state_dict}, config)
  model = resnet.ResNet(depth=depth, output_stride=output_stride, out_indices=(0, 1, 2, 3))
  ours = model.apply({'params': variables['params']['backbone_net'],
                      'batch_stats': variables['batch_stats']['backbone_net']},
                     jnp.asarray(ru.nchw_to_nhwc(images.numpy())))
  for r, o in zip(ref_outs, ours):
    o = ru.nhwc_to_nchw(o)
    assert o.shape == r.shape
    assert np.abs(o - r).max() <= 1e-4 * np.abs(r).max()
