"""The Colab demo notebook: committed without outputs, and it runs top to bottom in a fresh kernel.

    python -m pytest -m notebook tests/test_notebook.py     # executes it (a few minutes on CPU)

The executed run injects a short schedule through the notebook's `parameters` cell (few steps,
few eval images, a temporary workdir and tfds data dir) and, when PyTorch is installed, a small
SSSegmentation-layout checkpoint and an image, so that the optional conversion cell runs too.
"""

import json
import os
import re

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(REPO, 'notebooks', 'memseg_jax_demo.ipynb')
# Cells (by tag) that must draw a matplotlib figure.
FIGURE_CELLS = ('loss-curve', 'iou', 'predictions', 'memory')
NUM_STEPS = 10


def _read_json_notebook():
  with open(NOTEBOOK, encoding='utf-8') as f:
    return json.load(f)


def _source(cell) -> str:
  source = cell['source']
  return source if isinstance(source, str) else ''.join(source)


def _cell_with_tag(cells, tag):
  tagged = [c for c in cells if tag in c.get('metadata', {}).get('tags', [])]
  assert len(tagged) == 1, f'expected one cell tagged {tag!r}, found {len(tagged)}'
  return tagged[0]


def _assigned_names(source: str):
  return set(re.findall(r'^([A-Z_][A-Z0-9_]*)\s*=', source, flags=re.MULTILINE))


def test_the_committed_notebook_has_its_outputs_cleared():
  nb = _read_json_notebook()
  code_cells = [c for c in nb['cells'] if c['cell_type'] == 'code']
  assert code_cells
  dirty = [i for i, c in enumerate(nb['cells']) if c['cell_type'] == 'code'
           and (c.get('outputs') or c.get('execution_count') is not None)]
  assert not dirty, (f'cells {dirty} of {NOTEBOOK} have outputs or execution counts; clear them '
                     '(Jupyter: "Clear All Outputs"; or `jupyter nbconvert --clear-output '
                     '--inplace`) before committing')


def test_the_notebook_installs_only_in_colab_and_has_the_parameters_it_is_tested_with():
  nb = _read_json_notebook()
  first = next(c for c in nb['cells'] if c['cell_type'] == 'code')
  assert "'google.colab' in sys.modules" in _source(first)
  assert 'pip' in _source(first) and 'REPO_URL' in _source(first)
  parameters = _source(_cell_with_tag(nb['cells'], 'parameters'))
  assert {'NUM_STEPS', 'WORKDIR', 'DATA_DIR', 'EVAL_MAX_IMAGES', 'NUM_EXAMPLES',
          'TORCH_CHECKPOINT', 'CHECKPOINT_CONFIG', 'USER_IMAGE'} <= _assigned_names(parameters)
  for tag in FIGURE_CELLS + ('pretrained',):
    _cell_with_tag(nb['cells'], tag)


# ----------------------------------------------------------------------------- execution

def _write_fake_ssseg_checkpoint(path, config_path):
  """A state_dict in SSSegmentation's layout for the model of `config_path` (random weights with
  sane BatchNorm statistics), saved as {'model': state_dict} like the released files."""
  import torch
  from memseg_jax import convert
  from memseg_jax.config_validation import load_config
  rng = np.random.default_rng(0)
  state_dict = {}
  for key, shape in convert.variable_shapes(load_config(config_path)).items():
    leaf = key[-1]
    if leaf == 'var' or leaf == 'scale':
      value = np.ones(shape)
    elif leaf in ('mean', 'bias'):
      value = np.zeros(shape)
    elif leaf == 'kernel':
      value = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
      value = value.transpose(3, 2, 0, 1)     # HWIO -> OIHW
    else:                                    # the memory
      value = rng.normal(size=shape)
    state_dict[convert.torch_key(key)] = torch.from_numpy(np.asarray(value, np.float32))
  torch.save({'model': state_dict}, str(path))


def _write_user_image(path):
  from PIL import Image
  from memseg_jax.datasets import synthetic_scenes
  image, _ = synthetic_scenes.generate_example(7, 'validation', 0, synthetic_scenes.SMALL)
  Image.fromarray(image).save(str(path))


def _kernel_env(compilation_cache):
  """Like a Colab CPU runtime: one CPU device (no virtual devices), inline figures."""
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                 env.get('XLA_FLAGS', '')).strip()
  if flags:
    env['XLA_FLAGS'] = flags
  else:
    env.pop('XLA_FLAGS', None)
  env.pop('MPLBACKEND', None)
  # A fresh persistent cache: the prediction cell's images are among the evaluated ones, so
  # their programs come from the cache instead of a second compilation.
  env['MEMSEG_COMPILATION_CACHE'] = str(compilation_cache)
  env['TF_CPP_MIN_LOG_LEVEL'] = '2'
  return env


def _texts(cell) -> str:
  parts = []
  for output in cell.get('outputs', []):
    if output.get('output_type') == 'stream' and output.get('name') == 'stdout':
      parts.append(output['text'])
    elif 'data' in output and 'text/plain' in output['data']:
      parts.append(output['data']['text/plain'])
  return ''.join(parts)


def _has_png(cell) -> bool:
  return any('image/png' in output.get('data', {}) for output in cell.get('outputs', []))


@pytest.mark.notebook
@pytest.mark.slow
def test_the_notebook_runs_top_to_bottom_and_draws_its_figures(tmp_path):
  nbclient = pytest.importorskip('nbclient')
  nbformat = pytest.importorskip('nbformat')
  pytest.importorskip('ipykernel')
  pytest.importorskip('matplotlib')
  try:
    import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
    have_torch = True
  except ImportError:
    have_torch = False

  workdir = tmp_path / 'workdir'
  checkpoint = tmp_path / 'memorynet_demo.pth'
  image = tmp_path / 'my_image.png'
  demo_config = os.path.join(REPO, 'configs', 'demo.py')
  if have_torch:
    _write_fake_ssseg_checkpoint(checkpoint, demo_config)
    _write_user_image(image)
  overrides = {
      'NUM_STEPS': NUM_STEPS,
      'WORKDIR': str(workdir),
      'DATA_DIR': str(tmp_path / 'tfds'),
      'EVAL_MAX_IMAGES': 2,
      'NUM_EXAMPLES': 2,
      'TORCH_CHECKPOINT': str(checkpoint),
      'CHECKPOINT_CONFIG': demo_config,
      'USER_IMAGE': str(image),
  }
  nb = nbformat.read(NOTEBOOK, as_version=4)
  parameters = _cell_with_tag(nb.cells, 'parameters')
  assert set(overrides) <= _assigned_names(parameters.source), 'a parameter was renamed'
  parameters.source = '\n'.join(f'{k} = {v!r}' for k, v in overrides.items())

  client = nbclient.NotebookClient(nb, timeout=600, kernel_name='python3',
                                   resources={'metadata': {'path': str(tmp_path)}})
  try:
    client.execute(env=_kernel_env(tmp_path / 'xla_cache'))   # raises CellExecutionError (with the traceback) on error
  finally:
    nbformat.write(nb, str(tmp_path / 'executed.ipynb'))   # to look at when something fails

  errors = [o for c in nb.cells for o in c.get('outputs', []) if o.get('output_type') == 'error']
  assert not errors
  for tag in FIGURE_CELLS:
    assert _has_png(_cell_with_tag(nb.cells, tag)), f'cell {tag!r} drew no figure'

  # The run trained exactly the requested steps and the figures show its numbers.
  train_cell = next(c for c in nb.cells if 'main.run(config, WORKDIR)' in c.source)
  assert f'trained to step {NUM_STEPS}' in _texts(train_cell)
  with open(workdir / 'eval_results.json') as f:
    results = json.load(f)
  assert results['step'] == NUM_STEPS and results['num_images'] == overrides['EVAL_MAX_IMAGES']
  assert f"mIoU {results['mIoU']:.4f}" in _texts(_cell_with_tag(nb.cells, 'iou'))
  # The grid shows the evaluated images (the first of the split) predicted by the same
  # inference, so its pixel accuracy is the evaluation's aAcc: not to the last pixel, because
  # predict.preprocess (used by the grid) and the eval pipeline resize the image with slightly
  # different rounding (up to 0.018 apart after normalisation), which flips a few near-tie
  # pixels. A wrong image, label or palette order would be far off.
  assert overrides['NUM_EXAMPLES'] == overrides['EVAL_MAX_IMAGES']
  grid = re.search(r'pixel accuracy on these 2 images: ([0-9.]+)',
                   _texts(_cell_with_tag(nb.cells, 'predictions')))
  assert grid, _texts(_cell_with_tag(nb.cells, 'predictions'))
  assert abs(float(grid.group(1)) - results['aAcc']) < 0.005, (grid.group(1), results['aAcc'])
  assert 'memory (8, 1, 64)' in _texts(_cell_with_tag(nb.cells, 'memory'))

  pretrained = _cell_with_tag(nb.cells, 'pretrained')
  if have_torch:
    assert _has_png(pretrained), _texts(pretrained)
    assert (workdir / 'predictions' / 'my_image.png').exists()
    assert (workdir / 'predictions' / 'my_image_overlay.png').exists()
  else:
    assert 'Skipped' in _texts(pretrained)
