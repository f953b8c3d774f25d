"""MCIBI, DeepLabV3 S-101-D8 (ResNeSt-101, output stride 8), ADE20K, 512x512, batch 16, 180 epochs.

    python -m memseg_jax.main --config=configs/ade20k_s101.py --workdir=/ckpt/mcibi_s101_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet

Expected (the reference's released model `mcibi_deeplabv3_s101_ade20k.pth`, SSSegmentation
`mcibi_deeplabv3_resnest101os8_ade20k`): 46.63 mIoU single-scale on ADE20K validation, 47.39
with `:ms_flip` (whole image, scales 0.5-1.75 and flip, probabilities averaged). lr 0.004
(poly to 4e-5), weight decay 5e-4, memory base_lr 0.004 (momentum 0.9 at the start), memory
loss from epoch 2. About 227k steps (1,263 per epoch on 8 devices).

Evaluate the released checkpoint (convert it once, then evaluate it):

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_s101_ade20k.pth \
        --config=configs/ade20k_s101.py --output=/ckpt/mcibi_s101_ade20k_converted
    python -m memseg_jax.main --mode=eval --config=configs/ade20k_s101.py \
        --workdir=/tmp/mcibi_s101_ade20k_eval --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_s101_ade20k_converted

(`--config=configs/ade20k_s101.py:ms_flip` for the multi-scale + flip number.) The ImageNet backbone
for training:
`python -m memseg_jax.convert --imagenet --torch_checkpoint=resnest101_d2-f3b931b2.pth --config=configs/ade20k_s101.py --output=/ckpt/resnest101_imagenet`
(mmseg's `resnest101_d2`; its classifier `fc.*` is ignored, as the reference's strict=False load
ignores it).

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/ade20k_s101.py \
        --workdir=/ckpt/mcibi_s101_ade20k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnest101_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step with the memory loss at the batch of 16, compiled for the
chips without one (scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 9.74 of 30.75
GiB; v5p-8 (4 per chip): 9.77 of 95.74 GiB; 8xH100 (2 per GPU): 6.24 of 70.78 GiB. It fits the
smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=ade20k_s101 --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 4 images per chip were compiled and fit (9.73 GiB,
`python scripts/aot_check.py --configs=ade20k_s101 --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=4`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=32` keeps the chips busier
(the reference's lr and schedule are for 16).
"""

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')


def get_config(arg=None):
  """`--config=configs/ade20k_s101.py:ms_flip` evaluates with multi-scale + flip."""
  if arg not in (None, 'ms_flip'):
    raise ValueError(f"configs/ade20k_s101.py: unknown argument {arg!r} (expected 'ms_flip')")
  config = ade20k.get_config(arg)
  config.model.backbone.type = 'resnest'
  config.model.backbone.depth = 101
  config.train.num_epochs = 180
  config.train.lr = 0.004
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.004
  config.model.memory.use_loss = True
  return config
