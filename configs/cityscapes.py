"""MCIBI, DeepLabV3 R-50-D8, Cityscapes train+val, 512x1024, batch 16, 440 epochs.

    python -m memseg_jax.main --config=configs/cityscapes.py --workdir=/ckpt/mcibi_r50_cityscapes \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_r50_cityscapes`): 79.97 mIoU on the Cityscapes
*test server* (multi-scale + flip, sliding windows). Like the reference this trains on
train+val (3,475 images, 217 steps per epoch on 8 devices, about 95k steps), so the final
evaluation here on `validation` is not a held-out number; train on `--config.data.train_split=train`
for a validation score. The memory momentum starts at 1.0 (base_lr 0.009 < lr 0.01) and there
is no memory loss. Inference: slide windows of (height, width) = (1024, 512) with stride 341,
scales 0.5-1.75 and flip, softmax probabilities averaged (the reference's active config).

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/cityscapes.py --workdir=/ckpt/mcibi_r50_cityscapes \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 16, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 11.86 of 30.75 GiB; v5p-8 (4 per
chip): 11.89 of 95.74 GiB; v5e-8 (2 per chip): 6.19 of 15.75 GiB; 8xH100 (2 per GPU): 7.43 of 70.78
GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cityscapes --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')


def get_config():
  config = default.get_config()
  config.model.num_classes = 19
  config.model.memory.base_lr = 0.009
  config.model.memory.use_loss = False

  d = config.data
  d.name = 'cityscapes'
  d.train_split = 'trainval'
  d.eval_split = 'validation'
  d.num_train_images = 3475
  d.crop_size = (512, 1024)
  d.train_scale = (2048, 1024)
  d.eval_scale = (2048, 1024)

  t = config.train
  t.batch_size = 16
  t.num_epochs = 440
  t.lr = 0.01
  t.weight_decay = 5e-4

  i = config.inference
  i.mode = 'slide'
  i.crop_size = (1024, 512)
  i.stride = (341, 341)
  i.scales = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
  i.flip = True
  i.use_probs_before_resize = True
  return config
