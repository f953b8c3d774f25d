"""The MCIBI++ distribution memory against the reference `FeaturesMemoryV2` (SSSegmentation 1.7.0).

The fixed noise z is regenerated with PyTorch and must be bit-identical to the shipped file; the
sampled read matrix (K, 512) must be bit-identical to the one the reference's forward returns;
the update within 1e-6 (mean and std), in the upsampling and the fused form; the module's eval
forward within 1e-5 of the reference's output scale. The reference marks ignored pixels with
-100, this project with 255, on the same positions.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert, ops
from memseg_jax.models import memory as mem_lib
from tests import reference_utils as ru

torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')
pytestmark = pytest.mark.parity

IGNORE, REF_IGNORE = 255, -100
MOMENTUM_CFG = {'base_momentum': 0.1, 'base_lr': None, 'adjust_by_learning_rate': False}


def _reference_class():
  ru.import_ssseg_builder()      # registers the torchvision stand-in first
  from ssseg.modules.models.segmentors.mcibiplusplus.memoryv2 import FeaturesMemoryV2
  return FeaturesMemoryV2


def _reference(k, c=512, transform=256, out=512, use_hard=False, downsample=False):
  return _reference_class()(num_classes=k, feats_channels=c, transform_channels=transform,
                            out_channels=out, use_hard_aggregate=use_hard,
                            downsample_before_sa=downsample, norm_cfg={'type': 'BatchNorm2d'},
                            act_cfg={'type': 'ReLU', 'inplace': True})


def _random_memory(k, seed):
  r = np.random.RandomState(seed)
  # Signed means, stds in (0, 2): every row of the read differs from z.
  return np.stack([r.randn(k), r.uniform(0.05, 2.0, k)], axis=1).astype(np.float32)


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(ru.nhwc_to_nchw(x)))


def test_noise_file_is_bit_identical_to_a_fresh_torch_draw():
  from scripts.make_mcibipp_noise import reference_noise
  stored = np.load(mem_lib.NOISE_FILE)
  fresh = reference_noise()
  assert stored.dtype == np.float32 and stored.shape == (182, 512)
  np.testing.assert_array_equal(stored, fresh)
  # Narrower widths (multiples of 16) are prefixes of the stored rows, as memory_noise assumes.
  for c in (16, 64, 256):
    np.testing.assert_array_equal(mem_lib.memory_noise(40, c), reference_noise(40, c))


@pytest.mark.parametrize('k', [150, 182])
def test_read_matrix_is_bit_identical_to_the_reference(k):
  memory = _random_memory(k, seed=k)
  ref = _reference(k)
  ref.eval()
  with torch.no_grad():
    ref.memory.data.copy_(torch.from_numpy(memory))
    feats = torch.randn(1, 512, 2, 3, generator=torch.Generator().manual_seed(0))
    preds = torch.randn(1, k, 2, 3, generator=torch.Generator().manual_seed(1))
    ref_read = ref(feats, preds)[0].numpy()
  noise = mem_lib.memory_noise(k, 512)
  ours = np.asarray(jax.jit(mem_lib.read_distribution_memory)(memory, noise))
  mismatches = int(np.sum(ours != ref_read))
  # The same two roundings as numpy's float32 z * std + mean, and not one fused multiply-add.
  fma = (noise.astype(np.float64) * memory[:, 1:2] + memory[:, 0:1]).astype(np.float32)
  print(f'K={k}: read entries differing from the reference: {mismatches} of {ours.size} '
        f'(a fused multiply-add would differ in {int(np.sum(fma != ref_read))})')
  assert ours.dtype == np.float32 and ours.shape == (k, 512)
  np.testing.assert_array_equal(ours, ref_read)
  # The module's read, jitted with the rest of its forward, too.
  module = mem_lib.FeaturesMemoryV2(k, feats_channels=512, transform_channels=16, out_channels=8)
  x = jnp.zeros((1, 2, 3, 512))
  p = jnp.zeros((1, 2, 3, k))
  variables = module.init(jax.random.PRNGKey(0), x, p)
  variables = {**variables, 'memory': {'memory': jnp.asarray(memory)}}
  read, _ = jax.jit(module.apply)(variables, x, p)
  np.testing.assert_array_equal(np.asarray(read), ref_read)


def _update_case(seed, k=20, c=512, b=2, h=6, w=7, size=(45, 53)):
  r = np.random.RandomState(seed)
  memory = _random_memory(k, seed)
  feats = np.maximum(r.randn(b, h, w, c), 0).astype(np.float32)    # post-ReLU like F
  labels = r.randint(0, k - 4, size=(b, *size)).astype(np.int32)   # the last 4 classes absent
  labels[:, :3] = IGNORE
  return memory, feats, labels


def test_update_matches_reference_naive_and_fused():
  memory, feats, labels = _update_case(0)
  k = memory.shape[0]
  ref = _reference(k)
  with torch.no_grad():
    ref.memory.data.copy_(torch.from_numpy(memory))
    up = torch.nn.functional.interpolate(_nchw(feats), size=labels.shape[1:], mode='bilinear',
                                         align_corners=False)
    ref.update(up, torch.from_numpy(np.where(labels == IGNORE, REF_IGNORE, labels)).long(),
               ignore_index=REF_IGNORE, momentum_cfg=MOMENTUM_CFG, learning_rate=0.01)
  ref_memory = ref.memory.data.numpy()
  naive = np.asarray(jax.jit(lambda m, f, y: mem_lib.update_distribution_memory(
      m, ops.resize_bilinear(f, y.shape[1:]), y, momentum=0.1))(memory, feats, labels))
  fused = np.asarray(jax.jit(lambda m, f, y: mem_lib.update_distribution_memory_fused(
      m, f, y, momentum=0.1))(memory, feats, labels))
  for name, ours in (('naive', naive), ('fused', fused)):
    err = np.abs(ours - ref_memory).max(axis=0)
    print(f'{name} update: max abs diff mean {err[0]:.2e}, std {err[1]:.2e}')
    np.testing.assert_allclose(ours, ref_memory, rtol=0, atol=1e-6)
  # Absent classes kept bit for bit, present ones moved.
  np.testing.assert_array_equal(fused[-4:], memory[-4:])
  assert np.all(np.abs(fused[:-4] - memory[:-4]).max(axis=1) > 1e-4)


def _copy_weights(ref, module, *inputs):
  shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *inputs))
  flat = {k: v.shape for k, v in flax.traverse_util.flatten_dict(shapes).items()}
  return convert.convert_state_dict(ru.to_numpy_state_dict(ref), flat, 'FeaturesMemoryV2')


@pytest.mark.parametrize('use_hard,downsample', [(False, False), (True, False), (False, True)])
def test_forward_matches_reference_in_eval_mode(use_hard, downsample):
  k, c, t = 7, 32, 16
  ref = _reference(k, c=c, transform=t, out=24, use_hard=use_hard, downsample=downsample)
  g = torch.Generator().manual_seed(3)
  with torch.no_grad():
    for name, tensor in ref.state_dict().items():
      if name.endswith('running_var') or (name.endswith('weight') and tensor.ndim == 1):
        tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
      elif name.endswith('weight'):
        tensor.copy_(torch.randn(tensor.shape, generator=g) / np.sqrt(tensor[0].numel()))
      elif name == 'memory':
        tensor.copy_(torch.from_numpy(_random_memory(k, 4)))
      elif not name.endswith('num_batches_tracked'):
        tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)
  ref.eval()
  r = np.random.RandomState(5)
  feats = r.randn(2, 7, 5, c).astype(np.float32)      # odd sizes: stride 2 gives 4x3
  preds = (r.randn(2, 7, 5, k) * 2).astype(np.float32)
  ours = mem_lib.FeaturesMemoryV2(k, feats_channels=c, transform_channels=t, out_channels=24,
                                  use_hard_aggregate=use_hard, downsample_before_sa=downsample)
  variables = _copy_weights(ref, ours, feats, preds)
  read, out = jax.jit(ours.apply)(variables, feats, preds)
  with torch.no_grad():
    ref_read, ref_out = ref(_nchw(feats), _nchw(preds))
  ref_out = ru.nchw_to_nhwc(ref_out.numpy())
  np.testing.assert_array_equal(np.asarray(read), ref_read.numpy())
  err = np.abs(np.asarray(out) - ref_out).max() / np.abs(ref_out).max()
  print(f'hard={use_hard} downsample={downsample}: output relative diff {err:.2e}')
  assert err <= 1e-5
