"""resize_bilinear / interp_matrix against torch.nn.functional.interpolate (the reference's op)."""

import numpy as np
import pytest

from memseg_jax import ops

torch = pytest.importorskip('torch')
F = torch.nn.functional


def _torch_resize(x_nhwc, size=None, scale_factor=None, align_corners=False):
  t = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
  y = F.interpolate(t, size=size, scale_factor=scale_factor, mode='bilinear',
                    align_corners=align_corners)
  return y.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize('in_hw,out_hw', [((8, 8), (64, 64)), ((13, 17), (97, 129)),
                                          ((64, 86), (37, 50)), ((5, 7), (5, 7)),
                                          ((1, 1), (9, 4)), ((9, 11), (3, 2))])
@pytest.mark.parametrize('align_corners', [False, True])
def test_resize_matches_torch_interpolate_for_sizes(in_hw, out_hw, align_corners):
  x = np.random.RandomState(0).randn(2, *in_hw, 3).astype(np.float32)
  ours = np.asarray(ops.resize_bilinear(x, out_hw, align_corners=align_corners))
  ref = _torch_resize(x, size=out_hw, align_corners=align_corners)
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize('in_hw,scale', [((37, 53), 0.75), ((37, 53), 1.25), ((64, 86), 1.75),
                                         ((30, 41), 0.5), ((21, 33), 1.5)])
def test_resize_by_scale_factor_uses_torch_coordinate_mapping(in_hw, scale):
  x = np.random.RandomState(1).randn(1, *in_hw, 2).astype(np.float32)
  ours = np.asarray(ops.resize_bilinear(x, scale_factor=scale))
  ref = _torch_resize(x, scale_factor=scale)
  assert ours.shape == ref.shape
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


@pytest.mark.parametrize('in_size,out_size', [(8, 64), (13, 97), (86, 37), (1, 5)])
def test_interp_matrix_reproduces_resize_along_one_axis(in_size, out_size):
  x = np.random.RandomState(2).randn(1, in_size, 1, 4).astype(np.float32)
  m = ops.interp_matrix(in_size, out_size)
  np.testing.assert_allclose(m.sum(1), 1.0, atol=1e-6)
  via_matrix = np.einsum('oi,bic->boc', m, x[:, :, 0, :])
  ref = _torch_resize(x, size=(out_size, 1))[:, :, 0, :]
  np.testing.assert_allclose(via_matrix, ref, atol=2e-6)


def test_resize_rejects_both_or_neither_size_arguments():
  x = np.zeros((1, 4, 4, 1), np.float32)
  with pytest.raises(ValueError):
    ops.resize_bilinear(x)
  with pytest.raises(ValueError):
    ops.resize_bilinear(x, (2, 2), scale_factor=0.5)
