"""Parity of MCIBI ViT-L (configs/{ade20k,cocostuff10k}_vitl.py) with the reference, CPU float32.

The reference (SSSegmentation 1.7.0: `VisionTransformer`, MCIBI with `norm_layers` and three
auxiliary heads) is built with random weights: BN statistics calibrated on the test's images,
and the ViT parameters it initialises to constants (cls token, position embedding, LayerNorms,
attention biases) drawn at random (tests/reference_utils.py `randomize_vit`), so the position
embedding's resize changes the logits visibly. Its state_dict is converted with
`memseg_jax.convert`. The default run uses a reduced ViT of the same layout (4 blocks of 256
channels, 4 heads, every block an output); the full ViT-L is slow-marked. The ViT's dropout is
0.0 (the released models' value; 1.7.0 asserts 0.1 for `jx_vit_large_p16_384`, which the
reference cfg sidesteps with another structure name, see `vit_backbone_cfg`).
"""

import time

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

RTOL = 1e-4
REDUCED = dict(embed_dims=256, num_layers=4, num_heads=4, out_indices=(0, 1, 2, 3))


def _eval_logits(height, width, *, seed=0, config_file='ade20k_vitl.py', **sizes):
  gen = torch.Generator().manual_seed(seed)
  images = torch.randn(1, 3, height, width, generator=gen)
  cfg, config = ru.vit_mcibi_cfgs(config_file=config_file, **sizes)
  model = ru.build_reference(cfg, calibration_images=images, random_memory=True, seed=seed,
                             prepare=ru.randomize_vit)
  _, input_structure = ru.import_ssseg_builder()
  start = time.time()
  with torch.no_grad():
    ref = model(input_structure(images=images, mode='TEST')).seg_logits.numpy()
  ref_seconds = time.time() - start
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
  del model
  net = build_model(config)
  start = time.time()
  ours = jax.jit(lambda v, x: net.apply(v, x, train=False))(
      variables, jnp.asarray(ru.nchw_to_nhwc(images.numpy())))['logits']
  ours = ru.nhwc_to_nchw(np.asarray(ours))
  print(f'{height}x{width}: reference forward {ref_seconds:.1f} s, ours (with compile) '
        f'{time.time() - start:.1f} s')
  return ref, ours, config


def _assert_logits_match(ref, ours, config, height, width):
  k = config.model.num_classes
  assert ours.shape == ref.shape == (1, k, -(-height // 16), -(-width // 16))
  assert np.unique(ref.argmax(1)).size > 1
  err, scale = np.abs(ours - ref).max(), np.abs(ref).max()
  print(f'logits {height}x{width}: max abs diff {err:.3g}, max abs logit {scale:.3g}, '
        f'relative {err / scale:.3g}')
  assert err <= RTOL * scale, f'max abs diff {err:.3g} vs max abs logit {scale:.3g}'


@pytest.mark.parametrize('height,width', [(512, 512), (200, 328)])
def test_eval_logits_match_reference_reduced_vit(height, width):
  # 200x328 pads to 208x336: a 13x21 token grid, so the 32x32 position embedding is resized.
  ref, ours, config = _eval_logits(height, width, **REDUCED)
  _assert_logits_match(ref, ours, config, height, width)


def test_eval_logits_match_reference_cocostuff_head():
  # COCO-Stuff-10k: 182 classes, ASPP dilations (1, 12, 24, 36); a grid smaller than 512's.
  ref, ours, config = _eval_logits(256, 320, seed=1, config_file='cocostuff10k_vitl.py',
                                   **REDUCED)
  assert config.model.num_classes == 182
  _assert_logits_match(ref, ours, config, 256, 320)


def test_slide_inference_of_the_config_matches_reference():
  """configs/ade20k_vitl.py's inference (slide 512, stride 341, probabilities) on a 300x700
  image: two 300x512 windows (a 19x32 token grid), through `evaluate.inference` and the
  reference's own `inference`."""
  from memseg_jax import evaluate   # pylint: disable=import-outside-toplevel
  cfg, config = ru.vit_mcibi_cfgs(**REDUCED)
  gen = torch.Generator().manual_seed(6)
  images = torch.randn(1, 3, 300, 700, generator=gen)
  model = ru.build_reference(cfg, calibration_images=images[..., :512], random_memory=True,
                             seed=6, prepare=ru.randomize_vit)
  i = config.inference
  assert (i.mode, tuple(i.crop_size), tuple(i.stride)) == ('slide', (512, 512), (341, 341))
  model.cfg['inference'] = {
      'forward': {'mode': 'slide', 'cropsize': tuple(i.crop_size), 'stride': tuple(i.stride)},
      'tta': {'multiscale': [1.0], 'flip': False, 'use_probs_before_resize': True}}
  with torch.no_grad():
    ref = model.inference(images).numpy()
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
  forward_fn = evaluate.make_forward_fn(build_model(config))
  ours = evaluate.inference(forward_fn, variables, ru.nchw_to_nhwc(images.numpy()),
                            out_hw=(300, 700),
                            settings=evaluate.InferenceSettings.from_config(config))
  ours = ru.nhwc_to_nchw(np.asarray(ours))
  assert ours.shape == ref.shape == (1, 150, 300, 700)
  err = np.abs(ours - ref).max()
  print(f'slide probabilities 300x700: max abs diff {err:.3g}')
  assert err < 1e-4
  assert np.unique(ref.argmax(1)).size > 1


def test_position_embedding_resize_matters():
  """The odd-size case is sensitive to the resize: no resize would differ from the reference."""
  cfg, config = ru.vit_mcibi_cfgs(**REDUCED)
  model = ru.build_reference(cfg, prepare=ru.randomize_vit)
  pos = model.backbone_net.pos_embed.detach()
  resized = model.backbone_net.resizeposembed(pos, (13, 21), (32, 32), 'bilinear').numpy()
  from memseg_jax.models.backbones import vit   # pylint: disable=import-outside-toplevel
  ours = vit.resize_pos_embed(pos.numpy(), (13, 21), (32, 32))
  err = np.abs(ours - resized).max()
  print(f'pos_embed 32x32 -> 13x21: max abs diff {err:.3g}')
  assert err <= 1e-6 * np.abs(resized).max()
  # The grid really moves: nearest-neighbour subsampling is far from it.
  grid = pos.numpy()[0, 1:].reshape(32, 32, -1)
  nearest = grid[np.arange(13) * 32 // 13][:, np.arange(21) * 32 // 21]
  nearest = nearest.reshape(1, -1, grid.shape[-1])
  assert np.abs(nearest - resized[:, 1:]).max() > 0.1


def test_train_forward_losses_memory_and_bn_stats_match_reference():
  """One training forward at epoch 2 (memory loss on), dropout off in both (ViT and heads).

  100x120 images pad to 112x128 (a 7x8 grid: the position embedding is resized in training
  too); the auxiliary heads' x4 x4 nearest upsampling gives 112x128, which F.interpolate takes
  down to 100x120.
  """
  lr = 0.00635
  cfg, config = ru.vit_mcibi_cfgs(**REDUCED)
  num_classes = config.model.num_classes
  gen = torch.Generator().manual_seed(4)
  images = torch.randn(2, 3, 100, 120, generator=gen)
  labels = torch.randint(0, 100, (2, 100, 120), generator=gen)
  labels[:, :5, :] = -100
  memory = torch.rand(num_classes, 1, 512, generator=gen)
  memory[1::2] = 0

  model = ru.build_reference(cfg, calibration_images=images, seed=4, prepare=ru.randomize_vit)
  with torch.no_grad():
    model.memory_module.memory.copy_(memory)
  variables = convert.convert_ssseg_state_dict(model.state_dict(), config)
  model.train()
  model.mode = 'TRAIN_DEVELOP'
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

  w = config.loss
  pairs = {'loss_cls_stage2': ('loss_stage2', w.stage2),
           'loss_cls_stage1': ('loss_stage1', w.stage1),
           'loss_aux1': ('loss_aux1', w.aux), 'loss_aux2': ('loss_aux2', w.aux),
           'loss_aux3': ('loss_aux3', w.aux), 'loss_memory': ('loss_memory', w.memory),
           'loss_total': ('loss_total', 1.0)}
  assert set(ref_losses) == set(pairs)
  for ref_name, (name, weight) in pairs.items():
    ours = weight * float(our_losses[name])
    rel = abs(ours - ref_losses[ref_name]) / abs(ref_losses[ref_name])
    print(f'{ref_name}: ours {ours:.7g} reference {ref_losses[ref_name]:.7g} '
          f'relative diff {rel:.3g}')
    assert rel <= RTOL, (ref_name, ours, ref_losses[ref_name])
  # The three auxiliary heads see different blocks: their losses differ.
  assert len({round(float(our_losses[f'loss_aux{i}']), 6) for i in (1, 2, 3)}) == 3

  ref_logits = ref_out.seg_logits.detach().numpy()
  our_logits = ru.nhwc_to_nchw(ops.resize_bilinear(outputs['logits'], (100, 120)))
  assert np.abs(our_logits - ref_logits).max() <= RTOL * np.abs(ref_logits).max()

  ref_memory = ref_state['memory']['memory_module']['memory']
  our_memory = np.asarray(state['memory']['memory_module']['memory'])
  print(f'memory after the update: max abs diff {np.abs(our_memory - ref_memory).max():.3g}')
  np.testing.assert_allclose(our_memory, ref_memory, rtol=0, atol=1e-5)
  assert not np.allclose(our_memory[0:100:2], memory.numpy()[0:100:2])

  ref_stats = flax.traverse_util.flatten_dict(ref_state['batch_stats'])
  our_stats = flax.traverse_util.flatten_dict(state['batch_stats'])
  assert set(ref_stats) == set(our_stats)
  worst = 0.0
  for key, ref_value in ref_stats.items():
    err = np.abs(np.asarray(our_stats[key]) - ref_value).max() / np.abs(ref_value).max()
    worst = max(worst, err)
    assert err <= RTOL, key
  print(f'BN running statistics: worst relative diff {worst:.3g}')


def test_parameter_count_matches_reference_vit_large():
  """ADE20K ViT-L MCIBI: every reference parameter and buffer has its converted counterpart."""
  cfg, config = ru.vit_mcibi_cfgs()
  build_segmentor, _ = ru.import_ssseg_builder()
  model = build_segmentor(cfg, mode='TEST')
  ref_shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
                if not k.endswith('num_batches_tracked')}
  ref_parameters = sum(p.numel() for p in model.parameters())
  shapes = convert.variable_shapes(config)
  count = lambda cols: sum(int(np.prod(s)) for k, s in shapes.items() if k[0] in cols)
  print(f'ViT-L MCIBI parameters + memory: ours {count({"params", "memory"}):,} '
        f'reference {ref_parameters:,}; backbone '
        f'{sum(p.numel() for p in model.backbone_net.parameters()):,}')
  assert count({'params', 'memory'}) == ref_parameters
  torch_shape = convert._torch_shape  # pylint: disable=protected-access
  ours = {convert.torch_key(k, 'vit'): torch_shape(s, k[-1])
          for k, s in shapes.items()}
  assert ours == ref_shapes


@pytest.mark.slow
def test_eval_logits_match_reference_vit_large():
  """The full ViT-L/16 (24 blocks, 1024 channels) at 512x512 (~2-3 min on 2 CPU cores)."""
  ref, ours, config = _eval_logits(512, 512, seed=5)
  assert config.model.backbone.num_layers == 24
  _assert_logits_match(ref, ours, config, 512, 512)
