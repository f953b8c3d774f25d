r"""Builds a memseg_jax dataset (TFRecords in a tfds data dir) from the official download.

    python scripts/prepare_datasets.py --dataset=ade20k \
        --manual_dir=~/downloads/ade20k --data_dir=~/tensorflow_datasets
    python scripts/prepare_datasets.py --dataset=synthetic_scenes      # no download needed
    python scripts/prepare_datasets.py --dataset=synthetic_scenes/ade

`--manual_dir` holds the download as zip archives or extracted (see each builder's docstring in
memseg_jax/datasets/ for the files it expects). `--data_dir` defaults to $MEMSEG_DATA_DIR, else
~/tensorflow_datasets; training configs read it from config.data.data_dir. Progress bars come
from tfds. Bad input (corrupt image, label of the wrong size or with values outside the
dataset's range, missing or empty folder) stops with a message naming the file or folder;
`--skip_corrupt` skips undecodable images instead, and reports how many. Every error ends the
script with one `error: ...` line and a non-zero exit status (`memseg_jax.errors`).
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from memseg_jax import datasets, errors  # pylint: disable=g-import-not-at-top

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', None, f'One of {", ".join(datasets.NAMES)} (optionally /config).')
flags.DEFINE_string('manual_dir', '', 'Folder with the official download (zips or extracted).')
flags.DEFINE_string('data_dir', '', 'tfds data dir ($MEMSEG_DATA_DIR or ~/tensorflow_datasets).')
flags.DEFINE_bool('skip_corrupt', False, 'Skip (and count) images that cannot be decoded.')
flags.mark_flag_as_required('dataset')


def main(argv):
  """Prepares --dataset; bad input ends it with one `error:` line (`errors.run_program`)."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  builder = datasets.get_builder(FLAGS.dataset, FLAGS.data_dir or None,
                                 skip_corrupt=FLAGS.skip_corrupt)
  if datasets.is_prepared(builder):
    print(f'{FLAGS.dataset} is already prepared in {builder.data_dir}')
    return 0
  if not FLAGS.dataset.startswith('synthetic_scenes') and not FLAGS.manual_dir:
    raise app.UsageError(f'--manual_dir is required for {FLAGS.dataset} (the folder with the '
                         'official download)')
  datasets.download_and_prepare(builder, FLAGS.manual_dir or None)
  skipped = getattr(builder, 'skipped_files', [])
  for name in builder.info.splits:
    print(f'{FLAGS.dataset}/{name}: {builder.info.splits[name].num_examples} examples')
  if skipped:
    print(f'skipped {len(skipped)} corrupt image(s):')
    for f in skipped[:20]:
      print(f'  {f}')
  print(f'prepared in {builder.data_dir}')
  return 0


if __name__ == '__main__':
  errors.run_program(lambda argv: sys.exit(main(argv)))
