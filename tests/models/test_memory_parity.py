"""The memory update and forward against the reference `FeaturesMemory` of SSSegmentation 1.7.0.

Layouts are converted at this boundary only (ours NHWC, the reference NCHW). The reference
marks ignored pixels with -100, this project with 255: the same positions carry each project's
own ignore label.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memseg_jax.models import memory as mem_lib
from tests import reference_utils

torch = pytest.importorskip('torch')
pytestmark = pytest.mark.parity

IGNORE, REF_IGNORE = 255, -100
MOMENTUM_CFG = {'base_momentum': 0.9, 'base_lr': 0.01, 'adjust_by_learning_rate': True}
LR = 0.00635          # -> m = 0.5715


def _reference_memory_class():
  pytest.importorskip('ssseg')
  reference_utils.import_ssseg_builder()      # registers the torchvision stand-in first
  from ssseg.modules.models.segmentors.mcibi.memory import FeaturesMemory
  return FeaturesMemory


def _reference(k, c, n=1, transform=4, out=None, use_context=True, use_hard=False):
  cls = _reference_memory_class()
  return cls(num_classes=k, feats_channels=c, transform_channels=transform,
             out_channels=out or c, use_context_within_image=use_context, num_feats_per_cls=n,
             use_hard_aggregate=use_hard, norm_cfg={'type': 'BatchNorm2d'},
             act_cfg={'type': 'ReLU', 'inplace': True})


def _nchw(x):
  return torch.from_numpy(np.ascontiguousarray(reference_utils.nhwc_to_nchw(x)))


def _ref_update(memory, feats, labels, strategy):
  k, n, c = memory.shape
  ref = _reference(k, c, n)
  with torch.no_grad():
    ref.memory.data.copy_(torch.from_numpy(memory))
    ref_labels = np.where(labels == IGNORE, REF_IGNORE, labels)
    ref.update(_nchw(feats), torch.from_numpy(ref_labels).long(), ignore_index=REF_IGNORE,
               strategy=strategy, momentum_cfg=MOMENTUM_CFG, learning_rate=LR)
  return ref.memory.data.numpy()


def _ours_update(memory, feats, labels, strategy):
  m = mem_lib.momentum_at(LR, **MOMENTUM_CFG)
  return np.asarray(mem_lib.update_memory(memory, feats, labels, momentum=m,
                                          ignore_index=IGNORE, strategy=strategy))


def _case(name):
  r = np.random.RandomState(sum(map(ord, name)))
  k, c, n = 6, 16, 1
  if name == 'two_slots':
    n = 2
  memory = r.randn(k, n, c).astype(np.float32)
  feats = np.maximum(r.randn(2, 12, 10, c), 0).astype(np.float32)
  labels = r.randint(0, k, size=(2, 12, 10)).astype(np.int64)
  if name == 'init':
    memory[[0, 3]] = 0
  if name == 'cosine':
    feats[0, 0, :3] = 0                     # dead pixels: the eps clamp gives s = 0
    feats[0, 1, :3] *= 1e-10                # norms below 1e-8: clamped, s shrinks towards 0
  if name == 'absent':
    labels[labels == 1] = 4
  if name in ('ignore', 'two_slots'):
    labels[r.rand(2, 12, 10) < 0.3] = IGNORE
  if name == 'two_slots':
    memory[5, 1] = 0                        # lazy init of slot 1 only
    memory[2, 0] = np.abs(memory[2, 0])
    memory[2, 1] = -np.abs(memory[2, 1])    # no post-ReLU pixel prefers it: the empty slot
  return memory, feats, labels


@pytest.mark.parametrize('name,strategy', [('init', 'cosine_similarity'),
                                           ('cosine', 'cosine_similarity'),
                                           ('mean', 'mean'),
                                           ('absent', 'cosine_similarity'),
                                           ('ignore', 'cosine_similarity'),
                                           ('two_slots', 'cosine_similarity')])
def test_update_matches_reference(name, strategy):
  memory, feats, labels = _case(name)
  ref = _ref_update(memory, feats, labels, strategy)
  ours = _ours_update(memory, feats, labels.astype(np.int32), strategy)
  print(f'update {name} ({strategy}): max abs diff {np.abs(ours - ref).max():.3g}')
  assert np.abs(ours - ref).max() <= 1e-5
  if name == 'absent':
    np.testing.assert_array_equal(ours[1], memory[1])
    np.testing.assert_array_equal(ref[1], memory[1])


# ------------------------------------------------------------------------------------ forward
def _torch_key(path):
  """Flax variable path -> reference state_dict key of `FeaturesMemory`."""
  collection, *modules, leaf = path
  if collection == 'memory':
    return 'memory'
  parts = []
  for name in modules:
    if name.startswith('self_attentions_'):
      parts += ['self_attentions', name.rsplit('_', 1)[1]]
    elif name[-2:] in ('_0', '_1') and name[:-2].endswith('project'):
      parts += [name[:-2], name[-1]]        # two-conv projections: Sequential of Sequentials
    else:
      parts.append({'conv': '0', 'bn': '1'}.get(name, name))
  parts.append({('params', 'kernel'): 'weight', ('params', 'scale'): 'weight',
                ('params', 'bias'): 'bias', ('batch_stats', 'mean'): 'running_mean',
                ('batch_stats', 'var'): 'running_var'}[(collection, leaf)])
  return '.'.join(parts)


def _copy_reference_weights(ref, variables):
  state = {k: v for k, v in ref.state_dict().items() if not k.endswith('num_batches_tracked')}
  used = set()

  def convert(path, leaf):
    key = _torch_key(tuple(p.key for p in path))
    used.add(key)
    value = state[key].numpy()
    if value.ndim == 4:                      # OIHW -> HWIO
      value = value.transpose(2, 3, 1, 0)
    assert value.shape == leaf.shape, key
    return jnp.asarray(value)

  variables = jax.tree_util.tree_map_with_path(convert, variables)
  assert used == set(state), f'unmapped reference keys: {sorted(set(state) - used)}'
  return variables


def _randomise(ref, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in ref.state_dict().items():
      if name.endswith('num_batches_tracked'):
        continue
      if name.endswith('running_var'):
        tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
      elif name.endswith('weight') and tensor.ndim == 1:
        tensor.copy_(torch.rand(tensor.shape, generator=g) + 0.5)
      elif name.endswith('weight'):
        tensor.copy_(torch.randn(tensor.shape, generator=g) / np.sqrt(tensor[0].numel()))
      else:
        tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.5)


@pytest.mark.parametrize('n,use_hard,use_context', [(1, False, True), (2, False, True),
                                                    (1, True, False)])
def test_forward_matches_reference_in_eval_mode(n, use_hard, use_context):
  k, c, t = 5, 32, 16
  ref = _reference(k, c, n, transform=t, use_context=use_context, use_hard=use_hard)
  _randomise(ref, seed=n)
  ref.eval()
  r = np.random.RandomState(20 + n)
  feats = r.randn(2, 6, 5, c).astype(np.float32)
  preds = (r.randn(2, 6, 5, k) * 2).astype(np.float32)
  feats_ms = r.randn(2, 6, 5, c).astype(np.float32)

  ours = mem_lib.FeaturesMemory(k, feats_channels=c, transform_channels=t, out_channels=c,
                                num_feats_per_cls=n, use_hard_aggregate=use_hard,
                                use_context_within_image=use_context)
  variables = ours.init(jax.random.PRNGKey(0), feats, preds, feats_ms)
  variables = _copy_reference_weights(ref, variables)
  stored, out = ours.apply(variables, feats, preds, feats_ms)
  with torch.no_grad():
    ref_stored, ref_out = ref(_nchw(feats), _nchw(preds), _nchw(feats_ms) if use_context else None)
  ref_out = reference_utils.nchw_to_nhwc(ref_out.numpy())
  np.testing.assert_array_equal(np.asarray(stored), ref_stored.numpy())
  assert np.abs(np.asarray(out) - ref_out).max() <= 1e-5 * np.abs(ref_out).max()


@pytest.mark.parametrize('n', [1, 2])
def test_memory_loss_matches_reference_calculateloss(n):
  reference_utils.import_ssseg_builder()
  from ssseg.modules.models.losses import calculateloss
  k = 7
  logits = (np.random.RandomState(30 + n).randn(k * n, k) * 3).astype(np.float32)
  # The reference's target: class k repeated n times, rows in (class, slot) order.
  target = torch.arange(k).unsqueeze(1).repeat(1, n).view(-1)
  loss_cfg = reference_utils.reference_cfg(num_feats_per_cls=n)['head']['loss_cfg']
  ref = float(calculateloss(torch.from_numpy(logits), target, loss_cfg))
  ours = float(mem_lib.memory_loss(jnp.asarray(logits), n))
  assert abs(ours - ref) <= 1e-6 * abs(ref)
