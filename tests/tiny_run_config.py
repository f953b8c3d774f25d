"""A tiny MCIBI run for multi-process and preemption tests, usable as a --config file.

    python -m memseg_jax.main --config=tests/tiny_run_config.py --workdir=W \
        --config.data.data_dir=D --config.train.num_train_steps=40

configs/demo.py shrunk: 32x32 crops, global batch 4, a registered 48x48 `synthetic_scenes`
variant (256 train / 4 validation images, one image shape, so evaluation compiles each of its
programs once), no final evaluation. Loading this file registers the dataset variant, so a
fresh `memseg_jax.main` process can read it; `prepare_dataset(data_dir)` generates it.
"""

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATASET = 'synthetic_scenes/multihost_tiny'
NUM_TRAIN = 256


def register_dataset():
  from memseg_jax.datasets import synthetic_scenes  # pylint: disable=import-outside-toplevel
  name = DATASET.split('/')[1]
  if name in synthetic_scenes.CONFIGS:        # registered once per process
    return synthetic_scenes.CONFIGS[name]
  return synthetic_scenes.register_config(synthetic_scenes.SyntheticScenesConfig(
      name=DATASET.split('/')[1], description='48x48 scenes for multi-process tests',
      min_short=48, max_short=48, max_aspect=1.0, num_train=NUM_TRAIN, num_validation=4))


def prepare_dataset(data_dir: str) -> None:
  from memseg_jax import datasets  # pylint: disable=import-outside-toplevel
  register_dataset()
  builder = datasets.get_builder(DATASET, data_dir)
  if not datasets.is_prepared(builder):
    datasets.download_and_prepare(builder)


def get_config(data_dir: str = '', steps: int = 3):
  from memseg_jax.config_validation import load_config  # pylint: disable=import-outside-toplevel
  register_dataset()
  config = load_config(os.path.join(REPO, 'configs', 'demo.py'))
  config.data.name = DATASET
  config.data.num_train_images = NUM_TRAIN
  config.data.data_dir = data_dir
  config.data.crop_size = (32, 32)
  config.data.eval_scale = (48, 48)
  config.data.eval_keep_ratio = False
  config.train.batch_size = 4
  config.train.num_train_steps = int(steps)
  config.train.checkpoint_every_steps = 1000
  config.train.log_every_steps = 1
  config.train.final_eval = False
  config.eval.batch_size = 2
  config.eval.max_images = 4
  config.eval.num_summary_images = 0
  return config
