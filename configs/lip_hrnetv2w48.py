"""MCIBI, DeepLabV3 HRNetV2p-W48, LIP (20 classes), 473x473, batch 40, 150 epochs, lr 0.007.

    python -m memseg_jax.main --config=configs/lip_hrnetv2w48.py \
        --workdir=/ckpt/mcibi_hrnetv2w48_lip \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/hrnetv2_w48_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_hrnetv2w48_lip.pth`): 56.40 mIoU on LIP validation
single-scale, 56.99 with `:flip` (flip only, logits averaged, left/right channels swapped).
Convert and evaluate the released model:

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_hrnetv2w48_lip.pth \
        --config=configs/lip_hrnetv2w48.py --output=/ckpt/mcibi_hrnetv2w48_lip_converted
    python -m memseg_jax.main --mode=eval --config=configs/lip_hrnetv2w48.py:flip \
        --workdir=/tmp/eval_hrnetv2w48_lip --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_hrnetv2w48_lip_converted

Stem: `model.backbone.stem_relu=False` (the default) is what the released checkpoint needs (it
was trained without a ReLU after the stem's first BN); True reproduces SSSegmentation 1.7.0.

Reference config `mcibi_deeplabv3_hrnetv2w48_lip` (spec wave2 §4): unlike the R-50/R-101 LIP
configs the head keeps ReLU (no LeakyReLU); memory base_lr 0.007 (momentum 0.9 at the start), no
memory loss, no auxiliary head, stride-2 `downsample_backbone` (head at 1/8; the 119x119
branch-0 map of a 473 crop makes the fuse layers' second resampling step a real downsample).
The data pipeline is configs/lip.py's.

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 40, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (10 per chip): 17.72 of 30.75 GiB; v5p-8 (10 per chip): 18.29 of 95.74 GiB;
v5e-8 (5 per chip): 8.70 of 15.75 GiB; 8xH100 (5 per GPU): 8.37 of 70.78 GiB. It fits the smallest
listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=lip_hrnetv2w48 --targets=v4-8 --steps=train --dtypes=bfloat16`).
The v4-8 compile needs about 33 GiB of host memory (README, Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

lip = load_sibling_config(__file__, 'lip')
hrnet = load_sibling_config(__file__, 'ade20k_hrnetv2w48')


def get_config(arg=None):
  """`--config=configs/lip_hrnetv2w48.py:flip` evaluates with horizontal flip."""
  config = hrnet.set_hrnetv2w48(lip.get_config(arg), downsample_backbone_stride=2)
  config.model.act = 'relu'
  config.train.batch_size = 40
  config.train.num_epochs = 150
  config.train.lr = 0.007
  config.train.lr_min = -1.0               # 0.01 * lr = 7e-5
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.007
  config.model.memory.use_loss = False
  config.inference.use_probs_before_resize = False   # logits, with or without flip
  return config
