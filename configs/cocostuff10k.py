"""MCIBI, DeepLabV3 R-50-D8, COCO-Stuff-10k (182 classes), 512x512, batch 16, 110 epochs.

    python -m memseg_jax.main --config=configs/cocostuff10k.py \
        --workdir=/ckpt/mcibi_r50_cocostuff10k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_r50_cocostuff10k`): 38.84 mIoU on the COCO-Stuff-10k
test split single-scale, 39.78 with `:ms_flip` (scales 0.5-1.5 and flip). About 62k steps
(562 per epoch on 8 devices). lr 0.001, weight decay 1e-4, memory base_lr 0.0009 (the memory
momentum starts at 1.0), no memory loss.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/cocostuff10k.py \
        --workdir=/ckpt/mcibi_r50_cocostuff10k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 16, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 5.83 of 30.75 GiB; v5p-8 (4 per
chip): 5.87 of 95.74 GiB; 8xH100 (2 per GPU): 3.97 of 70.78 GiB. It fits the smallest listed slice,
a TPU v4-8
(`python scripts/aot_check.py --configs=cocostuff10k --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (8.61 GiB,
`python scripts/aot_check.py --configs=cocostuff10k --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')


def get_config(arg=None):
  if arg not in (None, 'ms_flip'):
    raise ValueError(f"configs/cocostuff10k.py: unknown argument {arg!r} (expected 'ms_flip')")
  config = default.get_config()
  config.model.num_classes = 182
  config.model.memory.base_lr = 0.0009
  config.model.memory.use_loss = False

  d = config.data
  d.name = 'cocostuff10k'
  d.train_split = 'train'
  d.eval_split = 'test'
  d.num_train_images = 9000

  t = config.train
  t.batch_size = 16
  t.num_epochs = 110
  t.lr = 0.001
  t.weight_decay = 1e-4
  if arg == 'ms_flip':
    config.inference.scales = (0.5, 0.75, 1.0, 1.25, 1.5)
    config.inference.flip = True
    config.inference.use_probs_before_resize = True
  return config
