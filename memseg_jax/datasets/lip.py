"""LIP (Look Into Person) human parsing: 20 classes (0 = background), labels used as they are.

Download `TrainVal_images.zip` and `TrainVal_parsing_annotations.zip` from
http://sysu-hcp.net/lip/ into one folder and prepare with

    python scripts/prepare_datasets.py --dataset=lip --manual_dir=DOWNLOADS --data_dir=DATA

Layout read (zips or extracted, any top folders): `train_images/*.jpg`, `val_images/*.jpg`,
`train_segmentations/*.png`, `val_segmentations/*.png` (the official archives put them under
`TrainVal_images/` and `TrainVal_parsing_annotations/`; the reference's flattened layout works
too). Splits `train` (30,462) and `validation` (10,000).
"""

from memseg_jax.datasets import _base

NAME = 'lip'
NUM_CLASSES = 20
# Left/right classes exchanged by a horizontal flip (leftArm/rightArm, leftLeg/rightLeg,
# leftShoe/rightShoe).
FLIP_SWAP_PAIRS = ((14, 15), (16, 17), (18, 19))

CLASS_NAMES = (
    '__background__', 'hat', 'hair', 'glove', 'sunglasses', 'upperclothes', 'dress', 'coat',
    'socks', 'pants', 'jumpsuits', 'scarf', 'skirt', 'face', 'leftArm', 'rightArm', 'leftLeg',
    'rightLeg', 'leftShoe', 'rightShoe',
)

PALETTE = (
    (0, 0, 0), (128, 0, 0), (255, 0, 0), (0, 85, 0), (170, 0, 51), (255, 85, 0), (0, 0, 85),
    (0, 119, 221), (85, 85, 0), (0, 85, 85), (85, 51, 0), (52, 86, 128), (0, 128, 0),
    (0, 0, 255), (51, 170, 221), (0, 255, 255), (85, 255, 170), (170, 255, 85), (255, 255, 0),
    (255, 170, 0),
)

META = _base.DatasetMeta(NAME, NUM_CLASSES, CLASS_NAMES, PALETTE,
                         split_aliases=(('val', 'validation'),))
LUT, VALID = _base.label_lut({c: c for c in range(NUM_CLASSES)}, range(NUM_CLASSES))
_SPLITS = {'train': 'train', 'validation': 'val'}


class Lip(_base.SegmentationBuilder, skip_registration=True):
  """LIP with its 20 labels (0..19), unchanged."""

  name = NAME
  META = META
  LUT, VALID = LUT, VALID
  DESCRIPTION = 'LIP human parsing (20 classes, 0 = background).'
  HOMEPAGE = 'http://sysu-hcp.net/lip/'
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      'Put TrainVal_images.zip and TrainVal_parsing_annotations.zip (or their extracted '
      'folders) into manual_dir.')

  def _list_splits(self, source):
    out = {}
    for split, folder in _SPLITS.items():
      images = _base.collect_split(source, f'{folder}_images', r'([^/]+)\.jpg',
                                   f'LIP {folder} images')
      labels = _base.collect_split(source, f'{folder}_segmentations', r'([^/]+)\.png',
                                   f'LIP {folder} segmentations')
      out[split] = _base.pair_split(images, labels, split)
    return out
