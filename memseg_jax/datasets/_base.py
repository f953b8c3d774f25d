"""What every dataset builder shares: reading a download, checking it, writing examples.

A builder here is a tfds `GeneratorBasedBuilder` that reads the official download from
`manual_dir`, either extracted or as the original zip files (or a mix: every `*.zip` directly or
deeper inside `manual_dir` is read as if it were extracted next to it). Files are found by the
tail of their path (e.g. `images/training/*.jpg`), so the extra top folders that archives add
do not matter.

Each example holds
- `image`: the source bytes, unchanged (JPEG, or PNG for Cityscapes), decoded once here to
  check them;
- `label`: a PNG (H, W, 1) uint8 of train ids, 255 = ignore, already remapped;
- `file_name`: the image path relative to the download;
- `height`, `width`: the image size (so that evaluation can plan its batches without decoding).

Bad input stops preparation with a `PreparationError` naming the file or folder at fault; a
corrupt image can instead be skipped (`skip_corrupt=True`), counted and reported.
"""

import dataclasses
import os
import re
import zipfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from memseg_jax.errors import UserError

IGNORE_INDEX = 255


class PreparationError(UserError, ValueError):
  """The download at `manual_dir` cannot be turned into a dataset (message names the culprit)."""


@dataclasses.dataclass(frozen=True)
class DatasetMeta:
  """Static facts about a dataset, next to its builder."""
  name: str
  num_classes: int
  class_names: Tuple[str, ...]
  palette: Tuple[Tuple[int, int, int], ...]
  ignore_index: int = IGNORE_INDEX
  split_aliases: Tuple[Tuple[str, str], ...] = ()

  def __post_init__(self):
    if len(self.class_names) != self.num_classes or len(self.palette) != self.num_classes:
      raise ValueError(f'{self.name}: {self.num_classes} classes but {len(self.class_names)} '
                       f'names and {len(self.palette)} colours')


def label_lut(mapping: Dict[int, int], valid_raw: Sequence[int]) -> Tuple[np.ndarray, np.ndarray]:
  """(lut, valid): uint8 raw -> train id table (default ignore) and a mask of allowed raw values."""
  lut = np.full(256, IGNORE_INDEX, np.uint8)
  for raw, train_id in mapping.items():
    lut[raw] = train_id
  valid = np.zeros(256, bool)
  valid[list(valid_raw)] = True
  return lut, valid


class Source:
  """The files of a download folder, including the members of zip archives inside it."""

  def __init__(self, root: str):
    if not root:
      raise PreparationError('no manual_dir given: pass the folder holding the official download')
    root = os.path.abspath(os.path.expanduser(str(root)))
    if not os.path.isdir(root):
      raise PreparationError(f'manual_dir {root} does not exist or is not a folder')
    self.root = root
    self._files: Dict[str, Tuple[Optional[str], str]] = {}
    self._zips: Dict[str, zipfile.ZipFile] = {}
    self.dirs = set()
    for dirpath, dirnames, filenames in os.walk(root):
      rel_dir = os.path.relpath(dirpath, root)
      rel_dir = '' if rel_dir == '.' else rel_dir.replace(os.sep, '/')
      for d in dirnames:
        self.dirs.add(f'{rel_dir}/{d}' if rel_dir else d)
      for f in filenames:
        full = os.path.join(dirpath, f)
        if f.lower().endswith('.zip'):
          self._add_zip(full)
        else:
          self._files[f'{rel_dir}/{f}' if rel_dir else f] = (None, full)

  def _add_zip(self, path: str):
    try:
      zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
      raise PreparationError(f'{path} is not a readable zip archive ({e})') from None
    self._zips[path] = zf
    for name in zf.namelist():
      if name.endswith('/'):
        self.dirs.add(name.rstrip('/'))
        continue
      self._files.setdefault(name, (path, name))
      parts = name.split('/')
      for i in range(1, len(parts)):
        self.dirs.add('/'.join(parts[:i]))

  def find(self, pattern: str) -> List[Tuple[str, re.Match]]:
    """Sorted (path, match) of files whose relative path matches `pattern` (re.search)."""
    rx = re.compile(pattern)
    out = []
    for path in self._files:
      m = rx.search(path)
      if m:
        out.append((path, m))
    out.sort(key=lambda x: x[0])
    return out

  def find_dirs(self, pattern: str) -> List[str]:
    rx = re.compile(pattern)
    return sorted(d for d in self.dirs if rx.search(d))

  def read(self, path: str) -> bytes:
    zip_path, member = self._files[path]
    if zip_path is None:
      with open(member, 'rb') as f:
        return f.read()
    return self._zips[zip_path].read(member)

  def describe(self, path: str) -> str:
    zip_path, member = self._files[path]
    return member if zip_path is None else f'{zip_path}:{member}'


def collect_split(source: Source, split_dir_rx: str, file_rx: str, what: str) -> Dict[str, str]:
  """{stem: path} of the files `<dir matching split_dir_rx>/<file matching file_rx>`.

  `file_rx` has one group, the stem. Raises a `PreparationError` naming the expected folder when
  it is missing or holds no matching file.
  """
  found = source.find(f'(?:^|/){split_dir_rx}/{file_rx}$')
  if not found:
    dirs = source.find_dirs(f'(?:^|/){split_dir_rx}$')
    if dirs:
      raise PreparationError(
          f'folder {os.path.join(source.root, dirs[0])} holds no {what} (expected files '
          f'matching {file_rx!r})')
    raise PreparationError(
        f'missing folder for {what}: expected a folder matching {split_dir_rx!r} (with files '
        f'{file_rx!r}) under {source.root} (extracted or inside a zip archive)')
  out = {}
  for path, m in found:
    stem = m.group(m.lastindex)
    if stem in out:
      raise PreparationError(f'two {what} with the same name {stem!r}: {out[stem]} and {path}')
    out[stem] = path
  return out


def pair_split(images: Dict[str, str], labels: Dict[str, str], split: str) -> List[Tuple[str, str]]:
  """[(image path, label path)] by stem; an image without a label is an error."""
  missing = sorted(set(images) - set(labels))
  if missing:
    raise PreparationError(
        f'{len(missing)} {split} image(s) have no label, e.g. {images[missing[0]]} '
        f'(expected a label named {missing[0]!r})')
  return [(images[k], labels[k]) for k in sorted(images)]


def decode_image(data: bytes):
  """Decodes image bytes to an (H, W, 3) uint8 array (BGR, unused beyond checks) or None."""
  import cv2  # pylint: disable=g-import-not-at-top
  arr = np.frombuffer(data, np.uint8)
  if arr.size == 0:
    return None
  img = cv2.imdecode(arr, cv2.IMREAD_COLOR)
  return img


def encode_png(label: np.ndarray) -> bytes:
  import cv2  # pylint: disable=g-import-not-at-top
  ok, buf = cv2.imencode('.png', label)
  if not ok:
    raise PreparationError('could not encode a label as PNG')
  return buf.tobytes()


def decode_label_png(data: bytes, where: str) -> np.ndarray:
  """A single-channel label PNG as (H, W) uint8; rejects colour or 16-bit labels."""
  import cv2  # pylint: disable=g-import-not-at-top
  arr = np.frombuffer(data, np.uint8)
  lab = cv2.imdecode(arr, cv2.IMREAD_UNCHANGED) if arr.size else None
  if lab is None:
    raise PreparationError(f'label {where} is not a readable PNG')
  if lab.ndim != 2 or lab.dtype != np.uint8:
    raise PreparationError(f'label {where} should be a single-channel 8-bit PNG, got shape '
                           f'{lab.shape} dtype {lab.dtype}')
  return lab


def remap_label(raw: np.ndarray, lut: np.ndarray, valid: np.ndarray, where: str) -> np.ndarray:
  """Raw ids -> train ids through `lut`, rejecting raw values outside `valid`."""
  raw = np.asarray(raw)
  if raw.dtype != np.uint8:
    if raw.size and (raw.min() < 0 or raw.max() > 255):
      raise PreparationError(f'label {where} has values outside [0, 255] '
                             f'(min {raw.min()}, max {raw.max()})')
    raw = raw.astype(np.uint8)
  present = np.unique(raw)
  bad = present[~valid[present]]
  if bad.size:
    raise PreparationError(f'label {where} has values outside the dataset\'s range: '
                           f'{bad.tolist()[:10]} (allowed: {np.flatnonzero(valid).tolist()[:5]}'
                           f'...{np.flatnonzero(valid).tolist()[-3:]})')
  return lut[raw]


class SegmentationBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared `_info` and example generation of the manual-download builders.

  Subclasses set META, LUT, VALID, DESCRIPTION, HOMEPAGE, MANUAL_DOWNLOAD_INSTRUCTIONS and
  implement `_list_splits(source) -> {split: [(image path, label path)]}`; they may override
  `_read_label(source, path) -> raw (H, W) array`.
  """

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: train ids, 255 = ignore.'}
  META: DatasetMeta
  LUT: np.ndarray
  VALID: np.ndarray
  DESCRIPTION = ''
  HOMEPAGE = ''
  IMAGE_FORMAT = None  # keep the source bytes

  def __init__(self, *, skip_corrupt: bool = False, **kwargs):
    self.skip_corrupt = skip_corrupt
    self.skipped_files: List[str] = []
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(None, None, 3), encoding_format=self.IMAGE_FORMAT),
            'label': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
            'file_name': tfds.features.Text(),
            'height': tfds.features.Scalar(dtype=np.int32),
            'width': tfds.features.Scalar(dtype=np.int32),
        }),
        homepage=self.HOMEPAGE,
        supervised_keys=('image', 'label'),
    )

  def _split_generators(self, dl_manager):
    source = Source(dl_manager.manual_dir)
    splits = self._list_splits(source)
    return {name: self._generate_examples(source, pairs, name) for name, pairs in splits.items()}

  def _list_splits(self, source: Source) -> Dict[str, List[Tuple[str, str]]]:
    raise NotImplementedError

  def _read_label(self, source: Source, path: str) -> np.ndarray:
    return decode_label_png(source.read(path), source.describe(path))

  def _generate_examples(self, source: Source, pairs, split: str) -> Iterator:
    skipped = 0
    for image_path, label_path in pairs:
      data = source.read(image_path)
      img = decode_image(data)
      where = source.describe(image_path)
      if img is None:
        if self.skip_corrupt:
          skipped += 1
          self.skipped_files.append(where)
          logging.warning('skipping corrupt image %s', where)
          continue
        raise PreparationError(
            f'image {where} cannot be decoded (corrupt or not an image); fix or remove it, or '
            'pass --skip_corrupt to skip such images')
      raw = self._read_label(source, label_path)
      lwhere = source.describe(label_path)
      if raw.shape[:2] != img.shape[:2]:
        raise PreparationError(f'label {lwhere} has size {raw.shape[:2]} but its image {where} '
                               f'has size {img.shape[:2]} (height, width)')
      label = remap_label(raw, self.LUT, self.VALID, lwhere)
      yield image_path, {
          'image': data,
          'label': encode_png(label),
          'file_name': image_path,
          'height': img.shape[0],
          'width': img.shape[1],
      }
    if skipped:
      logging.warning('%s/%s: skipped %d corrupt image(s)', self.name, split, skipped)
      print(f'{self.name}/{split}: skipped {skipped} corrupt image(s)')
