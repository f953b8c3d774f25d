"""Cityscapes (fine annotations): 19 classes, official id -> trainId, other ids -> ignore.

Download `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
https://www.cityscapes-dataset.com/ into one folder and prepare with

    python scripts/prepare_datasets.py --dataset=cityscapes --manual_dir=DOWNLOADS --data_dir=DATA

Layout read (zips or extracted): `leftImg8bit/{train,val}/{city}/*_leftImg8bit.png` and
`gtFine/{train,val}/{city}/*_gtFine_labelIds.png`. Splits `train` (2,975) and `validation`
(500); `trainval` (what the MCIBI Cityscapes configs train on) reads both, without a copy.
"""

from memseg_jax.datasets import _base

NAME = 'cityscapes'
NUM_CLASSES = 19

CLASS_NAMES = (
    'road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic_light', 'traffic_sign',
    'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
    'motorcycle', 'bicycle',
)

PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)

# Official labelIds -> trainIds (cityscapesscripts' labels.py); ids not listed are ignored.
ID_TO_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                  24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
META = _base.DatasetMeta(NAME, NUM_CLASSES, CLASS_NAMES, PALETTE,
                         split_aliases=(('val', 'validation'), ('trainval', 'train+validation')))
LUT, VALID = _base.label_lut(ID_TO_TRAIN_ID, range(34))
_SPLITS = {'train': 'train', 'validation': 'val'}


class Cityscapes(_base.SegmentationBuilder, skip_registration=True):
  """Cityscapes fine with train ids (0..18, 255 = ignore)."""

  name = NAME
  META = META
  LUT, VALID = LUT, VALID
  DESCRIPTION = 'Cityscapes fine annotations (19 classes), train ids, 255 = ignore.'
  HOMEPAGE = 'https://www.cityscapes-dataset.com/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip (or the extracted '
      'leftImg8bit/ and gtFine/ folders) into manual_dir.')

  def _list_splits(self, source):
    out = {}
    for split, folder in _SPLITS.items():
      images = _base.collect_split(source, f'leftImg8bit/{folder}',
                                   r'[^/]+/([^/]+)_leftImg8bit\.png',
                                   f'Cityscapes {folder} images')
      labels = _base.collect_split(source, f'gtFine/{folder}',
                                   r'[^/]+/([^/]+)_gtFine_labelIds\.png',
                                   f'Cityscapes {folder} labelIds')
      out[split] = _base.pair_split(images, labels, split)
    return out
