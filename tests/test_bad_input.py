"""README "What happens when ...": every bad input and fault ends with one `error: ...` line.

One test per row of that table. Each asserts a non-zero exit status, no `Traceback` anywhere in
the output, the culprit (file, key, value) named in the message, and, for the programs run as
subprocesses, that the message is the last thing printed. The runs fail before anything is
compiled, so each costs the program's imports (seconds). Rows whose program must train first
(SIGTERM, SIGKILL during a checkpoint write, a disk that fills up mid-run) are slow tests in
tests/test_preemption.py; their in-process counterparts here check the library part.
"""

import logging
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from memseg_jax import checkpoint as ckpt_lib
from memseg_jax import errors

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
CONFIGS = os.path.join(REPO, 'configs')
TINY = os.path.join(HERE, 'tiny_run_config.py')
sys.path.insert(0, HERE)
import tiny_run_config  # pylint: disable=wrong-import-position


# ------------------------------------------------------------------------------------ helpers
def _env(tmp_path):
  env = dict(os.environ)
  env.update(XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu',
             MEMSEG_COMPILATION_CACHE='0', TF_CPP_MIN_LOG_LEVEL='2',
             MEMSEG_DATA_DIR=str(tmp_path / 'no_data'), PYTHONPATH=REPO)
  return env


def _run(tmp_path, args, module='memseg_jax.main'):
  command = [sys.executable, *(['-m', module] if not module.endswith('.py') else [module]), *args]
  return subprocess.run(command, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True,
                        timeout=300)


def assert_one_error(proc, *culprits, exit_code=None):
  """The program failed with one `error:` line, printed last, naming every culprit."""
  output = proc.stdout + proc.stderr
  assert proc.returncode != 0, output[-3000:]
  if exit_code is not None:
    assert proc.returncode == exit_code, (proc.returncode, output[-3000:])
  assert 'Traceback' not in output, output[-6000:]
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  errors_printed = [line for line in lines if line.startswith('error: ')]
  assert len(errors_printed) == 1, output[-3000:]
  assert lines[-1] == errors_printed[0], f'printed after the message: {lines[-3:]}'
  for culprit in culprits:
    assert culprit in errors_printed[0], (culprit, errors_printed[0])
  print(f'[exit {proc.returncode}] {errors_printed[0]}')    # the README table quotes these
  return errors_printed[0]


def report(capsys, fn):
  """(exit status, stderr) of a program whose main calls `fn` (the entry points' handling)."""
  capsys.readouterr()           # only what the call prints
  with pytest.raises(SystemExit) as e:
    errors.guarded(lambda argv: fn())(['program'])
  err = capsys.readouterr().err
  assert 'Traceback' not in err
  lines = [line for line in err.splitlines() if line.strip()]
  # Only the message, or (orbax's one-line warnings / errors) the message last.
  assert lines[-1].startswith('error: ') and all('error: ' not in l for l in lines[:-1]), err
  with capsys.disabled():
    print(f'[exit {e.value.code}] {lines[-1]}')         # the README table quotes these
  return e.value.code, lines[-1]


def _can_write(folder) -> bool:
  try:
    with open(os.path.join(folder, '.probe'), 'w') as f:
      f.write('x')
    os.remove(os.path.join(folder, '.probe'))
    return True
  except OSError:
    return False


@pytest.fixture
def read_only_dir(tmp_path):
  """A folder nobody can write into (chmod; for root, which ignores modes, chattr +i)."""
  path = tmp_path / 'read_only'
  path.mkdir()
  path.chmod(0o555)
  immutable = False
  if _can_write(path) and shutil.which('chattr'):
    immutable = subprocess.run(['chattr', '+i', str(path)], capture_output=True).returncode == 0
  if _can_write(path):
    path.chmod(0o755)
    pytest.skip('cannot make a read-only folder here (root without chattr)')
  yield path
  if immutable:
    subprocess.run(['chattr', '-i', str(path)], check=False)
  path.chmod(0o755)


@pytest.fixture(scope='module')
def tiny_checkpoints(tmp_path_factory):
  """A training checkpoint (step 2) and a converted checkpoint of tests/tiny_run_config.py's
  model, random values, written without training."""
  from memseg_jax import convert, train
  from memseg_jax.models import build_model
  from tests.test_evaluate import random_variables
  root = tmp_path_factory.mktemp('tiny_ckpt')
  config = tiny_run_config.get_config()
  variables = jax.tree_util.tree_map(np.asarray, random_variables(build_model(config), seed=5))
  tx = train.create_optimizer(config, lambda step: 0.01)
  state = {'step': np.asarray(2, np.int32), 'opt_state': jax.tree_util.tree_map(
      np.asarray, tx.init(variables['params'])), 'rng': np.zeros(2, np.uint32), **variables}
  manager = ckpt_lib.create_manager(str(root / 'run'), config)
  manager.save(2, args=ocp.args.StandardSave(state))
  manager.wait_until_finished()
  manager.close()
  convert.save_variables(str(root / 'converted'), variables)
  return root


# ------------------------------------------------------------------------ python -m memseg_jax.main
@pytest.mark.parametrize('args, culprits', [
    (['--config.train.batchsize=8'],
     ['--config.train.batchsize=8', 'Did you mean "batch_size" instead of "batchsize"?']),
    (['--config.train.batch_size=eight'], ['--config.train.batch_size=eight']),
    (['--mode=evaluate'], ['--mode=evaluate', 'train|eval']),
    (['--learning_rate=1'], ["'learning_rate'"]),
], ids=['unknown_key', 'wrong_type', 'bad_mode', 'unknown_flag'])
def test_main_command_line_mistakes_are_one_line(tmp_path, args, culprits):
  proc = _run(tmp_path, [f'--config={CONFIGS}/demo.py', f'--workdir={tmp_path}/w', *args])
  assert_one_error(proc, *culprits, exit_code=2)


def test_main_config_file_missing_or_failing_is_named(tmp_path):
  proc = _run(tmp_path, [f'--config={CONFIGS}/nope.py', f'--workdir={tmp_path}/w'])
  assert_one_error(proc, f'--config={CONFIGS}/nope.py: no such config file', exit_code=2)
  broken = tmp_path / 'broken.py'
  broken.write_text('def get_config():\n  return undefined_name\n')
  proc = _run(tmp_path, [f'--config={broken}', f'--workdir={tmp_path}/w',
                         '--config.train.batch_size=8'])
  assert_one_error(proc, f'{broken}:2', "NameError: name 'undefined_name' is not defined",
                   exit_code=2)


def test_main_eval_of_a_checkpoint_of_another_config_names_variable_shapes_and_key(
    tmp_path, tiny_checkpoints):
  proc = _run(tmp_path, ['--mode=eval', f'--config={TINY}', f'--workdir={tmp_path}/eval',
                         f'--config.eval.checkpoint={tiny_checkpoints}/run',
                         '--config.model.num_classes=9'])
  message = assert_one_error(
      proc, f'checkpoint {tiny_checkpoints}/run/checkpoints/2 does not fit the model',
      'params/decoder_stage2/classifier/kernel (1, 1, 64, 8) in the checkpoint vs '
      '(1, 1, 64, 9) in the model',
      'config.model.num_classes most likely differs (8 in the checkpoint, 9 in this config)',
      exit_code=1)
  assert '\n' not in message


def test_main_unwritable_workdir_fails_before_the_first_step(tmp_path, read_only_dir):
  proc = _run(tmp_path, [f'--config={TINY}', f'--workdir={read_only_dir}/run'])
  assert_one_error(proc, f'workdir {read_only_dir}/run cannot be written', exit_code=1)
  assert 'step 1/' not in proc.stderr and 'training ' not in proc.stderr
  proc = _run(tmp_path, ['--mode=eval', f'--config={TINY}', f'--workdir={read_only_dir}/eval'])
  assert_one_error(proc, f'workdir {read_only_dir}/eval cannot be written', exit_code=1)


def test_main_library_errors_end_in_one_line(tmp_path, capsys, tiny_checkpoints):
  """`main.run` as `python -m memseg_jax.main` runs it, in-process (its handling, directly)."""
  from memseg_jax import main
  config = tiny_run_config.get_config(str(tmp_path / 'no_data'))
  config.train.batch_size = 8                   # the 8 devices of this test process

  def run(mode='train', **overrides):
    c = config.copy_and_resolve_references()
    for key, value in overrides.items():
      section, field = key.split('__')
      c[section][field] = value
    return report(capsys, lambda: main.run(c, str(tmp_path / 'w'), mode))

  cases = [
      (run(train__batch_size=7), 'config.train.batch_size=7 is not divisible by the 8 devices'),
      (run(model__num_classes=5),
       "config.model.num_classes=5 but dataset 'synthetic_scenes/multihost_tiny' has 8 classes"),
      (run('eval'), f'no checkpoint at {tmp_path}/w/checkpoints (train first, or set '
                    '--config.eval.checkpoint=DIR)'),
      (run('eval', eval__checkpoint=str(tmp_path)), f'{tmp_path} is not a checkpoint'),
      (run('eval', eval__checkpoint=f'{tiny_checkpoints}/converted', model__name='deeplabv3'),
       f"checkpoint {tiny_checkpoints}/converted does not fit the model of this config: "
       "config.model.name most likely differs (it is 'deeplabv3' in this config)"),
  ]
  for (code, message), expected in cases:
    assert code == 1 and expected in message, (message, expected)


def test_resuming_in_a_workdir_of_another_config_names_the_key(tmp_path, capsys,
                                                               tiny_checkpoints):
  from memseg_jax import train
  data_dir = str(tmp_path / 'tfds')
  tiny_run_config.prepare_dataset(data_dir)
  config = tiny_run_config.get_config(data_dir)
  config.train.batch_size = 8
  config.model.head.feats_channels = 96
  shutil.copytree(tiny_checkpoints / 'run', tmp_path / 'run')
  code, message = report(capsys, lambda: train.train_and_evaluate(config, str(tmp_path / 'run')))
  assert code == 1
  assert f'checkpoint {tmp_path}/run/checkpoints/2 does not fit the model' in message
  assert 'config.model.head.feats_channels most likely differs (64 in the checkpoint, 96 in ' \
         'this config)' in message


def test_a_failed_checkpoint_write_stops_with_the_step_and_the_kept_checkpoint(tmp_path, capsys):
  """A full disk at the 2nd checkpoint (the write fails in orbax's background thread)."""
  from disk_full_main import fail_nth_checkpoint_write
  from etils import epath
  config = tiny_run_config.get_config()
  state = {'w': np.arange(6, dtype=np.float32), 'step': np.asarray(0, np.int32)}
  path_type = type(epath.Path('/'))
  original = path_type.write_text
  quiet = errors.quiet_orbax_logs()    # as the programs do
  try:
    fail_nth_checkpoint_write(2)
    saver = ckpt_lib.Saver(ckpt_lib.create_manager(str(tmp_path), config))
    saver.save(1, dict(state, step=np.asarray(1, np.int32)))
    saver.save(2, dict(state, step=np.asarray(2, np.int32)))

    def train_on():
      try:
        saver.wait()
      finally:
        saver.close()
    code, message = report(capsys, train_on)
  finally:
    path_type.write_text = original
    logging.getLogger('absl').removeFilter(quiet)
  assert code == 1
  assert message.startswith(f'error: writing checkpoint 2 to {tmp_path}/checkpoints failed '
                            '(OSError: [Errno 28] No space left on device')
  assert message.endswith('training stopped, the last complete checkpoint is step 1 (the next '
                          'start resumes from it)')
  # Step 1 is still restorable; the next start sees only it and writes step 2 again.
  manager = ckpt_lib.create_manager(str(tmp_path), config)
  assert manager.all_steps() == [1]
  restored = manager.restore(1, args=ocp.args.StandardRestore(state))
  assert int(restored['step']) == 1
  saver = ckpt_lib.Saver(manager)
  assert saver.last_complete == 1
  saver.save(2, dict(state, step=np.asarray(2, np.int32)))
  saver.wait()
  saver.close()
  assert sorted(ocp.utils.checkpoint_steps(str(tmp_path / 'checkpoints'))) == [1, 2]


@pytest.mark.parametrize('error', [
    'memseg_jax.train.NonFiniteLossError',
    'memseg_jax.checkpoint.CheckpointWriteError',
    'memseg_jax.distributed.DistributedConfigError',
    'memseg_jax.datasets.DatasetNotPreparedError',
])
def test_every_typed_error_is_reported_in_one_line(capsys, error):
  import importlib
  module, _, name = error.rpartition('.')
  cls = getattr(importlib.import_module(module), name)
  assert issubclass(cls, errors.UserError)

  def fail():
    raise cls('the culprit X went wrong\n  on a second line')
  code, message = report(capsys, fail)
  assert code == 1 and message == 'error: the culprit X went wrong on a second line'


# --------------------------------------------------------------------- python -m memseg_jax.convert
@pytest.fixture(scope='module')
def pth_files(tmp_path_factory):
  torch = pytest.importorskip('torch')
  root = tmp_path_factory.mktemp('pth')
  (root / 'garbage.pth').write_bytes(bytes(range(256)) * 4)
  torch.save({'model': {'conv.weight': torch.zeros(2, 3, 1, 1)}}, root / 'other_model.pth')
  (root / 'exists').mkdir()
  return root


def test_convert_garbage_pth_is_one_line_without_traceback(tmp_path, pth_files):
  proc = _run(tmp_path, [f'--torch_checkpoint={pth_files}/garbage.pth', f'--config={TINY}',
                         f'--output={tmp_path}/out'], module='memseg_jax.convert')
  assert_one_error(proc, f'cannot read PyTorch checkpoint {pth_files}/garbage.pth', exit_code=1)
  proc = _run(tmp_path, [f'--config={TINY}'], module='memseg_jax.convert')
  assert_one_error(proc, '--torch_checkpoint', exit_code=2)


def test_convert_missing_foreign_pth_or_existing_output_is_one_line(tmp_path, capsys, pth_files):
  from memseg_jax import convert
  config = tiny_run_config.get_config()
  for name, output, expected in (
      ('missing.pth', 'out', f'PyTorch checkpoint not found: {pth_files}/missing.pth'),
      ('other_model.pth', 'out', f'{pth_files}/other_model.pth: the checkpoint '
                                 'does not match the model of this config: missing keys: '),
      ('other_model.pth', 'exists', f'--output={pth_files}/exists already exists (pass '
                                    '--overwrite to replace it)')):
    code, message = report(capsys, lambda: convert.convert_file(
        str(pth_files / name), config, str(pth_files / output)))
    assert code == 1 and expected in message, message
  assert 'unexpected keys: conv.weight' in report(capsys, lambda: convert.convert_file(
      str(pth_files / 'other_model.pth'), config, str(tmp_path / 'out')))[1]


# --------------------------------------------------------------------- python -m memseg_jax.predict
@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  from PIL import Image
  root = tmp_path_factory.mktemp('photos')
  (root / 'good').mkdir()
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / 'good' / 'a.png')
  (root / 'broken').mkdir()
  Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / 'broken' / 'a.png')
  (root / 'broken' / 'b.jpg').write_bytes(b'\xff\xd8 not a jpeg')
  (root / 'empty').mkdir()
  return root


def test_predict_with_a_checkpoint_of_another_config_is_one_line(tmp_path, tiny_checkpoints,
                                                                 photos):
  proc = _run(tmp_path, [f'--config={TINY}', f'--checkpoint={tiny_checkpoints}/run',
                         f'--input={photos}/good', f'--output={tmp_path}/out',
                         '--config.model.num_classes=9'], module='memseg_jax.predict')
  assert_one_error(proc, f'checkpoint {tiny_checkpoints}/run/checkpoints/2 does not fit',
                   'config.model.num_classes most likely differs (8 in the checkpoint, 9 in '
                   'this config)', exit_code=1)


def test_predict_bad_input_is_one_line_before_anything_is_compiled(
    tmp_path, capsys, tiny_checkpoints, photos, read_only_dir):
  from memseg_jax import predict
  config = tiny_run_config.get_config()
  ckpt, out = str(tiny_checkpoints / 'converted'), str(tmp_path / 'out')
  for args, expected in (
      ((ckpt, f'{photos}/empty', out), f"--input='{photos}/empty': no image files found"),
      ((ckpt, f'{photos}/broken', out), f'cannot read image {photos}/broken/b.jpg'),
      ((str(tmp_path / 'missing'), f'{photos}/good', out),
       f'--checkpoint: no such file or directory: {tmp_path}/missing'),
      ((ckpt, f'{photos}/good', f'{read_only_dir}/out'),
       f'--output {read_only_dir}/out cannot be written')):
    code, message = report(capsys, lambda: predict.run(config, *args, progress=False))
    assert code == 1 and expected in message, message
  assert not os.path.exists(out) or not os.listdir(out)


# ---------------------------------------------------------------- scripts/prepare_datasets.py
def test_prepare_datasets_bad_input_is_one_line(tmp_path, capsys):
  import cv2
  from memseg_jax import datasets
  from tests.datasets import layouts
  script = os.path.join(REPO, 'scripts', 'prepare_datasets.py')
  download = tmp_path / 'download'
  layouts.ade20k(str(download))
  label = download / 'ADEChallengeData2016/annotations/training/ADE_training_00000000.png'
  lab = cv2.imread(str(label), cv2.IMREAD_UNCHANGED)
  lab[3, 3] = 151
  cv2.imwrite(str(label), lab)
  proc = _run(tmp_path, ['--dataset=ade20k', f'--manual_dir={download}',
                         f'--data_dir={tmp_path}/tfds'], module=script)
  assert_one_error(proc, f'label {download}/ADEChallengeData2016/annotations/training/'
                   'ADE_training_00000000.png has values outside', '[151]', exit_code=1)
  proc = _run(tmp_path, ['--dataset=ade20k', f'--data_dir={tmp_path}/tfds'], module=script)
  assert_one_error(proc, '--manual_dir is required for ade20k', exit_code=2)

  # The script's other failures come from the same library calls.
  def prepare(name, manual_dir):
    return report(capsys, lambda: datasets.download_and_prepare(
        datasets.get_builder(name, str(tmp_path / 'tfds2')), str(manual_dir)))
  assert prepare('voc', download) == (1, "error: unknown dataset 'voc'; known: ade20k, "
                                          'cityscapes, lip, cocostuff10k, synthetic_scenes')
  assert prepare('ade20k', tmp_path / 'nowhere') == (
      1, f'error: manual_dir {tmp_path}/nowhere does not exist or is not a folder')
  cv2.imwrite(str(label), np.zeros_like(lab))
  image = download / 'ADEChallengeData2016/images/validation/ADE_validation_00000000.jpg'
  image.write_bytes(b'not a jpeg')
  code, message = prepare('ade20k', download)
  assert code == 1 and 'ADE_validation_00000000.jpg' in message, message


# ------------------------------------------------------------------------ the notebook's calls
def test_library_calls_raise_typed_errors_and_never_exit(tmp_path, tiny_checkpoints, pth_files):
  from memseg_jax import config_validation, convert, datasets, main, notebook_utils, predict
  config = tiny_run_config.get_config()
  bad = config.copy_and_resolve_references()
  bad.train.lr = -1.0
  other = config.copy_and_resolve_references()
  other.model.num_classes = 9
  calls = [
      (lambda: main.run(bad, str(tmp_path / 'w')), config_validation.ConfigError),
      (lambda: predict.load_variables(other, str(tiny_checkpoints / 'converted')),
       ckpt_lib.CheckpointMismatchError),
      (lambda: convert.load_ssseg_checkpoint(str(pth_files / 'garbage.pth'), config),
       convert.ConversionError),
      (lambda: datasets.get_builder('voc'), datasets.UnknownDatasetError),
      (lambda: notebook_utils.read_scalars(str(tmp_path)), FileNotFoundError),
  ]
  for call, expected in calls:
    with pytest.raises(expected) as e:
      call()
    assert isinstance(e.value, errors.user_error_types())
    assert '\n' not in str(e.value)
