"""MCIBI, DeepLabV3 S-101-D8 (ResNeSt-101), LIP (20 classes), 473x473, batch 40, 150 epochs.

    python -m memseg_jax.main --config=configs/lip_s101.py --workdir=/ckpt/mcibi_s101_lip \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet

Expected (the reference's released model `mcibi_deeplabv3_s101_lip.pth`, SSSegmentation
`mcibi_deeplabv3_resnest101os8_lip`): 56.21 mIoU on LIP validation single-scale, 56.34 with
`:flip` (flip only, logits averaged, left/right channels swapped). lr 0.007 (poly to 7e-5),
weight decay 5e-4, memory base_lr 0.007 (momentum 0.9 at the start), no memory loss. Unlike the
R-50/R-101 LIP configs the head uses ReLU (the S-101 config sets no LeakyReLU). About 114k steps
(761 per epoch on 8 devices). Data as configs/lip.py (square resize, rotations, flips that swap
left/right classes; evaluation at 473x473 without keeping the aspect ratio).

Evaluate the released checkpoint (convert it once, then evaluate it):

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_s101_lip.pth \
        --config=configs/lip_s101.py --output=/ckpt/mcibi_s101_lip_converted
    python -m memseg_jax.main --mode=eval --config=configs/lip_s101.py \
        --workdir=/tmp/mcibi_s101_lip_eval --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_s101_lip_converted

(`--config=configs/lip_s101.py:flip` for the flip number.) The ImageNet backbone:
`python -m memseg_jax.convert --imagenet --torch_checkpoint=resnest101_d2-f3b931b2.pth --config=configs/lip_s101.py --output=/ckpt/resnest101_imagenet`.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/lip_s101.py \
        --workdir=/ckpt/mcibi_s101_lip --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 40, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (10 per chip): 26.64 of 30.75 GiB; v5p-8 (10 per
chip): 26.61 of 95.74 GiB; v5e-8 (5 per chip): 11.66 of 15.75 GiB; 8xH100 (5 per GPU): 12.02 of
70.78 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=lip_s101 --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

lip = load_sibling_config(__file__, 'lip')


def get_config(arg=None):
  """`--config=configs/lip_s101.py:flip` evaluates with horizontal flip."""
  if arg not in (None, 'flip'):
    raise ValueError(f"configs/lip_s101.py: unknown argument {arg!r} (expected 'flip')")
  config = lip.get_config(arg)
  config.model.backbone.type = 'resnest'
  config.model.backbone.depth = 101
  config.model.act = 'relu'
  config.train.batch_size = 40
  config.train.num_epochs = 150
  config.train.lr = 0.007
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.007
  config.model.memory.use_loss = False
  return config
