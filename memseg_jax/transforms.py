"""Joint image + label transforms of the training and test pipelines, as TensorFlow ops.

Every op here reproduces one transform of the reference (SSSegmentation 1.7.0,
`ssseg/modules/datasets/pipelines/transforms.py`; spec section 6) on RGB uint8 images and uint8
labels with 255 = ignore. The ops run eagerly and inside `tf.data` with identical results:
randomness is never drawn from a global generator; each random op takes a `seed` (a (2,) int32
tensor for `tf.random.stateless_*`) derived from (config seed, process, epoch, position), so a
pipeline is deterministic and can be resumed anywhere.

Two backends for the pixel arithmetic (`backend` argument, `config.data.backend`, default
'auto' = 'opencv' when OpenCV is installed):
- 'opencv': the image resize and the photometric distortion call OpenCV through
  `tf.numpy_function`, as the reference does: bit-exact with it and the fastest on CPU (the
  benchmark in scripts/bench_input_pipeline.py), but not serialisable (no tf.data service).
- 'tf': pure TF ops. The image resize is TF's `ScaleAndTranslate` with a tent kernel
  (OpenCV's clamped half-pixel bilinear; OpenCV's 11-bit fixed point makes ~10% of pixels
  differ by 1) computed only on the crop window; the HSV steps emulate OpenCV's 8-bit RGB->HSV
  (exact) and HSV->RGB (exact for OpenCV 4.14 and 5.1 on an AVX-512 CPU; OpenCV 5.0, or a CPU
  without AVX-512, rounds the last pixels of some rows 1 lower: see `cv2_hsv2rgb`).
Label resizing, crop choice, flip, rotation, normalisation and padding are TF ops in both.

Faithfulness notes:
- Resize: target (L, S) * r, r ~ U[ratio_range), keep ratio, new side int(side * scale + 0.5);
  labels like `cv2.resize(INTER_NEAREST)` (source index floor(dst * in / out), which is not
  TF's half-pixel nearest).
- Random resize and crop are fused (`resize_and_crop`): only the candidate crop windows of the
  resized label are computed to apply the crop rule; the TF backend also resamples only the
  kept window of the image, and the input pipeline decodes only the JPEG region it needs.
- Crop: up to 10 tries, accepted when more than one valid class is present and the largest
  class covers < cat_max_ratio of the valid pixels; otherwise the 10th crop is kept. The
  reference returns the sample uncropped when the kept crop has no valid pixel; that path only
  yields a crop-sized example when the image is no larger than the crop (then both coincide),
  and crashes the reference's padding otherwise, so here the (all-ignore) 10th crop is kept.
- Photometric distortion: the reference's probabilities, order and uint8 clipping. Its
  saturation/hue steps call OpenCV's RGB<->HSV codes on a BGR array; we reproduce that exactly
  (OpenCV's BGR codes on our RGB array give the same numbers). The visible consequence: a hue
  shift of +d in the reference is -d on the true hue.
- Rotation (LIP): the reference's `cv2.getRotationMatrix2D` + `warpAffine` geometry; the image
  is interpolated bilinearly (the reference uses bicubic, which TF's projective transform op
  does not offer), the label by nearest neighbour, fill 0 / ignore.
- Normalisation: x * (1/std) - mean/std (equal to (x - mean)/std up to float rounding).
- Padding: centred (top = floor(diff / 2)), image 0 after normalisation, label ignore. The
  reference swaps the target size when orientations disagree; batches need one shape, so we
  always pad to `crop_size` (the swap never triggers for square crops or landscape datasets).
"""

from typing import Sequence, Tuple

import numpy as np
import tensorflow as tf

IGNORE_INDEX = 255
CROP_TRIES = 10


# ----------------------------------------------------------------------------- seeds

def example_seed(seed: int, *indices) -> tf.Tensor:
  """A (2,) int32 stateless seed for one example, from the run seed and integer indices."""
  s = tf.stack([tf.constant(seed, tf.int32), tf.constant(0x5EED, tf.int32)])
  for i in indices:
    s = tf.random.experimental.stateless_fold_in(s, tf.cast(i, tf.int64))
  return s


def split_seed(seed: tf.Tensor, num: int):
  """`num` independent (2,) seeds from one."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num=num))


def _uniform(seed, minval=0.0, maxval=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.float32)


def _randint(seed, minval, maxval, shape=()):
  """Integers in [minval, maxval) like `np.random.randint`."""
  return tf.random.stateless_uniform(shape, seed, minval=minval, maxval=maxval, dtype=tf.int32)


# ----------------------------------------------------------------------------- resize

def rescale_size(hw, scale: Sequence[float], keep_ratio: bool) -> tf.Tensor:
  """Output (h, w) int32 of the reference `Resize` for an image of size `hw` and target `scale`.

  Args:
    hw: (2,) int (height, width) of the input.
    scale: (long, short) target, already multiplied by the random ratio (floats are truncated
      to int as the reference does).
    keep_ratio: keep the aspect ratio (scale factor min(L/long, S/short)) or resize to the
      target, matching its orientation to the image's.
  """
  hw = tf.cast(hw, tf.float64)
  big = tf.floor(tf.cast(tf.reduce_max(scale), tf.float64))
  small = tf.floor(tf.cast(tf.reduce_min(scale), tf.float64))
  h, w = hw[0], hw[1]
  if keep_ratio:
    factor = tf.minimum(big / tf.maximum(h, w), small / tf.minimum(h, w))
    return tf.cast(tf.floor(tf.stack([h, w]) * factor + 0.5), tf.int32)
  return tf.cast(tf.where(h > w, tf.stack([big, small]), tf.stack([small, big])), tf.int32)


def random_rescale_size(seed, hw, scale: Sequence[float], ratio_range: Sequence[float],
                        keep_ratio: bool) -> Tuple[tf.Tensor, tf.Tensor]:
  """(new (h, w), ratio r) with r ~ U[ratio_range) and target (int(L*r), int(S*r))."""
  r = tf.cast(_uniform(seed, ratio_range[0], ratio_range[1]), tf.float64)
  target = tf.floor(tf.constant(scale, tf.float64) * r)
  return rescale_size(hw, target, keep_ratio), r


def _linear_taps(in_size, out_size, start, count):
  """Source taps (i0, i1, w1) of output indices [start, start+count) for half-pixel bilinear."""
  in_f = tf.cast(in_size, tf.float32)
  scale = in_f / tf.cast(out_size, tf.float32)
  dst = tf.cast(tf.range(count) + start, tf.float32)
  src = tf.maximum((dst + 0.5) * scale - 0.5, 0.0)
  i0 = tf.minimum(tf.cast(tf.floor(src), tf.int32), in_size - 1)
  i1 = tf.minimum(i0 + 1, in_size - 1)
  w1 = src - tf.cast(i0, tf.float32)
  w1 = tf.where(i0 == in_size - 1, 0.0, w1)
  return i0, i1, w1


def resize_image_window(image, out_hw, window=None, *, in_hw=None, offset=(0, 0)):
  """Rows/cols `window` = (top, left, h, w) of `cv2.resize(image, out_hw, INTER_LINEAR)`.

  Output pixel (i, j) of the window samples the input at ((top + i + 0.5) * in / out - 0.5, ...)
  with a tent kernel whose out-of-image taps are dropped and the rest renormalised, which is
  OpenCV's clamped bilinear (TF's `ScaleAndTranslate` op, no antialiasing).

  `image` may be a sub-rectangle of the full input starting at `offset` = (y0, x0) (see
  `source_window`), `in_hw` then being the full input size. Returns float32 (h, w, C) holding
  integers in [0, 255] (rounded like OpenCV's uint8 output).
  """
  if window is None:
    window = (0, 0, out_hw[0], out_hw[1])
  top, left, h, w = window
  if in_hw is None:
    in_hw = tf.shape(image)[:2]
  scale = (tf.cast(tf.stack([out_hw[0], out_hw[1]]), tf.float32)
           / tf.cast(tf.stack([in_hw[0], in_hw[1]]), tf.float32))
  translation = (-tf.cast(tf.stack([top, left]), tf.float32)
                 + tf.cast(tf.stack([offset[0], offset[1]]), tf.float32) * scale)
  out = tf.raw_ops.ScaleAndTranslate(
      images=image[None], size=tf.stack([h, w]), scale=scale, translation=translation,
      kernel_type='triangle', antialias=False)[0]
  return tf.clip_by_value(tf.round(out), 0.0, 255.0)


def _resize_window_numpy(image, out_h, out_w, top, left, h, w):
  import cv2  # pylint: disable=g-import-not-at-top
  out = cv2.resize(image, (int(out_w), int(out_h)), interpolation=cv2.INTER_LINEAR)
  return np.ascontiguousarray(out[top:top + h, left:left + w])


def resize_image_window_opencv(image, out_hw, window):
  """`resize_image_window` computed by `cv2.resize` itself (bit-exact with the reference).

  Returns uint8 (h, w, 3).
  """
  top, left, h, w = window
  out = tf.numpy_function(_resize_window_numpy,
                          [image, out_hw[0], out_hw[1], top, left, h, w], tf.uint8,
                          stateful=False)
  return tf.reshape(out, tf.stack([h, w, 3]))


def source_window(in_hw, out_hw, window):
  """(y0, x0, h, w): the input pixels that the bilinear output `window` reads (with a margin)."""
  top, left, h, w = window
  bounds = []
  for start, n, size_in, size_out in ((top, h, in_hw[0], out_hw[0]),
                                      (left, w, in_hw[1], out_hw[1])):
    s = tf.cast(size_in, tf.float32) / tf.cast(size_out, tf.float32)
    lo = tf.cast(tf.floor((tf.cast(start, tf.float32) + 0.5) * s - 0.5), tf.int32) - 1
    hi = tf.cast(tf.floor((tf.cast(start + n, tf.float32) - 0.5) * s - 0.5), tf.int32) + 3
    lo = tf.clip_by_value(lo, 0, size_in - 1)
    hi = tf.clip_by_value(hi, lo + 1, size_in)
    bounds.append((lo, hi - lo))
  return bounds[0][0], bounds[1][0], bounds[0][1], bounds[1][1]


def _nearest_index(in_size, out_size):
  # OpenCV's INTER_NEAREST: src = floor(dst * (1 / (out / in))), clamped.
  ifx = 1.0 / (tf.cast(out_size, tf.float64) / tf.cast(in_size, tf.float64))
  idx = tf.cast(tf.floor(tf.cast(tf.range(out_size), tf.float64) * ifx), tf.int32)
  return tf.minimum(idx, in_size - 1)


def resize_label_window(label, out_hw, window=None):
  """Rows/cols `window` = (top, left, h, w) of `cv2.resize(label, out_hw, INTER_NEAREST)`."""
  ys = _nearest_index(tf.shape(label)[0], out_hw[0])
  xs = _nearest_index(tf.shape(label)[1], out_hw[1])
  if window is not None:
    top, left, h, w = window
    ys, xs = ys[top:top + h], xs[left:left + w]
  # Gathers along axis 0 copy whole rows; the transposes make the column gather one too.
  rows = tf.gather(label, ys)
  return tf.transpose(tf.gather(tf.transpose(rows), xs))


def resize_label(label, out_hw):
  """`cv2.resize(label, out_hw, INTER_NEAREST)` for an (H, W) label."""
  return resize_label_window(label, out_hw)


def resize_image(image, out_hw):
  """Whole-image cv2-like bilinear resize; float32 with integer values."""
  return resize_image_window(image, out_hw)


# ----------------------------------------------------------------------------- crop

def crop_is_acceptable(label_crop, cat_max_ratio: float, num_classes_bound: int = 256):
  """The reference's acceptance rule: >1 valid class and max class share < cat_max_ratio."""
  counts = tf.math.bincount(tf.cast(tf.reshape(label_crop, [-1]), tf.int32),
                            minlength=num_classes_bound, maxlength=num_classes_bound)
  counts = counts[:IGNORE_INDEX]
  total = tf.reduce_sum(counts)
  num_present = tf.reduce_sum(tf.cast(counts > 0, tf.int32))
  ok = tf.logical_and(num_present > 1,
                      tf.cast(tf.reduce_max(counts), tf.float32)
                      < cat_max_ratio * tf.cast(total, tf.float32))
  return ok, total


def choose_crop(seed, label, crop_size: Sequence[int], cat_max_ratio: float,
                tries: int = CROP_TRIES, label_hw=None, window_fn=None):
  """(top, left, h, w) of the reference's `RandomCrop` on `label` (H, W).

  All `tries` candidate offsets are drawn up front from the seed, then tried in order. When
  `window_fn(top, left, h, w)` is given it produces the label window instead of slicing `label`
  (used to crop a resized label without resizing all of it), and `label_hw` its size.
  """
  if window_fn is None:
    window_fn = lambda t, l, h, w: label[t:t + h, l:l + w]
    label_hw = tf.shape(label)[:2]
  hh, ww = label_hw[0], label_hw[1]
  ch, cw = tf.minimum(crop_size[0], hh), tf.minimum(crop_size[1], ww)
  s_top, s_left = split_seed(seed, 2)
  # randint(0, n + 1) for each try: floor(u * (n + 1)).
  tops = tf.cast(tf.floor(_uniform(s_top, shape=(tries,)) * tf.cast(hh - ch + 1, tf.float32)),
                 tf.int32)
  lefts = tf.cast(tf.floor(_uniform(s_left, shape=(tries,)) * tf.cast(ww - cw + 1, tf.float32)),
                  tf.int32)
  tops = tf.minimum(tops, hh - ch)
  lefts = tf.minimum(lefts, ww - cw)
  if cat_max_ratio >= 1.0:
    return tops[0], lefts[0], ch, cw

  def cond(i, done):
    return tf.logical_and(i < tries, tf.logical_not(done))

  def body(i, done):
    ok, _ = crop_is_acceptable(window_fn(tops[i], lefts[i], ch, cw), cat_max_ratio)
    return tf.where(ok, i, i + 1), ok

  i, _ = tf.while_loop(cond, body, (tf.constant(0), tf.constant(False)))
  i = tf.minimum(i, tries - 1)
  return tops[i], lefts[i], ch, cw


def random_crop(seed, image, label, crop_size, cat_max_ratio):
  """Reference `RandomCrop` on an already resized (image, label) pair."""
  top, left, h, w = choose_crop(seed, label, crop_size, cat_max_ratio)
  return image[top:top + h, left:left + w], label[top:top + h, left:left + w]


def resize_and_crop(seed, image, label, *, scale, ratio_range, keep_ratio, crop_size,
                    cat_max_ratio, backend: str = 'auto'):
  """Random `Resize` then `RandomCrop`, computing only the kept window of the image.

  Args:
    image: (H, W, 3) uint8, or a function (y0, x0, h, w) -> that rectangle of it (so that a
      JPEG can be decoded only where the crop needs it).
    label: (H, W) uint8.
    backend: 'opencv' resizes the image with `cv2.resize` (exact, fastest), 'tf' with TF ops
      on only the part of the image the crop needs; 'auto': 'opencv' if installed.
  Returns (image float32 (h, w, 3) with integer values, label uint8 (h, w)); h, w <= crop_size.
  """
  backend = resolve_backend(backend)
  s_resize, s_crop = split_seed(seed, 2)
  in_hw = tf.shape(label)[:2]
  out_hw, _ = random_rescale_size(s_resize, in_hw, scale, ratio_range, keep_ratio)
  window_fn = lambda t, l, h, w: resize_label_window(label, out_hw, (t, l, h, w))
  window = choose_crop(s_crop, None, crop_size, cat_max_ratio, label_hw=out_hw,
                       window_fn=window_fn)
  if backend == 'opencv':
    full = image(0, 0, in_hw[0], in_hw[1]) if callable(image) else image
    out = resize_image_window_opencv(full, out_hw, window)
  elif callable(image):
    y0, x0, sh, sw = source_window(in_hw, out_hw, window)
    region = image(y0, x0, sh, sw)
    out = resize_image_window(region, out_hw, window, in_hw=in_hw, offset=(y0, x0))
  else:
    out = resize_image_window(image, out_hw, window)
  return out, window_fn(*window)


# ----------------------------------------------------------------------------- flip

def swap_table(swap_pairs: Sequence[Sequence[int]]) -> tf.Tensor:
  """A 256-entry uint8 lookup table exchanging each pair of label values."""
  table = np.arange(256, dtype=np.uint8)
  for a, b in swap_pairs:
    table[a], table[b] = b, a
  return tf.constant(table)


def random_flip(seed, image, label, prob: float = 0.5, swap_pairs=()):
  """Horizontal flip with probability `prob` (reference: flip unless rand() > prob)."""
  image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
  do_flip = _uniform(seed) <= prob

  def flip():
    lab = tf.reverse(label, axis=[1])
    if swap_pairs:
      lab = tf.gather(swap_table(swap_pairs), tf.cast(lab, tf.int32))
    return tf.reverse(image, axis=[1]), lab

  return tf.cond(do_flip, flip, lambda: (image, label))


# ----------------------------------------------------------------------------- photometric

# OpenCV's 8-bit HSV tables (modules/imgproc/src/color_hsv.simd.hpp): hsv_shift = 12 and
# round-to-nearest-even reciprocal tables for the saturation and hue divisions.
_HSV_SHIFT = 12
_SDIV = np.array([0] + [np.rint((255 << _HSV_SHIFT) / i) for i in range(1, 256)], np.int32)
_HDIV180 = np.array([0] + [np.rint((180 << _HSV_SHIFT) / (6.0 * i)) for i in range(1, 256)],
                    np.int32)


def cv2_rgb2hsv(image):
  """Exact `cv2.cvtColor(uint8 image, COLOR_RGB2HSV)`; int32 (H in [0,180], S, V in [0,255])."""
  x = tf.cast(image, tf.int32)
  r, g, b = x[..., 0], x[..., 1], x[..., 2]
  v = tf.maximum(tf.maximum(r, g), b)
  vmin = tf.minimum(tf.minimum(r, g), b)
  diff = v - vmin
  half = 1 << (_HSV_SHIFT - 1)
  s = tf.bitwise.right_shift(diff * tf.gather(tf.constant(_SDIV), v) + half, _HSV_SHIFT)
  h = tf.where(v == r, g - b, tf.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
  h = tf.bitwise.right_shift(h * tf.gather(tf.constant(_HDIV180), diff) + half, _HSV_SHIFT)
  h = tf.where(h < 0, h + 180, h)
  return tf.stack([h, s, v], axis=-1)


# OpenCV's 8-bit HSV->RGB (`HSV2RGB_b` in modules/imgproc/src/color_hsv.simd.hpp, the same
# arithmetic in 4.14, 5.0 and 5.1) splits every image row in two: whole blocks of 4 float32 SIMD
# vectors go through the vectorised code, which truncates the result to uint8; the row's last
# (width % block) pixels go through the scalar code, which rounds to nearest (`saturate_cast`).
# The block is 4 vectors of the instruction set OpenCV dispatches that file to: on this
# project's machines (x86-64 with AVX-512) 64 pixels with the 4.14 and 5.1 wheels (AVX-512) and
# 32 with the 5.0 wheels (AVX2); from the source, 32 on any CPU without AVX-512 and 16 with
# SSE or NEON. That block is the whole difference between versions and machines: given it,
# `cv2_hsv2rgb` reproduces OpenCV exactly (measured over all 2^24 HSV values with 4.14, 5.0 and
# 5.1; tests/test_transforms.py checks every H < 180 against the installed one). The TF backend
# follows the newest, OpenCV 5.1 on an AVX-512 CPU: 64.
OPENCV_HSV_BLOCK = 64


def cv2_hsv2rgb(hsv, block=None):
  """`cv2.cvtColor(uint8 hsv, COLOR_HSV2RGB)`, bit-exact for OpenCV's `block` (see above).

  Args:
    hsv: (..., W, 3) integer H in [0, 180), S, V in [0, 255]; rows run along axis -2.
    block: pixels per SIMD block of the OpenCV being followed; default `OPENCV_HSV_BLOCK`.
  Returns float32 with integer values.
  """
  block = OPENCV_HSV_BLOCK if block is None else int(block)
  hsv = tf.cast(hsv, tf.float32)
  h = hsv[..., 0] * np.float32(6.0 / 180.0)
  s = hsv[..., 1] * np.float32(1.0 / 255.0)
  v = hsv[..., 2] * np.float32(1.0 / 255.0)
  h = tf.math.floormod(h, 6.0)
  sector = tf.floor(h)
  frac = h - sector
  sector = tf.cast(sector, tf.int32)

  def one_minus(a, b):
    # OpenCV's builds contract v * (1 - a * b) into a fused multiply-add: 1 - a * b rounded
    # once. The float32 product is exact in float64; the rounding to float32 then agrees with
    # the FMA on every 8-bit input (checked exhaustively).
    a, b = tf.cast(a, tf.float64), tf.cast(b, tf.float64)
    return tf.cast(1.0 - a * b, tf.float32)

  tab = tf.stack([v, v * (1.0 - s), v * one_minus(s, frac), v * one_minus(s, 1.0 - frac)], -1)
  # OpenCV's sector_data gives (b, g, r) indices into tab for each sector.
  sector_bgr = tf.constant([[1, 3, 0], [1, 0, 2], [3, 0, 1], [0, 2, 1], [0, 1, 3], [2, 1, 0]],
                           tf.int32)
  idx = tf.gather(sector_bgr, sector)                                      # (..., 3) b, g, r
  bgr = tf.gather(tab, idx, batch_dims=len(tab.shape) - 1)
  rgb = tf.reverse(bgr, axis=[-1]) * 255.0
  width = tf.shape(hsv)[-2]
  vectorised = (tf.range(width) < width - width % block)[:, None]           # (W, 1)
  rgb = tf.where(vectorised, tf.floor(rgb), tf.round(rgb))                 # round: half to even
  return tf.clip_by_value(rgb, 0.0, 255.0)


def _convert(x, alpha=1.0, beta=0.0):
  # The reference's `convert`: float32 affine, clip to [0, 255], truncate to uint8.
  return tf.floor(tf.clip_by_value(x * alpha + beta, 0.0, 255.0))


def photometric_params(seed, brightness_delta=32, contrast_range=(0.5, 1.5),
                       saturation_range=(0.5, 1.5), hue_delta=18):
  """All random draws of one `PhotoMetricDistortion` call, as a dict of scalars."""
  s = split_seed(seed, 9)
  return {
      'brightness_on': _randint(s[0], 0, 2) == 1,
      'brightness': _uniform(s[1], -brightness_delta, brightness_delta),
      'contrast_first': _randint(s[2], 0, 2) == 1,
      'contrast_on': _randint(s[3], 0, 2) == 1,
      'contrast': _uniform(s[4], contrast_range[0], contrast_range[1]),
      'saturation_on': _randint(s[5], 0, 2) == 1,
      'saturation': _uniform(s[6], saturation_range[0], saturation_range[1]),
      'hue_on': _randint(s[7], 0, 2) == 1,
      'hue': _randint(s[8], -hue_delta, hue_delta),
  }


def _hsv_steps_tf(x, p):
  """Saturation then hue steps with the TF emulation of OpenCV's 8-bit HSV conversions."""

  # OpenCV's RGB codes applied to the reference's BGR array: feed the reversed channels.
  def saturation(y):
    hsv = cv2_rgb2hsv(tf.reverse(y, axis=[-1]))
    sat = _convert(tf.cast(hsv[..., 1], tf.float32), alpha=p['saturation'])
    hsv = tf.stack([hsv[..., 0], tf.cast(sat, tf.int32), hsv[..., 2]], -1)
    return tf.reverse(cv2_hsv2rgb(hsv), axis=[-1])

  def hue(y):
    hsv = cv2_rgb2hsv(tf.reverse(y, axis=[-1]))
    h = tf.math.floormod(hsv[..., 0] + p['hue'], 180)
    hsv = tf.stack([h, hsv[..., 1], hsv[..., 2]], -1)
    return tf.reverse(cv2_hsv2rgb(hsv), axis=[-1])

  x = tf.cond(p['saturation_on'], lambda: saturation(x), lambda: x)
  return tf.cond(p['hue_on'], lambda: hue(x), lambda: x)


def _photometric_numpy(image, b_on, beta, c_first, c_on, alpha, s_on, sat, h_on, hue):
  """The reference's PhotoMetricDistortion with given draws on an RGB uint8 image, via OpenCV.

  Every `convert` step of the reference (float32 affine, clip, truncate) is a function of one
  uint8 value, so it is applied as a 256-entry table computed with the same float32
  arithmetic. The reference calls OpenCV's RGB<->HSV codes on its BGR array; calling the BGR
  codes on our RGB array gives the same numbers without reordering channels.
  """
  import cv2  # pylint: disable=g-import-not-at-top
  v = np.arange(256, dtype=np.float32)

  def table(a, b):
    return np.clip(v * np.float32(a) + np.float32(b), 0, 255).astype(np.uint8)

  x = image
  if b_on:
    x = cv2.LUT(x, table(1.0, beta))
  if c_first and c_on:
    x = cv2.LUT(x, table(alpha, 0.0))
  if s_on:
    hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)
    hsv[..., 1] = cv2.LUT(hsv[..., 1], table(sat, 0.0))
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if h_on:
    hsv = cv2.cvtColor(x, cv2.COLOR_BGR2HSV)
    hsv[..., 0] = cv2.LUT(hsv[..., 0], ((np.arange(256) + int(hue)) % 180).astype(np.uint8))
    x = cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
  if not c_first and c_on:
    x = cv2.LUT(x, table(alpha, 0.0))
  return np.ascontiguousarray(x)


def _photometric_opencv(image, p):
  """Whole `PhotoMetricDistortion` in one OpenCV call; uint8 (h, w, 3) in and out."""
  x = tf.cast(image, tf.uint8)
  out = tf.numpy_function(
      _photometric_numpy,
      [x, p['brightness_on'], p['brightness'], p['contrast_first'], p['contrast_on'],
       p['contrast'], p['saturation_on'], p['saturation'], p['hue_on'], p['hue']],
      tf.uint8, stateful=False)
  return tf.reshape(out, tf.shape(x))


def resolve_backend(backend: str) -> str:
  """'auto' -> 'opencv' when OpenCV is installed, else 'tf'."""
  if backend == 'auto':
    try:
      import cv2  # pylint: disable=g-import-not-at-top,unused-import
      return 'opencv'
    except ImportError:
      return 'tf'
  if backend not in ('opencv', 'tf'):
    raise ValueError(f"backend must be 'auto', 'opencv' or 'tf', got {backend!r}")
  return backend


def apply_photometric(image, p, backend: str = 'auto'):
  """`PhotoMetricDistortion` with drawn parameters `p` on an RGB image of integer values.

  `backend`: 'opencv' runs the whole distortion through `tf.numpy_function` with OpenCV
  (exactly the reference's arithmetic, several times faster than the TF ops, but not
  serialisable for tf.data service; returns uint8), 'tf' uses TF ops with an emulation of
  OpenCV's 8-bit HSV conversions (exact for OpenCV's `OPENCV_HSV_BLOCK`-pixel SIMD blocks, see
  `cv2_hsv2rgb`; returns float32), 'auto' picks 'opencv' when OpenCV is installed.
  """
  backend = resolve_backend(backend)
  if backend == 'opencv':
    return _photometric_opencv(image, p)
  x = tf.cast(image, tf.float32)
  x = tf.cond(p['brightness_on'], lambda: _convert(x, beta=p['brightness']), lambda: x)

  def contrast(y):
    return tf.cond(p['contrast_on'], lambda: _convert(y, alpha=p['contrast']), lambda: y)

  x = tf.cond(p['contrast_first'], lambda: contrast(x), lambda: x)
  x = _hsv_steps_tf(x, p)
  x = tf.cond(p['contrast_first'], lambda: x, lambda: contrast(x))
  return x


def photometric_distortion(seed, image, backend: str = 'auto'):
  """Random `PhotoMetricDistortion` (spec 6.4) of an RGB image (see `apply_photometric`)."""
  return apply_photometric(image, photometric_params(seed), backend)


# ----------------------------------------------------------------------------- rotation

def rotation_matrix(angle_deg, hw):
  """`cv2.getRotationMatrix2D((w/2, h/2), angle, 1)` as a (2, 3) float32 matrix (src -> dst)."""
  a = tf.cast(angle_deg, tf.float64) * np.pi / 180.0
  alpha, beta = tf.cos(a), tf.sin(a)
  cx = tf.cast(hw[1], tf.float64) / 2.0
  cy = tf.cast(hw[0], tf.float64) / 2.0
  return tf.stack([tf.stack([alpha, beta, (1 - alpha) * cx - beta * cy]),
                   tf.stack([-beta, alpha, beta * cx + (1 - alpha) * cy])])


def rotate(image, label, angle_deg):
  """`cv2.warpAffine` of image (bilinear, fill 0) and label (nearest, fill ignore)."""
  hw = tf.shape(label)[:2]
  m = rotation_matrix(angle_deg, hw)
  # Inverse of the affine map: output pixel -> input pixel, as warpAffine samples.
  a, b, c = m[0, 0], m[0, 1], m[0, 2]
  d, e, f = m[1, 0], m[1, 1], m[1, 2]
  det = a * e - b * d
  ia, ib, id_, ie = e / det, -b / det, -d / det, a / det
  ic = -(ia * c + ib * f)
  if_ = -(id_ * c + ie * f)
  transform = tf.cast(tf.stack([ia, ib, ic, id_, ie, if_, 0.0, 0.0])[None], tf.float32)

  def warp(x, interpolation, fill):
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=x[None], transforms=transform, output_shape=hw,
        fill_value=tf.constant(fill, tf.float32), interpolation=interpolation,
        fill_mode='CONSTANT')[0]

  image = warp(tf.cast(image, tf.float32), 'BILINEAR', 0.0)
  label = warp(tf.cast(label, tf.float32)[..., None], 'NEAREST', float(IGNORE_INDEX))[..., 0]
  return tf.round(image), tf.cast(label, tf.uint8)


def rotation_params(seed, prob: float = 0.6, degree: int = 30):
  """(rotate?, angle): rand() <= prob and randint(-degree, degree), as the reference draws."""
  s_on, s_angle = split_seed(seed, 2)
  return _uniform(s_on) <= prob, _randint(s_angle, -degree, degree)


def random_rotate(seed, image, label, prob: float = 0.6, degree: int = 30):
  """Reference `RandomRotation`: w.p. `prob` rotate by randint(-degree, degree) degrees."""
  image, label = tf.convert_to_tensor(image), tf.convert_to_tensor(label)
  on, angle = rotation_params(seed, prob, degree)
  return tf.cond(on, lambda: rotate(image, label, angle),
                 lambda: (tf.cast(image, tf.float32), label))


# ----------------------------------------------------------------------------- normalize, pad

def normalize(image, mean, std):
  """(x - mean) / std on an RGB image (the reference converts its BGR array to RGB first)."""
  return (tf.cast(image, tf.float32) - tf.constant(mean, tf.float32)) / tf.constant(std, tf.float32)


def normalize_and_pad(image, label, size, mean, std):
  """`normalize` then centred `pad_to(size)`, fast: the affine map uses constants of the full
  crop shape sliced to the image (TF's per-channel broadcasting is several times slower than
  same-shape arithmetic). Equal to `pad_to(normalize(...))` up to float rounding."""
  h, w = tf.shape(label)[0], tf.shape(label)[1]
  inv = 1.0 / np.asarray(std, np.float32)
  scale = tf.constant(np.broadcast_to(inv, (size[0], size[1], 3)))
  shift = tf.constant(np.broadcast_to(-np.asarray(mean, np.float32) * inv, (size[0], size[1], 3)))
  x = tf.cast(image, tf.float32)
  label = tf.convert_to_tensor(label)

  def padded():
    return pad_to(x * scale[:h, :w] + shift[:h, :w], label, size, centered=True)

  static = label.shape
  if static.is_fully_defined():
    if tuple(static) == tuple(size):
      return x * scale + shift, label
    return padded()

  def full():
    xs = tf.reshape(x, [size[0], size[1], 3])
    return xs * scale + shift, tf.reshape(label, [size[0], size[1]])

  return tf.cond(tf.logical_and(tf.equal(h, size[0]), tf.equal(w, size[1])), full, padded)


def pad_to(image, label, size, centered: bool = True, image_fill=0.0,
           label_fill=IGNORE_INDEX):
  """Pad (image (h, w, C), label (h, w)) to `size`; centred like the reference or bottom/right."""
  h, w = tf.shape(label)[0], tf.shape(label)[1]
  dh, dw = size[0] - h, size[1] - w
  top = dh // 2 if centered else 0
  left = dw // 2 if centered else 0
  image = tf.pad(image, [[top, dh - top], [left, dw - left], [0, 0]], constant_values=image_fill)
  label = tf.pad(label, [[top, dh - top], [left, dw - left]],
                 constant_values=tf.cast(label_fill, label.dtype))
  image = tf.ensure_shape(image, [size[0], size[1], None])
  label = tf.ensure_shape(label, [size[0], size[1]])
  return image, label


# ----------------------------------------------------------------------------- compositions

def train_transform(seed, image, label, data_config):
  """The reference training pipeline for one example (spec section 6).

  Args:
    seed: (2,) stateless seed of this example.
    image: (H, W, 3) uint8 RGB, or a function (y0, x0, h, w) -> that rectangle of it.
    label: (H, W) uint8 train ids, 255 = ignore.
    data_config: `config.data` (crop_size, train_scale, ratio_range, keep_ratio, cat_max_ratio,
      flip_prob, flip_swap_pairs, photometric, rotate_prob, rotate_degree, mean, std, and
      optionally backend: 'auto' | 'opencv' | 'tf', see `resize_and_crop`/`apply_photometric`).
  Returns:
    image float32 (h, w, 3) normalised, label int32 (h, w), (h, w) = crop_size.
  """
  d = data_config
  s_crop, s_flip, s_rot, s_photo = split_seed(seed, 4)
  crop_size = tuple(int(c) for c in d.crop_size)
  backend = d.get('backend', 'auto')
  image, label = resize_and_crop(
      s_crop, image, label, scale=tuple(d.train_scale), ratio_range=tuple(d.ratio_range),
      keep_ratio=bool(d.keep_ratio), crop_size=crop_size, cat_max_ratio=float(d.cat_max_ratio),
      backend=backend)
  swap_pairs = tuple(tuple(int(v) for v in p) for p in d.flip_swap_pairs)
  image, label = random_flip(s_flip, image, label, float(d.flip_prob), swap_pairs)
  if d.rotate_prob > 0:
    image, label = random_rotate(s_rot, image, label, float(d.rotate_prob), int(d.rotate_degree))
  if d.photometric:
    image = photometric_distortion(s_photo, image, backend)
  image, label = normalize_and_pad(image, label, crop_size, d.mean, d.std)
  return image, tf.cast(label, tf.int32)


def test_resize_size(hw, data_config) -> tf.Tensor:
  """Test-time size (spec section 7): `eval_scale` with `eval_keep_ratio`, no random ratio."""
  return rescale_size(hw, tuple(float(s) for s in data_config.eval_scale),
                      bool(data_config.eval_keep_ratio))


def round_up(x, multiple: int):
  return (x + multiple - 1) // multiple * multiple
