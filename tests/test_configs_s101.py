"""The S-101-D8 (ResNeSt-101) configs hold the reference's values (spec wave2 §4 and §6,
mcibi_spec.md §7, mcibi_results.md).

The tables below are the spec's numbers written out as data; each test reads the loaded
config (and the model it builds) and compares. One train step of each config runs in
tests/test_configs.py.
"""

import os

import pytest

from memseg_jax import convert, models, schedules
from memseg_jax.config_validation import load_config, validate

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')

# wave2_spec.md §4, first table (rows resnest101os8_*): classes, global batch, epochs, lr,
# weight decay, lr_min, head input channels, memory loss, memory base_lr, initial memory
# momentum m0 = 0.9 * lr / base_lr; plus the head activation (the S-101 LIP config keeps the
# base ReLU, unlike LIP) and the crop (§4 notes). Every row: auxiliary FCN on C4.
TABLE = {
    'ade20k': dict(K=150, bs=16, epochs=180, lr=0.004, wd=5e-4, lr_min=4e-5, use_loss=True,
                   base_lr=0.004, m0=0.9, act='relu', crop=(512, 512)),
    'cityscapes': dict(K=19, bs=16, epochs=500, lr=0.01, wd=5e-4, lr_min=1e-4, use_loss=False,
                       base_lr=0.009, m0=1.0, act='relu', crop=(512, 1024)),
    'lip': dict(K=20, bs=40, epochs=150, lr=0.007, wd=5e-4, lr_min=7e-5, use_loss=False,
                base_lr=0.007, m0=0.9, act='relu', crop=(473, 473)),
    'cocostuff10k': dict(K=182, bs=32, epochs=150, lr=0.001, wd=5e-4, lr_min=1e-4,
                         use_loss=False, base_lr=0.0009, m0=1.0, act='relu', crop=(512, 512)),
}

# §4, second table (S-101 column) and mcibi_spec.md §7: (mode, crop, stride, scales, flip,
# probs) of the single-scale run and of the ms(+flip) block (`:ms_flip`, LIP `:flip`,
# Cityscapes: active).
SIX = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
EVAL = {
    'ade20k': {None: ('whole', None, None, (1.0,), False, False),
               'ms_flip': ('whole', None, None, SIX, True, True)},
    'cityscapes': {None: ('slide', (1024, 512), (341, 341), SIX, True, True)},
    'lip': {None: ('whole', None, None, (1.0,), False, False),
            'flip': ('whole', None, None, (1.0,), True, False)},
    'cocostuff10k': {None: ('whole', None, None, (1.0,), False, False),
                     'ms_flip': ('whole', None, None, (0.5, 0.75, 1.0, 1.25, 1.5), True, True)},
}

# mcibi_results.md §1: single-scale / ms+flip (LIP: flip; Cityscapes: ms+flip test server only).
REPORTED = {'ade20k': ('46.63', '47.39'), 'cityscapes': (None, '81.51'),
            'lip': ('56.21', '56.34'), 'cocostuff10k': ('41.18', '42.38')}

# §6: the data split and dataset details each config inherits from its dataset's R-50 config.
DATA = {
    'ade20k': dict(name='ade20k', train_split='train', eval_split='validation'),
    'cityscapes': dict(name='cityscapes', train_split='trainval', eval_split='validation'),
    'lip': dict(name='lip', train_split='train', eval_split='validation',
                flip_swap_pairs=((14, 15), (16, 17), (18, 19)), rotate_prob=0.6,
                eval_scale=(473, 473), eval_keep_ratio=False, keep_ratio=False),
    'cocostuff10k': dict(name='cocostuff10k', train_split='train', eval_split='test'),
}


def _config(dataset, arg=None):
  path = os.path.join(CONFIGS, f'{dataset}_s101.py')
  return load_config(path + (f':{arg}' if arg else ''))


@pytest.mark.parametrize('dataset', sorted(TABLE))
def test_training_values_equal_the_spec_table(dataset):
  row, config = TABLE[dataset], _config(dataset)
  validate(config, 8)
  m, t = config.model, config.train
  assert m.name == 'mcibi'
  # §1: {'type': 'ResNeSt', 'depth': 101, 'outstride': 8, 'selected_indices': (0, 1, 2, 3)}.
  assert dict(m.backbone) == {'type': 'resnest', 'depth': 101, 'output_stride': 8,
                              'contract_dilation': True, 'selected_indices': (0, 1, 2, 3),
                              'pretrained': ''}
  assert m.num_classes == row['K']
  assert t.batch_size == row['bs'] and t.num_epochs == row['epochs']
  assert t.lr == row['lr'] and t.weight_decay == row['wd'] and t.momentum == 0.9
  assert schedules.lr_min(config) == pytest.approx(row['lr_min'], rel=1e-12)
  assert m.memory.use_loss == row['use_loss'] and m.memory.base_lr == row['base_lr']
  assert m.memory.base_momentum * t.lr / m.memory.base_lr == pytest.approx(row['m0'], rel=1e-6)
  assert m.act == row['act']
  assert tuple(config.data.crop_size) == row['crop']
  # Unchanged head settings of every MCIBI config.
  assert tuple(m.head.dilations) == (1, 12, 24, 36) and m.head.feats_channels == 512
  assert m.memory.update_strategy == 'cosine_similarity' and m.memory.base_momentum == 0.9
  assert (config.loss.aux, config.loss.stage1, config.loss.stage2, config.loss.memory) == (
      0.4, 0.4, 1.0, 1.0)
  assert m.auxiliary.enabled and m.head.get('downsample_backbone_stride', 1) == 1
  # The head reads C5 (2048 channels) and the auxiliary head C4 (1024), both at 1/8: read from
  # the model the config builds (the split-attention conv of S-101 included).
  shapes = convert.variable_shapes(config)
  aspp = shapes[('params', 'context_within_image_module', 'parallel_branches_0', 'conv',
                 'kernel')]
  assert aspp[2] == 2048
  assert shapes[('params', 'auxiliary_decoder', 'conv', 'kernel')][2] == 1024
  assert shapes[('params', 'backbone_net', 'layer2_0', 'conv2', 'conv', 'kernel')] == (
      3, 3, 64, 256)
  assert sum(k[2].startswith('layer3_') and k[3:] == ('conv1', 'kernel') for k in shapes) == 23
  assert models.logits_stride(config) == 8


@pytest.mark.parametrize('dataset,arg', [(d, a) for d in sorted(EVAL) for a in EVAL[d]])
def test_evaluation_settings_equal_the_spec_table(dataset, arg):
  mode, crop, stride, scales, flip, probs = EVAL[dataset][arg]
  i = _config(dataset, arg).inference
  assert i.mode == mode
  if mode == 'slide':
    assert tuple(i.crop_size) == crop and tuple(i.stride) == stride
  assert tuple(i.scales) == scales and i.flip == flip
  assert i.use_probs_before_resize == probs


def test_unknown_config_argument_is_named():
  with pytest.raises(ValueError, match=r"configs/ade20k_s101\.py: unknown argument 'msflip'"):
    _config('ade20k', 'msflip')


@pytest.mark.parametrize('dataset', sorted(DATA))
def test_dataset_details(dataset):
  d = _config(dataset).data
  for key, value in DATA[dataset].items():
    got = d[key]
    assert (tuple(map(tuple, got)) if key == 'flip_swap_pairs' else
            tuple(got) if isinstance(value, tuple) else got) == value, key


@pytest.mark.parametrize('dataset', sorted(REPORTED))
def test_docstring_names_the_released_model_its_numbers_and_commands(dataset):
  with open(os.path.join(CONFIGS, f'{dataset}_s101.py')) as f:
    doc = f.read().split('"""')[1]
  assert f'python -m memseg_jax.main --config=configs/{dataset}_s101.py' in doc
  assert f'mcibi_deeplabv3_s101_{dataset}.pth' in doc
  for number in REPORTED[dataset]:
    if number:
      assert number in doc
  assert 'python -m memseg_jax.convert --torch_checkpoint=' in doc
  assert 'python -m memseg_jax.main --mode=eval' in doc
  assert '--imagenet' in doc and 'resnest101_d2-f3b931b2.pth' in doc
  assert '--config.model.dtype=bfloat16' in doc
  assert f'python scripts/aot_check.py --configs={dataset}_s101' in doc
