"""Looking at predictions: palette colouring, overlays and side-by-side rows (numpy + PIL).

Used by the evaluation summaries (TensorBoard images) and by `memseg_jax.predict` (PNG files).
Everything works on host numpy arrays: (H, W) integer masks and (H, W, 3) uint8 RGB images.
Ignore pixels (255) are drawn black.
"""

from typing import Sequence

import numpy as np


def default_palette(num_classes: int) -> np.ndarray:
  """(K, 3) uint8 palette for datasets without one: the PASCAL VOC bit-interleaving scheme."""
  palette = np.zeros((num_classes, 3), np.uint8)
  for j in range(num_classes):
    lab, i = j, 0
    while lab:
      for c in range(3):
        palette[j, c] |= ((lab >> c) & 1) << (7 - i)
      i += 1
      lab >>= 3
  return palette


def colorize(mask, palette, ignore_index: int = 255) -> np.ndarray:
  """(H, W) class ids -> (H, W, 3) uint8 colours; ignore / out-of-palette ids are black."""
  mask = np.asarray(mask)
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  table = np.zeros((256 if palette.shape[0] <= 256 else palette.shape[0] + 1, 3), np.uint8)
  table[:palette.shape[0]] = palette
  if ignore_index < table.shape[0]:
    table[ignore_index] = 0
  index = np.where((mask >= 0) & (mask < palette.shape[0]), mask, ignore_index)
  index = np.clip(index, 0, table.shape[0] - 1)
  return table[index]


def mask_to_pil(mask, palette):
  """A PIL 'P' (palette) image of an (H, W) mask; index i has colour palette[i], 255 black."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  mask = np.asarray(mask)
  palette = np.asarray(palette, np.uint8).reshape(-1, 3)
  if palette.shape[0] > 256 or mask.max(initial=0) > 255 or mask.min(initial=0) < 0:
    raise ValueError(f'palette PNGs hold at most 256 classes (mask range [{mask.min()}, '
                     f'{mask.max()}], {palette.shape[0]} palette entries)')
  image = Image.fromarray(mask.astype(np.uint8), mode='P')
  flat = np.zeros((256, 3), np.uint8)
  flat[:palette.shape[0]] = palette
  image.putpalette(flat.reshape(-1).tolist())
  return image


def denormalize(image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
  """A normalised float (H, W, 3) image back to uint8 RGB."""
  image = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean,
                                                                                  np.float32)
  return np.clip(np.round(image), 0, 255).astype(np.uint8)


def resize_nearest(image, out_hw) -> np.ndarray:
  """Nearest-neighbour resize of (H, W[, C]) to out_hw (for display only)."""
  image = np.asarray(image)
  h, w = image.shape[:2]
  ys = np.minimum((np.arange(out_hw[0]) * h) // out_hw[0], h - 1)
  xs = np.minimum((np.arange(out_hw[1]) * w) // out_hw[1], w - 1)
  return image[ys][:, xs]


def overlay(image, mask, palette, alpha: float = 0.5, ignore_index: int = 255) -> np.ndarray:
  """Blend the coloured mask over a uint8 RGB image of the same size (ignore pixels untouched)."""
  image = np.asarray(image, np.uint8)
  mask = np.asarray(mask)
  if image.shape[:2] != mask.shape:
    raise ValueError(f'overlay: image {image.shape[:2]} and mask {mask.shape} differ in size')
  colours = colorize(mask, palette, ignore_index).astype(np.float32)
  blended = (1 - alpha) * image.astype(np.float32) + alpha * colours
  keep = (mask == ignore_index)[..., None]
  return np.where(keep, image, np.round(blended)).astype(np.uint8)


def side_by_side(images: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
  """Concatenates uint8 (H_i, W_i, 3) images left to right on white, top-aligned."""
  height = max(im.shape[0] for im in images)
  width = sum(im.shape[1] for im in images) + gap * (len(images) - 1)
  canvas = np.full((height, width, 3), 255, np.uint8)
  x = 0
  for im in images:
    canvas[:im.shape[0], x:x + im.shape[1]] = im
    x += im.shape[1] + gap
  return canvas


def summary_row(image, label, pred, palette, mean, std, ignore_index: int = 255) -> np.ndarray:
  """[image | ground truth | prediction] at the original size, uint8, for TensorBoard.

  `image` is the normalised test-resized input; it is shown resized (nearest) to the label size.
  """
  rgb = resize_nearest(denormalize(image, mean, std), np.asarray(label).shape)
  return side_by_side([rgb, colorize(label, palette, ignore_index),
                       colorize(pred, palette, ignore_index)])
