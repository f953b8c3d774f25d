"""Parity of MCIBI with a ResNeSt backbone (S-101-D8) with the reference, CPU float32.

As tests/models/test_mcibi_parity.py: the reference is built with random weights (BN statistics
calibrated on the test's own images, a random non-zero memory for eval), its state_dict is
converted with `memseg_jax.convert`, and the same images go through both. Compared: eval logits
at odd, non-square sizes; one training forward at epoch 2 (every loss term, BN running
statistics, the memory after the update); and the gradient of the total loss with respect to
parameters of the stem, a middle block and the last block.

Most cases run a reduced-depth ResNeSt ("S-14": one block per stage, registered in both
implementations for the test) with every kind of layer of S-101: the deep stem, the pooled
shortcut at stride 1 and 2, the avd pool of layer2.0, split attention at dilations 1, 2 and 4.
Full-depth S-101 runs the eval case at 97x129 by default and the training case as a slow test.
"""

import math

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import convert, losses, ops
from memseg_jax.models import build_model
from memseg_jax.models.backbones import resnest
from tests import reference_utils as ru
from tests.models.backbones.test_resnest import (  # pylint: disable=unused-import
    project_overrides, reduced_depth, reference_backbone)

torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')

pytestmark = pytest.mark.parity

RTOL = 1e-4          # logits, loss terms, BN statistics: max |ours - ref| <= RTOL * max |ref|
MEMORY_ATOL = 1e-5
TOTAL_GRAD_RTOL = 1e-2   # see _train_step_parity


def _kwargs(depth, **kwargs):
  return dict(kwargs, backbone=reference_backbone(depth))


def _project_config(depth, **kwargs):
  return ru.project_config(**kwargs, overrides=project_overrides(depth))


def _eval_logits(depth, height, width, *, seed=0):
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(1, 3, height, width, generator=gen)
  model = ru.build_reference(ru.reference_cfg(**_kwargs(depth)), calibration_images=images,
                             random_memory=True, seed=seed)
  _, input_structure = ru.import_ssseg_builder()
  with torch.no_grad():
    ref = model(input_structure(images=images, mode='TEST')).seg_logits.numpy()
  config = _project_config(depth)
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
  net = build_model(config)
  ours = jax.jit(lambda v, x: net.apply(v, x, train=False))(
      variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())))['logits']
  ours = ru.nhwc_to_nchw(ours)
  assert ours.shape == ref.shape == (1, 150, math.ceil(height / 8), math.ceil(width / 8))
  assert np.unique(ref.argmax(1)).size > 1       # the prediction varies over the image
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f'S-{depth} logits {height}x{width}: max abs diff {err:.3g}, max abs logit {scale:.3g}, '
        f'relative {err / scale:.3g}')
  assert err <= RTOL * scale


def test_eval_logits_match_reference_s101_full_depth():
  # 97x129 -> 25x33 at layer2.0's input: both pools of the strided block see odd sizes.
  _eval_logits(101, 97, 129)


def test_eval_logits_match_reference_reduced_depth(reduced_depth):
  # 75x58 -> 19x15 at 1/4 (odd both ways), 10x8 at 1/8.
  _eval_logits(reduced_depth, 75, 58, seed=1)


# Gradients compared: the stem, the strided block's shortcut and attention, a middle block, the
# last block (torch names; `{mid}` / `{last}` are filled in per depth).
GRAD_KEYS = ('backbone_net.stem.0.weight', 'backbone_net.stem.4.weight',
             'backbone_net.layer2.0.downsample.1.weight', 'backbone_net.layer2.0.conv2.fc2.bias',
             'backbone_net.layer3.{mid}.conv2.conv.weight',
             'backbone_net.layer3.{mid}.conv2.fc1.weight',
             'backbone_net.layer4.{last}.conv3.weight', 'backbone_net.layer4.{last}.conv2.bn0.weight',
             'decoder_stage2.4.weight')


@pytest.fixture
def memory_read_gradient(monkeypatch):
  """The reference's gradient through the memory read taken at the memory that was read.

  The reference reads the memory as `self.memory.data[:, 0, :]` (`torch.matmul(weight_cls,
  memory)`, weight_cls = softmax(preds_stage1), not detached) and then updates that same
  storage in place (`.data.copy_`, untracked by autograd) before `backward()`. Its backward
  therefore forms d loss / d weight_cls with the memory *after* the update: the gradient
  reaching decoder_stage1, the bottleneck and the whole backbone through the memory read is
  that of a read of the updated memory, while the forward read the old one (in multi-GPU runs:
  the rank's locally updated memory, before the cross-rank average). memseg_jax differentiates
  the forward it computed (the read of the old memory). Measured on the reduced-depth case
  below without this fixture: decoder_stage1's gradient differs by 1.2x its size, the stem's by
  0.29x (the forward, losses, BN statistics and memory agree to 1e-5).

  So the test moves the reference's memory to a fresh storage after its read (the update then
  writes there, the read's saved operand keeps the values read) and gives the memory loss the
  updated memory, as its `stored_memory` alias did. Forward values are unchanged.
  """
  ru.import_ssseg_builder()
  from ssseg.modules.models.segmentors.mcibi.mcibi import MCIBI as TorchMCIBI
  from ssseg.modules.models.segmentors.mcibi.memory import FeaturesMemory
  forward, memory_loss = FeaturesMemory.forward, TorchMCIBI.calculatememoryloss

  def forward_then_move_the_memory(self, *args, **kwargs):
    stored_memory, memory_output = forward(self, *args, **kwargs)
    self.memory.data = stored_memory.clone()
    return stored_memory, memory_output

  def memory_loss_on_the_updated_memory(self, stored_memory):
    del stored_memory   # the values read by the forward, no longer those of the update
    return memory_loss(self, self.memory_module.memory.data)

  monkeypatch.setattr(FeaturesMemory, 'forward', forward_then_move_the_memory)
  monkeypatch.setattr(TorchMCIBI, 'calculatememoryloss', memory_loss_on_the_updated_memory)


def _train_step_parity(depth, *, seed=4, size=(61, 75), batch=4):
  """One training forward + backward at epoch 2 (memory loss on), dropout off in both.

  The images differ in their global statistics (a scale and a per-channel offset each): the
  train-mode BNs over per-image quantities (the split attentions' bn1 and the ASPP's pooled
  branch see one value per image; the attention over the ASPP features gives nearly one value
  per image) normalise the differences between the images, and with i.i.d. noise images those
  are tiny differences of nearly equal means, which float32 rounding swamps (the reference's own
  float32 and float64 gradients then differed by 1e-2 to 3e-2).

  The gradient of the total loss is compared to TOTAL_GRAD_RTOL, not 1e-3: through the random
  head in train mode it is ill-conditioned. The reference in float64, its input images scaled
  by (1 + 1e-6 * noise), moves its own gradients by up to 2e-2 (memory_module.bottleneck), 2.7e-3
  (layer2.0's split-attention conv) and 1.3e-3 (stem.0), while the forward differences between
  the two float32 implementations are ~1e-6 (an R-18 MCIBI shows the same). The backbone's own
  backward is compared at 1e-3 (measured ~1e-5) in
  tests/models/backbones/test_resnest.py::test_backbone_gradients_match_reference.
  """
  num_classes, lr = 150, 0.0027
  kwargs = dict(dropout=0.0, aux_dropout=0.0, base_lr=0.004)
  gen = torch.Generator().manual_seed(seed)
  images = (torch.randn(batch, 3, *size, generator=gen)
            * torch.linspace(0.5, 1.5, batch).view(batch, 1, 1, 1)
            + torch.randn(batch, 3, 1, 1, generator=gen))
  labels = torch.randint(0, 100, (batch, *size), generator=gen)   # classes 100..149 absent
  labels[:, :5, :] = -100
  memory = torch.rand(num_classes, 1, 512, generator=gen)
  memory[1::2] = 0                      # odd classes start empty (lazy init), even stored

  model = ru.build_reference(ru.reference_cfg(**_kwargs(depth, **kwargs)),
                             calibration_images=images, seed=seed)
  with torch.no_grad():
    model.memory_module.memory.copy_(memory)
  config = _project_config(depth, **kwargs)
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)

  model.train()
  model.mode = 'TRAIN_DEVELOP'
  _, input_structure = ru.import_ssseg_builder()
  ref_out = model(input_structure(images=images, seg_targets=labels, mode='TRAIN_DEVELOP'),
                  learning_rate=lr, epoch=2)
  model.zero_grad()
  ref_out.loss.backward()
  ref_losses = ref_out.losses_log_dict
  ref_grads = {k: p.grad.numpy().copy() for k, p in model.named_parameters() if p.grad is not None}
  ref_state = convert.convert_ssseg_state_dict(model.state_dict(), config)

  net = build_model(config)
  our_labels = jnp.asarray(np.where(labels.numpy() == -100, 255, labels.numpy()).astype(np.int32))

  @jax.jit
  def forward(v, x, y):
    def loss_fn(params):
      outputs, state = net.apply({**v, 'params': params}, x, train=True, labels=y, lr=lr,
                                 memory_loss=True, mutable=['batch_stats', 'memory'])
      terms = losses.compute_losses(outputs, y, config)
      return terms['loss_total'], (outputs, state, terms)
    return jax.grad(loss_fn, has_aux=True)(v['params'])

  grads, (outputs, state, our_losses) = forward(
      variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())), our_labels)

  # Loss terms (the reference logs each already multiplied by its weight).
  pairs = {'loss_cls_stage2': ('loss_stage2', config.loss.stage2),
           'loss_cls_stage1': ('loss_stage1', config.loss.stage1),
           'loss_aux': ('loss_aux', config.loss.aux),
           'loss_memory': ('loss_memory', config.loss.memory),
           'loss_total': ('loss_total', 1.0)}
  assert set(ref_losses) == set(pairs)
  for ref_name, (name, weight) in pairs.items():
    ours, ref = weight * float(our_losses[name]), ref_losses[ref_name]
    print(f'S-{depth} {ref_name}: ours {ours:.7g} reference {ref:.7g} relative diff '
          f'{abs(ours - ref) / abs(ref):.3g}')
    assert abs(ours - ref) <= RTOL * abs(ref), (ref_name, ours, ref)

  ref_logits = ref_out.seg_logits.detach().numpy()
  our_logits = ru.nhwc_to_nchw(ops.resize_bilinear(outputs['logits'], size))
  err = np.abs(our_logits - ref_logits).max() / np.abs(ref_logits).max()
  print(f'S-{depth} train-mode logits: relative max diff {err:.3g}')
  assert err <= RTOL

  # The memory after the update: both update branches and the untouched rows.
  ref_memory = ref_state['memory']['memory_module']['memory']
  our_memory = np.asarray(state['memory']['memory_module']['memory'])
  print(f'S-{depth} memory after the update: max abs diff '
        f'{np.abs(our_memory - ref_memory).max():.3g}')
  np.testing.assert_allclose(our_memory, ref_memory, rtol=0, atol=MEMORY_ATOL)
  old = memory.numpy()
  assert np.all(old[100:] == our_memory[100:])
  assert np.all(our_memory[1:100:2] != 0) and not np.allclose(our_memory[0:100:2], old[0:100:2])

  # BN running statistics, every layer (the split attentions' bn1 over the batch of 2 pools).
  ref_stats = flax.traverse_util.flatten_dict(ref_state['batch_stats'])
  our_stats = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert set(ref_stats) == set(our_stats)
  worst = 0.0
  for key, ref_value in ref_stats.items():
    err = np.abs(np.asarray(our_stats[key]) - ref_value).max() / np.abs(ref_value).max()
    worst = max(worst, err)
    assert err <= RTOL, key
  print(f'S-{depth} BN running statistics ({len(ref_stats)} arrays): worst relative diff '
        f'{worst:.3g}')

  # Gradients of the total loss.
  blocks = resnest.ARCH_SETTINGS[depth]
  names = {convert.torch_key(k, 'resnest'): k[1:] for k in convert.variable_shapes(config)
           if k[0] == 'params'}
  flat_grads = flax.traverse_util.flatten_dict(grads)
  for template in GRAD_KEYS:
    name = template.format(mid=blocks[2] // 2, last=blocks[3] - 1)
    ref = ref_grads[name]
    ours = np.asarray(flat_grads[names[name]])
    if ours.ndim == 4:
      ours = ours.transpose(3, 2, 0, 1)            # HWIO -> OIHW
    assert ours.shape == ref.shape, name
    err = np.abs(ours - ref).max() / np.abs(ref).max()
    print(f'S-{depth} grad {name}: max |ref| {np.abs(ref).max():.3g}, relative max diff '
          f'{err:.3g}')
    assert np.abs(ref).max() > 0 and err <= TOTAL_GRAD_RTOL, name


def test_train_losses_bn_stats_memory_and_gradients_match_reference_reduced_depth(
    reduced_depth, memory_read_gradient):
  _train_step_parity(reduced_depth)


@pytest.mark.slow
def test_train_losses_bn_stats_memory_and_gradients_match_reference_s101_full_depth(
    memory_read_gradient):
  _train_step_parity(101, seed=5, size=(57, 67))
