"""Every config in configs/ builds its model and runs one train step on 2 devices at a tiny size.

Each config keeps its model structure (backbone depth, head, activation, classes, memory and
loss settings) except where noted: crops shrink to 64x64 (Cityscapes 64x128), the global
batch to 8, and, to keep the test within minutes on a CPU, every backbone deeper than 50
layers (ade20k_r101) runs as R-50, the non-ADE20K configs (same R-50 structure as ADE20K) as
R-18 (MCIBI++ in configs/mcibipp/ likewise), the S-101 configs as S-50, the HRNet-W48 configs
as HRNetV2-W18-small, and the ViT-L configs as a ViT of the same layout with 4 blocks of 64
channels (every block an output; the 32x32 position embedding is resized to the 4x4 token
grid). The step's lr and memory momentum are checked against the config's schedule values.
"""

import importlib.util
import os
import re

import jax
import numpy as np
import pytest

from memseg_jax import schedules, train
from memseg_jax.config_validation import load_config, validate
from memseg_jax.models import build_model

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
# Every config file, subfolders included (paths relative to configs/); files whose name starts
# with '_' are helpers that configs import (configs/mcibipp/_base.py), not configs.
CONFIG_FILES = sorted(os.path.relpath(os.path.join(root, n), CONFIGS)
                      for root, _, names in os.walk(CONFIGS) for n in names
                      if n.endswith('.py') and not n.startswith('_'))
SMALLER_BACKBONE = {'ade20k_r101.py': 50, 'cityscapes.py': 18, 'lip.py': 18,
                    'cocostuff10k.py': 18, 'default.py': 18}
# The S-101 configs run as S-50 (ResNeSt's other depth: same stem, blocks and head wiring).
SMALLER_BACKBONE.update({f'{d}_s101.py': 50 for d in ('ade20k', 'cityscapes', 'lip',
                                                      'cocostuff10k')})
# HRNet configs run the narrowest reference arch (same stages, branches and head wiring).
SMALLER_HRNET_ARCH = 'hrnetv2_w18_small'
SMALLER_VIT = dict(embed_dims=64, num_layers=4, num_heads=4, out_indices=(0, 1, 2, 3))
# MCIBI++: the ADE20K variants and the UPerNet baseline keep their R-50, the other datasets'
# (the same heads) run on R-18.
SMALLER_BACKBONE.update({f'mcibipp/{d}_{s}.py': 18
                         for d in ('fcn', 'pspnet', 'deeplabv3', 'upernet')
                         for s in ('cityscapes', 'lip', 'cocostuff10k')})


def test_all_expected_configs_exist():
  mcibipp = [f'mcibipp/{d}_{s}.py' for d in ('fcn', 'pspnet', 'deeplabv3', 'upernet')
             for s in ('ade20k', 'cityscapes', 'lip', 'cocostuff10k')]
  for name in ('default.py', 'ade20k.py', 'ade20k_r101.py', 'cityscapes.py', 'lip.py',
               'cocostuff10k.py', 'demo.py', 'ade20k_vitl.py', 'cocostuff10k_vitl.py',
               'upernet_ade20k.py', 'demo_mcibipp.py', *mcibipp,
               *(f'{d}_s101.py' for d in ('ade20k', 'cityscapes', 'lip', 'cocostuff10k'))):
    assert name in CONFIG_FILES
    with open(os.path.join(CONFIGS, name)) as f:
      doc = f.read().split('"""')[1]
    assert 'python -m memseg_jax.main --config=configs/' in doc, name


def test_every_config_loads_from_its_folder_and_validates():
  """Configs in subfolders load their base with load_sibling_config(__file__, '../name')."""
  assert any('/' in name for name in CONFIG_FILES)
  for name in CONFIG_FILES:
    config = load_config(os.path.join(CONFIGS, name))
    validate(config, 8)
    if name.startswith('mcibipp/'):
      decoder, dataset = name[len('mcibipp/'):-3].split('_')
      assert config.model.name == 'mcibipp'
      assert config.data.name == dataset
      assert config.model.mcibipp.fpn == (decoder == 'upernet')
      assert config.model.memory.use_context_within_image == (decoder != 'fcn')



def _aot_targets():
  """scripts/aot_check.py's TARGETS: the devices and memory of each target it compiles for."""
  spec = importlib.util.spec_from_file_location(
      'aot_check', os.path.join(os.path.dirname(CONFIGS), 'scripts', 'aot_check.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.TARGETS


def test_every_docstring_states_the_measured_device_memory_of_its_documented_batch():
  """The figures in each docstring are rows of README's Hardware table, at the config's batch.

  Each config's docstring gives the device memory of its bfloat16 train step (with the memory
  loss where the config has it) at its documented global batch on every target compiled (every
  fitting README row of that step and batch), the v4-8 (the smallest listed slice) first.
  Checked against the config itself (batch, memory loss) and the aot_check table in the README,
  so that neither drifts from the other.
  """
  readme = os.path.join(os.path.dirname(CONFIGS), 'README.md')
  with open(readme) as f:
    table = [line for line in f if line.startswith('| ') and '| bfloat16 |' in line]
  table_cells = [line.split(' | ') for line in table]
  item = re.compile(r'(?:TPU )?(v4-8|v5p-8|v5e-8|8xH100) \((\d+) per (?:chip|GPU)\): '
                    r'(\d+\.\d\d) of (\d+\.\d\d) GiB')
  targets = _aot_targets()
  checked = 0
  for name in CONFIG_FILES:
    if name == 'default.py':
      continue
    config = load_config(os.path.join(CONFIGS, name))
    with open(os.path.join(CONFIGS, name)) as f:
      doc = ' '.join(f.read().split('"""')[1].split())
    m = re.search(r'Device memory of the bfloat16 train step( with the memory loss)? at the batch '
                  r'of (\d+), compiled for the chips without one \(scripts/aot_check\.py; README, '
                  r'Hardware\): (.*?)\. It fits the smallest listed slice, a TPU v4-8', doc)
    assert m, f'{name}: no device memory statement'
    memory_loss = config.model.name == 'mcibi' and config.model.memory.use_loss
    assert bool(m.group(1)) == memory_loss, name
    batch = int(m.group(2))
    assert batch == config.train.batch_size, name
    step = 'train_mem' if memory_loss else 'train'
    items = m.group(3).split('; ')
    assert item.fullmatch(items[0]) and items[0].startswith('TPU v4-8'), (name, items[0])
    # Every target the README has a fitting row for at this step and batch is in the list.
    compiled = {cells[0][2:] for cells in table_cells
                if cells[1:3] == [name[:-3], step] and cells[4].endswith(f'({batch})')
                and cells[6][:1].isdigit()}
    listed = {item.fullmatch(text).group(1) for text in items}
    assert compiled <= listed, f'{name}: README rows for {sorted(compiled - listed)} not listed'
    for text in items:
      target, per_device, peak, capacity = item.fullmatch(text).groups()
      chips, cap = targets[target].chips, f'{targets[target].capacity_gib:.2f}'
      assert int(per_device) * chips == batch and capacity == cap, (name, text)
      assert float(peak) < float(capacity), (name, text)
      row = (f'| {target} | {name[:-3]} | {step} | bfloat16 | {per_device} ({batch}) | ')
      rows = [line for line in table if line.startswith(row)]
      assert len(rows) == 1, f'{name}: no README row {row}'
      assert f'| {peak} ({cap}) |' in rows[0], (name, text, rows[0])
      checked += 1
  assert checked >= len(CONFIG_FILES) - 1


def test_every_command_in_a_docstring_is_on_one_line_and_names_its_config():
  """A command quoted inline (`python ...`) copies as it is: no line break inside the quotes.

  The aot_check commands compile the config whose docstring quotes them.
  """
  commands = 0
  for name in CONFIG_FILES:
    with open(os.path.join(CONFIGS, name)) as f:
      doc = f.read().split('"""')[1]
    for quoted in re.findall(r'`([^`]*)`', doc):
      if not quoted.startswith('python'):
        continue
      assert '\n' not in quoted, f'{name}: a command breaks across lines: {quoted!r}'
      commands += 1
      if 'scripts/aot_check.py' in quoted:
        assert f' --configs={name[:-3]} ' in quoted, (name, quoted)
  assert commands >= len(CONFIG_FILES)

def _repeats_a_structure(name: str) -> bool:
  """Whether the config's model is another config's with only dataset values changed.

  The other datasets' variants of the S-101, ViT-L and MCIBI++ configs build the same modules as
  their ADE20K config (class count, crop, schedule and memory values differ; every value is
  checked against the reference's table by the config tests). The HRNet Cityscapes config stays
  in: its `downsample_backbone` is a structure of its own. The R-101 config is configs/ade20k.py
  with a deeper backbone, and this test runs it at depth 50 (SMALLER_BACKBONE): the same model.
  """
  if name == 'ade20k_r101.py':
    return SMALLER_BACKBONE[name] == 50
  base = os.path.basename(name)
  if base.startswith('ade20k') or base.endswith('_ade20k.py') or name == 'cityscapes_hrnetv2w48.py':
    return False
  return name.startswith('mcibipp/') or base.endswith(('_s101.py', '_vitl.py',
                                                        '_hrnetv2w48.py'))


# The step runs on 2 of the session's 8 virtual devices. It is the sharded step all the same (the
# state replicated, the batch split over 'data', the memory and BatchNorm statistics reduced
# across it), but each device holds a copy of the replicated state (parameters and momentum:
# 0.73 GB for the R-50 configs): the ADE20K step's test process peaked at 10.7 GiB on 8 devices,
# 4.1 GiB on 2 (`/usr/bin/time`), so these tests can run beside others. That the step does not
# depend on the device count is tests/test_train.py's (8 devices against one).
STEP_DEVICES = 2

# CI runs `-m "slow and not exhaustive"` (its time limit); `-m exhaustive` runs the rest.
STEP_CASES = [pytest.param(n, marks=pytest.mark.exhaustive) if _repeats_a_structure(n) else n
              for n in CONFIG_FILES]


@pytest.mark.slow
@pytest.mark.parametrize('name', STEP_CASES)
def test_one_train_step_of_every_config(name):
  config = load_config(os.path.join(CONFIGS, name))
  validate(config, jax.device_count())
  lr0 = config.train.lr
  h, w = config.data.crop_size
  config.data.crop_size = (64, 64 * w // h)
  config.train.batch_size = 8
  if name in SMALLER_BACKBONE:
    config.model.backbone.depth = SMALLER_BACKBONE[name]
  if config.model.backbone.type == 'hrnet':
    config.model.backbone.arch = SMALLER_HRNET_ARCH
  if config.model.backbone.type == 'vit':
    config.model.backbone.update(SMALLER_VIT)
  validate(config, STEP_DEVICES)

  mesh = train.create_mesh(jax.devices()[:STEP_DEVICES])
  total = 10
  schedule = schedules.create_lr_schedule(config, total)
  tx = train.create_optimizer(config, schedule)
  state = train.create_train_state(config, jax.random.PRNGKey(0), tx)
  # A memory as after some training: with the all-zero initial memory the attention's key,
  # value and output branches see constant inputs and their BN biases get no gradient
  # (ReLU'(0) = 0, as in the reference), which would hide a parameter cut off from the loss.
  state = state.replace(memory=jax.tree_util.tree_map(
      lambda m: jax.random.normal(jax.random.PRNGKey(1), m.shape, m.dtype), state.memory))
  state = train.replicate(state, mesh)
  params0 = jax.device_get(state.params)
  # The epoch-2 variant (memory loss) where the config enables it.
  memory_loss = schedules.use_memory_loss(config, step=1, iterations_per_epoch=1)
  step = train.make_train_step(config, build_model(config, axis_name='data'), tx, schedule,
                               mesh, memory_loss=memory_loss)
  rng = np.random.default_rng(0)
  k = config.model.num_classes
  batch = {'image': rng.normal(size=(8, *config.data.crop_size, 3)).astype(np.float32),
           'label': rng.integers(0, k, size=(8, *config.data.crop_size)).astype(np.int32)}
  state, metrics = step(state, train.shard_batch(batch, mesh))
  metrics = jax.device_get(metrics)

  assert int(state.step) == 1
  assert float(metrics['lr']) == pytest.approx(lr0, rel=1e-6)
  if config.model.name == 'mcibi':
    mem = config.model.memory
    assert float(metrics['memory_momentum']) == pytest.approx(
        mem.base_momentum * lr0 / mem.base_lr, rel=1e-5)
    assert ('loss_memory' in metrics) == bool(mem.use_loss)
  if config.model.name == 'mcibipp':     # the reference's fixed momentum, no memory loss
    assert float(metrics['memory_momentum']) == pytest.approx(0.1)
    assert 'loss_memory' not in metrics
    assert ('loss_cwi' in metrics) == bool(config.model.memory.use_context_within_image)
  # Random labels: every CE term starts near ln(K) (a loose, independent bound).
  for term in ('loss_stage2', 'loss_stage1', 'loss_aux', 'loss_cls', 'loss_aux1', 'loss_aux2',
               'loss_aux3', 'loss_pr', 'loss_cwi'):
    if term in metrics:
      assert 0.3 * np.log(k) < float(metrics[term]) < 3 * np.log(k), (term, metrics[term])
  moved = [np.abs(np.asarray(a) - b).max()
           for a, b in zip(jax.tree_util.tree_leaves(jax.device_get(state.params)),
                           jax.tree_util.tree_leaves(params0))]
  assert min(moved) > 0


@pytest.mark.parametrize('name,arg,scales,flip,probs', [
    # mcibi_spec section 7: single scale upsamples the logits straight to the image (no
    # softmax); the multi-scale + flip blocks average softmax probabilities; LIP's flip averages
    # logits.
    ('ade20k.py', None, (1.0,), False, False),
    ('ade20k_r101.py', None, (1.0,), False, False),
    ('cocostuff10k.py', None, (1.0,), False, False),
    ('lip.py', None, (1.0,), False, False),
    ('ade20k.py', 'ms_flip', (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True, True),
    ('cocostuff10k.py', 'ms_flip', (0.5, 0.75, 1.0, 1.25, 1.5), True, True),
    ('lip.py', 'flip', (1.0,), True, False),
])
def test_resnet_configs_evaluate_as_the_reference_blocks(name, arg, scales, flip, probs):
  path = os.path.join(CONFIGS, name) + ('' if arg is None else f':{arg}')
  i = load_config(path).inference
  assert i.mode == 'whole'
  assert tuple(i.scales) == scales and i.flip == flip
  assert i.use_probs_before_resize == probs


@pytest.mark.parametrize('name,arg', [('ade20k.py', 'flip'), ('cocostuff10k.py', 'msflip'),
                                      ('lip.py', 'ms_flip')])
def test_unknown_config_argument_is_an_error_naming_it(name, arg):
  with pytest.raises(ValueError, match=f"configs/{name}: unknown argument '{arg}'"):
    load_config(os.path.join(CONFIGS, name) + f':{arg}')
