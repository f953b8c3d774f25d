"""Tests for memseg_jax/evaluate.py with a small stand-in network.

The inference logic (sliding windows, multi-scale, flip, class swap, averaging) is compared with
the reference's own code: `BaseSegmentor.inference` / `auginference` of SSSegmentation run on a
tiny PyTorch network, and the tester's final step (upsample every view to the original size,
average). The same network is written in JAX, so any difference comes from the inference logic.
The network has a global-average term so that padding or wrong window placement would show.
"""

import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax import evaluate

NUM_CLASSES = 5


def _standin_weights(seed=0):
  rng = np.random.RandomState(seed)
  return {'w': rng.randn(3, 3, 3, NUM_CLASSES).astype(np.float32) * 0.5,   # HWIO
          'b': rng.randn(NUM_CLASSES).astype(np.float32) * 0.1,
          'g': rng.randn(NUM_CLASSES).astype(np.float32)}


def _jax_forward(variables, images):
  """(N, H, W, 3) -> (N, ceil(H/8), ceil(W/8), K): 3x3 conv, stride 8, pad 1, + global term."""
  y = jax.lax.conv_general_dilated(images, variables['w'], (8, 8), ((1, 1), (1, 1)),
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   precision=jax.lax.Precision.HIGHEST)
  y = y + variables['b']
  return y + jnp.tanh(y.mean(axis=(1, 2), keepdims=True)) * variables['g']


def _torch_standin(weights, inference_cfg):
  import torch
  from tests.reference_utils import import_ssseg_builder
  import_ssseg_builder()   # registers the torchvision stand-in before importing ssseg
  from ssseg.modules.models.segmentors.base.base import BaseSegmentor

  class StandIn(torch.nn.Module):
    inference = BaseSegmentor.inference
    auginference = BaseSegmentor.auginference

    def __init__(self):
      super().__init__()
      self.conv = torch.nn.Conv2d(3, NUM_CLASSES, 3, stride=8, padding=1)
      with torch.no_grad():
        self.conv.weight.copy_(torch.from_numpy(weights['w'].transpose(3, 2, 0, 1).copy()))
        self.conv.bias.copy_(torch.from_numpy(weights['b']))
      self.g = torch.from_numpy(weights['g']).view(1, -1, 1, 1)
      self.cfg = {'num_classes': NUM_CLASSES, 'inference': inference_cfg,
                  'dataset': {'train': {'data_pipelines': []}}}
      self.mode = 'TEST'
      self.align_corners = False

    def forward(self, data_meta, **kwargs):
      y = self.conv(data_meta.images)
      y = y + torch.tanh(y.mean(dim=(2, 3), keepdim=True)) * self.g
      return types.SimpleNamespace(seg_logits=y)

  return StandIn().eval()


def _reference_scores(weights, image_nhwc, out_hw, *, mode, crop=(0, 0), stride=(0, 0),
                      scales=(1.0,), flip=False, use_probs=True, swap_pairs=None):
  """The reference tester on the stand-in network: averaged views at out_hw, NHWC numpy."""
  import torch
  import torch.nn.functional as F
  cfg = {'forward': {'mode': mode, 'cropsize': crop, 'stride': stride},
         'tta': {'multiscale': list(scales), 'flip': flip, 'use_probs_before_resize': use_probs,
                 'fixed_seg_target_pairs': [list(p) for p in swap_pairs] if swap_pairs else None}}
  module = _torch_standin(weights, cfg)
  images = torch.from_numpy(np.transpose(image_nhwc, (0, 3, 1, 2)).copy())
  with torch.no_grad():
    views = module.auginference(images)
    views = [F.interpolate(v, size=tuple(out_hw), mode='bilinear', align_corners=False)
             for v in views]
    scores = sum(views) / len(views)
  return np.transpose(scores.numpy(), (0, 2, 3, 1))


def _settings(mode='whole', crop=(0, 0), stride=(0, 0), scales=(1.0,), flip=False,
              use_probs=True, swap_pairs=(), windows_per_call=2):
  return evaluate.InferenceSettings(
      mode=mode, crop_size=tuple(crop), stride=tuple(stride), windows_per_call=windows_per_call,
      scales=tuple(scales), flip=flip, use_probs_before_resize=use_probs,
      flip_swap_pairs=tuple(swap_pairs))


def _image(shape, seed=1):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32)


CASES = {
    # name: (image (B, H, W, 3), out_hw, settings kwargs)
    'whole_odd_size': ((1, 37, 53, 3), (75, 104), dict(mode='whole')),
    'whole_logits_two_images': ((2, 29, 41, 3), (29, 41), dict(mode='whole', use_probs=False)),
    'slide_non_multiple_of_stride': ((1, 45, 70, 3), (90, 141),
                                     dict(mode='slide', crop=(24, 32), stride=(16, 20))),
    'slide_image_smaller_than_crop': ((1, 21, 70, 3), (21, 70),
                                      dict(mode='slide', crop=(24, 32), stride=(16, 20))),
    'whole_two_scales_flip': ((1, 37, 53, 3), (60, 81),
                              dict(mode='whole', scales=(0.75, 1.25), flip=True)),
    'slide_two_scales_flip': ((1, 45, 70, 3), (50, 77),
                              dict(mode='slide', crop=(24, 32), stride=(16, 20),
                                   scales=(0.75, 1.25), flip=True)),
    'flip_logits_with_class_swap': ((1, 33, 47, 3), (33, 47),
                                    dict(mode='whole', flip=True, use_probs=False,
                                         swap_pairs=((1, 2), (3, 4)))),
    'slide_flip_with_class_swap': ((1, 45, 70, 3), (45, 70),
                                   dict(mode='slide', crop=(24, 32), stride=(16, 20), flip=True,
                                        swap_pairs=((0, 3),))),
}


@pytest.mark.parity
@pytest.mark.parametrize('name', sorted(CASES))
def test_inference_matches_reference_tester_on_standin_network(name):
  shape, out_hw, kwargs = CASES[name]
  weights = _standin_weights()
  image = _image(shape)
  settings = _settings(**kwargs)
  ours = np.asarray(evaluate.inference(jax.jit(_jax_forward), weights, image, out_hw=out_hw,
                                       settings=settings))
  ref_kwargs = {k: v for k, v in kwargs.items()}
  ref_kwargs['swap_pairs'] = ref_kwargs.pop('swap_pairs', None)
  ref = _reference_scores(weights, image, out_hw, **ref_kwargs)
  assert ours.shape == ref.shape == shape[:1] + tuple(out_hw) + (NUM_CLASSES,)
  np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
  np.testing.assert_array_equal(ours.argmax(-1), ref.argmax(-1))


def test_slide_windows_cover_the_image_and_stay_inside():
  for hw, crop, stride in [((45, 70), (24, 32), (16, 20)), ((1024, 2048), (512, 1024), (341, 341)),
                           ((21, 70), (24, 32), (16, 20)), ((48, 64), (24, 32), (24, 32))]:
    windows = evaluate.slide_windows(hw, crop, stride)
    count = np.zeros(hw, np.int32)
    for y1, y2, x1, x2 in windows:
      assert 0 <= y1 < y2 <= hw[0] and 0 <= x1 < x2 <= hw[1]
      assert (y2 - y1, x2 - x1) == (min(crop[0], hw[0]), min(crop[1], hw[1]))
      count[y1:y2, x1:x2] += 1
    assert count.min() >= 1
    # The reference's grid counts (spec section 7).
    gh = max(hw[0] - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    gw = max(hw[1] - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    assert len(windows) == gh * gw
  # Cityscapes by hand: rows (1024 - 512 + 340) // 341 + 1 = 3, columns
  # (2048 - 1024 + 340) // 341 + 1 = 5; the last column is clamped to x1 = 1024.
  windows = evaluate.slide_windows((1024, 2048), (512, 1024), (341, 341))
  assert len(windows) == 15
  assert [w[2] for w in windows[:5]] == [0, 341, 682, 1023, 1024]
  assert [w[0] for w in windows[::5]] == [0, 341, 512]


def test_slide_result_does_not_depend_on_windows_per_call():
  weights = _standin_weights()
  image = _image((1, 45, 70, 3))
  outs = [np.asarray(evaluate.inference(
      jax.jit(_jax_forward), weights, image, out_hw=(45, 70),
      settings=_settings(mode='slide', crop=(24, 32), stride=(16, 20), windows_per_call=n)))
          for n in (1, 4, 32)]
  # The network sees batches of 1, 4 or 32 windows: XLA's float results may differ in the
  # last bit between batch sizes, nothing more.
  np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)
  np.testing.assert_allclose(outs[0], outs[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize('mode', ['whole', 'slide'])
def test_inference_runs_on_the_device_of_its_inputs(mode):
  weights = _standin_weights()
  image = _image((1, 45, 70, 3))
  settings = _settings(mode=mode, crop=(24, 32), stride=(16, 20), scales=(0.75, 1.0), flip=True)
  forward = jax.jit(_jax_forward)
  device = jax.devices()[3]
  on_device = evaluate.inference(forward, jax.device_put(weights, device),
                                 jax.device_put(image, device), out_hw=(50, 60),
                                 settings=settings)
  assert on_device.devices() == {device}
  default = evaluate.inference(forward, weights, image, out_hw=(50, 60), settings=settings)
  np.testing.assert_array_equal(np.asarray(on_device), np.asarray(default))


def test_settings_reject_bad_values():
  with pytest.raises(ValueError, match='inference.mode'):
    _settings(mode='tiles').validate()
  with pytest.raises(ValueError, match='inference.scales'):
    _settings(scales=()).validate()
  with pytest.raises(ValueError, match='inference.stride'):
    _settings(mode='slide', crop=(8, 8), stride=(0, 8)).validate()


# ----------------------------------------------------------------------------- evaluate()

NUM_EVAL_IMAGES = 5   # of the 64 validation images; 2, 3 and 4 do not divide it


@pytest.fixture(scope='module')
def synthetic_config(tmp_path_factory):
  """configs/demo.py on a freshly generated synthetic_scenes copy, 5 eval images, 48-px scale."""
  from memseg_jax import datasets
  from tests.reference_utils import REPO_ROOT
  import importlib.util
  import os
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.download_and_prepare(datasets.get_builder('synthetic_scenes', data_dir=data_dir))
  spec = importlib.util.spec_from_file_location('demo_config',
                                                os.path.join(REPO_ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = data_dir
  config.data.eval_scale = (96, 48)     # small inputs: a fast test
  config.eval.max_images = NUM_EVAL_IMAGES
  return config


def random_variables(model, seed=0):
  """Variables of `model` with random values (He-scaled kernels, perturbed BN state, a memory
  with content), built from shapes only: no init compile, so tests stay fast."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                             train=False))
  rng = np.random.RandomState(seed)

  def fill(path, leaf):
    name = str(getattr(path[-1], 'key', path[-1]))
    collection = str(getattr(path[0], 'key', path[0]))
    shape = leaf.shape
    if collection == 'memory':
      x = 0.1 * rng.randn(*shape)
    elif name == 'var':
      x = rng.uniform(0.5, 1.5, shape)
    elif name == 'scale':
      x = rng.uniform(0.8, 1.2, shape)
    elif len(shape) > 1:
      x = rng.randn(*shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      x = 0.1 * rng.randn(*shape)
    return np.asarray(x, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@pytest.fixture(scope='module')
def synthetic_variables(synthetic_config):
  from memseg_jax.models import build_model
  return random_variables(build_model(synthetic_config))


class _RecordingWriter:
  """Stands in for a clu metric writer."""

  def __init__(self):
    self.scalars, self.images = [], []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))

  def write_images(self, step, images):
    self.images.append((step, dict(images)))

  def flush(self):
    pass


def _independent_confusion(config, variables):
  """Every eval image read straight from tfds, predicted with `inference`, counted in numpy."""
  import tensorflow_datasets as tfds
  from memseg_jax import datasets, transforms
  from memseg_jax.models import build_model
  builder = datasets.get_builder(config.data.name, data_dir=config.data.data_dir)
  ds = builder.as_dataset(split=f'validation[:{NUM_EVAL_IMAGES}]', shuffle_files=False)
  forward_fn = evaluate.make_forward_fn(build_model(config))
  settings = evaluate.InferenceSettings.from_config(config)
  k = config.model.num_classes
  conf = np.zeros((k, k), np.int64)
  n = 0
  for ex in tfds.as_numpy(ds):
    image, label = ex['image'], ex['label'][..., 0].astype(np.int64)
    size = transforms.test_resize_size(label.shape, config.data).numpy()
    if transforms.resolve_backend(config.data.get('backend', 'auto')) == 'opencv':
      import cv2
      resized = cv2.resize(image, (int(size[1]), int(size[0])),
                           interpolation=cv2.INTER_LINEAR).astype(np.float32)
    else:
      resized = transforms.resize_image(image, size).numpy()
    x = ((resized - np.asarray(config.data.mean, np.float32))
         / np.asarray(config.data.std, np.float32))
    scores = evaluate.inference(forward_fn, variables, x[None], out_hw=label.shape,
                                settings=settings)
    pred = np.asarray(scores[0]).argmax(-1)
    keep = label != 255
    np.add.at(conf, (label[keep], pred[keep]), 1)
    n += 1
  return conf, n


@pytest.mark.slow
def test_evaluate_is_exact_across_devices_and_batch_sizes(synthetic_config, synthetic_variables,
                                                          tmp_path):
  import json
  from memseg_jax import metrics
  config = synthetic_config
  results = []
  writer = _RecordingWriter()
  for num_devices, batch_size in [(1, 1), (8, 3), (8, 4), (1, 2)]:
    cfg = config.copy_and_resolve_references()
    cfg.eval.batch_size = batch_size
    cfg.eval.num_summary_images = 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:num_devices]), ('data',))
    workdir = tmp_path / f'd{num_devices}_b{batch_size}'
    results.append(evaluate.evaluate(cfg, synthetic_variables, str(workdir), mesh=mesh, step=7,
                                     writer=writer if num_devices == 8 else None))
    written = json.loads((workdir / 'eval_results.json').read_text())
    assert written['num_images'] == NUM_EVAL_IMAGES and written['step'] == 7
    assert set(written['per_class_iou']) == set(
        evaluate.dataset_metadata(cfg)[0])
  for r in results[1:]:
    for key in ('mIoU', 'mAcc', 'aAcc', 'num_images'):
      np.testing.assert_equal(r[key], results[0][key])
    assert r['per_class_iou'] == pytest.approx(results[0]['per_class_iou'], nan_ok=True, abs=0)
  assert results[0]['num_images'] == NUM_EVAL_IMAGES
  # Summaries: the scalars of the results and 2 [image | gt | prediction] rows per run.
  assert writer.scalars[0] == (7, {'eval/mIoU': results[0]['mIoU'],
                                   'eval/mAcc': results[0]['mAcc'],
                                   'eval/aAcc': results[0]['aAcc']})
  assert len(writer.images) == 2 and len(writer.images[0][1]) == 2
  for row in writer.images[0][1].values():
    assert row.dtype == np.uint8 and row.ndim == 4 and row.shape[-1] == 3
    assert row.shape[2] == 3 * ((row.shape[2] - 8) // 3) + 8   # three equal panels, 2 gaps
  conf, n = _independent_confusion(config, synthetic_variables)
  expected = metrics.compute_metrics(conf, evaluate.dataset_metadata(config)[0])
  assert n == NUM_EVAL_IMAGES
  # The exact-shape path (padded_whole off) counts exactly what the independent loop counts.
  cfg = config.copy_and_resolve_references()
  cfg.inference.padded_whole = False
  exact = evaluate.evaluate(cfg, synthetic_variables, None,
                            mesh=jax.sharding.Mesh(np.array(jax.devices()[:1]), ('data',)))
  assert exact['num_images'] == NUM_EVAL_IMAGES
  assert exact['mIoU'] == pytest.approx(expected['mIoU'], abs=1e-12, nan_ok=True)
  assert exact['aAcc'] == pytest.approx(expected['aAcc'], abs=1e-12)
  assert exact['per_class_iou'] == pytest.approx(expected['per_class_iou'], abs=1e-12,
                                                 nan_ok=True)
  # The default padded path gives the same scores up to float32 rounding
  # (test_evaluate_padded.py: 1e-7); with these random weights a few pixels are near-ties
  # whose argmax such rounding can flip, so the metrics agree closely, not bit for bit.
  assert results[0]['aAcc'] == pytest.approx(expected['aAcc'], abs=2e-3)
  assert results[0]['mIoU'] == pytest.approx(expected['mIoU'], abs=2e-3)
