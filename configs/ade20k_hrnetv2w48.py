"""MCIBI, DeepLabV3 HRNetV2p-W48, ADE20K, 512x512, batch 16, 180 epochs, lr 0.004.

    python -m memseg_jax.main --config=configs/ade20k_hrnetv2w48.py \
        --workdir=/ckpt/mcibi_hrnetv2w48_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/hrnetv2_w48_imagenet

Expected (the reference's released model, SSSegmentation `mcibi_deeplabv3_hrnetv2w48_ade20k.pth`):
45.79 mIoU single-scale on ADE20K validation, 47.46 with `:ms_flip` (sliding 512x512 windows,
stride 341, scales 0.5-1.75, flip, softmax averaged). Convert and evaluate the released model:

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_hrnetv2w48_ade20k.pth \
        --config=configs/ade20k_hrnetv2w48.py --output=/ckpt/mcibi_hrnetv2w48_ade20k_converted
    python -m memseg_jax.main --mode=eval --config=configs/ade20k_hrnetv2w48.py:ms_flip \
        --workdir=/tmp/eval_hrnetv2w48_ade20k --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_hrnetv2w48_ade20k_converted

The ImageNet backbone (open-mmlab `hrnetv2_w48-d2186c55.pth`; its classification-head keys are
ignored):
`python -m memseg_jax.convert --imagenet --torch_checkpoint=hrnetv2_w48-d2186c55.pth --config=configs/ade20k_hrnetv2w48.py --output=/ckpt/hrnetv2_w48_imagenet`.

Stem: `model.backbone.stem_relu=False` (the default here) is what the released HRNet MCIBI
checkpoints need: they were trained by ssseg code without a ReLU after the stem's first BN.
SSSegmentation 1.7.0 adds that ReLU (`stem_relu=True` reproduces the package; spec wave2 §0).

Reference config `mcibi_deeplabv3_hrnetv2w48_ade20k` (spec wave2 §4): the head reads the
720-channel concatenation of the four HRNet branches at 1/4 (no auxiliary head), memory
base_lr 0.004 (momentum 0.9 at the start), memory loss from epoch 2, lr_min 1% of lr.
This file also holds `set_hrnetv2w48`, the backbone/head changes shared by the HRNet configs.

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step with the memory loss at the batch of 16, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 18.19 of 30.75 GiB; v5p-8 (4 per
chip): 18.17 of 95.74 GiB; 8xH100 (2 per GPU): 10.71 of 70.78 GiB. It fits the smallest listed
slice, a TPU v4-8
(`python scripts/aot_check.py --configs=ade20k_hrnetv2w48 --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 4 images per chip were compiled and fit (14.77 GiB,
`python scripts/aot_check.py --configs=ade20k_hrnetv2w48 --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=4`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=32` keeps the chips busier
(the reference's lr and schedule are for 16). Most of that memory is the memory module's attention
over the 128x128 map at 1/4.
"""

import ml_collections

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def set_hrnetv2w48(config, downsample_backbone_stride: int = 1):
  """HRNetV2p-W48 backbone, MCIBI head on its 720-channel 1/4 output, no auxiliary head."""
  config.model.backbone = ml_collections.ConfigDict({
      'type': 'hrnet',
      'arch': 'hrnetv2_w48',
      'stem_relu': False,                  # the released checkpoints' stem (docstring)
      'selected_indices': (0, 0, 0, 0),    # the one output, read 4 times as in the reference
      'pretrained': '',
  })
  config.model.head.downsample_backbone_stride = downsample_backbone_stride
  config.model.auxiliary.enabled = False   # the reference: auxiliary None, loss_aux popped
  return config


def slide_ms_flip(config, scales):
  """The HRNet configs' commented-out ms+flip block: 512x512 windows, stride 341."""
  i = config.inference
  i.mode = 'slide'
  i.crop_size = (512, 512)
  i.stride = (341, 341)
  i.scales = tuple(scales)
  i.flip = True
  i.use_probs_before_resize = True
  return config


def get_config(arg=None):
  """`--config=configs/ade20k_hrnetv2w48.py:ms_flip` evaluates with slide multi-scale + flip."""
  config = set_hrnetv2w48(ade20k.get_config())
  config.train.num_epochs = 180
  config.train.lr = 0.004
  config.train.lr_min = -1.0               # 0.01 * lr = 4e-5
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.004
  config.model.memory.use_loss = True
  # Single scale: whole image, logits (the reference's active inference block).
  config.inference.mode = 'whole'
  config.inference.use_probs_before_resize = False
  if arg == 'ms_flip':
    slide_ms_flip(config, MS_FLIP_SCALES)
  elif arg:
    raise ValueError(f"configs/ade20k_hrnetv2w48.py: unknown argument {arg!r} (expected 'ms_flip')")
  return config
