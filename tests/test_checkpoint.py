"""Checkpoints: resuming ends where an uninterrupted run ends; mismatches fail clearly;
the ImageNet backbone replaces exactly the backbone.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memseg_jax import checkpoint as ckpt_lib
from memseg_jax import convert, schedules, train
from memseg_jax.config_validation import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')


def _tree_equal(a, b, what):
  flat_a = jax.tree_util.tree_flatten_with_path(jax.device_get(a))[0]
  flat_b = jax.tree_util.tree_leaves(jax.device_get(b))
  assert len(flat_a) == len(flat_b), what
  for (path, x), y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=f'{what} {jax.tree_util.keystr(path)}')


@pytest.fixture(scope='module')
def synthetic_data_dir(tmp_path_factory):
  from memseg_jax import datasets
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  builder = datasets.get_builder('synthetic_scenes', data_dir)
  datasets.download_and_prepare(builder)
  return data_dir


def _demo_config(data_dir, steps):
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  config.data.data_dir = data_dir
  config.data.crop_size = (32, 32)
  config.train.num_train_steps = steps
  config.train.checkpoint_every_steps = steps // 2
  config.train.keep_checkpoints = 3
  config.train.log_every_steps = 1
  config.train.final_eval = False
  return config


@pytest.mark.slow
def test_resume_after_n_steps_ends_like_an_uninterrupted_2n_run(tmp_path, synthetic_data_dir):
  n = 2
  config = _demo_config(synthetic_data_dir, 2 * n)
  straight = train.train_and_evaluate(config, str(tmp_path / 'straight'))
  first = train.train_and_evaluate(config, str(tmp_path / 'resumed'), stop_at_step=n)
  assert int(first.step) == n
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(straight.step) == int(resumed.step) == 2 * n
  for field in ('params', 'batch_stats', 'memory', 'opt_state', 'rng'):
    _tree_equal(getattr(straight, field), getattr(resumed, field), field)
  # The memory really moved (the comparison is not between two zero memories).
  assert np.abs(np.asarray(jax.tree_util.tree_leaves(resumed.memory)[0])).max() > 0

  # The step-n checkpoint written while the uninterrupted run went on (its state donated to
  # the next steps) equals the one of the stopped run.
  mesh = train.create_mesh()
  tx = train.create_optimizer(config, schedules.create_lr_schedule(config, 2 * n))
  abstract = train.abstract_train_state(config, tx, mesh)
  restored = []
  for name in ('straight', 'resumed'):
    manager = ckpt_lib.create_manager(str(tmp_path / name), config)
    assert sorted(manager.all_steps()) == [n, 2 * n]
    restored.append(manager.restore(n, args=ocp.args.StandardRestore(abstract)))
    manager.close()
  _tree_equal(restored[0], restored[1], 'checkpoint at step n')
  assert os.path.exists(tmp_path / 'straight' / 'config.json')


@pytest.mark.slow
def test_a_nan_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, synthetic_data_dir):
  from memseg_jax import input_pipeline
  config = _demo_config(synthetic_data_dir, 6)   # checkpoints every 3 steps
  bad_step = 4

  def poisoned(start_step):
    for step, batch in enumerate(input_pipeline.create_train_dataset(
        config, start_step=start_step), start=start_step):
      if step == bad_step:
        batch = dict(batch, image=np.full_like(batch['image'], np.nan))
      yield batch

  with pytest.raises(train.NonFiniteLossError, match=f'at step {bad_step}') as e:
    train.train_and_evaluate(config, str(tmp_path), dataset_fn=poisoned)
  assert 'the last good checkpoint is step 3' in str(e.value)
  manager = ckpt_lib.create_manager(str(tmp_path), config)
  assert manager.all_steps() == [3]
  manager.close()


def test_restoring_a_checkpoint_of_another_shape_names_the_keys(tmp_path):
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  state = train.TrainState(step=jnp.asarray(3, jnp.int32),
                           params={'head': {'kernel': jnp.ones((2, 3))}, 'old': jnp.zeros(2)},
                           opt_state=(), batch_stats={}, memory={'m': jnp.zeros((4, 1, 2))},
                           rng=jax.random.PRNGKey(0))
  manager = ckpt_lib.create_manager(str(tmp_path), config)
  ckpt_lib.save(manager, 3, state)
  manager.wait_until_finished()
  target = state.replace(params={'head': {'kernel': jnp.ones((2, 5))}, 'new': jnp.zeros(2)})
  abstract = jax.eval_shape(lambda: target)
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.restore_latest(manager, abstract)
  message = str(e.value)
  assert 'params/head/kernel (2, 3) in the checkpoint vs (2, 5) in the model' in message
  assert 'Missing: params/new' in message
  assert 'Unexpected: params/old' in message
  assert '\n' not in message
  # The matching structure restores the saved values.
  restored = ckpt_lib.restore_latest(manager, jax.eval_shape(lambda: state))
  assert int(restored.step) == 3
  manager.close()


def test_abstract_states_of_different_configs_differ_in_the_class_dependent_keys():
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  other = load_config(os.path.join(CONFIGS, 'demo.py'))
  other.model.num_classes = 9
  mesh = train.create_mesh()
  tx = train.create_optimizer(config, schedules.create_lr_schedule(config, 10))
  a = ckpt_lib.leaf_shapes(train.abstract_train_state(config, tx, mesh))
  b = ckpt_lib.leaf_shapes(train.abstract_train_state(other, tx, mesh))
  with pytest.raises(ckpt_lib.CheckpointMismatchError) as e:
    ckpt_lib.check_tree_matches(b, a, 'checkpoint X', config=other)
  message = str(e.value)
  assert message.startswith('checkpoint X does not fit the model of this config: '
                            'config.model.num_classes most likely differs (8 in the checkpoint, '
                            '9 in this config). Wrong shapes: ')
  assert ('params/decoder_stage2/classifier/kernel (1, 1, 64, 8) in the checkpoint vs '
          '(1, 1, 64, 9) in the model') in message
  # Every class-dependent variable, and only those, differs: 3 classifiers (kernel + bias), the
  # memory, and the same slots of the optimizer state.
  wrong = {k for k in a if k in b and a[k] != b[k]}
  assert {k for k in wrong if not k.startswith('opt_state')} == {
      'memory/memory_module/memory', *(f'params/{head}/classifier/{leaf}' for head in (
          'auxiliary_decoder', 'decoder_stage1', 'decoder_stage2') for leaf in ('kernel', 'bias'))}
  assert f'(+{len(wrong) - 4} more)' in message


@pytest.mark.slow
def test_pretrained_backbone_replaces_only_the_backbone(tmp_path):
  config = load_config(os.path.join(CONFIGS, 'demo.py'))
  config.data.crop_size = (32, 32)
  fresh = train.init_variables(config, jax.random.PRNGKey(0))
  donor = jax.tree_util.tree_map(lambda x: np.asarray(x) + 1.5, fresh)   # any other values
  path = convert.save_variables(str(tmp_path / 'imagenet'), {
      'params': {'backbone_net': donor['params']['backbone_net']},
      'batch_stats': {'backbone_net': donor['batch_stats']['backbone_net']}})
  config.model.backbone.pretrained = path
  loaded = train.init_variables(config, jax.random.PRNGKey(0))
  for collection in ('params', 'batch_stats'):
    _tree_equal(loaded[collection]['backbone_net'], donor[collection]['backbone_net'], collection)
    for name in fresh[collection]:
      if name != 'backbone_net':
        _tree_equal(loaded[collection][name], fresh[collection][name], f'{collection}.{name}')
  _tree_equal(loaded['memory'], fresh['memory'], 'memory')

  wrong = load_config(os.path.join(CONFIGS, 'demo.py'))
  wrong.model.backbone.depth = 50
  wrong.model.backbone.pretrained = path
  shapes = jax.eval_shape(
      lambda: train.init_variables(_no_pretrained(wrong), jax.random.PRNGKey(0)))
  variables = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  with pytest.raises(ckpt_lib.CheckpointMismatchError, match='pretrained backbone .*layer'):
    ckpt_lib.load_pretrained_backbone(wrong, variables)


def _no_pretrained(config):
  config = config.copy_and_resolve_references()
  config.model.backbone.pretrained = ''
  return config


# ------------------------------------------------------------------ evaluation without trainer
def _tiny_config(data_dir=''):
  import sys
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  import tiny_run_config  # pylint: disable=import-outside-toplevel
  return tiny_run_config.get_config(data_dir)


def _save_tree(workdir, step, tree):
  manager = ckpt_lib.create_manager(str(workdir), _tiny_config())
  manager.save(step, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  manager.close()


@pytest.fixture(scope='module')
def foreign_checkpoints(tmp_path_factory):
  """Training checkpoints the trainer of this config could not resume: an Adam optimizer state
  (the trainer uses SGD), and none at all; plus a converted checkpoint of the same variables."""
  import optax
  from memseg_jax.models import build_model
  from tests.test_evaluate import random_variables
  root = tmp_path_factory.mktemp('foreign')
  config = _tiny_config()
  variables = jax.tree_util.tree_map(np.asarray, random_variables(build_model(config), seed=3))
  adam = optax.adam(1e-3).init(variables['params'])
  _save_tree(root / 'adam', 5, {'step': np.asarray(5, np.int32), 'opt_state': adam,
                                'rng': np.zeros(2, np.uint32), **variables})
  _save_tree(root / 'no_opt_state', 7, dict(variables))
  convert.save_variables(str(root / 'converted'), variables)
  return config, root, variables


def test_eval_variables_restore_from_any_optimizer_s_checkpoint_without_the_trainer(
    foreign_checkpoints):
  config, root, variables = foreign_checkpoints
  for path, step in ((root / 'adam', 5), (root / 'adam' / 'checkpoints', 5),
                     (root / 'adam' / 'checkpoints' / '5', 5), (root / 'no_opt_state', 7),
                     (root / 'converted', None)):
    restored, got_step = ckpt_lib.restore_eval_variables(str(path), config)
    assert got_step == step, path
    assert sorted(restored) == ['batch_stats', 'memory', 'params']
    _tree_equal(restored, variables, str(path))
    assert all(isinstance(x, np.ndarray) for x in jax.tree_util.tree_leaves(restored))


def test_a_checkpoint_that_is_not_one_or_is_incomplete_is_named(foreign_checkpoints, tmp_path):
  config, root, _ = foreign_checkpoints
  with pytest.raises(ckpt_lib.CheckpointError, match=f'{tmp_path} is not a checkpoint'):
    ckpt_lib.restore_eval_variables(str(tmp_path), config)
  # A write cut short (orbax's temporary folder) is never picked up.
  (tmp_path / 'run' / 'checkpoints' / '9.orbax-checkpoint-tmp').mkdir(parents=True)
  with pytest.raises(ckpt_lib.CheckpointError, match='no complete checkpoint in'):
    ckpt_lib.restore_eval_variables(str(tmp_path / 'run'), config)
  deeper = config.copy_and_resolve_references()
  deeper.model.backbone.depth = 50       # bottleneck blocks: other variables, not only shapes
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="config.model.backbone most likely differs \\(type='resnet', "
                           "depth=50 in this config\\)"):
    ckpt_lib.restore_eval_variables(str(root / 'converted'), deeper)
  config.model.name = 'deeplabv3'
  with pytest.raises(ckpt_lib.CheckpointMismatchError,
                     match="config.model.name most likely differs \\(it is 'deeplabv3'"):
    ckpt_lib.restore_eval_variables(str(root / 'converted'), config)


def test_evaluation_and_prediction_import_nothing_from_the_trainer():
  import ast
  import subprocess
  import sys
  package = os.path.join(os.path.dirname(CONFIGS), 'memseg_jax')
  for name in ('evaluate.py', 'predict.py', 'checkpoint.py'):
    tree = ast.parse(open(os.path.join(package, name)).read())
    for node in ast.walk(tree):
      if isinstance(node, ast.ImportFrom):
        names = [f'{node.module}.{a.name}' for a in node.names]
      elif isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      else:
        continue
      assert not any(n.split('.')[-1] == 'train' for n in names), (name, names)
  # Nor through another module.
  code = ('import sys; from memseg_jax import checkpoint, evaluate, main, predict; '
          'print("memseg_jax.train" in sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(CONFIGS), env=dict(os.environ, JAX_PLATFORMS='cpu'))
  assert out.stdout.strip() == 'False', out.stderr[-2000:]
