"""MCIBI, DeepLabV3 R-50-D8 (ResNet-v1c, output stride 8), ADE20K, 512x512, batch 16, 130 epochs.

    python -m memseg_jax.main --config=configs/ade20k.py --workdir=/ckpt/mcibi_r50_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation `mcibi_deeplabv3_r50_ade20k`):
44.39 mIoU single-scale on ADE20K validation (45.97 with --config.inference.scales and flip as
in `ms_flip` below). About 164k steps (1,263 per epoch on 8 devices, spec section 5); the
memory loss joins from epoch 2. Prepare the data first:

    python scripts/prepare_datasets.py --dataset=ade20k \
        --manual_dir=/data/ADEChallengeData2016 --data_dir=/data/tfds

The ImageNet backbone:
`python -m memseg_jax.convert --imagenet --torch_checkpoint=resnet50_v1c.pth --config=configs/ade20k.py --output=/ckpt/resnet50_v1c_imagenet`
(an open-mmlab `.pth` path also works directly). Every value is the reference's
`mcibi_deeplabv3_resnet50os8_ade20k` (configs/default.py holds them).

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/ade20k.py --workdir=/ckpt/mcibi_r50_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step with the memory loss at the batch of 16, compiled for the
chips without one (scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 5.83 of 30.75
GiB; v5p-8 (4 per chip): 5.90 of 95.74 GiB; 8xH100 (2 per GPU): 3.90 of 70.78 GiB. It fits the
smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=ade20k --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (8.61 GiB,
`python scripts/aot_check.py --configs=ade20k --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg=None):
  """`--config=configs/ade20k.py:ms_flip` evaluates with multi-scale + flip."""
  if arg not in (None, 'ms_flip'):
    raise ValueError(f"configs/ade20k.py: unknown argument {arg!r} (expected 'ms_flip')")
  config = default.get_config()
  config.model.name = 'mcibi'
  config.model.num_classes = 150
  config.model.backbone.depth = 50
  config.data.name = 'ade20k'
  config.data.num_train_images = 20210
  config.train.batch_size = 16
  config.train.num_epochs = 130
  config.train.lr = 0.01
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.01
  config.model.memory.use_loss = True
  if arg == 'ms_flip':
    config.inference.scales = MS_FLIP_SCALES
    config.inference.flip = True
    config.inference.use_probs_before_resize = True
  return config
