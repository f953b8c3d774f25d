"""MCIBI, DeepLabV3 head on ViT-Large/16 (ImageNet-22k, 384), ADE20K, 512x512, batch 16, 130 epochs.

    python -m memseg_jax.main --config=configs/ade20k_vitl.py --workdir=/ckpt/mcibi_vitl_ade20k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/vit_large_p16_384_imagenet

Expected (the reference's released model, SSSegmentation `mcibi_deeplabv3_vitlarge_ade20k`):
50.08 mIoU single-scale on ADE20K validation (slide 512x512, stride 341, probabilities
averaged), 51.63 with `:ms_flip` (6 scales and flip, same slide windows). About 164k steps
(1,263 per epoch on 8 devices). The memory loss joins from epoch 2.

Evaluate the released checkpoint (`mcibi_deeplabv3_vitlarge_ade20k.pth`, from
https://github.com/SegmentationBLWX/modelstore/releases/download/ssseg_mcibi/):

    python -m memseg_jax.convert --config=configs/ade20k_vitl.py \
        --torch_checkpoint=mcibi_deeplabv3_vitlarge_ade20k.pth --output=/ckpt/mcibi_vitl_ade20k_flax
    python -m memseg_jax.main --mode=eval --config=configs/ade20k_vitl.py --workdir=/tmp/eval_vitl \
        --config.data.data_dir=/data/tfds --config.eval.checkpoint=/ckpt/mcibi_vitl_ade20k_flax

The ImageNet backbone (timm `jx_vit_large_p16_384-b3be5167.pth`; its 24x24 position embedding is
resized to 32x32 on conversion):
`python -m memseg_jax.convert --imagenet --torch_checkpoint=jx_vit_large_p16_384-b3be5167.pth --config=configs/ade20k_vitl.py --output=/ckpt/vit_large_p16_384_imagenet`
(the `.pth` path also works directly).

Values: the reference's `mcibi_deeplabv3_vitlarge_ade20k` (spec wave2 sections 3 and 4): the
ViT outputs after blocks 9/14/19/23 at stride 16, each through a LayerNorm; ASPP dilations
(1, 6, 12, 18) on the last; three auxiliary heads (two 3x3 CBRs each followed by a x4 nearest
upsampling) on the other three, 0.4 each; SGD with weight decay 0 and the backbone's lr x 0.1
(the memory momentum follows the unscaled lr). Dropout after the position embedding, the
attention and the FFN is 0.0: 1.7.0 asserts 0.1, but the released models and later upstream
configs use 0.0 (`--config.model.backbone.drop_rate=0.1` gives 1.7.0's). ViT-L has 300M+
parameters: `--config.model.remat=True` rematerialises each block in the backward pass
(scripts/vit_memory.py prints the per-device peak with and without it).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step with the memory loss at the batch of 16, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (4 per chip): 13.98 of 30.75 GiB; v5p-8 (4 per
chip): 14.05 of 95.74 GiB. It fits the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=ade20k_vitl --targets=v4-8 --steps=train_mem --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 4 images per chip were compiled and fit (13.33 GiB,
`python scripts/aot_check.py --configs=ade20k_vitl --targets=v5e-8 --steps=train_mem --dtypes=bfloat16 --per_device_batch=4`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=32` keeps the chips busier
(the reference's lr and schedule are for 16). Compiling for 8xH100 without a GPU needs
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README, Hardware).
"""

import ml_collections

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)


def vit_large_backbone():
  """config.model.backbone of the MCIBI ViT-L configs (`jx_vit_large_p16_384`)."""
  return ml_collections.ConfigDict(dict(
      type='vit',
      selected_indices=(0, 1, 2, 3),
      img_size=(512, 512),         # the position embedding's grid: img_size / patch_size
      patch_size=16,
      embed_dims=1024,
      num_layers=24,
      num_heads=16,
      mlp_ratio=4,
      out_indices=(9, 14, 19, 23),
      drop_rate=0.0,               # 1.7.0: 0.1; released models and later upstream: 0.0
      norm_eps=1e-6,
      pretrained='',               # converted timm jx_vit_large_p16_384 (orbax dir) or the .pth
  ))


def apply_vit_large(config):
  """The ViT-L changes shared by the ADE20K and COCO-Stuff configs."""
  m = config.model
  m.backbone = vit_large_backbone()
  m.head.norm_layers = True
  m.head.norm_eps = 1e-6
  m.auxiliary.num_convs = 2
  m.auxiliary.upsample = 4
  m.auxiliary.num_heads = 3
  t = config.train
  t.weight_decay = 0.0
  t.params_rules = (('backbone_net', 0.1, 1.0),)   # (pattern, lr_multiplier, wd_multiplier)
  i = config.inference
  i.mode = 'slide'
  i.crop_size = (512, 512)
  i.stride = (341, 341)
  i.use_probs_before_resize = True
  return config


def get_config(arg=None):
  """`--config=configs/ade20k_vitl.py:ms_flip` evaluates with multi-scale + flip."""
  config = apply_vit_large(ade20k.get_config())
  config.model.head.dilations = (1, 6, 12, 18)
  config.train.lr = 0.01
  config.train.num_epochs = 130
  config.model.memory.base_lr = 0.01
  config.model.memory.use_loss = True
  if arg == 'ms_flip':
    config.inference.scales = MS_FLIP_SCALES
    config.inference.flip = True
  return config
