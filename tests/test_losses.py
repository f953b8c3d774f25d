"""Pixel cross-entropy (upsampled logits, ignore label) and the weighted loss dictionary."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import losses, ops
from memseg_jax.models import memory as memory_lib
from tests import reference_utils as ru


def _random_case(seed=0, k=5, low=(3, 4), full=(11, 13), ignore_frac=0.2):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(2, *low, k)).astype(np.float32) * 3
  labels = rng.integers(0, k, size=(2, *full)).astype(np.int32)
  labels[rng.random(labels.shape) < ignore_frac] = 255
  return logits, labels


def test_cross_entropy_matches_torch_interpolate_then_cross_entropy():
  torch = pytest.importorskip('torch')
  F = torch.nn.functional
  logits, labels = _random_case()
  up = F.interpolate(torch.from_numpy(ru.nhwc_to_nchw(logits).copy()), size=labels.shape[1:],
                     mode='bilinear', align_corners=False)
  ref = F.cross_entropy(up, torch.from_numpy(labels).long(), ignore_index=255).item()
  ours = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 255))
  assert abs(ours - ref) <= 1e-6 * abs(ref)


def test_cross_entropy_hand_worked_example():
  # Same-size logits (no resize): two valid pixels, one ignored.
  logits = np.array([[[[2.0, 0.0], [0.0, 0.0], [5.0, -5.0]]]], np.float32)   # (1, 1, 3, 2)
  labels = np.array([[[0, 1, 255]]], np.int32)
  expected = (np.log1p(np.exp(-2.0)) + np.log(2.0)) / 2
  ours = float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels)))
  assert abs(ours - expected) < 1e-6


def test_cross_entropy_is_zero_when_every_pixel_is_ignored():
  logits, labels = _random_case()
  labels[:] = 255
  assert float(losses.cross_entropy(jnp.asarray(logits), jnp.asarray(labels))) == 0.0


def _config(name='mcibi'):
  return ru.project_config(model=name, num_classes=5)


def test_compute_losses_weights_the_terms_as_configured():
  logits, labels = _random_case(1)
  outputs = {'logits': jnp.asarray(logits), 'preds_stage1': jnp.asarray(logits[::-1]),
             'preds_aux': jnp.asarray(logits * 0.5),
             'preds_memory': jnp.asarray(np.random.default_rng(2).normal(size=(5, 5)),
                                         jnp.float32)}
  config = _config()
  out = losses.compute_losses(outputs, jnp.asarray(labels), config)
  ce = lambda x: float(losses.cross_entropy(jnp.asarray(x), jnp.asarray(labels)))
  assert float(out['loss_stage2']) == pytest.approx(ce(logits), rel=1e-6)
  assert float(out['loss_stage1']) == pytest.approx(ce(logits[::-1]), rel=1e-6)
  assert float(out['loss_aux']) == pytest.approx(ce(logits * 0.5), rel=1e-6)
  assert float(out['loss_memory']) == pytest.approx(
      float(memory_lib.memory_loss(outputs['preds_memory'], 1)), rel=1e-6)
  expected = (1.0 * out['loss_stage2'] + 0.4 * out['loss_stage1'] + 0.4 * out['loss_aux']
              + 1.0 * out['loss_memory'])
  assert (config.loss.stage2, config.loss.stage1, config.loss.aux, config.loss.memory) == (
      1.0, 0.4, 0.4, 1.0)
  assert float(out['loss_total']) == pytest.approx(float(expected), rel=1e-6)

  del outputs['preds_memory']
  out = losses.compute_losses(outputs, jnp.asarray(labels), config)
  assert 'loss_memory' not in out
  assert float(out['loss_total']) == pytest.approx(
      float(out['loss_stage2'] + 0.4 * out['loss_stage1'] + 0.4 * out['loss_aux']), rel=1e-6)


def test_compute_losses_deeplabv3_has_cls_and_aux():
  logits, labels = _random_case(3)
  outputs = {'logits': jnp.asarray(logits), 'preds_aux': jnp.asarray(logits * 2)}
  out = losses.compute_losses(outputs, jnp.asarray(labels), _config('deeplabv3'))
  assert set(out) == {'loss_cls', 'loss_aux', 'loss_total'}
  assert float(out['loss_total']) == pytest.approx(
      float(out['loss_cls'] + 0.4 * out['loss_aux']), rel=1e-6)


@pytest.mark.parametrize('rows', [1, 5, 64])
def test_blockwise_cross_entropy_equals_upsampling_everything_first(monkeypatch, rows):
  """Value and gradient of the row-block form against the whole upsampled logits.

  Blocks of 1, 5 (61 rows: the last block padded with ignored rows) and all rows.
  """
  rng = np.random.default_rng(5)
  logits = jnp.asarray(rng.normal(size=(2, 8, 9, 6)) * 3, jnp.float32)
  labels = rng.integers(0, 6, (2, 61, 70))
  labels[:, :4] = 255
  labels = jnp.asarray(labels, jnp.int32)
  monkeypatch.setattr(losses, '_CE_BLOCK_ELEMENTS', 2 * 70 * 6 * rows)
  assert losses._ce_block_rows(2, 61, 70, 6) == min(rows, 61)

  def whole(x):      # the direct form: upsample, log-softmax, mean over labelled pixels
    up = jax.nn.log_softmax(ops.resize_bilinear(x, (61, 70)), axis=-1)
    valid = labels != 255
    nll = -jnp.take_along_axis(up, jnp.where(valid, labels, 0)[..., None], axis=-1)[..., 0]
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.sum(valid)

  value, grad = jax.value_and_grad(lambda x: losses.cross_entropy(x, labels))(logits)
  ref_value, ref_grad = jax.value_and_grad(whole)(logits)
  assert float(value) == pytest.approx(float(ref_value), rel=1e-6)
  np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-5, atol=1e-8)
