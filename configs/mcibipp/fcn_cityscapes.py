"""MCIBI++ FCN R-50-D8, Cityscapes train/val, 512x1024, batch 8, 220 epochs, lr 0.01.

    python -m memseg_jax.main --config=configs/mcibipp/fcn_cityscapes.py \
        --workdir=/ckpt/mcibipp_fcn_cityscapes --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation
`mcibiplusplus_resnet50os8_cityscapes`): 78.77 mIoU single-scale on Cityscapes validation (whole
1024x2048 images). About 372 steps per epoch on 8 devices; weight decay 5e-4. Head: no context
module; decoder_cls reads the memory output (512 channels). Evaluate the released checkpoint
(converted once):

    python -m memseg_jax.convert --config=configs/mcibipp/fcn_cityscapes.py \
        --torch_checkpoint=mcibiplusplus_resnet50os8_cityscapes.pth \
        --output=/ckpt/mcibipp_fcn_cityscapes_released
    python -m memseg_jax.main --mode=eval --config=configs/mcibipp/fcn_cityscapes.py \
        --workdir=/tmp/eval_fcn_cityscapes --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibipp_fcn_cityscapes_released

Settings: configs/mcibipp/_base.py (the reference's values, dataset by dataset).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 8, compiled for the chips without one (scripts/aot_check.py; README, Hardware):
TPU v4-8 (2 per chip): 5.06 of 30.75 GiB; v5p-8 (2 per chip): 5.04 of 95.74 GiB; 8xH100 (1 per GPU):
3.23 of 70.78 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=mcibipp/fcn_cityscapes --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 4 images per chip were compiled and fit (9.77 GiB,
`python scripts/aot_check.py --configs=mcibipp/fcn_cityscapes --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=4`):
the batch of 8 is 1 per chip on a v5e-8, and `--config.train.batch_size=32` keeps the chips busier
(the reference's lr and schedule are for 8).
"""

from memseg_jax.config_validation import load_sibling_config

base = load_sibling_config(__file__, '_base')


def get_config():
  return base.get_config('fcn', 'cityscapes')
