r"""Training input throughput per CPU core: memseg_jax's tf.data pipeline vs the reference's.

    python scripts/bench_input_pipeline.py --cores=1 --num_images=64 --seconds=20

Writes `--num_images` synthetic ADE20K-sized images (512x683 JPEG, quality 90) with labels made
of random blobs of ~10 classes (ignore pixels included) in the official ADE20K layout, prepares
them with the ade20k builder, then measures
  1. memseg_jax: `input_pipeline.build_train_dataset` (TFRecord read, JPEG/PNG decode, random
     resize (2048, 512) x [0.5, 2), 512x512 crop with cat_max_ratio 0.75, flip, photometric
     distortion, normalise, pad, batching) with tf.data limited to `--cores` threads;
  2. the reference (SSSegmentation 1.7.0 transforms, imported from `ssseg`) on the same files:
     cv2.imread of image and label, Resize, RandomCrop, RandomFlip, PhotoMetricDistortion,
     Normalize, ToTensor, Padding, in one Python thread with OpenCV/torch set to 1 thread.
The process is pinned to `--cores` CPUs (sched_setaffinity), so images/s divided by `--cores`
is the per-core figure; images per CPU-second (process CPU time, all threads) is also printed,
which is the fairer figure on a machine shared with other jobs. Labels are already train ids,
so neither side pays a label remap (the reference remaps in its dataset class, our builder at
preparation); the reference side maps 0 to ignore with one comparison.
"""

import os
import sys
import tempfile
import time
import types

from absl import app
from absl import flags

FLAGS = flags.FLAGS
flags.DEFINE_integer('cores', 1, 'CPUs to pin the process to (and tf.data threads).')
flags.DEFINE_integer('num_images', 48, 'Synthetic images to generate.')
flags.DEFINE_float('seconds', 15.0, 'Measuring time per pipeline (after warm-up).')
flags.DEFINE_integer('batch_size', 8, 'Batch size of our pipeline (per process).')
flags.DEFINE_string('workdir', '', 'Where to write the images and TFRecords (default: temp).')
flags.DEFINE_bool('reference', True, 'Also run the reference transforms.')
flags.DEFINE_enum('backend', 'auto', ['auto', 'opencv', 'tf'],
                  'Pixel backend of memseg_jax.transforms (config.data.backend).')


def _pin(cores: int):
  avail = sorted(os.sched_getaffinity(0))
  os.sched_setaffinity(0, set(avail[:cores]))
  os.environ.setdefault('OMP_NUM_THREADS', str(cores))


def make_images(root: str, n: int, seed: int = 0):
  """ADE20K-layout folder with n 512x683 JPEG images and blob labels."""
  import cv2
  import numpy as np
  rng = np.random.default_rng(seed)
  for split in ('training', 'validation'):
    os.makedirs(os.path.join(root, 'images', split), exist_ok=True)
    os.makedirs(os.path.join(root, 'annotations', split), exist_ok=True)
  h, w = 512, 683
  yy, xx = np.mgrid[0:h, 0:w]
  for i in range(n):
    split = 'training' if i < n - 2 else 'validation'
    label = np.zeros((h, w), np.uint8)   # 0 = unlabelled in ADE20K
    base = rng.integers(1, 151)
    label[:] = base
    for _ in range(10):
      cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(30, 200)
      label[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.integers(0, 151)
    palette = rng.integers(0, 256, (256, 3))
    image = palette[label].astype(np.float64) + rng.normal(0, 20, (h, w, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    name = f'ADE_{split}_{i:08d}'
    cv2.imwrite(os.path.join(root, 'images', split, name + '.jpg'), image,
                [cv2.IMWRITE_JPEG_QUALITY, 90])
    cv2.imwrite(os.path.join(root, 'annotations', split, name + '.png'), label)


def bench_ours(data_dir: str, manual_dir: str, cores: int, seconds: float, batch_size: int,
               backend: str = 'auto'):
  from configs import default
  from memseg_jax import datasets
  from memseg_jax import input_pipeline
  builder = datasets.get_builder('ade20k', data_dir)
  if not datasets.is_prepared(builder):
    datasets.download_and_prepare(builder, manual_dir)
  config = default.get_config()
  config.data.data_dir = data_dir
  config.train.batch_size = batch_size
  config.data.num_parallel_calls = 0 if cores == 1 else cores
  config.data.shuffle_buffer = 64
  config.data.backend = backend
  ds = input_pipeline.build_train_dataset(config, builder=builder, num_threads=cores)
  it = iter(ds)
  for _ in range(3):
    next(it)
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    b = next(it)
    n += int(b['image'].shape[0])
  return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def _install_torchvision_stand_in():
  # `import ssseg.modules` imports torchvision (used only by its SAM-family models); its PyPI
  # wheel does not load beside the CPU torch, and the transforms never call it. Every name
  # looked up in the stand-in is a function that raises.
  def unavailable(*args, **kwargs):
    raise RuntimeError('torchvision stand-in: not available in this benchmark')

  names = ('torchvision', 'torchvision.transforms', 'torchvision.transforms.functional',
           'torchvision.ops', 'torchvision.ops.boxes')
  for name in names:
    if name not in sys.modules:
      module = types.ModuleType(name)
      module.__getattr__ = lambda attr: unavailable
      sys.modules[name] = module
  for name in names[1:]:
    parent, child = name.rsplit('.', 1)
    setattr(sys.modules[parent], child, sys.modules[name])


def bench_reference(manual_dir: str, seconds: float):
  import cv2
  import numpy as np
  import torch
  cv2.setNumThreads(1)
  torch.set_num_threads(1)
  _install_torchvision_stand_in()
  from ssseg.modules.datasets.pipelines import transforms as T
  pipeline = T.Compose([
      T.Resize(output_size=(2048, 512), keep_ratio=True, scale_range=(0.5, 2.0)),
      T.RandomCrop(crop_size=(512, 512), one_category_max_ratio=0.75, ignore_index=255),
      T.RandomFlip(prob=0.5),
      T.PhotoMetricDistortion(),
      T.Normalize(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375]),
      T.ToTensor(),
      T.Padding(output_size=(512, 512), data_type='tensor', seg_target_fill_value=255),
  ])
  img_dir = os.path.join(manual_dir, 'images', 'training')
  ann_dir = os.path.join(manual_dir, 'annotations', 'training')
  names = sorted(f[:-4] for f in os.listdir(img_dir))
  np.random.seed(0)

  def one(name):
    image = cv2.imread(os.path.join(img_dir, name + '.jpg'))
    label = cv2.imread(os.path.join(ann_dir, name + '.png'), cv2.IMREAD_GRAYSCALE)
    label = label.astype(np.float32)
    label[label == 0] = 255      # stands for the remap, in one comparison
    out = pipeline({'image': image, 'seg_target': label, 'width': image.shape[1],
                    'height': image.shape[0]})
    assert tuple(out['image'].shape) == (3, 512, 512), out['image'].shape
    return out

  for name in names[:3]:
    one(name)
  n, t0, c0 = 0, time.perf_counter(), time.process_time()
  while time.perf_counter() - t0 < seconds:
    one(names[n % len(names)])
    n += 1
  return n / (time.perf_counter() - t0), n / (time.process_time() - c0)


def main(argv):
  del argv
  _pin(FLAGS.cores)
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  work = FLAGS.workdir or tempfile.mkdtemp(prefix='memseg_bench_')
  manual_dir = os.path.join(work, 'download')
  data_dir = os.path.join(work, 'tfds')
  if not os.path.exists(os.path.join(manual_dir, 'images')):
    make_images(manual_dir, FLAGS.num_images)
  ref = None
  if FLAGS.reference:
    ref, ref_cpu = bench_reference(manual_dir, FLAGS.seconds)
    print(f'reference (ssseg transforms, OpenCV): {ref:.1f} images/s wall on {FLAGS.cores} '
          f'core(s) = {ref / FLAGS.cores:.1f} images/s/core; {ref_cpu:.1f} images per CPU-second',
          flush=True)
  ours, ours_cpu = bench_ours(data_dir, manual_dir, FLAGS.cores, FLAGS.seconds, FLAGS.batch_size,
                              FLAGS.backend)
  print(f'memseg_jax tf.data pipeline (backend {FLAGS.backend}): {ours:.1f} images/s wall on '
        f'{FLAGS.cores} core(s) = '
        f'{ours / FLAGS.cores:.1f} images/s/core; {ours_cpu:.1f} images per CPU-second',
        flush=True)
  if ref:
    print(f'ratio memseg_jax / reference: {ours / ref:.2f} (wall), {ours_cpu / ref_cpu:.2f} '
          '(per CPU-second)')


if __name__ == '__main__':
  app.run(main)
