"""MCIBI, DeepLabV3 head on ViT-L/16, COCO-Stuff-10k (182 classes), 512x512, batch 16, 110 epochs.

    python -m memseg_jax.main --config=configs/cocostuff10k_vitl.py \
        --workdir=/ckpt/mcibi_vitl_cocostuff10k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/vit_large_p16_384_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_vitlarge_cocostuff10k`): 44.27 mIoU on the
COCO-Stuff-10k test split single-scale (slide 512x512, stride 341, probabilities averaged),
45.50 with `:ms_flip` (scales 0.5-1.75 and flip). About 62k steps (562 per epoch on 8
devices). lr 0.001 (backbone x 0.1), weight decay 0, memory base_lr 0.0009 (the memory
momentum starts at 1.0), no memory loss, ASPP dilations (1, 12, 24, 36).

Evaluate the released checkpoint (`mcibi_deeplabv3_vitlarge_cocostuff10k.pth`, from
https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_mcibi/):

    python -m memseg_jax.convert --config=configs/cocostuff10k_vitl.py \
        --torch_checkpoint=mcibi_deeplabv3_vitlarge_cocostuff10k.pth \
        --output=/ckpt/mcibi_vitl_cocostuff10k_flax
    python -m memseg_jax.main --mode=eval --config=configs/cocostuff10k_vitl.py \
        --workdir=/tmp/eval_vitl_coco --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_vitl_cocostuff10k_flax

Everything else as configs/ade20k_vitl.py (the ImageNet conversion command is there).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 14.14 of 30.75 GiB; v5p-8 (4 per chip): 14.18 of 95.74 GiB; v5e-8
(2 per chip): 8.19 of 15.75 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cocostuff10k_vitl --targets=v4-8 --steps=train --dtypes=bfloat16`).
Compiling for 8xH100 without a GPU needs XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README,
Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

cocostuff10k = load_sibling_config(__file__, 'cocostuff10k')
ade20k_vitl = load_sibling_config(__file__, 'ade20k_vitl')


def get_config(arg=None):
  config = ade20k_vitl.apply_vit_large(cocostuff10k.get_config())
  config.model.head.dilations = (1, 12, 24, 36)
  config.train.lr = 0.001
  config.train.num_epochs = 110
  config.model.memory.base_lr = 0.0009
  config.model.memory.use_loss = False
  if arg == 'ms_flip':
    config.inference.scales = ade20k_vitl.MS_FLIP_SCALES
    config.inference.flip = True
  return config
