"""MCIBI, DeepLabV3 R-50-D8 (ResNet-v1c, output stride 8), ADE20K, 512x512, batch 16, 130 epochs.

    python -m memseg_jax.main --config=configs/ade20k.py --workdir=/ckpt/mcibi_r50_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation `mcibi_deeplabv3_r50_ade20k`):
44.39 mIoU single-scale on ADE20K validation (45.97 with --config.inference.scales and flip as
in `ms_flip` below). About 164k steps (1,263 per epoch on 8 devices, spec section 5); the
memory loss joins from epoch 2. Prepare the data first:

    python scripts/prepare_datasets.py --dataset=ade20k --manual_dir=/data/ADEChallengeData2016 --data_dir=/data/tfds

The ImageNet backbone: `python -m memseg_jax.convert --imagenet
--torch_checkpoint=resnet50_v1c.pth --config=configs/ade20k.py --output=/ckpt/resnet50_v1c_imagenet`
(an open-mmlab `.pth` path also works directly). Every value is the reference's
`mcibi_deeplabv3_resnet50os8_ade20k` (configs/default.py holds them).

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/ade20k.py --workdir=/ckpt/mcibi_r50_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory (TPU v4-8, v5e-8, v5p-8, 8xH100), checked without a chip by
`python scripts/aot_check.py --configs=ade20k`: whether the documented batch fits each slice;
add `--targets=v5e-8 --per_device_batch=N` for the images per v5e chip (16 GiB HBM).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def get_config(arg=None):
  """`--config=configs/ade20k.py:ms_flip` evaluates with multi-scale + flip."""
  if arg not in (None, 'ms_flip'):
    raise ValueError(f"configs/ade20k.py: unknown argument {arg!r} (expected 'ms_flip')")
  config = default.get_config()
  config.model.name = 'mcibi'
  config.model.num_classes = 150
  config.model.backbone.depth = 50
  config.data.name = 'ade20k'
  config.data.num_train_images = 20210
  config.train.batch_size = 16
  config.train.num_epochs = 130
  config.train.lr = 0.01
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.01
  config.model.memory.use_loss = True
  if arg == 'ms_flip':
    config.inference.scales = MS_FLIP_SCALES
    config.inference.flip = True
    config.inference.use_probs_before_resize = True
  return config
