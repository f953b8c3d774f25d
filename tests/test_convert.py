"""PyTorch -> Flax conversion: key mapping, strictness, checkpoint files, orbax round trip, CLI."""

import os
import subprocess
import sys

import flax
import jax
import numpy as np
import pytest

from memseg_jax import convert
from tests import reference_utils as ru


def _small_config(**kwargs):
  kwargs.setdefault('num_classes', 19)
  kwargs.setdefault('depth', 18)
  return ru.project_config(**kwargs)


def _fake_state_dict(config, seed=0):
  """A state_dict with the reference's names and layouts (OIHW) and random values."""
  rng = np.random.default_rng(seed)
  state_dict = {}
  for key, shape in convert.variable_shapes(config).items():
    torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
    state_dict[convert.torch_key(key)] = rng.normal(size=torch_shape).astype(np.float32)
    if key[0] == 'batch_stats' and key[-1] == 'mean':
      # BN layers also save a counter, which carries nothing the project needs.
      state_dict[convert.torch_key(key).replace('running_mean', 'num_batches_tracked')] = (
          np.array(7))
  return state_dict


def test_torch_key_rules():
  assert convert.torch_key(('params', 'backbone_net', 'stem_0', 'kernel')) == (
      'backbone_net.stem.0.weight')
  assert convert.torch_key(('batch_stats', 'backbone_net', 'layer3_0', 'downsample_1', 'var')) == (
      'backbone_net.layer3.0.downsample.1.running_var')
  assert convert.torch_key(('params', 'context_within_image_module', 'global_branch', 'bn',
                            'scale')) == 'context_within_image_module.global_branch.2.weight'
  assert convert.torch_key(('params', 'context_within_image_module', 'branches_3', 'conv',
                            'kernel')) == 'context_within_image_module.branches.3.1.weight'
  assert convert.torch_key(('params', 'memory_module', 'self_attention', 'query_project_1', 'bn',
                            'bias')) == 'memory_module.self_attention.query_project.1.1.bias'
  assert convert.torch_key(('params', 'decoder_stage2', 'classifier', 'bias')) == (
      'decoder_stage2.4.bias')
  assert convert.torch_key(('params', 'decoder', 'classifier', 'kernel')) == 'decoder.1.weight'
  assert convert.torch_key(('memory', 'memory_module', 'memory')) == 'memory_module.memory'


def test_conversion_transposes_kernels_and_renames_bn_entries():
  config = _small_config()
  state_dict = _fake_state_dict(config)
  variables = convert.convert_ssseg_state_dict(state_dict, config)
  assert set(variables) == {'params', 'batch_stats', 'memory'}
  kernel = variables['params']['backbone_net']['layer2_0']['conv2']['kernel']
  np.testing.assert_array_equal(
      kernel, state_dict['backbone_net.layer2.0.conv2.weight'].transpose(2, 3, 1, 0))
  bn = variables['batch_stats']['decoder_stage1']['bn']
  np.testing.assert_array_equal(bn['var'], state_dict['decoder_stage1.1.running_var'])
  np.testing.assert_array_equal(variables['params']['auxiliary_decoder']['bn']['scale'],
                                state_dict['auxiliary_decoder.1.weight'])
  np.testing.assert_array_equal(variables['memory']['memory_module']['memory'],
                                state_dict['memory_module.memory'])
  # A DDP-style 'module.' prefix is accepted.
  prefixed = {f'module.{k}': v for k, v in state_dict.items()}
  again = convert.convert_ssseg_state_dict(prefixed, config)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, again, variables))


@pytest.mark.parametrize('problem', ['missing', 'unexpected', 'shape'])
def test_bad_state_dict_fails_naming_the_key(problem):
  config = _small_config()
  state_dict = _fake_state_dict(config)
  if problem == 'missing':
    del state_dict['decoder_stage2.4.bias']
    match = r'missing keys: decoder_stage2\.4\.bias'
  elif problem == 'unexpected':
    state_dict['decoder_stage3.0.weight'] = np.zeros((19, 512, 1, 1), np.float32)
    match = r'unexpected keys: decoder_stage3\.0\.weight'
  else:
    state_dict['memory_module.memory'] = np.zeros((19, 2, 512), np.float32)
    match = r'memory_module\.memory has shape \(19, 2, 512\), expected \(19, 1, 512\)'
  with pytest.raises(ValueError, match=match):
    convert.convert_ssseg_state_dict(state_dict, config)


def test_checkpoint_of_another_config_is_rejected():
  # 150-class weights into a 19-class model: every classifier is named.
  state_dict = _fake_state_dict(_small_config(num_classes=150))
  with pytest.raises(ValueError, match=r'decoder_stage1\.4\.weight has shape \(150, 512, 1, 1\)'):
    convert.convert_ssseg_state_dict(state_dict, _small_config())


def test_load_ssseg_checkpoint_accepts_wrapped_and_bare_files_and_orbax_round_trip(tmp_path):
  torch = pytest.importorskip('torch')
  config = _small_config()
  state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in _fake_state_dict(config).items()}
  torch.save({'model': state_dict, 'epoch': 3}, tmp_path / 'wrapped.pth')
  torch.save(state_dict, tmp_path / 'bare.pth')
  wrapped = convert.load_ssseg_checkpoint(str(tmp_path / 'wrapped.pth'), config)
  bare = convert.load_ssseg_checkpoint(str(tmp_path / 'bare.pth'), config)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, wrapped, bare))

  path = convert.save_variables(str(tmp_path / 'flax_ckpt'), wrapped)
  assert os.path.isabs(path)
  restored = convert.restore_variables(path)
  flat_a = flax.traverse_util.flatten_dict(wrapped)
  flat_b = flax.traverse_util.flatten_dict(restored)
  assert set(flat_a) == set(flat_b)
  for k in flat_a:
    np.testing.assert_array_equal(np.asarray(flat_b[k]), flat_a[k])

  del state_dict['bottleneck.1.running_mean']
  torch.save({'model': state_dict}, tmp_path / 'broken.pth')
  with pytest.raises(ValueError, match=r'broken\.pth.*missing keys: bottleneck\.1\.running_mean'):
    convert.load_ssseg_checkpoint(str(tmp_path / 'broken.pth'), config)
  with pytest.raises(FileNotFoundError, match='nowhere.pth'):
    convert.load_ssseg_checkpoint(str(tmp_path / 'nowhere.pth'), config)


@pytest.mark.parity
@pytest.mark.parametrize('kwargs', [dict(), dict(head_type='ppm', num_classes=19),
                                    dict(model='deeplabv3'), dict(depth=18)])
def test_flax_tree_names_every_reference_state_dict_entry(kwargs):
  """The Flax tree of each variant maps one-to-one, shapes included, onto the reference's."""
  pytest.importorskip('torch')
  build_segmentor, _ = ru.import_ssseg_builder()
  ref = build_segmentor(ru.reference_cfg(**kwargs), mode='TEST')
  ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()
                if not k.endswith('num_batches_tracked')}
  shapes = convert.variable_shapes(ru.project_config(**kwargs))
  ours = {}
  for key, shape in shapes.items():
    ours[convert.torch_key(key)] = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 \
        else shape
  assert ours == ref_shapes


@pytest.mark.parity
def test_imagenet_resnet_conversion_fills_the_backbone():
  torch = pytest.importorskip('torch')
  ru.import_ssseg_builder()
  from ssseg.modules.models.backbones.resnet import ResNet as TorchResNet
  ref = TorchResNet(structure_type='resnet50conv3x3stem', depth=50, pretrained=False,
                    norm_cfg={'type': 'BatchNorm2d'})
  # open-mmlab layout: the backbone's own names plus the ImageNet classifier.
  state_dict = dict(ref.state_dict())
  state_dict.update({'fc.weight': torch.zeros(1000, 2048), 'fc.bias': torch.zeros(1000)})
  config = ru.project_config()
  variables = convert.convert_imagenet({'state_dict': state_dict}, config)
  backbone_shapes = {k: s for k, s in convert.variable_shapes(config).items()
                     if k[1] == 'backbone_net'}
  flat = flax.traverse_util.flatten_dict(variables)
  assert {k: v.shape for k, v in flat.items()} == backbone_shapes
  np.testing.assert_array_equal(
      variables['params']['backbone_net']['stem_6']['kernel'],
      state_dict['stem.6.weight'].numpy().transpose(2, 3, 1, 0))

  del state_dict['layer4.2.bn3.running_var']
  with pytest.raises(ValueError, match=r'missing keys: layer4\.2\.bn3\.running_var'):
    convert.convert_imagenet(state_dict, config)


def test_cli_writes_an_orbax_checkpoint_equal_to_the_python_conversion(tmp_path):
  torch = pytest.importorskip('torch')
  config = _small_config()
  state_dict = {k: torch.from_numpy(np.asarray(v)) for k, v in _fake_state_dict(config).items()}
  torch.save({'model': state_dict}, tmp_path / 'model.pth')
  config_file = tmp_path / 'small.py'
  config_file.write_text(
      'import importlib.util\n'
      'def get_config():\n'
      f'  spec = importlib.util.spec_from_file_location("d", {os.path.join(ru.REPO_ROOT, "configs", "default.py")!r})\n'
      '  module = importlib.util.module_from_spec(spec)\n'
      '  spec.loader.exec_module(module)\n'
      '  config = module.get_config()\n'
      '  config.model.num_classes = 19\n'
      '  config.model.backbone.depth = 18\n'
      '  return config\n')
  output = tmp_path / 'converted'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, '-m', 'memseg_jax.convert', f'--torch_checkpoint={tmp_path / "model.pth"}',
       f'--config={config_file}', f'--output={output}'],
      cwd=ru.REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  restored = flax.traverse_util.flatten_dict(convert.restore_variables(str(output)))
  expected = flax.traverse_util.flatten_dict(
      convert.load_ssseg_checkpoint(str(tmp_path / 'model.pth'), config))
  assert set(restored) == set(expected)
  for k in expected:
    np.testing.assert_array_equal(np.asarray(restored[k]), expected[k])
