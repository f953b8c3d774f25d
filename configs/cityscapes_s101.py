"""MCIBI, DeepLabV3 S-101-D8 (ResNeSt-101), Cityscapes train+val, 512x1024, batch 16, 500 epochs.

    python -m memseg_jax.main --config=configs/cityscapes_s101.py \
        --workdir=/ckpt/mcibi_s101_cityscapes \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet

Expected (the reference's released model `mcibi_deeplabv3_s101_cityscapes.pth`, SSSegmentation
`mcibi_deeplabv3_resnest101os8_cityscapes`): 81.51 mIoU on the Cityscapes *test server*
(multi-scale + flip, sliding windows; the reference reports no single-scale number). Like the
reference this trains on train+val (3,475 images, 217 steps per epoch on 8 devices, about 109k
steps), so the evaluation here on `validation` is not a held-out number. lr 0.01, weight decay
5e-4, memory base_lr 0.009 (the memory momentum starts at 1.0), no memory loss. Inference (the
reference's active config): slide windows of (height, width) = (1024, 512), stride 341, scales
0.5-1.75 and flip, softmax probabilities averaged.

Evaluate the released checkpoint (convert it once, then evaluate it; test-server numbers need
the server):

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_s101_cityscapes.pth \
        --config=configs/cityscapes_s101.py --output=/ckpt/mcibi_s101_cityscapes_converted
    python -m memseg_jax.main --mode=eval --config=configs/cityscapes_s101.py \
        --workdir=/tmp/mcibi_s101_cityscapes_eval --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_s101_cityscapes_converted

The ImageNet backbone:
`python -m memseg_jax.convert --imagenet --torch_checkpoint=resnest101_d2-f3b931b2.pth --config=configs/cityscapes_s101.py --output=/ckpt/resnest101_imagenet`.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/cityscapes_s101.py \
        --workdir=/ckpt/mcibi_s101_cityscapes --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 16, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 19.43 of 30.75 GiB; v5p-8 (4 per
chip): 19.42 of 95.74 GiB; v5e-8 (2 per chip): 10.16 of 15.75 GiB; 8xH100 (2 per GPU): 11.89 of
70.78 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cityscapes_s101 --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

cityscapes = load_sibling_config(__file__, 'cityscapes')


def get_config():
  config = cityscapes.get_config()
  config.model.backbone.type = 'resnest'
  config.model.backbone.depth = 101
  config.train.num_epochs = 500
  config.train.lr = 0.01
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.009
  config.model.memory.use_loss = False
  return config
