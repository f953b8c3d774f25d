"""Parity of MCIBI on HRNet with the reference (SSSegmentation 1.7.0) on CPU, float32.

The reference is built with random weights and calibrated BN (tests/reference_utils.py) and
converted with `memseg_jax.convert`. The HRNet MCIBI head reads the 720-channel concatenation
at 1/4 (here: the narrow test arch's 120 channels, or W18-small's 270), has no auxiliary head,
and, in the Cityscapes/LIP configs, a stride-2 `downsample_backbone` whose BN statistics move
four times per training step. The reference HRNet needs a workaround to be built at all (the
1.7.0 `HRModule` bug; tests/hrnet_reference.py). Comparisons use SSSegmentation 1.7.0's stem
(stem_relu=True); the other stem is compared in tests/models/backbones/test_hrnet.py.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert, losses
from memseg_jax.models import build_model
from memseg_jax.models.backbones import hrnet
from tests import reference_utils as ru
from tests.hrnet_reference import (TINY, patched_reference, project_hrnet_config,
                                   reference_hrnet_cfg)

torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')

pytestmark = pytest.mark.parity

RTOL = 1e-4        # logits, loss terms, BN statistics: max |ours - ref| <= RTOL * max |ref|
MEMORY_ATOL = 1e-5
GRAD_RTOL = 1e-3   # backbone gradients from the reference's cotangent at the backbone output
# End to end, the parameter gradients of this random network are far more sensitive to the
# forward's rounding than the forward is: the two sides' forwards agree to ~1e-5 (relative),
# and given the reference's own inputs and cotangent our head's gradients agree to ~5e-6, but
# end to end the train-mode BNs of the head (batch statistics over 2 images, channels that
# vary little across pixels) amplify the forward differences to ~1e-3 in the backbone's
# gradients. The end-to-end bound is therefore looser; it still catches any real difference
# (without the read's post-update memory, see memory.py, the error is 0.2-1).
GRAD_RTOL_END_TO_END = 1e-2
# Scale of decoder_stage1's classifier in the training tests: confident coarse predictions, as
# a trained model gives. With the near-uniform softmax of a random classifier over 150 classes
# every pixel reads almost the same memory vector, and the attention's train-mode BNs divide by
# that near-zero spread: the reference's own float32 gradients then differ from its float64
# ones by up to 1e-2. With the scale they agree to ~2e-5.
CLASSIFIER_SCALE = 10.0


def _eval_logits(arch, height, width, downsample_stride, seed=0):
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(1, 3, height, width, generator=gen)
  with patched_reference():
    model = ru.build_reference(reference_hrnet_cfg(arch, downsample_stride=downsample_stride),
                               calibration_images=images, random_memory=True, seed=seed)
    _, input_structure = ru.import_ssseg_builder()
    with torch.no_grad():
      ref = model(input_structure(images=images, mode='TEST')).seg_logits.numpy()
    config = project_hrnet_config(arch, downsample_stride=downsample_stride)
    variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
    net = build_model(config)
    ours = jax.jit(lambda v, x: net.apply(v, x, train=False))(
        variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())))['logits']
  stride = 4 * downsample_stride
  assert ref.shape == (1, 150, math.ceil(height / stride), math.ceil(width / stride))
  return ref, ru.nhwc_to_nchw(ours)


def _assert_close(name, ref, ours):
  assert ours.shape == ref.shape
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f'{name}: max abs diff {err:.3g}, max abs value {scale:.3g}, relative {err / scale:.3g}')
  assert err <= RTOL * scale, name


@pytest.mark.parametrize('arch,height,width,downsample_stride', [
    # 97x129: branches 25x33, 13x17, 7x9, 4x5 (x2^k overshoots, then the exact-size resize).
    ('hrnetv2_w18_small', 97, 129, 1),
    (TINY, 75, 61, 2),
])
def test_eval_logits_match_reference(arch, height, width, downsample_stride):
  ref, ours = _eval_logits(arch, height, width, downsample_stride)
  assert np.unique(ref.argmax(1)).size > 1     # not a degenerate case
  _assert_close(f'logits {arch} {height}x{width} ds{downsample_stride}', ref, ours)


@pytest.mark.slow
def test_eval_logits_match_reference_full_w48_lip_size():
  """The full HRNetV2p-W48 with the LIP configs' stride-2 head at a 473x473 crop (branch sizes
  119, 60, 30, 15: every fuse upsampling overshoots and is resized down)."""
  ref, ours = _eval_logits('hrnetv2_w48', 473, 473, 2, seed=5)
  assert np.unique(ref.argmax(1)).size > 1
  _assert_close('logits hrnetv2_w48 473x473 ds2', ref, ours)


# ------------------------------------------------------------------------------- training


def _train_run(arch, downsample_stride, size, seed):
  """One training forward + backward at epoch 2 on both sides (dropout off, memory loss on).

  Returns a dict of the reference's and our loss terms, BN statistics, memory and gradients.
  """
  num_classes, lr = 150, 0.00635
  kwargs = dict(dropout=0.0)
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(2, 3, *size, generator=gen)
  labels = torch.randint(0, 100, (2, *size), generator=gen)
  labels[:, :5, :] = -100
  memory = torch.rand(num_classes, 1, 512, generator=gen)
  memory[1::2] = 0                      # odd classes: lazy init; even: cosine update

  with patched_reference():
    model = ru.build_reference(
        reference_hrnet_cfg(arch, downsample_stride=downsample_stride, **kwargs),
        calibration_images=images, seed=seed)
    with torch.no_grad():
      model.memory_module.memory.copy_(memory)
      model.decoder_stage1[4].weight.mul_(CLASSIFIER_SCALE)
      model.decoder_stage1[4].bias.mul_(CLASSIFIER_SCALE)
    # The reference's gradient at the backbone output (all four selections together).
    backbone_grad = {}

    def keep_grad(grad):
      backbone_grad.setdefault('g', grad.numpy().copy())

    def keep_output_grad(module, inputs, outputs):
      del module, inputs
      outputs[0].register_hook(keep_grad)

    model.backbone_net.register_forward_hook(keep_output_grad)
    config = project_hrnet_config(arch, downsample_stride=downsample_stride, **kwargs)
    variables = convert.convert_ssseg_state_dict(model.state_dict(), config)

    model.train()
    model.mode = 'TRAIN'
    _, input_structure = ru.import_ssseg_builder()
    ref_out = model(input_structure(images=images, seg_targets=labels, mode='TRAIN'),
                    learning_rate=lr, epoch=2)
    ref_out.loss.backward()
    ref_grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters()
                 if p.grad is not None}
    ref_state = convert.convert_ssseg_state_dict(model.state_dict(), config)

    net = build_model(config)
    our_labels = jnp.asarray(np.where(labels.numpy() == -100, 255, labels.numpy()), jnp.int32)

    def loss_fn(params, x, y):
      outputs, state = net.apply({**variables, 'params': params}, x, train=True, labels=y,
                                 lr=lr, memory_loss=True, mutable=['batch_stats', 'memory'])
      terms = losses.compute_losses(outputs, y, config)
      return terms['loss_total'], (terms, state)

    x = jnp.asarray(ru.nchw_to_nhwc(images.numpy()))
    (_, (our_losses, state)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
        variables['params'], x, our_labels)

    # Our backbone's backward from the reference's cotangent at its output.
    backbone = hrnet.HRNet(arch=arch, stem_relu=True, train=True)
    def backbone_fn(params):
      (out,), _ = backbone.apply({'params': params,
                                  'batch_stats': variables['batch_stats']['backbone_net']},
                                 x, mutable=['batch_stats'])
      return out
    _, vjp = jax.vjp(backbone_fn, variables['params']['backbone_net'])
    backbone_grads, = jax.jit(vjp)(jnp.asarray(ru.nchw_to_nhwc(backbone_grad['g'])))

  # Our gradients under the reference's names (the converter's naming rule).
  flat_grads = flax.traverse_util.flatten_dict(grads)
  our_grads = {convert.torch_key(('params', *k), 'hrnet'): np.asarray(v)
               for k, v in flat_grads.items()}
  our_backbone_grads = {
      convert.torch_key(('params', 'backbone_net', *k), 'hrnet'): np.asarray(v)
      for k, v in flax.traverse_util.flatten_dict(backbone_grads).items()}
  return dict(config=config, ref_losses=ref_out.losses_log_dict, our_losses=our_losses,
              ref_state=ref_state, state=state, initial=variables, memory=memory.numpy(),
              ref_grads=ref_grads, our_grads=our_grads, our_backbone_grads=our_backbone_grads)


@pytest.fixture(scope='module')
def tiny_train():
  # 64x80: branches 16x20, 8x10, 4x5, 2x3 (2x3 x8 = 16x24 -> 16x20); head at 8x10.
  return _train_run(TINY, 2, (64, 80), seed=4)


def test_train_loss_terms_match_reference(tiny_train):
  run = tiny_train
  config, ref_losses = run['config'], run['ref_losses']
  pairs = {'loss_cls_stage2': ('loss_stage2', config.loss.stage2),
           'loss_cls_stage1': ('loss_stage1', config.loss.stage1),
           'loss_memory': ('loss_memory', config.loss.memory),
           'loss_total': ('loss_total', 1.0)}
  assert set(ref_losses) == set(pairs)           # no auxiliary loss
  assert 'loss_aux' not in run['our_losses']
  for ref_name, (name, weight) in pairs.items():
    ours = weight * float(run['our_losses'][name])
    print(f'{ref_name}: ours {ours:.7g} reference {ref_losses[ref_name]:.7g} relative diff '
          f'{abs(ours - ref_losses[ref_name]) / abs(ref_losses[ref_name]):.3g}')
    assert abs(ours - ref_losses[ref_name]) <= RTOL * abs(ref_losses[ref_name]), ref_name


def test_train_bn_statistics_match_reference_incl_the_4x_downsample_backbone(tiny_train):
  run = tiny_train
  ref_stats = flax.traverse_util.flatten_dict(run['ref_state']['batch_stats'])
  our_stats = flax.traverse_util.flatten_dict(run['state']['batch_stats'])
  assert set(ref_stats) == set(our_stats)
  worst = 0.0
  for key, ref_value in ref_stats.items():
    err = np.abs(np.asarray(our_stats[key]) - ref_value).max() / np.abs(ref_value).max()
    worst = max(worst, err)
    assert err <= RTOL, key
  print(f'BN running statistics ({len(ref_stats)} arrays): worst relative diff {worst:.3g}')
  # The downsample_backbone BN moved 4 times: r4 = 0.9^4 r0 + (1 - 0.9^4) b. A single update
  # (0.9 r0 + 0.1 b, b recovered from the reference) would be far outside the tolerance.
  key = ('downsample_backbone', 'bn', 'mean')
  r0 = np.asarray(flax.traverse_util.flatten_dict(run['initial']['batch_stats'])[key])
  r4 = ref_stats[key]
  batch = (r4 - 0.9 ** 4 * r0) / (1 - 0.9 ** 4)
  once = 0.9 * r0 + 0.1 * batch
  sensitivity = np.abs(once - r4).max() / np.abs(r4).max()
  print(f'downsample_backbone BN mean: one update instead of four would differ by {sensitivity:.3g}'
        ' (relative)')
  assert sensitivity > 100 * RTOL


def test_train_memory_update_matches_reference(tiny_train):
  run = tiny_train
  ref_memory = run['ref_state']['memory']['memory_module']['memory']
  our_memory = np.asarray(run['state']['memory']['memory_module']['memory'])
  err = np.abs(our_memory - ref_memory).max()
  print(f'memory after the update: max abs diff {err:.3g}')
  np.testing.assert_allclose(our_memory, ref_memory, rtol=0, atol=MEMORY_ATOL)
  old = run['memory']
  assert np.all(old[100:] == our_memory[100:])          # absent classes untouched
  assert np.all(our_memory[1:100:2] != 0)               # lazy init happened


# Stem, a middle block, the last block (and its fuse layer).
BACKBONE_GRAD_KEYS = (
    'backbone_net.conv1.weight',
    'backbone_net.bn1.weight',
    'backbone_net.stage3.0.branches.1.0.conv1.weight',
    'backbone_net.stage3.1.fuse_layers.2.0.1.0.weight',
    'backbone_net.stage4.0.branches.3.0.conv2.weight',
    'backbone_net.stage4.0.branches.1.1.bn2.bias',
    'backbone_net.stage4.0.fuse_layers.0.3.0.weight',
)


def _grad_diff(ours, ref):
  if ours.ndim == 4:
    ours = ours.transpose(3, 2, 0, 1)      # HWIO -> OIHW
  scale = np.abs(ref).max()
  assert scale > 0
  return np.abs(ours - ref).max() / scale


def test_train_backbone_gradients_match_reference(tiny_train):
  """d(total loss)/d(backbone parameters) from the reference's gradient at the backbone output
  (the backbone's own backward: the stem, a middle block and the last block)."""
  run = tiny_train
  for key in BACKBONE_GRAD_KEYS:
    err = _grad_diff(run['our_backbone_grads'][key], run['ref_grads'][key])
    print(f'grad {key} (backbone backward): relative diff {err:.3g}')
    assert err <= GRAD_RTOL, key
  worst = max((_grad_diff(g, run['ref_grads'][k]), k) for k, g in run['our_backbone_grads'].items())
  print(f'worst over all {len(run["our_backbone_grads"])} backbone parameters: {worst[0]:.3g} '
        f'({worst[1]})')
  assert worst[0] <= GRAD_RTOL


def test_train_gradients_end_to_end_match_reference(tiny_train):
  """d(total loss)/d(parameters) through the whole model, incl. the memory read whose gradient
  uses the updated memory, and the 4x-applied downsample_backbone."""
  run = tiny_train
  for key in BACKBONE_GRAD_KEYS + ('downsample_backbone.0.weight', 'bottleneck.0.weight',
                                   'decoder_stage1.0.weight', 'decoder_stage2.0.weight'):
    err = _grad_diff(run['our_grads'][key], run['ref_grads'][key])
    print(f'grad {key} (end to end): relative diff {err:.3g}')
    assert err <= GRAD_RTOL_END_TO_END, key
  worst = max((_grad_diff(g, run['ref_grads'][k]), k) for k, g in run['our_grads'].items())
  print(f'worst over all {len(run["our_grads"])} parameters (end to end): {worst[0]:.3g} '
        f'({worst[1]})')
