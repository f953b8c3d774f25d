"""MCIBI++ UPerNet R-50-D8, Cityscapes train/val, 512x1024, batch 8, 220 epochs, lr 0.01.

    python -m memseg_jax.main --config=configs/mcibipp/upernet_cityscapes.py \
        --workdir=/ckpt/mcibipp_upernet_cityscapes --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation
`mcibiplusplus_upernet_resnet50os8_cityscapes`): 80.05 mIoU single-scale on Cityscapes
validation (whole 1024x2048 images). About 372 steps per epoch on 8 devices; weight decay 5e-4.
Head: PPM context, gathering from decoder_cwi, FPN over C2..C4 (1024 -> 1024 channels), 1x1
decoder_cls on 4096 channels at 1/4. Evaluate the released checkpoint (converted once):

    python -m memseg_jax.convert --config=configs/mcibipp/upernet_cityscapes.py \
        --torch_checkpoint=mcibiplusplus_upernet_resnet50os8_cityscapes.pth \
        --output=/ckpt/mcibipp_upernet_cityscapes_released
    python -m memseg_jax.main --mode=eval --config=configs/mcibipp/upernet_cityscapes.py \
        --workdir=/tmp/eval_upernet_cityscapes --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibipp_upernet_cityscapes_released

Settings: configs/mcibipp/_base.py (the reference's values, dataset by dataset).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 8, compiled for the chips without one (scripts/aot_check.py; README, Hardware):
TPU v4-8 (2 per chip): 7.96 of 30.75 GiB; v5p-8 (2 per chip): 8.09 of 95.74 GiB; 8xH100 (1 per GPU):
5.91 of 70.78 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=mcibipp/upernet_cityscapes --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 2 images per chip were compiled and fit (8.00 GiB,
`python scripts/aot_check.py --configs=mcibipp/upernet_cityscapes --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=2`):
the batch of 8 is 1 per chip on a v5e-8, and `--config.train.batch_size=16` keeps the chips busier
(the reference's lr and schedule are for 8).
"""

from memseg_jax.config_validation import load_sibling_config

base = load_sibling_config(__file__, '_base')


def get_config():
  return base.get_config('upernet', 'cityscapes')
