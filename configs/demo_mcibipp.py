"""A small MCIBI++ (DeepLabV3 variant) on the built-in `synthetic_scenes`: minutes on a CPU.

    python -m memseg_jax.main --config=configs/demo_mcibipp.py --workdir=/tmp/memseg_demo_mcibipp

configs/demo.py with the MCIBI++ head instead of MCIBI's: the same data (512 training / 64
validation scenes of 8 classes, generated on first use), ResNet-18-D8 from scratch, narrow
head (64 channels, ASPP dilations 1/2/4/6 for the 12x12 maps of 96x96 crops), batch 8, 320
steps (5 epochs), lr 0.05. The memory is the (8, 2) distribution memory (momentum 0.1, no
memory loss); the decoders are the reference's ADE20K DeepLabV3 variant (gathering from
decoder_cwi, no segmentor self-attention, 3x3 decoder_cls). On 2 idle CPU cores it takes about
as long as configs/demo.py (5-10 minutes) and ends with a validation mIoU comparable to it
(measured: see the README's MCIBI++ section).
"""

from memseg_jax.config_validation import load_sibling_config

demo = load_sibling_config(__file__, 'demo')
mcibipp = load_sibling_config(__file__, 'mcibipp/_base')


def get_config():
  config = demo.get_config()
  mcibipp.set_mcibipp_head(config, 'deeplabv3', 'ade20k')
  m = config.model
  m.num_classes = 8
  m.memory.transform_channels = 32
  m.memory.out_channels = 64
  m.mcibipp.fpn_feats_channels = m.memory.out_channels + m.head.feats_channels
  return config
