"""The entry point: config values are checked up front with one-line errors naming the key,
and a missing dataset stops `main` in seconds with a message saying where and how."""

import os
import subprocess
import sys
import time

import pytest

from memseg_jax import config_validation
from memseg_jax.config_validation import ConfigError, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')


@pytest.fixture
def config():
  return load_config(os.path.join(CONFIGS, 'ade20k.py'))


@pytest.mark.parametrize('key, value, expected', [
    ('model.name', 'pspnet', "config.model.name='pspnet' is not one of 'mcibi', 'deeplabv3'"),
    ('model.backbone.depth', 34, 'config.model.backbone.depth=34 is not one of 18, 50, 101'),
    ('model.backbone.output_stride', 4, 'config.model.backbone.output_stride=4'),
    ('model.head.type', 'fcn', "config.model.head.type='fcn'"),
    ('model.memory.update_strategy', 'max', "config.model.memory.update_strategy='max'"),
    ('data.name', 'voc', "config.data.name='voc' is not one of"),
    ('data.crop_size', (0, 512), 'config.data.crop_size=(0, 512) must be two positive integers'),
    ('inference.mode', 'grid', "config.inference.mode='grid'"),
    ('train.lr', -0.1, 'config.train.lr=-0.1 must be > 0'),
    ('model.num_classes', 0, 'config.model.num_classes=0 must be > 0'),
])
def test_a_wrong_value_is_a_one_line_error_naming_the_key(config, key, value, expected):
  config_validation.validate(config, 8)   # the shipped value passes
  section, _, field = key.rpartition('.')
  node = config
  for part in section.split('.'):
    node = node[part]
  node[field] = value
  with pytest.raises(ConfigError) as e:
    config_validation.validate(config, 8)
  assert str(e.value).startswith(expected), str(e.value)
  assert '\n' not in str(e.value)


def test_batch_size_must_divide_over_the_devices(config):
  config.train.batch_size = 7
  with pytest.raises(ConfigError, match=r'^config\.train\.batch_size=7 is not divisible by the '
                                        r'8 devices$'):
    config_validation.validate(config, 8)
  config.train.batch_size = 8
  config_validation.validate(config, 8)


def test_every_shipped_config_is_valid_on_8_devices():
  for name in sorted(os.listdir(CONFIGS)):
    if name.endswith('.py'):
      config_validation.validate(load_config(os.path.join(CONFIGS, name)), 8)


def _run_main(args, tmp_path):
  env = dict(os.environ, MEMSEG_DATA_DIR=str(tmp_path / 'no_data'))
  start = time.time()
  proc = subprocess.run([sys.executable, '-m', 'memseg_jax.main', *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  return proc, time.time() - start


def test_main_reports_a_bad_override_in_one_line_without_traceback(tmp_path):
  proc, _ = _run_main([f'--config={CONFIGS}/ade20k.py', f'--workdir={tmp_path}/w',
                       '--config.train.batch_size=7'], tmp_path)
  assert proc.returncode == 1
  assert 'Traceback' not in proc.stderr
  assert 'error: config.train.batch_size=7 is not divisible by the 8 devices' in proc.stderr


def test_main_without_prepared_data_says_where_it_is_expected(tmp_path):
  proc, seconds = _run_main([f'--config={CONFIGS}/ade20k.py', f'--workdir={tmp_path}/w'],
                            tmp_path)
  assert proc.returncode == 1, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  error = proc.stderr[proc.stderr.index('error: '):]
  assert "dataset 'ade20k' is not prepared" in error
  assert str(tmp_path / 'no_data') in error                         # where it is expected
  assert 'scripts/prepare_datasets.py --dataset=ade20k' in error     # how to prepare it
  # Nothing was compiled: the failure comes before the model is built (generous bound for a
  # shared CI machine; it is a few seconds of imports).
  assert seconds < 90, seconds
