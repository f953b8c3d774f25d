"""MCIBI++ PSPNet R-50-D8, COCO-Stuff-10k, 512x512, batch 16, 110 epochs, lr 0.001.

    python -m memseg_jax.main --config=configs/mcibipp/pspnet_cocostuff10k.py \
        --workdir=/ckpt/mcibipp_pspnet_cocostuff10k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation
`mcibiplusplus_ppm_resnet50os8_cocostuff10k`): 38.47 mIoU single-scale on the COCO-Stuff-10k
test split. About 562 steps per epoch on 8 devices; weight decay 1e-4. Head: PPM context,
segmentor self-attention, gathering from decoder_cwi, 3x3 decoder_cls; lr_min 1e-4. Evaluate the
released checkpoint (converted once):

    python -m memseg_jax.convert --config=configs/mcibipp/pspnet_cocostuff10k.py \
        --torch_checkpoint=mcibiplusplus_ppm_resnet50os8_cocostuff10k.pth \
        --output=/ckpt/mcibipp_pspnet_cocostuff10k_released
    python -m memseg_jax.main --mode=eval --config=configs/mcibipp/pspnet_cocostuff10k.py \
        --workdir=/tmp/eval_pspnet_cocostuff10k --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibipp_pspnet_cocostuff10k_released

Settings: configs/mcibipp/_base.py (the reference's values, dataset by dataset).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 5.49 of 30.75 GiB; v5p-8 (4 per chip): 5.48 of 95.74 GiB. It fits
the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=mcibipp/pspnet_cocostuff10k --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (8.31 GiB,
`python scripts/aot_check.py --configs=mcibipp/pspnet_cocostuff10k --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16). On 8xH100 (2 per GPU): 3.78 of 70.78 GiB, compiled
without a GPU with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README, Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

base = load_sibling_config(__file__, '_base')


def get_config():
  return base.get_config('pspnet', 'cocostuff10k')
