"""Converting the released HRNet MCIBI layouts: with and without `downsample_backbone`.

The state_dicts come from the reference model itself (SSSegmentation 1.7.0's MCIBI on
HRNetV2p-W48 with random weights; its HRNet needs the `HRModule` workaround of
tests/hrnet_reference.py), saved as the released `.pth` files are ({'model': state_dict}),
and loaded with the project's HRNet configs.
"""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.config_validation import load_config
from tests import reference_utils as ru

torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')

pytestmark = pytest.mark.parity

CONFIGS = os.path.join(ru.REPO_ROOT, 'configs')


def _reference_state_dict(num_classes, downsample_stride):
  from tests.hrnet_reference import patched_reference, reference_hrnet_cfg  # pylint: disable=import-outside-toplevel
  build_segmentor, _ = ru.import_ssseg_builder()
  with patched_reference():
    torch.manual_seed(0)
    model = build_segmentor(reference_hrnet_cfg('hrnetv2_w48', num_classes=num_classes,
                                                downsample_stride=downsample_stride), mode='TEST')
  return model.state_dict()


@pytest.fixture(scope='module')
def released_like(tmp_path_factory):
  """{(num_classes, stride): path} of two W48 checkpoints as the releases store them."""
  folder = tmp_path_factory.mktemp('hrnet_ckpt')
  paths = {}
  for num_classes, stride in [(19, 2), (19, 1)]:
    path = str(folder / f'mcibi_hrnet_{num_classes}_s{stride}.pth')
    torch.save({'model': _reference_state_dict(num_classes, stride), 'epoch': 500}, path)
    paths[num_classes, stride] = path
  return paths


def test_cityscapes_layout_with_downsample_backbone_converts(released_like):
  config = load_config(os.path.join(CONFIGS, 'cityscapes_hrnetv2w48.py'))
  variables = convert.load_ssseg_checkpoint(released_like[19, 2], config)
  state_dict = torch.load(released_like[19, 2], weights_only=False)['model']
  np.testing.assert_array_equal(
      variables['params']['downsample_backbone']['conv']['kernel'],
      state_dict['downsample_backbone.0.weight'].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(variables['batch_stats']['downsample_backbone']['bn']['var'],
                                state_dict['downsample_backbone.1.running_var'].numpy())
  assert variables['params']['context_within_image_module']['parallel_branches_0']['conv'][
      'kernel'].shape == (1, 1, 720, 512)
  assert 'auxiliary_decoder' not in variables['params']
  count = sum(int(np.prod(v.shape)) for v in jax.tree_util.tree_leaves(variables))
  ref_count = sum(v.numel() for k, v in state_dict.items()
                  if not k.endswith('num_batches_tracked'))
  assert count == ref_count


def test_layout_without_downsample_backbone_needs_a_config_without_it(released_like):
  """The same weights without `downsample_backbone` (ADE20K/COCO-Stuff layout) load into a
  stride-1 config, and each layout is refused by the other config, naming the keys."""
  stride1 = load_config(os.path.join(CONFIGS, 'cityscapes_hrnetv2w48.py'))
  stride1.model.head.downsample_backbone_stride = 1
  variables = convert.load_ssseg_checkpoint(released_like[19, 1], stride1)
  assert 'downsample_backbone' not in variables['params']
  with pytest.raises(ValueError, match=r'unexpected keys: downsample_backbone\.0\.weight, '
                                       r'downsample_backbone\.1\.bias'):
    convert.load_ssseg_checkpoint(released_like[19, 2], stride1)
  stride2 = load_config(os.path.join(CONFIGS, 'cityscapes_hrnetv2w48.py'))
  with pytest.raises(ValueError, match=r'mcibi_hrnet_19_s1\.pth: .*missing keys: '
                                       r'downsample_backbone\.0\.weight'):
    convert.load_ssseg_checkpoint(released_like[19, 1], stride2)
  # A 150-class (ADE20K) config: the classifiers and the memory have the wrong shapes.
  ade = load_config(os.path.join(CONFIGS, 'ade20k_hrnetv2w48.py'))
  with pytest.raises(ValueError, match=r'decoder_stage1\.4\.weight has shape \(19, 512, 1, 1\), '
                                       r'expected \(150, 512, 1, 1\)'):
    convert.load_ssseg_checkpoint(released_like[19, 1], ade)


@pytest.mark.slow
def test_cli_converts_the_cityscapes_layout(released_like, tmp_path):
  out = tmp_path / 'converted'
  env = dict(os.environ, PYTHONPATH=ru.REPO_ROOT, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'memseg_jax.convert', f'--torch_checkpoint={released_like[19, 2]}',
       f'--config={os.path.join(CONFIGS, "cityscapes_hrnetv2w48.py")}', f'--output={out}'],
      capture_output=True, text=True, env=env, cwd=ru.REPO_ROOT, timeout=600, check=False)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'wrote' in result.stdout
  restored = convert.restore_variables(str(out))
  state_dict = torch.load(released_like[19, 2], weights_only=False)['model']
  np.testing.assert_array_equal(
      restored['params']['backbone_net']['stage4_2']['fuse_layers_3_0_2']['conv']['kernel'],
      state_dict['backbone_net.stage4.2.fuse_layers.3.0.2.0.weight'].numpy().transpose(2, 3, 1, 0))
