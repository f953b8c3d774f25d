"""MCIBI, DeepLabV3 R-50-D8, LIP (human parsing, 20 classes), 473x473, batch 32, 150 epochs.

    python -m memseg_jax.main --config=configs/lip.py --workdir=/ckpt/mcibi_r50_lip \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (SSSegmentation `mcibi_deeplabv3_r50_lip`): 53.73 mIoU on LIP validation single-scale,
54.08 with `:flip` (flip only, logits averaged, left/right channels swapped). About 143k steps
(952 per epoch on 8 devices). LeakyReLU(0.01) in the head, no memory loss; the train crops are
a 520 x r square resize (aspect not kept, r in [0.75, 1.25)), flips that swap the left/right
classes, and rotations; evaluation resizes to 473x473 without keeping the aspect ratio.

On TPUs and GPUs train in bfloat16 (parameters, BatchNorm statistics and the memory stay
float32):

    python -m memseg_jax.main --config=configs/lip.py --workdir=/ckpt/mcibi_r50_lip \
        --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet \
        --config.model.dtype=bfloat16

Device memory of the bfloat16 train step at the batch of 32, compiled for the chips without one
(scripts/aot_check.py; README, Hardware): TPU v4-8 (8 per chip): 7.55 of 30.75 GiB; v5p-8 (8 per
chip): 7.50 of 95.74 GiB; 8xH100 (4 per GPU): 5.97 of 70.78 GiB. It fits the smallest listed slice,
a TPU v4-8
(`python scripts/aot_check.py --configs=lip --targets=v4-8 --steps=train --dtypes=bfloat16`). On v5e
(15.75 GiB per chip) up to 8 images per chip were compiled and fit (7.50 GiB,
`python scripts/aot_check.py --configs=lip --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 32 is 4 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 32).
"""

from memseg_jax.config_validation import load_sibling_config

default = load_sibling_config(__file__, 'default')

FLIP_SWAP_PAIRS = ((14, 15), (16, 17), (18, 19))


def get_config(arg=None):
  """`--config=configs/lip.py:flip` evaluates with horizontal flip."""
  if arg not in (None, 'flip'):
    raise ValueError(f"configs/lip.py: unknown argument {arg!r} (expected 'flip')")
  config = default.get_config()
  config.model.num_classes = 20
  config.model.act = 'leaky_relu'
  config.model.memory.base_lr = 0.01
  config.model.memory.use_loss = False

  d = config.data
  d.name = 'lip'
  d.num_train_images = 30462
  d.crop_size = (473, 473)
  d.train_scale = (520, 520)
  d.keep_ratio = False
  d.ratio_range = (0.75, 1.25)
  d.flip_swap_pairs = FLIP_SWAP_PAIRS
  d.rotate_prob = 0.6
  d.rotate_degree = 30
  d.eval_scale = (473, 473)
  d.eval_keep_ratio = False

  t = config.train
  t.batch_size = 32
  t.num_epochs = 150
  t.lr = 0.01
  t.weight_decay = 5e-4

  config.inference.mode = 'whole'
  if arg == 'flip':
    config.inference.flip = True
    config.inference.use_probs_before_resize = False
  return config
