"""MCIBI, DeepLabV3 HRNetV2p-W48, COCO-Stuff-10k (182 classes), 512x512, batch 16, 110 epochs.

    python -m memseg_jax.main --config=configs/cocostuff10k_hrnetv2w48.py \
        --workdir=/ckpt/mcibi_hrnetv2w48_cocostuff10k \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/hrnetv2_w48_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_hrnetv2w48_cocostuff10k.pth`): 39.77 mIoU on the
COCO-Stuff-10k test split single-scale, 41.48 with `:ms_flip` (sliding 512x512 windows, stride
341, scales 0.5-1.5, flip, softmax averaged). Convert and evaluate the released model:

    python -m memseg_jax.convert --torch_checkpoint=mcibi_deeplabv3_hrnetv2w48_cocostuff10k.pth \
        --config=configs/cocostuff10k_hrnetv2w48.py \
        --output=/ckpt/mcibi_hrnetv2w48_cocostuff10k_converted
    python -m memseg_jax.main --mode=eval --config=configs/cocostuff10k_hrnetv2w48.py:ms_flip \
        --workdir=/tmp/eval_hrnetv2w48_cocostuff10k --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/mcibi_hrnetv2w48_cocostuff10k_converted

Stem: `model.backbone.stem_relu=False` (the default) is what the released checkpoint needs (it
was trained without a ReLU after the stem's first BN); True reproduces SSSegmentation 1.7.0.

Reference config `mcibi_deeplabv3_hrnetv2w48_cocostuff10k` (spec wave2 §4): lr 0.001, weight
decay 1e-4, memory base_lr 0.0009 (momentum ~1.0 at the start), no memory loss, no auxiliary
head, the head at 1/4 on the 720-channel output. The data pipeline is configs/cocostuff10k.py's.

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 18.07 of 30.75 GiB; v5p-8 (4 per chip): 18.06 of 95.74 GiB; v5e-8
(2 per chip): 9.22 of 15.75 GiB; 8xH100 (2 per GPU): 10.89 of 70.78 GiB. It fits the smallest listed
slice, a TPU v4-8
(`python scripts/aot_check.py --configs=cocostuff10k_hrnetv2w48 --targets=v4-8 --steps=train --dtypes=bfloat16`).
"""

from memseg_jax.config_validation import load_sibling_config

cocostuff10k = load_sibling_config(__file__, 'cocostuff10k')
hrnet = load_sibling_config(__file__, 'ade20k_hrnetv2w48')

MS_FLIP_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5)


def get_config(arg=None):
  """`--config=configs/cocostuff10k_hrnetv2w48.py:ms_flip` evaluates with slide ms + flip."""
  config = hrnet.set_hrnetv2w48(cocostuff10k.get_config())
  config.train.batch_size = 16
  config.train.num_epochs = 110
  config.train.lr = 0.001
  config.train.lr_min = -1.0               # 0.01 * lr = 1e-5
  config.train.weight_decay = 1e-4
  config.model.memory.base_lr = 0.0009
  config.model.memory.use_loss = False
  config.inference.mode = 'whole'
  config.inference.use_probs_before_resize = False   # single scale: logits
  if arg == 'ms_flip':
    hrnet.slide_ms_flip(config, MS_FLIP_SCALES)
  elif arg:
    raise ValueError(f'configs/cocostuff10k_hrnetv2w48.py: unknown argument {arg!r} '
                     "(expected 'ms_flip')")
  return config
