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

Device memory of the bfloat16 train step with the memory loss at the batch of 16, compiled for the
chips without one (scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 7.95 of 30.75
GiB; v5p-8 (4 per chip): 8.06 of 95.74 GiB; 8xH100 (2 per GPU): 5.84 of 70.78 GiB. It fits the
smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=ade20k_r101 --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (11.94 GiB,
`python scripts/aot_check.py --configs=ade20k_r101 --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16).
"""

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')


def get_config(arg=None):
  config = ade20k.get_config(arg)
  config.model.backbone.depth = 101
  return config
