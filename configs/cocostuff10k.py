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

Device memory of the bfloat16 train step, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): on v5e 8 images per chip fit (8.61 of 15.75 GiB,
`python scripts/aot_check.py --configs=cocostuff10k --targets=v5e-8 --steps=train
--dtypes=bfloat16 --per_device_batch=8`), so the batch of 16 fits a v5e-8 (2 per chip) and a TPU
v4-8 (4 per chip, 30.75 GiB; the ADE20K network with 150 classes took 5.83 GiB there).
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
