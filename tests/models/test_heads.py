"""Heads (ASPP, PPM, decoder/aux heads) against the reference modules on tiny tensors."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert
from memseg_jax.models import heads


@pytest.mark.parametrize('in_size,out_size', [(13, 6), (9, 6), (7, 3), (8, 2), (5, 6), (1, 1)])
def test_adaptive_pool_matches_torch_adaptive_avg_pool(in_size, out_size):
  torch = pytest.importorskip('torch')
  x = np.random.default_rng(0).normal(size=(2, in_size, in_size + 3, 4)).astype(np.float32)
  ref = torch.nn.AdaptiveAvgPool2d(out_size)(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  ours = heads.adaptive_avg_pool(jnp.asarray(x), out_size)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy().transpose(0, 2, 3, 1), rtol=1e-6,
                             atol=1e-6)


def test_adaptive_pool_matrix_rows_are_averages_over_pytorch_bins():
  m = heads.adaptive_pool_matrix(9, 6)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=1e-6)
  # Bin i spans [floor(9i/6), ceil(9(i+1)/6)): 0-2, 1-3, 3-5, 4-6, 6-8, 7-9.
  spans = [tuple(np.nonzero(row)[0][[0, -1]]) for row in m]
  assert spans == [(0, 1), (1, 2), (3, 4), (4, 5), (6, 7), (7, 8)]


# ------------------------------------------------------------------------ reference comparisons
def _torch():
  torch = pytest.importorskip('torch')
  from tests import reference_utils as ru
  ru.import_ssseg_builder()
  return torch, ru


def _act_cfg(act):
  if act == 'relu':
    return {'type': 'ReLU', 'inplace': True}
  return {'type': 'LeakyReLU', 'negative_slope': 0.01, 'inplace': True}


def _compare(ref_module, flax_module, x_nhwc, *, train):
  """Outputs (and in train mode the updated BN statistics) of both modules, same weights."""
  torch, ru = _torch()
  x_nchw = torch.from_numpy(ru.nhwc_to_nchw(x_nhwc).copy())
  ru.calibrate_batchnorm(ref_module, lambda: ref_module(x_nchw))
  shapes = jax.eval_shape(lambda x: flax_module.init(jax.random.PRNGKey(0), x),
                          jnp.asarray(x_nhwc))
  flat = {k: v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  variables = convert.convert_state_dict(ref_module.state_dict(), flat)
  ref_module.train(train)
  with torch.no_grad():
    ref_out = ru.nchw_to_nhwc(ref_module(x_nchw).numpy())
  if train:
    ours, state = flax_module.apply(variables, jnp.asarray(x_nhwc), mutable=['batch_stats'])
  else:
    ours, state = flax_module.apply(variables, jnp.asarray(x_nhwc)), None
  err = np.abs(np.asarray(ours) - ref_out).max()
  assert ours.shape == ref_out.shape
  assert err <= 1e-5 * np.abs(ref_out).max(), err
  if train:
    ref_stats = convert.convert_state_dict(ref_module.state_dict(), flat)['batch_stats']
    for key, value in flax.traverse_util.flatten_dict(ref_stats).items():
      ours_value = np.asarray(flax.traverse_util.flatten_dict(state['batch_stats'])[key])
      np.testing.assert_allclose(ours_value, value, rtol=1e-5, atol=1e-6, err_msg=str(key))


def _input(shape, seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parity
@pytest.mark.parametrize('train', [False, True])
@pytest.mark.parametrize('act', ['relu', 'leaky_relu'])
def test_aspp_matches_reference(train, act):
  torch, _ = _torch()
  from ssseg.modules.models.segmentors.deeplabv3 import ASPP as TorchASPP
  torch.manual_seed(0)
  ref = TorchASPP(16, 8, [1, 2, 3], norm_cfg={'type': 'BatchNorm2d'}, act_cfg=_act_cfg(act))
  ours = heads.ASPP(features=8, dilations=(1, 2, 3), act=act, train=train)
  _compare(ref, ours, _input((2, 9, 11, 16)), train=train)


@pytest.mark.parity
@pytest.mark.parametrize('train', [False, True])
def test_ppm_matches_reference(train):
  torch, _ = _torch()
  from ssseg.modules.models.segmentors.pspnet import PyramidPoolingModule
  torch.manual_seed(1)
  ref = PyramidPoolingModule(16, 8, [1, 2, 3, 6], norm_cfg={'type': 'BatchNorm2d'},
                             act_cfg=_act_cfg('relu'))
  ours = heads.PPM(features=8, pool_scales=(1, 2, 3, 6), train=train)
  # 9x13: bins of scales 2, 3, 6 overlap unevenly.
  _compare(ref, ours, _input((2, 9, 13, 16), seed=1), train=train)


@pytest.mark.parity
@pytest.mark.parametrize('train', [False, True])
def test_auxiliary_head_matches_reference(train):
  torch, _ = _torch()
  from ssseg.modules.models.segmentors.base.auxiliary import DefaultAuxiliaryDecoder
  torch.manual_seed(2)
  ref = DefaultAuxiliaryDecoder(in_channels=16, out_channels=8, dropout=0.0, num_classes=5,
                                norm_cfg={'type': 'BatchNorm2d'}, act_cfg=_act_cfg('relu'))
  ours = heads.DecoderHead(num_classes=5, features=8, kernel_size=3, dropout=0.0, train=train)
  _compare(ref, ours, _input((2, 7, 6, 16), seed=2), train=train)


@pytest.mark.parity
@pytest.mark.parametrize('train', [False, True])
def test_decoder_head_matches_reference_layout(train):
  """MCIBI's decoder_stage1/2: Sequential(1x1 conv, BN, ReLU, Dropout2d, 1x1 conv with bias)."""
  torch, _ = _torch()
  nn = torch.nn
  torch.manual_seed(3)
  ref = nn.Sequential(nn.Conv2d(16, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Dropout2d(0.0), nn.Conv2d(8, 5, 1))
  ours = heads.DecoderHead(num_classes=5, features=8, kernel_size=1, dropout=0.0, train=train)
  _compare(ref, ours, _input((3, 5, 4, 16), seed=3), train=train)


def test_dropout2d_drops_whole_channels_in_training_only():
  # More classes than channels, so the channel mask can be solved for from the logits.
  head = heads.ClassifierHead(num_classes=16, dropout=0.5, train=True)
  x = jnp.ones((2, 5, 6, 8))
  variables = head.init(jax.random.PRNGKey(0), x)
  kernel = variables['params']['classifier']['kernel']           # (1, 1, 8, 16)
  bias = variables['params']['classifier']['bias']
  out = head.apply(variables, x, rngs={'dropout': jax.random.PRNGKey(1)})
  # Every pixel of a sample sees the same channel mask, so the logits are constant over H, W.
  np.testing.assert_allclose(out, jnp.broadcast_to(out[:, :1, :1], out.shape), rtol=1e-6)
  # And they equal the classifier applied to a {0, 2}-valued channel mask (scale 1/(1-p)).
  masks = [np.linalg.lstsq(np.asarray(kernel[0, 0]).T, np.asarray(out[b, 0, 0] - bias),
                          rcond=None)[0] for b in range(2)]
  values = np.round(np.concatenate(masks), 3)
  assert set(values.tolist()) == {0.0, 2.0}
  eval_out = heads.ClassifierHead(num_classes=16, dropout=0.5).apply(variables, x)
  np.testing.assert_allclose(eval_out[0, 0, 0], np.asarray(kernel[0, 0]).sum(0) + bias,
                             rtol=1e-5)
