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

Device memory (TPU v4-8, v5e-8, v5p-8, 8xH100), checked without a chip by
`python scripts/aot_check.py --configs=ade20k_r101`: whether the documented batch fits each slice;
add `--targets=v5e-8 --per_device_batch=N` for the images per v5e chip (16 GiB HBM).
"""

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')


def get_config(arg=None):
  config = ade20k.get_config(arg)
  config.model.backbone.depth = 101
  return config
