"""MCIBI++ PSPNet R-50-D8, ADE20K, 512x512, batch 16, 130 epochs, lr 0.01.

    python -m memseg_jax.main --config=configs/mcibipp/pspnet_ade20k.py \
        --workdir=/ckpt/mcibipp_pspnet_ade20k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation
`mcibiplusplus_ppm_resnet50os8_ade20k`): 43.88 mIoU single-scale on ADE20K validation. About
1,263 steps per epoch on 8 devices; weight decay 5e-4. Head: PPM context, segmentor self-
attention, gathering from decoder_pr (force_use_preds_pr), 1x1 decoders. Evaluate the released
checkpoint (converted once):

    python -m memseg_jax.convert --config=configs/mcibipp/pspnet_ade20k.py \
        --torch_checkpoint=mcibiplusplus_ppm_resnet50os8_ade20k.pth \
        --output=/ckpt/mcibipp_pspnet_ade20k_released
    python -m memseg_jax.main --mode=eval --config=configs/mcibipp/pspnet_ade20k.py \
        --workdir=/tmp/eval_pspnet_ade20k --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibipp_pspnet_ade20k_released

Settings: configs/mcibipp/_base.py (the reference's values, dataset by dataset).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 5.43 of 30.75 GiB; v5p-8 (4 per chip): 5.50 of 95.74 GiB. It fits
the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=mcibipp/pspnet_ade20k --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (8.27 GiB,
`python scripts/aot_check.py --configs=mcibipp/pspnet_ade20k --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16). On 8xH100 (2 per GPU): 3.65 of 70.78 GiB, compiled
without a GPU with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README, Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

base = load_sibling_config(__file__, '_base')


def get_config():
  return base.get_config('pspnet', 'ade20k')
