"""Evaluation of an HRNet model: no padded (valid_hw) path, each image at its exact size.

HRNet's fuse layers resample between branch sizes that depend on each image's own size, so the
backbone declares SUPPORTS_VALID_HW = False; `evaluate` must then run every image unpadded
even with `inference.padded_whole` on, and count exactly what an independent loop counts.
"""

import importlib.util
import os

import jax
import numpy as np
import pytest

from memseg_jax import evaluate, models
from tests.hrnet_reference import TINY, TINY_ARCH
from tests.reference_utils import REPO_ROOT
from tests.test_evaluate import NUM_EVAL_IMAGES, _independent_confusion, random_variables


@pytest.fixture
def hrnet_demo_config(tmp_path_factory, monkeypatch):
  """configs/demo.py on synthetic_scenes with the narrow test HRNet and a stride-2 head."""
  from memseg_jax import datasets  # pylint: disable=import-outside-toplevel
  from memseg_jax.models.backbones import hrnet  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(hrnet.ARCH_SETTINGS, TINY, TINY_ARCH)
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  datasets.download_and_prepare(datasets.get_builder('synthetic_scenes', data_dir=data_dir))
  spec = importlib.util.spec_from_file_location('demo_config',
                                                os.path.join(REPO_ROOT, 'configs', 'demo.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.model.backbone = {'type': 'hrnet', 'arch': TINY, 'stem_relu': False,
                           'selected_indices': (0, 0, 0, 0), 'pretrained': ''}
  config.model.auxiliary.enabled = False
  config.model.head.downsample_backbone_stride = 2
  config.data.data_dir = data_dir
  config.data.eval_scale = (96, 48)
  config.eval.max_images = NUM_EVAL_IMAGES
  config.inference.padded_whole = True      # asked for, but the model cannot take it
  return config


@pytest.mark.slow
def test_hrnet_evaluation_runs_each_image_at_its_size_and_counts_exactly(hrnet_demo_config):
  from memseg_jax import metrics  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  config = hrnet_demo_config
  assert not models.supports_valid_hw(config)
  assert models.logits_stride(config) == 8
  variables = random_variables(build_model(config))
  result = evaluate.evaluate(config, variables, None,
                             mesh=jax.sharding.Mesh(np.array(jax.devices()[:2]), ('data',)))
  conf, n = _independent_confusion(config, variables)
  expected = metrics.compute_metrics(conf, evaluate.dataset_metadata(config)[0])
  assert result['num_images'] == n == NUM_EVAL_IMAGES
  assert result['aAcc'] == pytest.approx(expected['aAcc'], abs=1e-12)
  assert result['mIoU'] == pytest.approx(expected['mIoU'], abs=1e-12, nan_ok=True)
  assert 0 < result['aAcc'] < 1
