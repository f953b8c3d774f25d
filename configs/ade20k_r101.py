"""MCIBI, DeepLabV3 R-101-D8, ADE20K, 512x512, batch 16, 130 epochs.

    python -m memseg_jax.main --config=configs/ade20k_r101.py --workdir=/ckpt/mcibi_r101_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet101_v1c_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_r101_ade20k`): 45.66 mIoU single-scale on ADE20K
validation, 47.27 with `:ms_flip`. Same recipe as configs/ade20k.py with a 101-layer backbone.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/ade20k_r101.py --workdir=/ckpt/mcibi_r101_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet101_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): the batch of 16 fits a TPU v4-8 (4 per chip: 7.95 of
30.75 GiB). On v5e 8 images per chip fit (11.94 of 15.75 GiB,
`python scripts/aot_check.py --configs=ade20k_r101 --targets=v5e-8 --steps=train_mem
--dtypes=bfloat16 --per_device_batch=8`).
"""

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')


def get_config(arg=None):
  config = ade20k.get_config(arg)
  config.model.backbone.depth = 101
  return config
