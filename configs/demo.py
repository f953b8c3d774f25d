"""A small MCIBI on the built-in `synthetic_scenes` dataset: the whole path in minutes on a CPU.

    python -m memseg_jax.main --config=configs/demo.py --workdir=/tmp/memseg_demo

Generates the dataset on first use (512 training / 64 validation procedurally drawn scenes of
8 classes, 96-192 px sides, into the tfds data dir), trains a ResNet-18-D8 MCIBI with a narrow
head from scratch for 320 steps (5 epochs of 64 steps at batch 8, 96x96 crops; the memory loss
joins at epoch 2), checkpoints, and evaluates on the validation split. On 2 CPU cores it takes
about 5-10 minutes and ends with a final loss around 1 and a validation mIoU well above chance
(about 0.4-0.6; chance is about 0.07). Run it again to see it resume (nothing left to train,
so it only re-evaluates).

On a GPU or TPU, bfloat16 compute (parameters, BatchNorm statistics and the memory stay
float32; `scripts/compare_bf16.py` compares the two on this demo):

    python -m memseg_jax.main --config=configs/demo.py --workdir=/tmp/memseg_demo_bf16 \
        --config.model.dtype=bfloat16

It fits every slice scripts/aot_check.py lists (TPU v4-8, v5e-8, v5p-8, 8xH100) at its batch
of 8 with room to spare (a train step peaks at about 0.2 GiB per device), on v5e too.

Device memory of the bfloat16 train step with the memory loss at the batch of 8, compiled for the
chips without one (scripts/aot_check.py; README, Hardware): TPU v4-8 (2 per chip): 0.22 of 30.75
GiB; v5p-8 (2 per chip): 0.19 of 95.74 GiB; 8xH100 (1 per GPU): 0.19 of 70.78 GiB. It fits the
smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=demo --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (0.21 GiB,
`python scripts/aot_check.py --configs=demo --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=8`):
the batch of 8 is 1 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the demo's lr and schedule are for 8).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')


def get_config():
  config = default.get_config()
  m = config.model
  m.name = 'mcibi'
  m.num_classes = 8
  m.backbone.depth = 18
  m.head.feats_channels = 64
  m.head.dilations = (1, 2, 4, 6)       # the 12x12 feature maps of a 96x96 crop
  m.memory.transform_channels = 32
  m.memory.out_channels = 64
  m.auxiliary.channels = 64
  m.memory.base_lr = 0.05
  m.memory.use_loss = True

  d = config.data
  d.name = 'synthetic_scenes'
  d.num_train_images = 512
  d.crop_size = (96, 96)
  d.train_scale = (256, 128)
  d.eval_scale = (256, 128)
  d.shuffle_buffer = 256

  t = config.train
  t.batch_size = 8
  t.num_epochs = 5
  t.lr = 0.05
  t.weight_decay = 1e-4
  t.log_every_steps = 20
  t.checkpoint_every_steps = 100
  t.keep_checkpoints = 2

  config.inference.mode = 'whole'
  config.eval.batch_size = 8
  return config
