"""MCIBI, DeepLabV3 HRNetV2p-W48, Cityscapes train+val, 512x1024, batch 16, 500 epochs.

    python -m memseg_jax.main --config=configs/cityscapes_hrnetv2w48.py \
        --workdir=/ckpt/mcibi_hrnetv2w48_cityscapes \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/hrnetv2_w48_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_hrnetv2w48_cityscapes.pth`): 82.54 mIoU on the
Cityscapes *test server* (multi-scale + flip, the only reported figure; no single-scale number
is published). Like the reference this trains on train+val and evaluates with sliding windows
of (height, width) = (1024, 512), stride 341, scales 0.5-1.75 and flip (softmax averaged), the
reference's active inference block. Convert and evaluate the released model (on `validation`
here, which the model has seen in training; the test split needs the server):

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_hrnetv2w48_cityscapes.pth \
        --config=configs/cityscapes_hrnetv2w48.py \
        --output=/ckpt/mcibi_hrnetv2w48_cityscapes_converted
    python -m memseg_jax.main --mode=eval --config=configs/cityscapes_hrnetv2w48.py \
        --workdir=/tmp/eval_hrnetv2w48_cityscapes --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_hrnetv2w48_cityscapes_converted

Stem: `model.backbone.stem_relu=False` (the default) is what the released checkpoint needs (no
ReLU after the stem's first BN; ssseg HEAD sets `mcibi_version=True` for exactly this config);
True reproduces SSSegmentation 1.7.0.

Reference config `mcibi_deeplabv3_hrnetv2w48_cityscapes` (spec wave2 §4): lr 0.01, memory
base_lr 0.009 (momentum ~1.0 at the start), no memory loss, no auxiliary head, and a stride-2
3x3 CBR (`downsample_backbone`) on the 720-channel output: the head runs at 1/8.

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 15.68 of 30.75 GiB; v5p-8 (4 per chip): 15.68 of 95.74 GiB; v5e-8
(2 per chip): 7.82 of 15.75 GiB; 8xH100 (2 per GPU): 8.60 of 70.78 GiB. It fits the smallest listed
slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cityscapes_hrnetv2w48 --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

cityscapes = load_sibling_config(__file__, 'cityscapes')
hrnet = load_sibling_config(__file__, 'ade20k_hrnetv2w48')


def get_config():
  config = hrnet.set_hrnetv2w48(cityscapes.get_config(), downsample_backbone_stride=2)
  config.train.num_epochs = 500
  config.train.lr = 0.01
  config.train.lr_min = -1.0               # 0.01 * lr = 1e-4
  config.train.weight_decay = 5e-4
  config.model.memory.base_lr = 0.009
  config.model.memory.use_loss = False
  return config
