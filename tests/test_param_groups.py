"""Per-group SGD (config.train.params_rules) against torch.optim.SGD with the reference's groups.

The reference builds its parameter groups with `DefaultParamsConstructor` (a rule applies to
every parameter whose dotted name contains its pattern, longest pattern first) and its
`PolyScheduler` sets group.lr = lr_multiplier * target lr before each step. Here both run
3 steps with a changing poly lr on the same parameters and gradients.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from memseg_jax import convert, schedules, train
from tests import reference_utils as ru

RULES = {'backbone_net': {'lr_multiplier': 0.1, 'wd_multiplier': 0.5},
         'backbone_net.fc.bias': {'lr_multiplier': 2.0, 'wd_multiplier': 0.0}}


def _config(rules, weight_decay=5e-4, lr=0.01):
  config = ru.project_config()
  config.train.lr = lr
  config.train.weight_decay = weight_decay
  config.train.num_train_steps = 5
  config.train.params_rules = tuple((pattern, rule['lr_multiplier'], rule['wd_multiplier'])
                                    for pattern, rule in rules.items())
  return config


def test_groups_follow_the_longest_matching_pattern_of_the_reference_name():
  params = {'backbone_net': {'pos_embed': jnp.zeros(3), 'fc': {'kernel': jnp.zeros((2, 2)),
                                                               'bias': jnp.zeros(2)}},
            'decoder': {'kernel': jnp.zeros((2, 2))}}
  labels = train.param_group_labels(params, RULES)
  assert labels == {'backbone_net': {'pos_embed': 'backbone_net',
                                     'fc': {'kernel': 'backbone_net',
                                            'bias': 'backbone_net.fc.bias'}},
                    'decoder': {'kernel': train.BASE_GROUP}}


def test_vit_config_puts_every_backbone_parameter_in_the_0_1_group():
  _, config = ru.vit_mcibi_cfgs(embed_dims=64, num_layers=4, num_heads=4,
                                 out_indices=(0, 1, 2, 3))
  shapes = convert.variable_shapes(config)
  params = {}
  for key, shape in shapes.items():
    if key[0] == 'params':
      node = params
      for part in key[1:-1]:
        node = node.setdefault(part, {})
      node[key[-1]] = jax.ShapeDtypeStruct(shape, jnp.float32)
  labels = train.param_group_labels(params, train.params_rules(config), 'vit')
  flat = {tuple(p.key for p in path): label
          for path, label in jax.tree_util.tree_flatten_with_path(labels)[0]}
  assert flat[('backbone_net', 'pos_embed')] == 'backbone_net'
  assert flat[('backbone_net', 'cls_token')] == 'backbone_net'
  for key, label in flat.items():
    assert label == ('backbone_net' if key[0] == 'backbone_net' else train.BASE_GROUP), key
  assert config.train.weight_decay == 0.0


def test_without_rules_the_optimizer_state_keeps_its_single_group_layout():
  config = _config({})
  schedule = schedules.create_lr_schedule(config, 5)
  params = {'a': jnp.ones(3), 'b': {'kernel': jnp.ones((2, 2))}}
  state = train.create_optimizer(config, schedule).init(params)
  plain = optax.chain(optax.add_decayed_weights(5e-4),
                      optax.sgd(schedule, momentum=0.9, nesterov=False)).init(params)
  assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(plain)


torch = pytest.importorskip('torch')
pytest.importorskip('ssseg')


def test_three_sgd_steps_equal_torch_sgd_with_the_reference_groups_and_poly_schedule():
  ru.import_ssseg_builder()
  from ssseg.modules.models.optimizers.builder import BuildOptimizer
  from ssseg.modules.models.schedulers.polyscheduler import PolyScheduler

  class Backbone(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.pos_embed = torch.nn.Parameter(torch.randn(1, 5, 4))
      self.fc = torch.nn.Linear(4, 3)

  class Net(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.backbone_net = Backbone()
      self.decoder = torch.nn.Linear(3, 2)

  torch.manual_seed(0)
  net = Net()
  lr0, wd, total = 0.01, 5e-4, 5
  optimizer_cfg = {'type': 'SGD', 'lr': lr0, 'momentum': 0.9, 'weight_decay': wd,
                   'params_rules': {k: dict(v) for k, v in RULES.items()}}
  optimizer = BuildOptimizer(net, optimizer_cfg)
  scheduler = PolyScheduler(optimizer=optimizer, lr=lr0, max_epochs=1, iters_per_epoch=total,
                            params_rules={k: dict(v) for k, v in RULES.items()})
  assert len(optimizer.param_groups) == 5

  to_np = lambda t: t.detach().numpy().copy()
  params = {'backbone_net': {'pos_embed': jnp.asarray(to_np(net.backbone_net.pos_embed)),
                             'fc': {'kernel': jnp.asarray(to_np(net.backbone_net.fc.weight).T),
                                    'bias': jnp.asarray(to_np(net.backbone_net.fc.bias))}},
            'decoder': {'kernel': jnp.asarray(to_np(net.decoder.weight).T),
                        'bias': jnp.asarray(to_np(net.decoder.bias))}}
  config = _config(RULES, weight_decay=wd, lr=lr0)
  schedule = schedules.create_lr_schedule(config, total)
  tx = train.create_optimizer(config, schedule)
  opt_state = tx.init(params)

  gen = np.random.default_rng(1)
  torch_params = {('backbone_net', 'pos_embed'): (net.backbone_net.pos_embed, False),
                  ('backbone_net', 'fc', 'kernel'): (net.backbone_net.fc.weight, True),
                  ('backbone_net', 'fc', 'bias'): (net.backbone_net.fc.bias, False),
                  ('decoder', 'kernel'): (net.decoder.weight, True),
                  ('decoder', 'bias'): (net.decoder.bias, False)}
  lrs = []
  for step in range(3):
    target_lr = scheduler.updatelr()
    lrs.append(target_lr)
    assert float(schedule(step)) == pytest.approx(target_lr, rel=1e-6)
    grads = jax.tree_util.tree_map(
        lambda p: jnp.asarray(gen.normal(size=p.shape).astype(np.float32)), params)
    flat = {tuple(k.key for k in path): g
            for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]}
    for key, (p, transposed) in torch_params.items():
      g = np.asarray(flat[key])
      p.grad = torch.from_numpy(np.ascontiguousarray(g.T if transposed else g))
    scheduler.step()
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)

    ours = {tuple(k.key for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    for key, (p, transposed) in torch_params.items():
      ref = to_np(p).T if transposed else to_np(p)
      err = np.abs(ours[key] - ref).max()
      print(f'step {step} (lr {target_lr:.6g}) {"/".join(key)}: max abs diff {err:.3g}')
      assert err <= 1e-6 * np.abs(ref).max(), (step, key, err)
  assert lrs[0] > lrs[1] > lrs[2]
  # The groups really differ: the lr of each reference group after the last update.
  by_name = {g['name']: g['lr'] for g in optimizer.param_groups}
  assert by_name['backbone_net.pos_embed'] == pytest.approx(0.1 * lrs[-1])
  assert by_name['backbone_net.fc.bias'] == pytest.approx(2.0 * lrs[-1])
  assert by_name['decoder.weight'] == pytest.approx(lrs[-1])
