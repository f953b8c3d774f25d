"""Predict segmentation masks for arbitrary images: palette PNG masks and side-by-side overlays.

    python -m memseg_jax.predict --config=configs/ade20k.py --checkpoint=/path/to/ckpt \
        --input='photos/*.jpg' --output=/tmp/masks

For every input image (any format PIL reads, converted to RGB) this applies the dataset's
test-time resize (`config.data.eval_scale`, `eval_keep_ratio`; the same ops as the eval
pipeline, `memseg_jax.transforms`) and normalisation, runs `evaluate.inference` with the
config's `inference` block (whole or slide, scales, flip), and writes, under --output, keeping
the inputs' relative folder layout:

    NAME.png          mode 'P' mask at the original size, palette = the dataset's colours
    NAME_overlay.png  [original image | mask blended over it]

--checkpoint is a converted checkpoint (`python -m memseg_jax.convert`), a training workdir,
its `checkpoints` folder or one step folder of it. Only the model's variables are restored
(`checkpoint.restore_eval_variables`); nothing of the trainer is built. Bad input (no images, a
checkpoint that is missing or of another config, an image that cannot be decoded, an output
folder that cannot be written) ends the program with one `error: ...` line, naming it, before
anything is compiled.
"""

import glob
import os
from typing import Dict, List, Sequence, Tuple

from absl import app
import jax
import numpy as np

from memseg_jax import errors
from memseg_jax import evaluate
from memseg_jax import visualize
from memseg_jax.errors import UserError

class ImageError(UserError, ValueError):
  """An input image that cannot be decoded (the message names the file)."""


IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff', '.gif', '.ppm')


def find_images(pattern: str) -> List[str]:
  """Sorted image files of a directory (recursively) or a glob pattern; error if none."""
  if os.path.isdir(pattern):
    paths = [os.path.join(root, name) for root, _, names in os.walk(pattern) for name in names
             if name.lower().endswith(IMAGE_EXTENSIONS)]
  else:
    paths = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
  if not paths:
    raise FileNotFoundError(f'--input={pattern!r}: no image files found (give a directory or '
                            f'a glob pattern such as "photos/*.jpg")')
  return sorted(paths)


def read_image(path: str) -> np.ndarray:
  """(H, W, 3) uint8 RGB; ImageError naming the file if it cannot be decoded."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  try:
    with Image.open(path) as image:
      return np.asarray(image.convert('RGB'))
  except Exception as e:  # pylint: disable=broad-except
    raise ImageError(f'cannot read image {path}: {errors.one_line(e)}') from None


def preprocess(image: np.ndarray, data_config) -> np.ndarray:
  """Test-time resize + normalisation of a uint8 RGB image, as the eval pipeline does."""
  from memseg_jax import transforms  # pylint: disable=import-outside-toplevel
  size = transforms.test_resize_size(image.shape[:2], data_config)
  if transforms.resolve_backend(data_config.get('backend', 'auto')) == 'opencv':
    resized = transforms.resize_image_window_opencv(image, size, (0, 0, size[0], size[1]))
  else:
    resized = transforms.resize_image(image, size)
  return np.asarray(transforms.normalize(resized, data_config.mean, data_config.std))


def load_variables(config, checkpoint_path: str) -> Dict:
  """Host variables of a converted or training checkpoint (checkpoint.restore_eval_variables)."""
  from memseg_jax import checkpoint  # pylint: disable=import-outside-toplevel
  if not os.path.exists(checkpoint_path):
    raise FileNotFoundError(f'--checkpoint: no such file or directory: {checkpoint_path}')
  variables, _ = checkpoint.restore_eval_variables(os.path.abspath(checkpoint_path), config)
  return variables


def check_images(paths: Sequence[str]) -> None:
  """ImageError naming the first file PIL cannot open (header check; cheap, before compiling)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  for path in paths:
    try:
      with Image.open(path) as image:
        image.verify()
    except Exception as e:  # pylint: disable=broad-except
      raise ImageError(f'cannot read image {path}: {errors.one_line(e)}') from None


def _output_paths(paths: Sequence[str], output_dir: str) -> List[Tuple[str, str]]:
  root = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  out = []
  for p in paths:
    stem = os.path.splitext(os.path.relpath(os.path.abspath(p), root))[0]
    out.append((os.path.join(output_dir, stem + '.png'),
                os.path.join(output_dir, stem + '_overlay.png')))
  return out


def predict_images(config, variables, paths: Sequence[str], output_dir: str,
                   *, model=None, progress: bool = True) -> List[Tuple[str, str]]:
  """Writes a palette mask and an overlay per image; returns [(mask path, overlay path)]."""
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  _, palette = evaluate.dataset_metadata(config)
  settings = evaluate.InferenceSettings.from_config(config)
  device = jax.local_devices()[0]
  forward_fn = evaluate.make_forward_fn(model or build_model(config, platform=device.platform))
  variables = jax.device_put(jax.tree_util.tree_map(np.asarray, variables), device)
  outputs = _output_paths(paths, output_dir)
  for path, (mask_path, overlay_path) in tqdm(list(zip(paths, outputs)), desc='predict',
                                              unit='img', disable=not progress):
    image = read_image(path)
    x = preprocess(image, config.data)
    scores = evaluate.inference(forward_fn, variables, x[None], out_hw=image.shape[:2],
                                settings=settings)
    pred = np.asarray(jax.numpy.argmax(scores[0], axis=-1)).astype(np.uint8)
    os.makedirs(os.path.dirname(mask_path), exist_ok=True)
    visualize.mask_to_pil(pred, palette).save(mask_path)
    from PIL import Image  # pylint: disable=import-outside-toplevel
    row = visualize.side_by_side([image, visualize.overlay(image, pred, palette)])
    Image.fromarray(row).save(overlay_path)
  return outputs


def run(config, checkpoint_path: str, input_pattern: str, output_dir: str,
        progress: bool = True) -> List[Tuple[str, str]]:
  """What `python -m memseg_jax.predict` does (library entry): masks and overlays of the images.

  Every input is checked before anything is compiled: the images (found, decodable), the
  output folder (writable), the checkpoint (present, of this config's model).
  """
  from memseg_jax import checkpoint  # pylint: disable=import-outside-toplevel
  paths = find_images(input_pattern)
  check_images(paths)
  output_dir = checkpoint.check_writable(os.path.abspath(output_dir), '--output')
  variables = load_variables(config, checkpoint_path)
  evaluate.dataset_metadata(config)     # a class count that differs from the dataset's
  return predict_images(config, variables, paths, output_dir, progress=progress)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  config = _CONFIG.value
  if config is None or not _CHECKPOINT.value or not _INPUT.value or not _OUTPUT.value:
    raise app.UsageError('--config, --checkpoint, --input and --output are required')
  outputs = run(config, _CHECKPOINT.value, _INPUT.value, _OUTPUT.value)
  print(f'wrote {len(outputs)} masks and overlays to {os.path.abspath(_OUTPUT.value)}')


if __name__ == '__main__':
  # Flags are defined only when run as a program, so importing this module next to
  # memseg_jax.main (which also defines --config) does not clash.
  from absl import flags
  from ml_collections import config_flags

  _CONFIG = config_flags.DEFINE_config_file('config', None, 'config file (configs/*.py)')
  _CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'converted or training checkpoint dir')
  _INPUT = flags.DEFINE_string('input', None, 'image directory or glob pattern')
  _OUTPUT = flags.DEFINE_string('output', None, 'output directory')
  errors.run_program(main)
