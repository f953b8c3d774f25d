"""UPerNet R-50-D8 (no memory), ADE20K, 512x512, batch 16, 130 epochs: the MCIBI++ baseline.

    python -m memseg_jax.main --config=configs/upernet_ade20k.py \
        --workdir=/ckpt/upernet_r50_ade20k --config.data.data_dir=/data/tfds \
        --config.model.backbone.pretrained=/ckpt/resnet50_v1c_imagenet

Expected (the reference's released model, SSSegmentation `upernet_resnet50os8_ade20k`): 43.02
mIoU single-scale on ADE20K validation (MCIBI++ UPerNet, configs/mcibipp/upernet_ade20k.py:
44.30). PPM [1, 2, 3, 6] on C5, FPN over C2..C4 with 512 channels, decoder 3x3 CBR + Dropout2d
0.1 + classifier at 1/4, FCN auxiliary head on C4 (0.4); whole single-scale inference on
logits. Evaluate the released checkpoint (converted once):

    python -m memseg_jax.convert --config=configs/upernet_ade20k.py \
        --torch_checkpoint=upernet_resnet50os8_ade20k.pth --output=/ckpt/upernet_r50_released
    python -m memseg_jax.main --mode=eval --config=configs/upernet_ade20k.py \
        --workdir=/tmp/eval_upernet_ade20k --config.data.data_dir=/data/tfds \
        --config.eval.checkpoint=/ckpt/upernet_r50_released

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 16, compiled for the chips without one (scripts/aot_check.py; README,
Hardware): TPU v4-8 (4 per chip): 5.37 of 30.75 GiB; v5p-8 (4 per chip): 5.44 of 95.74 GiB. It fits
the smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=upernet_ade20k --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (8.66 GiB,
`python scripts/aot_check.py --configs=upernet_ade20k --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 16 is 2 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the reference's lr and schedule are for 16). On 8xH100 (2 per GPU): 3.76 of 70.78 GiB, compiled
without a GPU with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README, Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

ade20k = load_sibling_config(__file__, 'ade20k')


def get_config():
  config = ade20k.get_config()
  config.model.name = 'upernet'
  config.model.head.type = 'ppm'
  config.model.head.feats_channels = 512
  config.model.head.pool_scales = (1, 2, 3, 6)
  config.model.head.dropout = 0.1
  config.loss.stage2 = 1.0        # loss_cls
  config.loss.aux = 0.4
  i = config.inference
  i.mode = 'whole'
  i.scales = (1.0,)
  i.flip = False
  i.use_probs_before_resize = False
  return config
