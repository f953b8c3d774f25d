"""COCO-Stuff-10k (v1.1): 182 classes; label 0 -> ignore, c -> c - 1, 255 -> ignore.

Download `cocostuff-10k-v1.1.zip` (https://github.com/nightrome/cocostuff10k) into a folder and
prepare with

    python scripts/prepare_datasets.py --dataset=cocostuff10k --manual_dir=DOWNLOADS --data_dir=DATA

Layout read (zip or extracted): `images/*.jpg`, `annotations/*.mat` (uint8 field `S`) and the
official lists `imageLists/train.txt` (9,000) and `imageLists/test.txt` (1,000), which become
the splits `train` and `test` (`validation` is an alias of `test`).
"""

import io

import numpy as np

from memseg_jax.datasets import _base

NAME = 'cocostuff10k'
NUM_CLASSES = 182

CLASS_NAMES = (
    'person', 'bicycle', 'car', 'motorcycle', 'airplane', 'bus', 'train', 'truck', 'boat',
    'traffic light', 'fire hydrant', 'street sign', 'stop sign', 'parking meter', 'bench',
    'bird', 'cat', 'dog', 'horse', 'sheep', 'cow', 'elephant', 'bear', 'zebra', 'giraffe', 'hat',
    'backpack', 'umbrella', 'shoe', 'eye glasses', 'handbag', 'tie', 'suitcase', 'frisbee',
    'skis', 'snowboard', 'sports ball', 'kite', 'baseball bat', 'baseball glove', 'skateboard',
    'surfboard', 'tennis racket', 'bottle', 'plate', 'wine glass', 'cup', 'fork', 'knife',
    'spoon', 'bowl', 'banana', 'apple', 'sandwich', 'orange', 'broccoli', 'carrot', 'hot dog',
    'pizza', 'donut', 'cake', 'chair', 'couch', 'potted plant', 'bed', 'mirror', 'dining table',
    'window', 'desk', 'toilet', 'door', 'tv', 'laptop', 'mouse', 'remote', 'keyboard',
    'cell phone', 'microwave', 'oven', 'toaster', 'sink', 'refrigerator', 'blender', 'book',
    'clock', 'vase', 'scissors', 'teddy bear', 'hair drier', 'toothbrush', 'hair brush',
    'banner', 'blanket', 'branch', 'bridge', 'building-other', 'bush', 'cabinet', 'cage',
    'cardboard', 'carpet', 'ceiling-other', 'ceiling-tile', 'cloth', 'clothes', 'clouds',
    'counter', 'cupboard', 'curtain', 'desk-stuff', 'dirt', 'door-stuff', 'fence',
    'floor-marble', 'floor-other', 'floor-stone', 'floor-tile', 'floor-wood', 'flower', 'fog',
    'food-other', 'fruit', 'furniture-other', 'grass', 'gravel', 'ground-other', 'hill', 'house',
    'leaves', 'light', 'mat', 'metal', 'mirror-stuff', 'moss', 'mountain', 'mud', 'napkin',
    'net', 'paper', 'pavement', 'pillow', 'plant-other', 'plastic', 'platform', 'playingfield',
    'railing', 'railroad', 'river', 'road', 'rock', 'roof', 'rug', 'salad', 'sand', 'sea',
    'shelf', 'sky-other', 'skyscraper', 'snow', 'solid-other', 'stairs', 'stone', 'straw',
    'structural-other', 'table', 'tent', 'textile-other', 'towel', 'tree', 'vegetable',
    'wall-brick', 'wall-concrete', 'wall-other', 'wall-panel', 'wall-stone', 'wall-tile',
    'wall-wood', 'water-other', 'waterdrops', 'window-blind', 'window-other', 'wood',
)


def _bit_palette(n):
  """The PASCAL-VOC style colour map (bits of the class index spread over R, G, B)."""
  out = []
  for j in range(n):
    lab, rgb = j, [0, 0, 0]
    for i in range(8):
      if not lab:
        break
      for c in range(3):
        rgb[c] |= ((lab >> c) & 1) << (7 - i)
      lab >>= 3
    out.append(tuple(rgb))
  return tuple(out)


PALETTE = _bit_palette(NUM_CLASSES)
META = _base.DatasetMeta(NAME, NUM_CLASSES, CLASS_NAMES, PALETTE,
                         split_aliases=(('validation', 'test'), ('val', 'test')))
LUT, VALID = _base.label_lut({0: 255, 255: 255, **{c: c - 1 for c in range(1, NUM_CLASSES + 1)}},
                             list(range(NUM_CLASSES + 1)) + [255])


class Cocostuff10k(_base.SegmentationBuilder, skip_registration=True):
  """COCO-Stuff-10k with train ids (0..181, 255 = ignore)."""

  name = NAME
  META = META
  LUT, VALID = LUT, VALID
  DESCRIPTION = 'COCO-Stuff-10k v1.1 (182 classes), train ids, 255 = ignore.'
  HOMEPAGE = 'https://github.com/nightrome/cocostuff10k'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put cocostuff-10k-v1.1.zip (or its extracted images/, annotations/, imageLists/) into '
      'manual_dir.')

  def _list_splits(self, source):
    images = _base.collect_split(source, 'images', r'([^/]+)\.jpg', 'COCO-Stuff-10k images')
    labels = _base.collect_split(source, 'annotations', r'([^/]+)\.mat',
                                 'COCO-Stuff-10k annotations')
    out = {}
    for split in ('train', 'test'):
      lists = source.find(f'(?:^|/)imageLists/{split}\\.txt$')
      if not lists:
        raise _base.PreparationError(
            f'missing image list imageLists/{split}.txt under {source.root}')
      ids = [l.strip() for l in source.read(lists[0][0]).decode().splitlines() if l.strip()]
      if not ids:
        raise _base.PreparationError(f'image list {source.describe(lists[0][0])} is empty')
      missing = [i for i in ids if i not in images]
      if missing:
        raise _base.PreparationError(
            f'{len(missing)} image(s) of {source.describe(lists[0][0])} are missing from '
            f'images/, e.g. {missing[0]}.jpg')
      out[split] = _base.pair_split({i: images[i] for i in ids}, labels, split)
    return out

  def _read_label(self, source, path):
    import scipy.io  # pylint: disable=g-import-not-at-top
    where = source.describe(path)
    try:
      mat = scipy.io.loadmat(io.BytesIO(source.read(path)))
    except Exception as e:  # pylint: disable=broad-except
      raise _base.PreparationError(
          f'annotation {where} is not a readable .mat file ({e})') from None
    if 'S' not in mat:
      raise _base.PreparationError(f'annotation {where} has no field "S" (keys: '
                                   f'{sorted(k for k in mat if not k.startswith("__"))})')
    return np.asarray(mat['S'])
