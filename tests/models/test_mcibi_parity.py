"""Parity of the Flax MCIBI / DeepLabV3 with the reference (SSSegmentation 1.7.0) on CPU, float32.

Each test builds the reference model with random weights (BN statistics calibrated on the
test's own images and perturbed, a random non-zero memory for eval; see
tests/reference_utils.py), converts its state_dict with `memseg_jax.convert`, and compares the
outputs of the same images. The reference uses the ignore label -100, the project 255, on the
same pixels.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert, losses, ops
from memseg_jax.models import build_model
from tests import reference_utils as ru

torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')

pytestmark = pytest.mark.parity

# Acceptance bound: max |ours - reference| <= RTOL * max |reference|.
RTOL = 1e-4


def _eval_logits(kwargs, height, width, *, seed=0):
  """(reference, ours) eval logits, NCHW numpy, for one random image of the given size."""
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(1, 3, height, width, generator=gen)
  model = ru.build_reference(ru.reference_cfg(**kwargs), calibration_images=images,
                             random_memory=True, seed=seed)
  _, input_structure = ru.import_ssseg_builder()
  with torch.no_grad():
    ref = model(input_structure(images=images, mode='TEST')).seg_logits.numpy()
  config = ru.project_config(**kwargs)
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
  net = build_model(config)
  ours = jax.jit(lambda v, x: net.apply(v, x, train=False))(
      variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())))['logits']
  return ref, ru.nhwc_to_nchw(ours)


def _assert_logits_match(ref, ours, num_classes, height, width):
  assert ours.shape == ref.shape == (1, num_classes, math.ceil(height / 8), math.ceil(width / 8))
  # Not a degenerate case: the prediction varies over the image.
  assert np.unique(ref.argmax(1)).size > 1
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f'logits {height}x{width}: max abs diff {err:.3g}, max abs logit {scale:.3g}, '
        f'relative {err / scale:.3g}')
  assert err <= RTOL * scale, f'max abs diff {err:.3g} vs max abs logit {scale:.3g}'


@pytest.mark.parametrize('height,width', [(64, 64), (97, 129)])
def test_eval_logits_match_reference_ade20k_r50(height, width):
  ref, ours = _eval_logits({}, height, width)
  _assert_logits_match(ref, ours, 150, height, width)


def test_eval_logits_match_reference_ppm_variant():
  # 72x104 -> a 9x13 map: PPM bins of scales 2, 3 and 6 overlap unevenly there.
  kwargs = dict(num_classes=19, head_type='ppm')
  ref, ours = _eval_logits(kwargs, 72, 104, seed=1)
  _assert_logits_match(ref, ours, 19, 72, 104)


def test_eval_logits_match_reference_resnet18():
  kwargs = dict(depth=18)
  ref, ours = _eval_logits(kwargs, 64, 48, seed=2)
  _assert_logits_match(ref, ours, 150, 64, 48)


def test_eval_logits_match_reference_deeplabv3():
  kwargs = dict(model='deeplabv3')
  ref, ours = _eval_logits(kwargs, 64, 64, seed=3)
  _assert_logits_match(ref, ours, 150, 64, 64)


@pytest.mark.parametrize('fused_update', [True, False], ids=['fused', 'naive'])
def test_train_forward_losses_memory_and_bn_stats_match_reference(fused_update):
  """One training forward at epoch 2 (memory loss on), dropout off in both.

  Both forms of the memory update: the fused one (the default) and the reference's literal one
  (upsample F to the label size, then update).
  """
  num_classes, lr = 150, 0.00635
  kwargs = dict(dropout=0.0, aux_dropout=0.0)
  gen = torch.Generator().manual_seed(4)
  images = torch.randn(2, 3, 64, 64, generator=gen)
  # Classes 0..99 only (100..149 absent), a band of ignored pixels.
  labels = torch.randint(0, 100, (2, 64, 64), generator=gen)
  labels[:, :5, :] = -100
  # Odd classes start empty (lazy-init branch), even classes stored (cosine branch).
  memory = torch.rand(num_classes, 1, 512, generator=gen)
  memory[1::2] = 0

  model = ru.build_reference(ru.reference_cfg(**kwargs), calibration_images=images, seed=4)
  with torch.no_grad():
    model.memory_module.memory.copy_(memory)
  config = ru.project_config(**kwargs, overrides={'model.memory.fused_update': fused_update})
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)

  model.train()
  model.mode = 'TRAIN_DEVELOP'   # also returns the upsampled final logits
  _, input_structure = ru.import_ssseg_builder()
  ref_out = model(input_structure(images=images, seg_targets=labels, mode='TRAIN_DEVELOP'),
                  learning_rate=lr, epoch=2)
  ref_losses = ref_out.losses_log_dict
  ref_state = convert.convert_ssseg_state_dict(model.state_dict(), config)

  net = build_model(config)
  our_labels = jnp.asarray(np.where(labels.numpy() == -100, 255, labels.numpy()).astype(np.int32))

  @jax.jit
  def forward(v, x, y):
    outputs, state = net.apply(v, x, train=True, labels=y, lr=lr, memory_loss=True,
                               mutable=['batch_stats', 'memory'])
    return outputs, state, losses.compute_losses(outputs, y, config)

  outputs, state, our_losses = forward(
      variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())), our_labels)

  # The reference logs each term already multiplied by its weight.
  pairs = {'loss_cls_stage2': ('loss_stage2', config.loss.stage2),
           'loss_cls_stage1': ('loss_stage1', config.loss.stage1),
           'loss_aux': ('loss_aux', config.loss.aux),
           'loss_memory': ('loss_memory', config.loss.memory),
           'loss_total': ('loss_total', 1.0)}
  assert set(ref_losses) == set(pairs)
  for ref_name, (name, weight) in pairs.items():
    ours = weight * float(our_losses[name])
    print(f'{ref_name}: ours {ours:.7g} reference {ref_losses[ref_name]:.7g} relative diff '
          f'{abs(ours - ref_losses[ref_name]) / abs(ref_losses[ref_name]):.3g}')
    assert abs(ours - ref_losses[ref_name]) <= RTOL * abs(ref_losses[ref_name]), (
        ref_name, ours, ref_losses[ref_name])

  ref_logits = ref_out.seg_logits.detach().numpy()
  our_logits = ru.nhwc_to_nchw(ops.resize_bilinear(outputs['logits'], (64, 64)))
  assert np.abs(our_logits - ref_logits).max() <= RTOL * np.abs(ref_logits).max()

  ref_memory = ref_state['memory']['memory_module']['memory']
  our_memory = np.asarray(state['memory']['memory_module']['memory'])
  print(f'memory after the update: max abs diff {np.abs(our_memory - ref_memory).max():.3g}')
  np.testing.assert_allclose(our_memory, ref_memory, rtol=0, atol=1e-5)
  # Both update branches and the untouched rows were exercised.
  old = memory.numpy()
  assert np.all(old[100:] == our_memory[100:])
  assert np.all(our_memory[1:100:2] != 0) and not np.allclose(our_memory[0:100:2], old[0:100:2])

  # BN running statistics after the step, decoder_stage2's moved twice (pixels, then memory).
  ref_stats = flax.traverse_util.flatten_dict(ref_state['batch_stats'])
  our_stats = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert set(ref_stats) == set(our_stats)
  for key, ref_value in ref_stats.items():
    err = np.abs(np.asarray(our_stats[key]) - ref_value).max()
    assert err <= RTOL * np.abs(ref_value).max(), key


def test_parameter_count_matches_reference():
  """ADE20K R-50 MCIBI: the reference counts 91,487,522 parameters (incl. the memory)."""
  build_segmentor, _ = ru.import_ssseg_builder()
  model = build_segmentor(ru.reference_cfg(), mode='TEST')
  ref_parameters = sum(p.numel() for p in model.parameters())
  state_dict = model.state_dict()
  ref_state_values = sum(v.numel() for k, v in state_dict.items()
                         if not k.endswith('num_batches_tracked'))
  shapes = convert.variable_shapes(ru.project_config())
  count = lambda cols: sum(int(np.prod(s)) for k, s in shapes.items() if k[0] in cols)
  print(f'parameters + memory: ours {count({"params", "memory"}):,} reference {ref_parameters:,}'
        f' (params {count({"params"}):,}, memory {count({"memory"}):,})')
  assert ref_parameters == 91_487_522
  # The reference's parameters() are our params + the memory; its BN buffers our batch_stats.
  assert count({'params', 'memory'}) == ref_parameters
  assert count({'params', 'batch_stats', 'memory'}) == ref_state_values
