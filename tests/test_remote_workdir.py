"""Work directories on remote filesystems (gs://): paths stay URLs, and the files the project
writes itself go through tf.io.gfile. TensorFlow's in-memory filesystem (ram://) stands in for
Cloud Storage, which tests cannot reach."""

import json
import os

import pytest
import tensorflow as tf

from memseg_jax import checkpoint as ckpt_lib
from memseg_jax import train
from memseg_jax.config_validation import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def test_urls_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
  assert ckpt_lib.absolute_path('gs://bucket/runs/r1/') == 'gs://bucket/runs/r1'
  assert ckpt_lib.checkpoint_dir('gs://bucket/runs/r1') == 'gs://bucket/runs/r1/checkpoints'
  monkeypatch.chdir(tmp_path)
  assert ckpt_lib.absolute_path('w') == os.path.join(str(tmp_path), 'w')
  assert ckpt_lib.checkpoint_dir('w') == os.path.join(str(tmp_path), 'w', 'checkpoints')


def test_the_config_is_written_through_gfile():
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  workdir = 'ram://memseg_test/run1'
  train.save_config(config, workdir)
  with tf.io.gfile.GFile(f'{workdir}/config.json') as f:
    saved = json.load(f)
  assert saved['model']['num_classes'] == config.model.num_classes == 8
  assert saved['data']['crop_size'] == list(config.data.crop_size)


def test_evaluating_a_missing_remote_checkpoint_names_the_url():
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  with pytest.raises(FileNotFoundError, match='ram://memseg_test/empty/checkpoints'):
    ckpt_lib.load_eval_variables(config, 'ram://memseg_test/empty')
