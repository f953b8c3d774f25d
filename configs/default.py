"""Defaults shared by every memseg_jax config (MCIBI, DeepLabV3 R-50-D8, ADE20K recipe).

    python -m memseg_jax.main --config=configs/ade20k.py --workdir=/tmp/mcibi_ade20k

This file is not meant to be run on its own: dataset configs import `get_config()` from here
and override a few fields. Every field is documented where it is set; values follow the
reference (SSSegmentation 1.7.0, `mcibi_deeplabv3_resnet50os8_ade20k`).
"""

import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- model
  config.model = m = ml_collections.ConfigDict()
  m.name = 'mcibi'                # 'mcibi' (memory on) or 'deeplabv3' (the same net, memory off);
                                  # 'mcibipp' (MCIBI++) or 'upernet' (configs/mcibipp/)
  m.num_classes = 150
  m.dtype = 'float32'             # compute dtype; parameters, BN statistics, memory stay float32
  m.act = 'relu'                  # head/aux activation: 'relu' or 'leaky_relu' (LIP: slope 0.01)
  m.bn_eps = 1e-5
  m.bn_momentum = 0.1             # PyTorch convention: running = 0.9 * running + 0.1 * batch
  m.conv_impl = 'auto'            # 'auto' (by the devices compiled for), 'native' or 'taps' (CPU)
  m.remat = False                 # rematerialise backbone blocks in the backward pass (ViT)

  m.backbone = ml_collections.ConfigDict()
  m.backbone.type = 'resnet'      # memseg_jax.models.backbones.REGISTRY
  m.backbone.selected_indices = (0, 1, 2, 3)   # outputs read: head the last, aux the one before
  m.backbone.depth = 50           # 18, 50 or 101 (ResNet-v1c: deep stem)
  m.backbone.output_stride = 8    # 8, 16 or 32
  m.backbone.contract_dilation = True
  m.backbone.pretrained = ''      # converted ImageNet checkpoint (orbax dir) or open-mmlab .pth

  m.head = ml_collections.ConfigDict()
  m.head.type = 'aspp'            # context within image: 'aspp' or 'ppm'
  m.head.feats_channels = 512
  m.head.dilations = (1, 12, 24, 36)   # ASPP
  m.head.pool_scales = (1, 2, 3, 6)    # PPM
  m.head.dropout = 0.1            # Dropout2d before the classifier of each decoder
  # MCIBI: stride of a 3x3 CBR on the backbone outputs before the head (the reference's
  # `downsample_backbone`; HRNet Cityscapes/LIP: 2, i.e. the head at 1/8); 1: no such layer.
  m.head.downsample_backbone_stride = 1
  m.head.norm_layers = False      # LayerNorm over channels on each selected output (ViT-L)
  m.head.norm_eps = 1e-6

  m.memory = ml_collections.ConfigDict()
  m.memory.num_feats_per_cls = 1
  m.memory.transform_channels = 256
  m.memory.out_channels = 512
  m.memory.use_hard_aggregate = False
  m.memory.use_context_within_image = True
  m.memory.update_strategy = 'cosine_similarity'   # or 'mean'
  m.memory.base_momentum = 0.9
  m.memory.base_lr = 0.01
  m.memory.adjust_by_learning_rate = True
  m.memory.use_loss = True        # representation-consistency loss (from epoch 2 on)
  # The memory update from the 1/8-resolution features (models/memory.py: update_memory_fused),
  # equal to upsampling F to the label size first (False, the reference's literal form, kept for
  # the parity tests) up to float32 rounding, at a fraction of the memory and time.
  m.memory.fused_update = True

  # MCIBI++ (model.name='mcibipp', configs/mcibipp/): options of its segmentor. It also reads
  # model.memory (transform/out channels, hard aggregation, the context on/off, momentum,
  # fused update) and model.head (context type, channels, dropout).
  m.mcibipp = ml_collections.ConfigDict()
  m.mcibipp.use_self_attention = True    # SA(query=context, key/value=memory output)
  m.mcibipp.force_use_preds_pr = False   # gather with decoder_pr's logits despite a context
  m.mcibipp.downsample_before_sa = False # stride-2 3x3 CBR before the memory's SA (HRNet)
  m.mcibipp.decoder_pr_kernel = 1        # conv1 of decoder_pr / _cwi / _cls: 1 or 3 (pad 1)
  m.mcibipp.decoder_cwi_kernel = 1
  m.mcibipp.decoder_cls_kernel = 1
  m.mcibipp.fpn = False                  # UPerNet variant: FPN over C2..C4, logits at 1/4
  m.mcibipp.fpn_feats_channels = 1024    # laterals = memory out_channels + context channels
  m.mcibipp.fpn_out_channels = 512

  m.auxiliary = ml_collections.ConfigDict()
  m.auxiliary.enabled = True
  m.auxiliary.channels = 512
  m.auxiliary.dropout = 0.1
  m.auxiliary.num_convs = 1       # 3x3 conv + BN + act blocks per head
  m.auxiliary.upsample = 0        # nearest x factor after each block (0: none; ViT-L: 4)
  m.auxiliary.num_heads = 1       # heads on the outputs before the head's (ViT-L: 3, aux1..3)

  # ---------------------------------------------------------------- losses
  config.loss = ml_collections.ConfigDict()
  config.loss.stage2 = 1.0
  config.loss.stage1 = 0.4
  config.loss.aux = 0.4
  config.loss.memory = 1.0
  config.loss.cwi = 1.0           # MCIBI++: decoder_cwi (its loss_cls/loss_pr weigh stage2/stage1)

  # ---------------------------------------------------------------- data
  config.data = d = ml_collections.ConfigDict()
  d.name = 'ade20k'               # a builder in memseg_jax.datasets
  d.data_dir = ''                 # tfds data dir ('' -> $MEMSEG_DATA_DIR or ~/tensorflow_datasets)
  d.manual_dir = ''               # folder with the official download, used by --prepare
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.ignore_index = 255
  d.num_train_images = 20210      # used when the dataset is not prepared yet (step counts only)
  d.crop_size = (512, 512)        # (height, width)
  d.train_scale = (2048, 512)     # (long, short) target before the random ratio
  d.ratio_range = (0.5, 2.0)
  d.keep_ratio = True
  d.cat_max_ratio = 0.75
  d.flip_prob = 0.5
  d.flip_swap_pairs = ()          # LIP: ((14, 15), (16, 17), (18, 19))
  d.photometric = True
  d.rotate_prob = 0.0             # LIP: 0.6
  d.rotate_degree = 30
  d.mean = (123.675, 116.28, 103.53)   # RGB
  d.std = (58.395, 57.12, 57.375)
  d.eval_scale = (2048, 512)      # test-time resize (keep_ratio as d.eval_keep_ratio)
  d.eval_keep_ratio = True
  d.eval_pad_multiple = 64        # eval batches are padded to sizes rounded up to this (few shapes)
  d.shuffle_buffer = 1000
  d.num_parallel_calls = -1       # -1 -> tf.data.AUTOTUNE
  d.prefetch = 2

  # ---------------------------------------------------------------- train
  config.train = t = ml_collections.ConfigDict()
  t.batch_size = 16               # global, split over all devices of all hosts
  t.num_epochs = 130
  t.num_train_steps = -1          # -1 -> num_epochs * iterations per epoch
  t.lr = 0.01
  t.lr_min = -1.0                 # -1 -> 0.01 * lr
  t.lr_power = 0.9
  t.momentum = 0.9
  t.weight_decay = 5e-4
  # Parameter groups (the reference's `params_rules`): rules (pattern, lr_multiplier,
  # wd_multiplier); a parameter whose reference name (memseg_jax.convert.torch_key, e.g.
  # 'backbone_net.layers.0.ln1.weight') contains the pattern (longest pattern first) gets
  # lr * lr_multiplier and weight_decay * wd_multiplier. Empty: one group.
  t.params_rules = ()
  t.log_every_steps = 50
  t.checkpoint_every_steps = 2000
  t.keep_checkpoints = 3
  t.eval_every_steps = 0          # 0 -> evaluate only at the end
  t.final_eval = True

  # ---------------------------------------------------------------- eval / inference
  config.eval = e = ml_collections.ConfigDict()
  e.batch_size = 1                # global; padded so every image counts exactly once
  e.checkpoint = ''               # '' -> latest checkpoint in the workdir
  e.num_summary_images = 4
  e.max_images = -1               # -1 -> the whole split

  config.inference = i = ml_collections.ConfigDict()
  i.mode = 'whole'                # 'whole' or 'slide'
  i.padded_whole = True           # whole mode at the eval buckets' fixed shapes, padding masked
  i.crop_size = (512, 512)        # slide window (height, width)
  i.stride = (341, 341)
  i.windows_per_call = 4
  i.scales = (1.0,)
  i.flip = False
  # Softmax before upsampling/averaging the views, or the logits (the reference's base config:
  # off; its multi-scale, flip-averaged and slide blocks turn it on).
  i.use_probs_before_resize = False

  return config
