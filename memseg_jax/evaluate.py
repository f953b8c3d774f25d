"""Evaluation: whole / sliding-window / multi-scale + flip inference, the confusion matrix, mIoU.

The protocol is the reference's tester (SSSegmentation 1.7.0 `BaseSegmentor.inference`,
`auginference` and `test.py`; spec section 7):

- Each test-time view is the test-resized image scaled by `s` (bilinear, PyTorch
  `scale_factor` semantics) for every `s` in `config.inference.scales`, and its horizontal
  mirror when `config.inference.flip` is on.
- `whole` mode runs the network on the full view; with `use_probs_before_resize` the softmax is
  taken on the 1/8-resolution logits.
- `slide` mode runs (crop_h, crop_w) windows with stride (stride_h, stride_w): the grid has
  max(H - crop_h + stride_h - 1, 0) // stride_h + 1 rows (likewise columns), windows are clamped
  to the border (y1 = max(y2 - crop_h, 0)); each window's logits are upsampled to the window
  size, softmaxed there (with `use_probs_before_resize`), summed into a canvas and divided by
  the per-pixel window count.
- The flipped view's output gets LIP's left/right class swap (`config.data.flip_swap_pairs`)
  and is mirrored back.
- Every view's output is upsampled straight to the *original* image size, the views are
  averaged (sum / count, in the reference's order), then argmax.

Shapes. Plain zero padding would change the output everywhere (ASPP's image-pool branch would
average over the padded area, border convolutions would see it, the memory attention would
attend to it), so padded inputs alone cannot reproduce the reference. Two paths:

- whole mode, `inference.padded_whole` (default): each image stays in its eval bucket's padded
  shape (the pipeline's fixed shapes, sizes rounded up to `data.eval_pad_multiple`) and the
  network masks everything outside the valid region (`valid_hw`, models/layers.py), which
  makes the valid logits those of the unpadded image. Scaling, flipping, un-flipping and the
  resize to the original size are gathers with per-image index/weight tables computed on the
  host (`padded_whole_tables`, the same weights as `ops.resize_bilinear`), padded to fixed
  lengths, and the scores land in the label bucket's shape, where the label's ignore padding
  keeps the padded area out of the confusion matrix. Everything compiles once per bucket (the
  network once per padded view shape), whatever the number of distinct image sizes.
- slide mode, and whole mode with `padded_whole=False` (`inference`): the network runs on the
  exact (resized, scaled) image, cropped out of its bucket in numpy, and compiles once per
  distinct input shape; in slide mode it only ever sees the window shape, `windows_per_call`
  windows per call (the last call padded with copies), so a 1024x2048 image never needs all
  its windows at once. The small pre/post-processing functions (scaling, softmax, resize to
  the original size, canvas accumulation) compile per image shape; they are cheap.

Devices. Images are independent, so `evaluate` spreads them over the local devices (the
variables are copied to every local device once) and keeps up to D images in flight. A jitted
program is compiled per device as well as per shape, so an image goes to a device that has
already compiled its shape unless that device is more than `_REPLICATE_AFTER` images ahead of
the least loaded one (`_DevicePicker`): the work spreads while each shape compiles on few
devices. The per-image (K, K) confusion matrices come back to the host, are summed in int64,
then summed across processes, so every image counts exactly once whatever the device count,
the device assignment or the batch size.
"""

import collections
import functools
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from memseg_jax import metrics
from memseg_jax.ops import resize_bilinear, resize_taps


# ----------------------------------------------------------------------------- set-up

@functools.lru_cache(maxsize=None)
def make_forward_fn(model) -> Callable:
  """jit(variables, images (N, H, W, 3)) -> eval logits (N, ceil(H/8), ceil(W/8), K).

  Cached per model, so every caller shares one jit cache (one compile per input shape).
  """
  def forward(variables, images):
    return model.apply(variables, images, train=False)['logits']
  return jax.jit(forward)


@functools.lru_cache(maxsize=None)
def make_padded_forward_fn(model) -> Callable:
  """jit(variables, images (N, H, W, 3) zero-padded, valid_hw (N, 2)) -> eval logits.

  The top-left ceil(valid_hw / 8) of each image's logits equal the unpadded forward's.
  """
  def forward(variables, images, valid_hw):
    return model.apply(variables, images, train=False, valid_hw=valid_hw)['logits']
  return jax.jit(forward)


class InferenceSettings(collections.namedtuple(
    'InferenceSettings', ['mode', 'crop_size', 'stride', 'windows_per_call', 'scales', 'flip',
                          'use_probs_before_resize', 'flip_swap_pairs', 'padded_whole'],
    defaults=(True,))):
  """Hashable, validated copy of `config.inference` (+ `config.data.flip_swap_pairs`)."""

  @classmethod
  def from_config(cls, config) -> 'InferenceSettings':
    i = config.inference if 'inference' in config else config
    swap = ()
    if 'data' in config and 'flip_swap_pairs' in config.data:
      swap = config.data.flip_swap_pairs
    settings = cls(
        mode=str(i.mode),
        crop_size=tuple(int(v) for v in i.crop_size),
        stride=tuple(int(v) for v in i.stride),
        windows_per_call=int(i.windows_per_call),
        scales=tuple(float(s) for s in i.scales),
        flip=bool(i.flip),
        use_probs_before_resize=bool(i.use_probs_before_resize),
        flip_swap_pairs=tuple((int(a), int(b)) for a, b in swap),
        padded_whole=bool(i.get('padded_whole', True)))
    settings.validate()
    return settings

  def validate(self):
    if self.mode not in ('whole', 'slide'):
      raise ValueError(f"inference.mode: expected 'whole' or 'slide', got {self.mode!r}")
    if not self.scales or any(s <= 0 for s in self.scales):
      raise ValueError(f'inference.scales: expected positive floats, got {self.scales!r}')
    if self.mode == 'slide':
      if len(self.crop_size) != 2 or min(self.crop_size) <= 0:
        raise ValueError(f'inference.crop_size: expected (h, w) > 0, got {self.crop_size!r}')
      if len(self.stride) != 2 or min(self.stride) <= 0:
        raise ValueError(f'inference.stride: expected (h, w) > 0, got {self.stride!r}')
      if self.windows_per_call < 1:
        raise ValueError(f'inference.windows_per_call: expected >= 1, got {self.windows_per_call}')


# ----------------------------------------------------------------------------- jitted pieces

@functools.partial(jax.jit, static_argnames=('scale', 'flip'))
def _make_views(images, *, scale: float, flip: bool):
  """(B, H, W, 3) -> (V*B, h, w, 3): the scaled image, then its mirror when `flip`."""
  if scale != 1.0:
    images = resize_bilinear(images, scale_factor=scale)
  if flip:
    images = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
  return images


def _unflip(x, swap_pairs):
  """Swaps left/right class channels, then mirrors back (the reference's order)."""
  if swap_pairs:
    perm = list(range(x.shape[-1]))
    for a, b in swap_pairs:
      perm[a], perm[b] = b, a
    x = x[..., jnp.asarray(perm)]
  return x[:, :, ::-1]


@functools.partial(jax.jit, static_argnames=('out_hw', 'num_views', 'softmax', 'swap_pairs'))
def _views_to_output(x, *, out_hw: Tuple[int, int], num_views: int, softmax: bool,
                     swap_pairs):
  """(V*B, h, w, K) per-view logits/probabilities -> (V, B, out_h, out_w, K) at `out_hw`."""
  x = x.astype(jnp.float32)
  if softmax:
    x = jax.nn.softmax(x, axis=-1)
  x = x.reshape((num_views, -1) + x.shape[1:])
  views = [x[0]]
  if num_views == 2:
    views.append(_unflip(x[1], swap_pairs))
  return jnp.stack([resize_bilinear(v, out_hw) for v in views])


@functools.partial(jax.jit, static_argnames=('window_hw', 'softmax'))
def _window_outputs(logits, *, window_hw: Tuple[int, int], softmax: bool):
  """(N, h', w', K) window logits -> (N, ch, cw, K) upsampled (and softmaxed) per window."""
  x = resize_bilinear(logits.astype(jnp.float32), window_hw)
  if softmax:
    x = jax.nn.softmax(x, axis=-1)
  return x


@functools.partial(jax.jit, donate_argnums=0)   # the canvas is updated in place
def _accumulate(canvas, windows, y1s, x1s, num_valid):
  """canvas (B, H, W, K) += windows (n, B, ch, cw, K) at (y1s[i], x1s[i]) for i < num_valid.

  Windows are added one after the other in raster order, as the reference does, so the float
  sums are the same; padding windows (i >= num_valid) add exact zeros.
  """
  n, b, ch, cw, k = windows.shape

  def body(i, c):
    start = (0, y1s[i], x1s[i], 0)
    update = jnp.where(i < num_valid, windows[i], 0.0)
    return lax.dynamic_update_slice(c, lax.dynamic_slice(c, start, (b, ch, cw, k)) + update,
                                    start)

  return lax.fori_loop(0, n, body, canvas)


@functools.partial(jax.jit, static_argnames=('out_hw', 'flipped', 'swap_pairs'))
def _canvas_to_output(canvas, count, *, out_hw, flipped: bool, swap_pairs):
  """Divides by the window count, un-flips, resizes to `out_hw`: (B, out_h, out_w, K)."""
  x = canvas / count[None, :, :, None]
  if flipped:
    x = _unflip(x, swap_pairs)
  return resize_bilinear(x, out_hw)


# ----------------------------------------------------------------------------- inference

def slide_windows(image_hw: Tuple[int, int], crop_size: Sequence[int],
                  stride: Sequence[int]):
  """[(y1, y2, x1, x2)] of the reference's sliding windows, row by row.

  h_grids = max(H - crop_h + stride_h - 1, 0) // stride_h + 1 (likewise w); each window is
  clamped to the image: y2 = min(y1 + crop_h, H), y1 = max(y2 - crop_h, 0).
  """
  h, w = image_hw
  crop_h, crop_w = crop_size
  stride_h, stride_w = stride
  grids_h = max(h - crop_h + stride_h - 1, 0) // stride_h + 1
  grids_w = max(w - crop_w + stride_w - 1, 0) // stride_w + 1
  windows = []
  for hi in range(grids_h):
    for wi in range(grids_w):
      y1, x1 = hi * stride_h, wi * stride_w
      y2, x2 = min(y1 + crop_h, h), min(x1 + crop_w, w)
      y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
      windows.append((y1, y2, x1, x2))
  return windows


def _slide_view(forward_fn, variables, view, settings: InferenceSettings, *, out_hw,
                flipped: bool):
  """One view (B, H, W, 3) in slide mode -> (B, out_h, out_w, K) (probs or logits)."""
  b, h, w, _ = view.shape
  windows = slide_windows((h, w), settings.crop_size, settings.stride)
  ch, cw = windows[0][1] - windows[0][0], windows[0][3] - windows[0][2]
  count = np.zeros((h, w), np.float32)
  for y1, y2, x1, x2 in windows:
    count[y1:y2, x1:x2] += 1
  canvas = None
  per_call = settings.windows_per_call
  for start in range(0, len(windows), per_call):
    chunk = windows[start:start + per_call]
    num_valid = len(chunk)
    chunk = chunk + [chunk[-1]] * (per_call - num_valid)    # one window shape, one compile
    crops = jnp.concatenate([view[:, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk], axis=0)
    logits = forward_fn(variables, crops)                   # (n*B, h', w', K)
    outs = _window_outputs(logits, window_hw=(ch, cw),
                           softmax=settings.use_probs_before_resize)
    outs = outs.reshape((per_call, b) + outs.shape[1:])     # (n, B, ch, cw, K)
    if canvas is None:
      canvas = jnp.zeros((b, h, w, outs.shape[-1]), jnp.float32, device=outs.sharding)
    canvas = _accumulate(canvas, outs,
                         jnp.asarray([c[0] for c in chunk], jnp.int32),
                         jnp.asarray([c[2] for c in chunk], jnp.int32),
                         jnp.int32(num_valid))
  return _canvas_to_output(canvas, jnp.asarray(count), out_hw=tuple(out_hw), flipped=flipped,
                           swap_pairs=settings.flip_swap_pairs)


def inference(forward_fn: Callable, variables, images, *, out_hw: Tuple[int, int],
              settings: InferenceSettings):
  """Test-time prediction of one image (or B images of the same size) at the original size.

  Args:
    forward_fn: (variables, images (N, h, w, 3)) -> logits (N, ceil(h/8), ceil(w/8), K), e.g.
      `make_forward_fn(model)`. Should be jitted (it is called once per view or window chunk).
    variables: the model variables.
    images: (B, H, W, 3) float32 normalised, at the exact test-resized size (not padded).
    out_hw: (height, width) of the original image: every view is upsampled to it.
    settings: `InferenceSettings.from_config(config)`.
  Returns:
    (B, out_h, out_w, K) float32: the average over views of softmax probabilities
    (`use_probs_before_resize`) or logits; argmax over the last axis gives the prediction.
  """
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'inference: expected images (B, H, W, 3), got shape {images.shape}')
  out_hw = (int(out_hw[0]), int(out_hw[1]))
  num_views = 2 if settings.flip else 1
  b = images.shape[0]
  total, count = None, 0
  for scale in settings.scales:
    views = _make_views(images, scale=scale, flip=settings.flip)   # (V*B, h, w, 3)
    if settings.mode == 'whole':
      logits = forward_fn(variables, views)
      outs = list(_views_to_output(logits, out_hw=out_hw, num_views=num_views,
                                   softmax=settings.use_probs_before_resize,
                                   swap_pairs=settings.flip_swap_pairs))
    else:
      outs = [_slide_view(forward_fn, variables, views[v * b:(v + 1) * b], settings,
                          out_hw=out_hw, flipped=v == 1) for v in range(num_views)]
    for out in outs:
      total = out if total is None else total + out
      count += 1
  return total / count


# ----------------------------------------------------------------------------- padded whole mode

_VIEW_MULTIPLE = 32   # padded view sizes are rounded up to this (a multiple of every stride)


def _round_up(x: int, m: int) -> int:
  return max(-(-x // m) * m, m)


def _resize_table(in_size: int, out_size: int, length: int, *,
                  scale_factor: Optional[float] = None, mirror: int = 0):
  """Host-side (i0, i1, lam) of `length` entries: entry o < out_size is output o of the 1-D
  resize in_size -> out_size with `ops.resize_bilinear`'s weights; entries past out_size read
  input 0 with weight 0 (they land in padding). `mirror` m > 0 maps every source index i to
  m - 1 - i (a horizontal flip of the m-wide input)."""
  i0 = np.zeros(length, np.int32)
  i1 = np.zeros(length, np.int32)
  lam = np.zeros(length, np.float32)
  if in_size == out_size and scale_factor in (None, 1.0):     # resize_bilinear's identity
    i0[:out_size] = i1[:out_size] = np.arange(out_size)
  else:
    a, b, l = resize_taps(in_size, out_size, scale_factor=scale_factor)
    i0[:out_size], i1[:out_size], lam[:out_size] = a, b, l
  if mirror:
    i0[:out_size] = mirror - 1 - i0[:out_size]
    i1[:out_size] = mirror - 1 - i1[:out_size]
  return i0, i1, lam


def padded_whole_tables(image_hw, padded_hw, orig_hw, label_hw, settings: 'InferenceSettings',
                        output_stride: int = 8):
  """Per scale, the host-side tables of one image for `padded_whole_scores`.

  Args:
    image_hw: (h, w) the test-resized size, the valid top-left of the padded image.
    padded_hw: (Hp, Wp) the padded image's shape (its eval bucket).
    orig_hw: (oh, ow) the original size every view is resized to.
    label_hw: (Lh, Lw) the padded label's shape (oh <= Lh, ow <= Lw).
  Returns:
    [(view_hw, tables)] per scale: view_hw the padded (Hv, Wv) of the scaled views (depends on
    the bucket and the scale only); tables a dict of numpy arrays, each with a leading views
    axis (1, or 2 with flip): 'valid' (V, 2) the scaled size, 'in_rows'/'in_cols' (i0, i1, lam)
    scaling (and flipping) the image into the view, 'out_rows'/'out_cols' the resize (and
    un-flip) of the valid logits to the original size inside the label's shape.
  """
  h, w = (int(v) for v in image_hw)
  hp, wp = (int(v) for v in padded_hw)
  oh, ow = (int(v) for v in orig_hw)
  lh, lw = (int(v) for v in label_hw)
  plan = []
  for scale in settings.scales:
    if scale == 1.0:
      hs, ws, hv, wv, factor = h, w, _round_up(hp, _VIEW_MULTIPLE), _round_up(wp, _VIEW_MULTIPLE), None
    else:   # PyTorch's scale_factor semantics: floor(size * s), source = (dst + .5) / s - .5
      hs, ws = int(np.floor(h * scale)), int(np.floor(w * scale))
      hv = _round_up(int(np.floor(hp * scale)), _VIEW_MULTIPLE)
      wv = _round_up(int(np.floor(wp * scale)), _VIEW_MULTIPLE)
      factor = scale
    # Feature size: every stride-2 layer maps v to ceil(v / 2) (models/layers.py).
    hf, wf = -(-hs // output_stride), -(-ws // output_stride)
    flips = (False, True) if settings.flip else (False,)
    views = collections.defaultdict(list)
    for flipped in flips:
      rows = _resize_table(h, hs, hv, scale_factor=factor)
      cols = _resize_table(w, ws, wv, scale_factor=factor)
      if flipped:   # view column x is the scaled image's column ws - 1 - x
        cols = tuple(np.concatenate([c[:ws][::-1], c[ws:]]) for c in cols)
      views['valid'].append(np.asarray([hs, ws], np.int32))
      views['in_rows'].append(rows)
      views['in_cols'].append(cols)
      views['out_rows'].append(_resize_table(hf, oh, lh))
      views['out_cols'].append(_resize_table(wf, ow, lw, mirror=wf if flipped else 0))
    tables = {'valid': np.stack(views['valid'])}
    for key in ('in_rows', 'in_cols', 'out_rows', 'out_cols'):
      tables[key] = tuple(np.stack(part) for part in zip(*views[key]))
    plan.append(((hv, wv), tables))
  return plan


def _lerp_axis(x, table, axis: int):
  i0, i1, lam = table
  shape = [1] * x.ndim
  shape[axis] = -1
  lam = lam.reshape(shape).astype(x.dtype)
  return jnp.take(x, i0, axis=axis) * (1 - lam) + jnp.take(x, i1, axis=axis) * lam


def _resize_by_tables(x, rows, cols):
  """x (H, W, C) -> (len(rows), len(cols), C): rows first, then columns (resize_bilinear's order)."""
  return _lerp_axis(_lerp_axis(x, rows, 0), cols, 1)


@jax.jit
def _padded_views(image, tables):
  """image (Hp, Wp, 3) -> (V, Hv, Wv, 3) scaled (and flipped) views, zero outside `valid`."""
  views = jax.vmap(_resize_by_tables, in_axes=(None, 0, 0))(
      image.astype(jnp.float32), tables['in_rows'], tables['in_cols'])
  valid = tables['valid']
  rows = jnp.arange(views.shape[1])[None, :] < valid[:, 0:1]
  cols = jnp.arange(views.shape[2])[None, :] < valid[:, 1:2]
  return jnp.where((rows[:, :, None] & cols[:, None, :])[..., None], views, 0.0)


@functools.partial(jax.jit, static_argnames=('softmax', 'swap_pairs'))
def _padded_outputs(logits, tables, *, softmax: bool, swap_pairs):
  """(V, h', w', K) view logits -> (V, Lh, Lw, K) at the original size (un-flipped)."""
  x = logits.astype(jnp.float32)
  if softmax:
    x = jax.nn.softmax(x, axis=-1)
  if x.shape[0] == 2 and swap_pairs:           # LIP's class swap on the flipped view
    perm = list(range(x.shape[-1]))
    for a, b in swap_pairs:
      perm[a], perm[b] = b, a
    x = jnp.stack([x[0], x[1][..., jnp.asarray(perm)]])
  # The un-flip (mirror) is folded into the flipped view's column table.
  return jax.vmap(_resize_by_tables)(x, tables['out_rows'], tables['out_cols'])


def padded_whole_scores(forward_fn: Callable, variables, image, *, image_hw, orig_hw, label_hw,
                        settings: 'InferenceSettings', output_stride: int = 8, device=None):
  """Whole-mode test-time prediction of one zero-padded image, at fixed shapes.

  Args:
    forward_fn: `make_padded_forward_fn(model)`.
    image: (Hp, Wp, 3) normalised, the test-resized image in its top-left (h, w) = image_hw.
    label_hw: the padded label shape (Lh, Lw) the scores are laid out in.
    device: where the tables go (the device holding `image` and `variables`).
  Returns:
    (Lh, Lw, K) float32: the top-left orig_hw equals `inference(...)` on the unpadded image;
    the rest is unspecified (the label's ignore padding covers it).
  """
  plan = padded_whole_tables(image_hw, image.shape[:2], orig_hw, label_hw, settings,
                             output_stride)
  total, count = None, 0
  for _, tables in plan:
    tables = jax.device_put(tables, device)
    views = _padded_views(image, tables)
    logits = forward_fn(variables, views, tables['valid'])
    outs = _padded_outputs(logits, tables, softmax=settings.use_probs_before_resize,
                           swap_pairs=settings.flip_swap_pairs)
    for v in range(outs.shape[0]):        # the reference's order: each scale, then its flip
      total = outs[v] if total is None else total + outs[v]
      count += 1
  return total / count


# ----------------------------------------------------------------------------- eval loop

@functools.partial(jax.jit, static_argnames=('num_classes', 'ignore_index'))
def _predict_and_count(scores, label, *, num_classes: int, ignore_index: int):
  """scores (h, w, K) at the original size, label (Lh, Lw) padded with ignore (Lh >= h).

  Returns (pred (h, w) int32, confusion (K, K) int32).
  """
  pred = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  h, w = pred.shape
  conf = metrics.confusion_matrix(pred, label[:h, :w], num_classes, ignore_index)
  return pred, conf


def dataset_metadata(config):
  """(class_names, palette (K, 3) uint8) of `config.data.name`, from memseg_jax.datasets."""
  from memseg_jax import config_validation, datasets  # pylint: disable=import-outside-toplevel
  config_validation.check_num_classes(config)
  info = datasets.get_dataset_info(config.data.name)
  return list(info.class_names), np.asarray(info.palette, np.uint8).reshape(-1, 3)


def _json_safe(x):
  """NaN -> None, so eval_results.json is strict JSON."""
  if isinstance(x, dict):
    return {k: _json_safe(v) for k, v in x.items()}
  if isinstance(x, float) and np.isnan(x):
    return None
  return x


_REPLICATE_AFTER = 4


class _DevicePicker:
  """Chooses a local device per image, preferring devices that compiled the image's shape."""

  def __init__(self, devices):
    self.devices = list(devices)
    self.load = [0] * len(self.devices)
    self.compiled = collections.defaultdict(set)   # shape -> device indices

  def pick(self, shape) -> int:
    least = min(range(len(self.devices)), key=lambda i: self.load[i])
    have = self.compiled[shape]
    if have:
      best = min(have, key=lambda i: self.load[i])
      if self.load[best] - self.load[least] <= _REPLICATE_AFTER:
        least = best
    have.add(least)
    self.load[least] += 1
    return least


def _eval_batches(config):
  """(iterator of eval batches of this process, number of images of this process or None)."""
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  kwargs = dict(process_index=jax.process_index(), process_count=jax.process_count())
  if hasattr(input_pipeline, 'build_eval_dataset'):
    ds, plan = input_pipeline.build_eval_dataset(config, **kwargs)
    return ds.as_numpy_iterator(), int(np.sum(plan.owner == jax.process_index()))
  return input_pipeline.create_eval_dataset(config, **kwargs), None


def evaluate(config, variables, workdir: Optional[str], *, mesh=None, step: Optional[int] = None,
             writer=None, model=None) -> Dict[str, Any]:
  """Evaluates `variables` on `config.data.eval_split`; every image counts exactly once.

  Args:
    config: the full config (model, data, eval, inference blocks); `config.eval.max_images`
      (applied by the input pipeline) limits the split for quick checks.
    variables: {'params', 'batch_stats'[, 'memory']} (host arrays or replicated jax arrays).
    workdir: where eval_results.json goes (None: not written).
    mesh: its devices of this process run the evaluation (default: all local devices).
    step: training step recorded with the results (and used for the summaries).
    writer: optional clu metric writer: scalars and `config.eval.num_summary_images`
      [image | ground truth | prediction] rows.
    model: the Linen module (default: `build_model(config)`).
  Returns:
    metrics.compute_metrics(...) (mIoU, mAcc, aAcc, per_class_iou, per_class_acc,
    num_images) plus 'step' and 'seconds'.
  """
  from memseg_jax import models, visualize  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel

  start_time = time.time()
  settings = InferenceSettings.from_config(config)
  k = int(config.model.num_classes)
  ignore_index = int(config.data.ignore_index)
  class_names, palette = dataset_metadata(config)
  if mesh is not None:
    devices = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
  else:
    devices = jax.local_devices()
  if model is None:
    model = build_model(config, platform=devices[0].platform)
  forward_fn = make_forward_fn(model)
  # Models whose layers cannot mask a padded region run each image at its exact size.
  padded = (settings.mode == 'whole' and settings.padded_whole
            and models.supports_valid_hw(config))
  padded_forward_fn = make_padded_forward_fn(model)
  output_stride = models.logits_stride(config)
  # Plain host copies first: variables may arrive sharded over a training mesh.
  host_variables = jax.tree_util.tree_map(np.asarray, variables)
  device_variables = [jax.device_put(host_variables, d) for d in devices]
  picker = _DevicePicker(devices)
  num_summary = int(config.eval.num_summary_images) if writer is not None else 0
  is_main = jax.process_index() == 0

  conf = np.zeros((k, k), np.int64)
  num_images = 0
  summaries = []
  pending = collections.deque()

  def drain_one():
    item = pending.popleft()
    conf[...] += np.asarray(item['conf'], np.int64)
    if 'pred' in item:
      summaries.append((item['image'], item['label'], np.asarray(item['pred'])))

  batches, local_total = _eval_batches(config)
  progress = tqdm(total=local_total, desc=f'eval {config.data.name}/{config.data.eval_split}',
                  unit='img', disable=not is_main, dynamic_ncols=True)
  for batch in batches:
    for j in range(len(batch['valid'])):
      if not batch['valid'][j]:
        continue
      h, w = (int(v) for v in batch['image_hw'][j])
      oh, ow = (int(v) for v in batch['orig_hw'][j])
      label_hw = batch['label'].shape[1:3]
      d = picker.pick(batch['image'].shape[1:3] + label_hw if padded else (h, w, oh, ow))
      label = jax.device_put(np.asarray(batch['label'][j], np.int32), devices[d])
      if padded:   # the bucket's fixed shapes, the padding masked (module docstring)
        image = jax.device_put(np.asarray(batch['image'][j]), devices[d])
        scores = padded_whole_scores(padded_forward_fn, device_variables[d], image,
                                     image_hw=(h, w), orig_hw=(oh, ow), label_hw=label_hw,
                                     settings=settings, output_stride=output_stride,
                                     device=devices[d])
      else:        # the exact resized image, cropped out of its bucket
        image = jax.device_put(np.ascontiguousarray(batch['image'][j:j + 1, :h, :w]),
                               devices[d])
        scores = inference(forward_fn, device_variables[d], image, out_hw=(oh, ow),
                           settings=settings)[0]
      pred, image_conf = _predict_and_count(scores, label, num_classes=k,
                                            ignore_index=ignore_index)
      item = {'conf': image_conf}
      if len(summaries) + len(pending) < num_summary and is_main:
        item.update(pred=pred[:oh, :ow], image=np.asarray(batch['image'][j, :h, :w]),
                    label=np.asarray(batch['label'][j, :oh, :ow]))
      pending.append(item)
      if len(pending) >= len(devices):   # about one image in flight per device
        drain_one()
      num_images += 1
      progress.update(1)
  while pending:
    drain_one()
  progress.close()

  conf = metrics.sum_across_processes(conf)
  num_images = int(metrics.sum_across_processes(np.asarray([num_images]))[0])
  results = metrics.compute_metrics(conf, class_names, num_images=num_images)
  results['step'] = None if step is None else int(step)
  results['seconds'] = time.time() - start_time
  logging.info('eval step %s: mIoU %.4f aAcc %.4f on %d images (%.1f s)', step,
               results['mIoU'], results['aAcc'], num_images, results['seconds'])

  if is_main and workdir:
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    # tf.io.gfile: the workdir may be local or gs://.
    tf.io.gfile.makedirs(workdir)
    with tf.io.gfile.GFile(os.path.join(workdir, 'eval_results.json'), 'w') as f:
      f.write(json.dumps(_json_safe(results), indent=2))
  if writer is not None:
    summary_step = 0 if step is None else int(step)
    writer.write_scalars(summary_step, {'eval/mIoU': results['mIoU'],
                                        'eval/mAcc': results['mAcc'],
                                        'eval/aAcc': results['aAcc']})
    if summaries:
      writer.write_images(summary_step, {
          f'eval/image{i}_gt_pred': visualize.summary_row(
              img, label, pred, palette, config.data.mean, config.data.std,
              ignore_index=ignore_index)[None]
          for i, (img, label, pred) in enumerate(summaries)})
    writer.flush()
  return results


def evaluate_checkpoint(config, workdir: str) -> Dict[str, Any]:
  """`main --mode=eval`: evaluates config.eval.checkpoint or the latest checkpoint in `workdir`.

  `config.eval.checkpoint` may be a converted checkpoint (`python -m memseg_jax.convert`), a
  training workdir, its checkpoints folder or one of its step folders. Only the model's
  variables are restored (`checkpoint.load_eval_variables`: shapes from the model's init, a
  partial restore), so no optimizer or TrainState is built and a checkpoint of any optimizer
  evaluates. The workdir (where eval_results.json goes) is checked for writing first.
  """
  from memseg_jax import checkpoint  # pylint: disable=import-outside-toplevel
  workdir = checkpoint.check_writable(workdir)
  variables, step = checkpoint.load_eval_variables(config, workdir)
  return evaluate(config, variables, workdir, step=step)
