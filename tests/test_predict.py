"""Tests for memseg_jax/predict.py: files written, their sizes and palette, clear errors."""

import importlib.util
import os

import jax
import numpy as np
import pytest
from PIL import Image

from memseg_jax import evaluate, predict
from tests.reference_utils import REPO_ROOT
from tests.test_evaluate import random_variables


def _demo_config():
  spec = importlib.util.spec_from_file_location('demo_config',
                                                os.path.join(REPO_ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.eval_scale = (64, 40)    # small inputs: a fast test
  return config


@pytest.fixture(scope='module')
def converted_checkpoint(tmp_path_factory):
  from memseg_jax import convert
  from memseg_jax.models import build_model
  config = _demo_config()
  variables = random_variables(build_model(config), seed=1)
  path = str(tmp_path_factory.mktemp('ckpt') / 'converted')
  convert.save_variables(path, variables)
  return config, path, jax.tree_util.tree_map(np.asarray, variables)


def _write_inputs(folder):
  rng = np.random.RandomState(0)
  sizes = {'a.jpg': (50, 70), 'b.png': (61, 45), os.path.join('sub', 'c.png'): (40, 40)}
  os.makedirs(os.path.join(folder, 'sub'), exist_ok=True)
  for name, (h, w) in sizes.items():
    Image.fromarray(rng.randint(0, 256, (h, w, 3), dtype=np.uint8)).save(
        os.path.join(folder, name))
  return sizes


def test_predict_writes_one_palette_mask_and_one_overlay_per_image(converted_checkpoint,
                                                                    tmp_path):
  config, path, variables = converted_checkpoint
  sizes = _write_inputs(tmp_path / 'in')
  restored = predict.load_variables(config, path)
  for a, b in zip(jax.tree_util.tree_leaves(restored), jax.tree_util.tree_leaves(variables)):
    np.testing.assert_array_equal(a, b)
  paths = predict.find_images(str(tmp_path / 'in'))
  assert len(paths) == 3
  outputs = predict.predict_images(config, restored, paths, str(tmp_path / 'out'),
                                   progress=False)
  assert len(outputs) == 3
  _, palette = evaluate.dataset_metadata(config)
  for name, (h, w) in sizes.items():
    stem = os.path.splitext(name)[0]
    mask = Image.open(tmp_path / 'out' / (stem + '.png'))
    overlay = Image.open(tmp_path / 'out' / (stem + '_overlay.png'))
    assert mask.mode == 'P' and mask.size == (w, h)
    pal = np.asarray(mask.getpalette()[:3 * len(palette)], np.uint8).reshape(-1, 3)
    np.testing.assert_array_equal(pal, palette)
    values = np.asarray(mask)
    assert values.max() < config.model.num_classes
    assert overlay.mode == 'RGB' and overlay.size == (2 * w + 4, h)
    # The left half of the overlay is the input itself.
    original = np.asarray(Image.open(tmp_path / 'in' / name).convert('RGB'))
    np.testing.assert_array_equal(np.asarray(overlay)[:, :w], original)
  # The mask is the argmax of `inference` on the preprocessed image (an independent path).
  image = predict.read_image(str(tmp_path / 'in' / 'b.png'))
  scores = evaluate.inference(evaluate.make_forward_fn(
      __import__('memseg_jax.models', fromlist=['build_model']).build_model(config)),
      variables, predict.preprocess(image, config.data)[None], out_hw=image.shape[:2],
      settings=evaluate.InferenceSettings.from_config(config))
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / 'out' / 'b.png')),
                                np.asarray(scores[0]).argmax(-1))


def test_predict_errors_name_the_culprit(converted_checkpoint, tmp_path):
  config, path, variables = converted_checkpoint
  with pytest.raises(FileNotFoundError, match='no image files found'):
    predict.find_images(str(tmp_path / 'nothing' / '*.jpg'))
  with pytest.raises(FileNotFoundError, match='missing_ckpt'):
    predict.load_variables(config, str(tmp_path / 'missing_ckpt'))
  bad = tmp_path / 'broken.jpg'
  bad.write_bytes(b'not an image')
  with pytest.raises(ValueError, match='broken.jpg'):
    predict.predict_images(config, variables, [str(bad)], str(tmp_path / 'out'),
                           progress=False)


def test_preprocess_resizes_like_the_eval_pipeline():
  """With OpenCV present the eval pipeline resizes with cv2.resize (bilinear); so must predict."""
  cv2 = pytest.importorskip('cv2')
  from memseg_jax import predict, transforms
  from memseg_jax.config_validation import load_config
  from tests.reference_utils import REPO_ROOT
  import os
  config = load_config(os.path.join(REPO_ROOT, 'configs', 'demo.py'))
  image = np.random.default_rng(0).integers(0, 256, (171, 133, 3)).astype(np.uint8)
  h, w = (int(v) for v in transforms.test_resize_size(image.shape[:2], config.data).numpy())
  expected = ((cv2.resize(image, (w, h), interpolation=cv2.INTER_LINEAR).astype(np.float32)
               - np.asarray(config.data.mean, np.float32)) / np.asarray(config.data.std, np.float32))
  np.testing.assert_array_equal(predict.preprocess(image, config.data), expected)
