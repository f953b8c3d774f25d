"""tf.data input pipelines: per-process training batches and padded, bucketed eval batches.

Training (`create_train_dataset`): each process reads its own part of the split (whole TFRecord
files when there are at least as many files as processes, else every P-th record), shuffles
files and records per epoch, applies the reference augmentation (`transforms.train_transform`)
and yields numpy batches of `config.train.batch_size // process_count` examples:

    {'image': float32 (B_host, h, w, 3) normalised RGB, 'label': int32 (B_host, h, w), 255 = ignore}

with (h, w) = config.data.crop_size. The stream is a pure function of (config.seed, process
index, start step): epoch e shuffles with seeds derived from (seed, e), and the augmentation of
the j-th record of epoch e draws from the stateless seed (seed, process, e, j). Resuming at step
s therefore starts epoch e = floor(s * B_host / N_p) directly and skips the first
(s * B_host mod N_p) shuffled records of it, before any decoding; earlier epochs are never read.

Evaluation (`create_eval_dataset`): the whole split is planned first from the stored image sizes
(no decoding): every image is assigned a bucket (its test-time size and its original size, each
rounded up to `config.data.eval_pad_multiple`), buckets are cut into global batches of
B_host * process_count slots and process p takes slots [p * B_host, (p + 1) * B_host) of each.
All processes thus see the same sequence of shapes, every image appears exactly once, and the
padding slots of the last batch of each bucket are masked by `valid`.

TensorFlow never sees an accelerator: the pipeline runs on the host CPU only. With the OpenCV
backend (see `transforms`), OpenCV is set to one thread per call (tf.data runs calls in
parallel).
"""

import dataclasses
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from memseg_jax import datasets
from memseg_jax import transforms
from memseg_jax.config_validation import ConfigError


def _single_threaded_opencv(data_config):
  # tf.data supplies the parallelism; OpenCV's own threads would oversubscribe the cores.
  if transforms.resolve_backend(data_config.get('backend', 'auto')) == 'opencv':
    import cv2  # pylint: disable=g-import-not-at-top
    cv2.setNumThreads(1)


def hide_accelerators_from_tf():
  """Keeps TensorFlow off GPUs/TPUs (they belong to JAX)."""
  for kind in ('GPU', 'TPU'):
    try:
      tf.config.set_visible_devices([], kind)
    except (RuntimeError, ValueError):
      pass  # already initialised, or no such device type


# ----------------------------------------------------------------------------- reading

@dataclasses.dataclass
class _SplitFiles:
  paths: List[str]
  lengths: List[int]

  @property
  def num_examples(self) -> int:
    return int(sum(self.lengths))


def _builder(config):
  return datasets.require_prepared(config.data.name, config.data.data_dir or None)


def _split_files(builder, name: str, split: str) -> _SplitFiles:
  """TFRecord shards (in split order) of a split expression such as 'train+validation'."""
  split = datasets.resolve_split(name, split)
  paths, lengths = [], []
  for part in split.split('+'):
    if part not in builder.info.splits:
      raise ConfigError(f'dataset {name!r} has no split {part!r} (config.data.train_split / '
                        f'eval_split); it has {sorted(builder.info.splits)}')
    info = builder.info.splits[part]
    paths += [os.path.join(builder.data_dir, f) for f in info.filenames]
    lengths += list(info.shard_lengths)
  return _SplitFiles(paths, lengths)


def _parse_fn(builder):
  features = builder.info.features
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  decoders = {'image': tfds.decode.SkipDecoding(), 'label': tfds.decode.SkipDecoding()}

  def parse(serialized):
    return features.deserialize_example(serialized, decoders=decoders)

  return parse


def _decode(example):
  image = tf.io.decode_image(example['image'], channels=3, expand_animations=False)
  label = tf.io.decode_png(example['label'], channels=1)[..., 0]
  return image, label


def _image_region_fn(data):
  """(y0, x0, h, w) -> that rectangle of the encoded image; JPEGs decode only that part."""

  def region(y0, x0, h, w):
    def jpeg():
      return tf.io.decode_and_crop_jpeg(data, tf.stack([y0, x0, h, w]), channels=3)

    def other():
      img = tf.io.decode_image(data, channels=3, expand_animations=False)
      return img[y0:y0 + h, x0:x0 + w]

    return tf.cond(tf.io.is_jpeg(data), jpeg, other)

  return region


_RAW_SPEC = {'image': tf.io.FixedLenFeature([], tf.string),
             'label': tf.io.FixedLenFeature([], tf.string)}


def _records(paths) -> tf.data.Dataset:
  return tf.data.TFRecordDataset(paths, buffer_size=8 << 20)


def _options(num_threads: Optional[int] = None) -> tf.data.Options:
  opts = tf.data.Options()
  opts.deterministic = True
  opts.experimental_optimization.map_parallelization = True
  if num_threads:
    opts.threading.private_threadpool_size = int(num_threads)
    opts.threading.max_intra_op_parallelism = 1
  return opts


def _parallel_calls(d):
  """config.data.num_parallel_calls: -1 -> AUTOTUNE, 0 -> sequential map, n -> n."""
  n = int(d.num_parallel_calls)
  return tf.data.AUTOTUNE if n < 0 else (n or None)


# ----------------------------------------------------------------------------- counts

def get_num_train_examples(config) -> int:
  """Size of the training split, or `config.data.num_train_images` if it is not prepared."""
  builder = datasets.get_builder(config.data.name, config.data.data_dir or None)
  if not datasets.is_prepared(builder):
    return int(config.data.num_train_images)
  return _split_files(builder, config.data.name, config.data.train_split).num_examples


def iterations_per_epoch(config, num_devices: int) -> int:
  """floor(ceil(N / W) / B_per_device): DistributedSampler padding + drop_last (spec 5)."""
  n = get_num_train_examples(config)
  per_device = config.train.batch_size // num_devices
  if per_device < 1:
    raise ConfigError(f'config.train.batch_size={config.train.batch_size} < number of devices '
                      f'{num_devices}')
  return max(1, math.ceil(n / num_devices) // per_device)


# ----------------------------------------------------------------------------- training

def _process_part(files: _SplitFiles, process_index: int, process_count: int):
  """(paths, num_examples, record-level sharding?) of this process."""
  if len(files.paths) >= process_count:
    idx = list(range(process_index, len(files.paths), process_count))
    return [files.paths[i] for i in idx], sum(files.lengths[i] for i in idx), False
  n = files.num_examples
  count = len(range(process_index, n, process_count))
  return list(files.paths), count, True


def train_records(config, *, process_index: int = 0, process_count: int = 1,
                  start_step: int = 0, builder=None) -> tf.data.Dataset:
  """This process's endless stream of (epoch, position in epoch, serialized record).

  Starts at the record that batch `start_step` begins with; no record is decoded here.
  """
  d = config.data
  builder = builder or _builder(config)
  files = _split_files(builder, d.name, d.train_split)
  paths, n_p, record_shard = _process_part(files, process_index, process_count)
  if n_p == 0:
    raise ConfigError(f'process {process_index} of {process_count} has no training example '
                      f'({files.num_examples} in split config.data.train_split={d.train_split!r})')
  b_host = config.train.batch_size // process_count
  if b_host < 1 or config.train.batch_size % process_count:
    raise ConfigError(f'config.train.batch_size={config.train.batch_size} is not a multiple of '
                      f'the process count {process_count}')
  seed = int(config.seed)
  shuffle_buffer = int(d.shuffle_buffer)
  paths_t = tf.constant(paths)
  cycle = min(4, len(paths))

  def epoch(e):
    e = tf.cast(e, tf.int64)
    if record_shard:
      # Record-level sharding needs the global record order: files stay in split order.
      ds = _records(paths_t).enumerate()
      ds = ds.filter(lambda i, _: i % process_count == process_index).map(lambda i, x: x)
    else:
      file_seed = tf.stack([tf.constant(seed, tf.int64), e * 1000 + process_index])
      order = tf.random.experimental.stateless_shuffle(paths_t, tf.cast(file_seed, tf.int32))
      ds = tf.data.Dataset.from_tensor_slices(order).interleave(
          _records, cycle_length=cycle, block_length=1, num_parallel_calls=cycle,
          deterministic=True)
    if shuffle_buffer > 1:
      ds = ds.shuffle(shuffle_buffer, seed=(seed * 1_000_003 + e * 7919 + process_index),
                      reshuffle_each_iteration=False)
    return ds.enumerate().map(lambda j, x: (e, j, x))

  e0, k0 = divmod(int(start_step) * b_host, n_p)
  return epoch(e0).skip(k0).concatenate(
      tf.data.Dataset.range(e0 + 1, 1 << 62).flat_map(epoch))


def build_train_dataset(config, *, process_index: int = 0, process_count: int = 1,
                        start_step: int = 0, num_threads: Optional[int] = None,
                        builder=None, batch: bool = True) -> tf.data.Dataset:
  """The training `tf.data.Dataset` (see the module docstring); `create_train_dataset` wraps it."""
  hide_accelerators_from_tf()
  d = config.data
  _single_threaded_opencv(d)
  seed = int(config.seed)
  ds = train_records(config, process_index=process_index, process_count=process_count,
                     start_step=start_step, builder=builder)

  def preprocess(e, j, serialized):
    ex = tf.io.parse_single_example(serialized, _RAW_SPEC)
    label = tf.io.decode_png(ex['label'], channels=1)[..., 0]
    s = transforms.example_seed(seed, process_index, e, j)
    image, label = transforms.train_transform(s, _image_region_fn(ex['image']), label, d)
    return {'image': image, 'label': label}

  ds = ds.map(preprocess, num_parallel_calls=_parallel_calls(d), deterministic=True)
  if batch:
    ds = ds.batch(config.train.batch_size // process_count, drop_remainder=True)
  ds = ds.prefetch(int(d.prefetch) if int(d.prefetch) > 0 else tf.data.AUTOTUNE)
  return ds.with_options(_options(num_threads))


def create_train_dataset(config, *, process_index: int = 0, process_count: int = 1,
                         start_step: int = 0) -> Iterator[Dict[str, np.ndarray]]:
  """Iterator of numpy training batches of this process, starting at `start_step`.

  Yields {'image': float32 (B_host, h, w, 3), 'label': int32 (B_host, h, w)} with
  B_host = config.train.batch_size // process_count and (h, w) = config.data.crop_size.
  """
  ds = build_train_dataset(config, process_index=process_index, process_count=process_count,
                           start_step=start_step)
  return ds.as_numpy_iterator()


# ----------------------------------------------------------------------------- evaluation

def test_resize_size_np(hw: Sequence[int], scale: Sequence[float], keep_ratio: bool):
  """numpy twin of `transforms.rescale_size` (same float64 arithmetic) for planning."""
  h, w = float(hw[0]), float(hw[1])
  big, small = math.floor(max(scale)), math.floor(min(scale))
  if keep_ratio:
    f = min(big / max(h, w), small / min(h, w))
    return int(math.floor(h * f + 0.5)), int(math.floor(w * f + 0.5))
  return (int(big), int(small)) if h > w else (int(small), int(big))


@dataclasses.dataclass
class EvalPlan:
  """The global eval schedule (identical on every process)."""
  buckets: List[Tuple[int, int, int, int]]      # (Hp, Wp, Lh, Lw) of each bucket, in order
  bucket_of: np.ndarray                         # (N,) bucket index of each record
  owner: np.ndarray                             # (N,) process that yields each record
  per_process: List[Tuple[int, int]]            # per bucket: (slots per process, batches)
  batch_size: int                               # B_host
  num_examples: int

  @property
  def num_batches(self) -> int:
    return int(sum(b for _, b in self.per_process))


def _read_sizes(paths) -> Tuple[np.ndarray, np.ndarray]:
  spec = {'height': tf.io.FixedLenFeature([], tf.int64),
          'width': tf.io.FixedLenFeature([], tf.int64)}
  ds = _records(paths).batch(256).map(lambda x: tf.io.parse_example(x, spec))
  hs, ws = [], []
  for b in ds.as_numpy_iterator():
    hs.append(b['height'])
    ws.append(b['width'])
  if not hs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64)
  return np.concatenate(hs), np.concatenate(ws)


def plan_eval(heights, widths, data_config, batch_size: int, process_count: int) -> EvalPlan:
  """Buckets and slot assignment for `len(heights)` images (see the module docstring)."""
  mult = int(data_config.get('eval_pad_multiple', 64))
  scale = tuple(float(s) for s in data_config.eval_scale)
  keys = []
  for h, w in zip(heights, widths):
    rh, rw = test_resize_size_np((h, w), scale, bool(data_config.eval_keep_ratio))
    keys.append((transforms.round_up(rh, mult), transforms.round_up(rw, mult),
                 transforms.round_up(int(h), mult), transforms.round_up(int(w), mult)))
  buckets = sorted(set(keys))
  index = {k: i for i, k in enumerate(buckets)}
  n = len(keys)
  bucket_of = np.array([index[k] for k in keys], np.int64)
  owner = np.full(n, -1, np.int64)
  g = batch_size * process_count
  per_process = []
  for b in range(len(buckets)):
    members = np.flatnonzero(bucket_of == b)         # ascending = file order
    num_batches = -(-len(members) // g)
    slots = np.arange(len(members))
    owner[members] = (slots % g) // batch_size
    per_process.append((num_batches * batch_size, num_batches))
  return EvalPlan(buckets, bucket_of, owner, per_process, batch_size, n)


def _eval_example(serialized_parse, d, bucket):
  hp, wp, lh, lw = bucket

  def fn(i, serialized):
    ex = serialized_parse(serialized)
    image, label = _decode(ex)
    orig_hw = tf.shape(label)[:2]
    new_hw = transforms.test_resize_size(orig_hw, d)
    if transforms.resolve_backend(d.get('backend', 'auto')) == 'opencv':
      image = transforms.resize_image_window_opencv(image, new_hw, (0, 0, new_hw[0], new_hw[1]))
    else:
      image = transforms.resize_image(image, new_hw)
    image = transforms.normalize(image, d.mean, d.std)
    image = tf.pad(image, [[0, hp - new_hw[0]], [0, wp - new_hw[1]], [0, 0]])
    label = tf.pad(tf.cast(label, tf.int32), [[0, lh - orig_hw[0]], [0, lw - orig_hw[1]]],
                   constant_values=transforms.IGNORE_INDEX)
    return {
        'image': tf.ensure_shape(image, [hp, wp, 3]),
        'image_hw': tf.cast(new_hw, tf.int32),
        'label': tf.ensure_shape(label, [lh, lw]),
        'orig_hw': tf.cast(orig_hw, tf.int32),
        'valid': tf.constant(True),
        'file_name': ex['file_name'],
        'index': tf.cast(i, tf.int32),
    }

  return fn


def _padding_example(bucket):
  hp, wp, lh, lw = bucket
  return {
      'image': tf.zeros([hp, wp, 3], tf.float32),
      'image_hw': tf.zeros([2], tf.int32),
      'label': tf.fill([lh, lw], tf.constant(transforms.IGNORE_INDEX, tf.int32)),
      'orig_hw': tf.zeros([2], tf.int32),
      'valid': tf.constant(False),
      'file_name': tf.constant(''),
      'index': tf.constant(-1, tf.int32),
  }


def build_eval_dataset(config, *, process_index: int = 0, process_count: int = 1,
                       batch_size: Optional[int] = None, builder=None,
                       num_threads: Optional[int] = None):
  """(tf.data.Dataset of eval batches, EvalPlan); `create_eval_dataset` wraps it."""
  hide_accelerators_from_tf()
  d = config.data
  _single_threaded_opencv(d)
  builder = builder or _builder(config)
  files = _split_files(builder, d.name, d.eval_split)
  global_batch = int(batch_size or config.eval.batch_size)
  b_host = max(1, global_batch // process_count)
  heights, widths = _read_sizes(files.paths)
  max_images = int(config.eval.get('max_images', -1))
  if max_images >= 0:
    heights, widths = heights[:max_images], widths[:max_images]
  plan = plan_eval(heights, widths, d, b_host, process_count)
  parse = _parse_fn(builder)
  mine = tf.constant(plan.owner == process_index)
  bucket_of = tf.constant(plan.bucket_of)
  n = plan.num_examples
  raw = _records(files.paths).take(n).enumerate()
  raw = raw.filter(lambda i, _: tf.gather(mine, i))
  if len(plan.buckets) > 1:
    # Bucket-major order differs from file order: hold this process's encoded records in
    # memory (a 1/P share of the encoded split) instead of re-reading the split per bucket.
    idx, ser = [], []
    for i, s in raw.as_numpy_iterator():
      idx.append(i)
      ser.append(s)
    raw = tf.data.Dataset.from_tensor_slices(
        (tf.constant(np.array(idx, np.int64)), tf.constant(np.array(ser, dtype=object))))
  npc = _parallel_calls(d)
  ds = None
  for b, bucket in enumerate(plan.buckets):
    slots, _ = plan.per_process[b]
    mine_here = int(np.sum((plan.owner == process_index) & (plan.bucket_of == b)))
    part = raw.filter(lambda i, _, b=b: tf.equal(tf.gather(bucket_of, i), b))
    part = part.map(_eval_example(parse, d, bucket), num_parallel_calls=npc, deterministic=True)
    if slots > mine_here:
      part = part.concatenate(
          tf.data.Dataset.from_tensors(_padding_example(bucket)).repeat(slots - mine_here))
    part = part.batch(b_host, drop_remainder=True)
    ds = part if ds is None else ds.concatenate(part)
  if ds is None:
    raise ConfigError(f'eval split config.data.eval_split={d.eval_split!r} of {d.name!r} is empty')
  ds = ds.prefetch(2).with_options(_options(num_threads))
  return ds, plan


def create_eval_dataset(config, *, process_index: int = 0, process_count: int = 1,
                        batch_size: Optional[int] = None) -> Iterator[Dict[str, np.ndarray]]:
  """Iterator of numpy eval batches of this process (every image exactly once overall).

  Each batch: 'image' float32 (B, Hp, Wp, 3) normalised, test-time resized, zero-padded at the
  bottom/right; 'image_hw' int32 (B, 2) the resized size; 'label' int32 (B, Lh, Lw) at the
  original resolution, padded with 255; 'orig_hw' int32 (B, 2); 'valid' bool (B,) (False for
  padding slots); 'file_name' bytes (B,); 'index' int32 (B,) record index in the split (-1 for
  padding). B = max(1, batch_size // process_count), batch_size defaulting to
  config.eval.batch_size (global). Shapes come from a few buckets; all processes see the same
  sequence of shapes and the same number of batches.
  """
  ds, _ = build_eval_dataset(config, process_index=process_index, process_count=process_count,
                             batch_size=batch_size)
  return ds.as_numpy_iterator()
