"""MCIBI, DeepLabV3 S-101-D8 (ResNeSt-101), COCO-Stuff-10k (182), 512x512, batch 32, 150 epochs.

    python -m memseg_jax.main --config=configs/cocostuff10k_s101.py \
        --workdir=/ckpt/mcibi_s101_cocostuff10k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet

Expected (the reference's released model `mcibi_deeplabv3_s101_cocostuff10k.pth`,
SSSegmentation `mcibi_deeplabv3_resnest101os8_cocostuff10k`): 41.18 mIoU on the COCO-Stuff-10k
test split single-scale, 42.38 with `:ms_flip` (whole image, scales 0.5-1.5 and flip,
probabilities averaged). lr 0.001 with the poly floor set to 1e-4 (not 0.01 x lr), weight decay
5e-4 (the R-50/R-101 COCO-Stuff configs use 1e-4), memory base_lr 0.0009 (the memory momentum
starts at 1.0), no memory loss. About 42k steps (281 per epoch on 8 devices).

Evaluate the released checkpoint (convert it once, then evaluate it):

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_s101_cocostuff10k.pth \
        --config=configs/cocostuff10k_s101.py --output=/ckpt/mcibi_s101_cocostuff10k_converted
    python -m memseg_jax.main --mode=eval --config=configs/cocostuff10k_s101.py \
        --workdir=/tmp/mcibi_s101_cocostuff10k_eval --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_s101_cocostuff10k_converted

(`--config=configs/cocostuff10k_s101.py:ms_flip` for the multi-scale + flip number.) The ImageNet
backbone:
`python -m memseg_jax.convert --imagenet --torch_checkpoint=resnest101_d2-f3b931b2.pth --config=configs/cocostuff10k_s101.py --output=/ckpt/resnest101_imagenet`.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/cocostuff10k_s101.py \
        --workdir=/ckpt/mcibi_s101_cocostuff10k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 32, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (8 per chip): 15.88 of 30.75 GiB; v5p-8 (8 per
chip): 15.87 of 95.74 GiB; v5e-8 (4 per chip): 9.74 of 15.75 GiB; 8xH100 (4 per GPU): 11.22 of 70.78
GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cocostuff10k_s101 --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

cocostuff10k = load_sibling_config(__file__, 'cocostuff10k')


def get_config(arg=None):
  """`--config=configs/cocostuff10k_s101.py:ms_flip` evaluates with multi-scale + flip."""
  if arg not in (None, 'ms_flip'):
    raise ValueError(f"configs/cocostuff10k_s101.py: unknown argument {arg!r} (expected 'ms_flip')")
  config = cocostuff10k.get_config(arg)
  config.model.backbone.type = 'resnest'
  config.model.backbone.depth = 101
  config.train.batch_size = 32
  config.train.num_epochs = 150
  config.train.lr = 0.001
  config.train.lr_min = 1e-4
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.0009
  config.model.memory.use_loss = False
  return config
