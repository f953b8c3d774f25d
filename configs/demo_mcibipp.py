"""A small MCIBI++ (UPerNet variant) on the built-in `synthetic_scenes`: minutes on a CPU.

    python -m memseg_jax.main --config=configs/demo_mcibipp.py --workdir=/tmp/memseg_demo_mcibipp

configs/demo.py with the MCIBI++ head instead of MCIBI's: the same data (512 training / 64
validation scenes of 8 classes, generated on first use), ResNet-18-D8 from scratch, batch 8,
320 steps (5 epochs), lr 0.05, and a narrow head: 64 channels, PPM context, the FPN over C2..C4
with 128-channel laterals and 64-channel outputs, logits at 1/4 (24x24 for a 96x96 crop). The
memory is the (8, 2) distribution memory (momentum 0.1, no memory loss); the decoders are those
of the reference's ADE20K UPerNet variant (gathering from decoder_cwi, no segmentor
self-attention, 3x3 decoder_cls). On 2 CPU cores it takes about as long as configs/demo.py and
ends above it: measured 0.869 validation mIoU (demo.py: 0.687), 29 minutes on a shared machine
(load 7-10; demo.py took 39 minutes at load 20). The DeepLabV3 variant
(`set_mcibipp_head(config, 'deeplabv3')` below) reached 0.643 in 32 minutes (load 17-20).

On TPUs and GPUs train in bfloat16: add `--config.model.dtype=bfloat16` to the command above
(parameters, BatchNorm statistics and the memory stay float32). Device memory of the bfloat16 train
step at the batch of 8, compiled for the chips without one (scripts/aot_check.py; README, Hardware):
TPU v4-8 (2 per chip): 0.22 of 30.75 GiB; v5p-8 (2 per chip): 0.19 of 95.74 GiB. It fits the
smallest listed slice, a TPU v4-8
(`python scripts/aot_check.py --configs=demo_mcibipp --targets=v4-8 --steps=train --dtypes=bfloat16`).
On v5e (15.75 GiB per chip) up to 8 images per chip were compiled and fit (0.22 GiB,
`python scripts/aot_check.py --configs=demo_mcibipp --targets=v5e-8 --steps=train --dtypes=bfloat16 --per_device_batch=8`):
the batch of 8 is 1 per chip on a v5e-8, and `--config.train.batch_size=64` keeps the chips busier
(the demo's lr and schedule are for 8). On 8xH100 (1 per GPU): 0.18 of 70.78 GiB, compiled without a
GPU with XLA_FLAGS=--xla_gpu_enable_triton_gemm=false (README, Hardware).
"""

from memseg_jax.config_validation import load_sibling_config

demo = load_sibling_config(__file__, 'demo')
mcibipp = load_sibling_config(__file__, 'mcibipp/_base')


def get_config():
  config = demo.get_config()
  mcibipp.set_mcibipp_head(config, 'upernet', 'ade20k')
  m = config.model
  m.num_classes = 8
  m.memory.transform_channels = 32
  m.memory.out_channels = 64
  m.mcibipp.fpn_feats_channels = m.memory.out_channels + m.head.feats_channels
  m.mcibipp.fpn_out_channels = 64
  return config
