"""Transforms: OpenCV/reference semantics, eager == tf.data, alignment, randomness statistics."""

import sys

import cv2
import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from memseg_jax import transforms as T

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
# Far-apart colours, one per class, so that a label can be read back from the image.
COLOURS = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0],
                    [0, 255, 255], [255, 0, 255], [255, 255, 255]], np.uint8)


def block_scene(h, w, block=16, seed=0, num_classes=8):
  """(image, label): random class per block, image = that class's colour, a few ignored blocks."""
  rng = np.random.default_rng(seed)
  grid = rng.integers(0, num_classes, (-(-h // block), -(-w // block)))
  label = np.kron(grid, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
  image = COLOURS[label]
  label = label.copy()
  label[:block, :block] = 255
  return image, label


def data_config(**overrides):
  d = ml_collections.ConfigDict(dict(
      crop_size=(64, 64), train_scale=(256, 64), ratio_range=(0.5, 2.0), keep_ratio=True,
      cat_max_ratio=0.75, flip_prob=0.5, flip_swap_pairs=(), photometric=True, rotate_prob=0.0,
      rotate_degree=30, mean=MEAN, std=STD, eval_scale=(256, 64), eval_keep_ratio=True,
      backend='auto'))
  d.update(overrides)
  return d


def seed_of(i):
  return T.example_seed(3, 0, 0, i)


def in_tf_data(fn, *args):
  """Runs fn(*args) inside a tf.data map (graph mode) and returns the numpy result."""
  ds = tf.data.Dataset.from_tensors(tuple(tf.convert_to_tensor(a) for a in args)).map(fn)
  return next(iter(ds.as_numpy_iterator()))


def np_tree(x):
  return tf.nest.map_structure(lambda t: t.numpy() if hasattr(t, 'numpy') else np.asarray(t), x)


# ----------------------------------------------------------------------------- OpenCV semantics

@pytest.mark.parametrize('in_hw,out_hw', [((37, 50), (80, 107)), ((80, 107), (37, 50)),
                                          ((64, 64), (64, 64)), ((51, 29), (130, 12))])
def test_resize_matches_opencv(in_hw, out_hw):
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, in_hw + (3,), dtype=np.uint8)
  label = rng.integers(0, 256, in_hw, dtype=np.uint8)
  ours = T.resize_image(image, tf.constant(out_hw)).numpy()
  ref = cv2.resize(image, out_hw[::-1], interpolation=cv2.INTER_LINEAR).astype(np.float32)
  # OpenCV interpolates uint8 in 11-bit fixed point; we compute in float and round.
  assert np.abs(ours - ref).max() <= 1
  assert (ours != ref).mean() < 0.2
  np.testing.assert_array_equal(T.resize_label(label, tf.constant(out_hw)).numpy(),
                                cv2.resize(label, out_hw[::-1], interpolation=cv2.INTER_NEAREST))


def test_resize_window_and_source_window_equal_a_crop_of_the_full_resize():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (41, 57, 3), dtype=np.uint8)
  for out_hw, window in [((90, 120), (13, 40, 32, 48)), ((30, 40), (0, 0, 30, 40)),
                         ((83, 115), (51, 67, 32, 48))]:
    full = T.resize_image(image, tf.constant(out_hw)).numpy()
    top, left, h, w = window
    win = T.resize_image_window(image, tf.constant(out_hw), window).numpy()
    # A shifted translation changes float32 rounding of the sample positions: rare ties at .5
    # round the other way.
    assert np.abs(win - full[top:top + h, left:left + w]).max() <= 1
    assert (win != full[top:top + h, left:left + w]).mean() < 0.005
    y0, x0, sh, sw = [int(v) for v in T.source_window((41, 57), out_hw, window)]
    region = image[y0:y0 + sh, x0:x0 + sw]
    part = T.resize_image_window(region, tf.constant(out_hw), window, in_hw=(41, 57),
                                 offset=(y0, x0)).numpy()
    assert np.abs(part - full[top:top + h, left:left + w]).max() <= 1
    assert (part != full[top:top + h, left:left + w]).mean() < 0.01


def _reference_dsize(h, w, scale, keep_ratio):
  """The reference `Resize` output (h, w), written from spec section 6 with numpy."""
  if keep_ratio:
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * f + 0.5), int(w * f + 0.5)
  return (max(scale), min(scale)) if h > w else (min(scale), max(scale))


@pytest.mark.parametrize('hw', [(512, 683), (683, 512), (1024, 2048), (300, 301), (97, 1000)])
def test_rescale_size_matches_the_reference_formula(hw):
  for r in (0.5, 0.77, 1.0, 1.63, 1.999):
    scale = (int(2048 * r), int(512 * r))
    for keep in (True, False):
      ours = tuple(T.rescale_size(hw, scale, keep).numpy().tolist())
      assert ours == _reference_dsize(*hw, scale, keep)


# The TF backend's HSV->RGB (transforms.cv2_hsv2rgb with its default 64-pixel SIMD blocks: OpenCV
# 5.1 on an AVX-512 CPU) against each OpenCV, by the SIMD block that OpenCV runs on the CPU at
# hand (`opencv_hsv_block`, see transforms.OPENCV_HSV_BLOCK), measured with the images of the
# tests below: 64-pixel blocks on x86-64 with AVX-512 (OpenCV 4.14 and 5.1), 32 with the 5.0
# wheels and on CPUs without AVX-512 (OpenCV 5.1 on an AMD EPYC with AVX2 gave exactly 5.0's
# figures: the difference follows the block, not the version). `hsv2rgb_max`, `hsv2rgb_frac`:
# the largest difference of one HSV->RGB conversion and the fraction of pixels that differ;
# `photometric_max`, `photometric_frac`: the same after the whole photometric distortion (up to
# two conversions, then possibly a contrast stretch), over all draws of the test. A version not
# listed is held to the newest one's bounds; a block not measured for the version fails.
_EXACT = dict(hsv2rgb_max=0, hsv2rgb_frac=0.0, photometric_max=0, photometric_frac=0.0)
_BLOCK_32 = dict(hsv2rgb_max=1, hsv2rgb_frac=0.245, photometric_max=3, photometric_frac=0.0872)
HSV_BOUNDS = {
    '4.14': {64: _EXACT},
    '5.0': {32: _BLOCK_32},
    '5.1': {64: _EXACT, 32: _BLOCK_32},
}


def opencv_hsv_block() -> int:
  """Pixels per SIMD block of the installed OpenCV's 8-bit HSV->RGB on this CPU.

  A row of 1023 copies of one colour whose exact RGB has a fraction >= 0.5: the vectorised
  blocks truncate it, the row's last 1023 % block pixels round it up.
  """
  row = np.zeros((1, 1023, 3), np.uint8)
  row[...] = (7, 201, 203)
  truncated = T.cv2_hsv2rgb(row, block=1).numpy()[0]
  rounded = T.cv2_hsv2rgb(row, block=4096).numpy()[0]
  assert (truncated != rounded).any()
  out = cv2.cvtColor(row, cv2.COLOR_HSV2RGB)[0]
  if not ((out == truncated).all(-1) | (out == rounded).all(-1)).all():
    pytest.fail(f'OpenCV {cv2.__version__}: its 8-bit HSV->RGB neither truncates nor rounds '
                f'{tuple(row[0, 0])}; the TF emulation (transforms.cv2_hsv2rgb) no longer holds')
  vectorised = int(np.argmin((out == truncated).all(-1))) if (out != truncated).any() else 1023
  return 1024 - vectorised


def check_hsv_bound(name: str, max_diff: float, frac: float):
  """Fails, naming the OpenCV version and its SIMD block, when a difference exceeds its bound."""
  version = cv2.__version__
  key = '.'.join(version.split('.')[:2])
  known = key in HSV_BOUNDS
  if not known:
    key = max(HSV_BOUNDS, key=lambda k: tuple(int(p) for p in k.split('.')))
  block = opencv_hsv_block()
  if block not in HSV_BOUNDS[key]:
    pytest.fail(f'OpenCV {version} runs {block}-pixel SIMD blocks here: no bound was measured for '
                f'them (OpenCV {key}: {sorted(HSV_BOUNDS[key])}); see transforms.cv2_hsv2rgb.',
                pytrace=False)
  bound = HSV_BOUNDS[key][block]
  print(f'OpenCV {version} ({block}-pixel blocks), {name}: largest difference {max_diff:g}, '
        f'fraction differing {frac:.6f} (bound {bound[name + "_max"]}, {bound[name + "_frac"]})')
  if max_diff > bound[name + '_max'] or frac > bound[name + '_frac']:
    where = f'measured for OpenCV {key}' if known else (
        f'of the newest OpenCV measured ({key}); no bound was measured for {version}')
    pytest.fail(
        f'OpenCV {version}: the TF emulation of its 8-bit HSV->RGB ({name}) differs by up to '
        f'{max_diff:g} in a fraction {frac:.4f} of the values; the emulation\'s bound {where} '
        f'with {block}-pixel SIMD blocks (largest {bound[name + "_max"]}, fraction '
        f'{bound[name + "_frac"]}) no longer holds; see transforms.cv2_hsv2rgb.', pytrace=False)


def test_rgb2hsv_emulation_equals_opencv():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  image[0, :, :] = np.arange(96)[:, None] * 2    # greys: zero saturation, zero difference
  np.testing.assert_array_equal(T.cv2_rgb2hsv(image).numpy(),
                                cv2.cvtColor(image, cv2.COLOR_RGB2HSV))


def test_hsv2rgb_emulation_is_exact_with_the_installed_opencvs_block():
  # Every 8-bit HSV value OpenCV's H range uses, in rows of 120 pixels so that both the
  # vectorised blocks and the scalar row tail are exercised.
  block = opencv_hsv_block()
  h, s, v = np.meshgrid(np.arange(180), np.arange(256), np.arange(256), indexing='ij')
  hsv = np.stack([h, s, v], -1).astype(np.uint8).reshape(-1, 120, 3)
  ours = T.cv2_hsv2rgb(hsv, block=block).numpy()
  ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  wrong = int((ours != ref).any(-1).sum())
  print(f'OpenCV {cv2.__version__}: {block}-pixel blocks, {wrong} of {hsv.size // 3} HSV values '
        'differ')
  if wrong:
    pytest.fail(f'OpenCV {cv2.__version__}: the TF emulation of its 8-bit HSV->RGB with '
                f'{block}-pixel blocks gets {wrong} of {hsv.size // 3} values wrong (by up to '
                f'{np.abs(ours - ref).max():g}); the emulation no longer holds for this version',
                pytrace=False)


def test_hsv_emulation_matches_opencv():
  rng = np.random.default_rng(2)
  image = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)
  hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
  hsv[..., 0] = rng.integers(0, 180, hsv.shape[:2])
  ours = T.cv2_hsv2rgb(hsv).numpy()
  ref = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  check_hsv_bound('hsv2rgb', float(np.abs(ours - ref).max()), float((ours != ref).any(-1).mean()))


def test_an_opencv_with_another_rounding_fails_with_its_version(monkeypatch):
  # An OpenCV 5.2 that computed every pixel like the vectorised blocks (no rounded row tail):
  # the 96-pixel rows of the test above differ from the 64-pixel-block emulation by 1.
  rng = np.random.default_rng(2)
  hsv = rng.integers(0, 256, (64, 96, 3)).astype(np.uint8)
  hsv[..., 0] %= 180
  changed = T.cv2_hsv2rgb(hsv, block=1).numpy()
  ours = T.cv2_hsv2rgb(hsv).numpy()
  monkeypatch.setattr(cv2, '__version__', '5.2.0')
  # As on an AVX-512 CPU, whatever this one runs: the bound of 64-pixel blocks is exactness.
  monkeypatch.setattr(sys.modules[__name__], 'opencv_hsv_block', lambda: 64)
  message = r'OpenCV 5\.2\.0: .* no bound was measured for 5\.2\.0 .* no longer holds'
  with pytest.raises(pytest.fail.Exception, match=message):
    check_hsv_bound('hsv2rgb', float(np.abs(ours - changed).max()),
                    float((ours != changed).any(-1).mean()))
  # Within the newest measured bound (5.1's: exact) an unlisted version passes.
  check_hsv_bound('hsv2rgb', 0.0, 0.0)
  # A SIMD block no bound was measured for fails, naming it, even without a difference.
  monkeypatch.setattr(sys.modules[__name__], 'opencv_hsv_block', lambda: 16)
  with pytest.raises(pytest.fail.Exception, match=r'runs 16-pixel SIMD blocks here: no bound'):
    check_hsv_bound('hsv2rgb', 0.0, 0.0)


def _reference_photometric(image_rgb, p):
  """The reference's PhotoMetricDistortion with fixed draws, on its BGR array (numpy + cv2)."""
  def convert(x, alpha=1.0, beta=0.0):
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)
  img = image_rgb[..., ::-1].copy()
  if p['brightness_on']:
    img = convert(img, beta=p['brightness'])
  if p['contrast_first'] and p['contrast_on']:
    img = convert(img, alpha=p['contrast'])
  if p['saturation_on']:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 1] = convert(hsv[..., 1], alpha=p['saturation'])
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if p['hue_on']:
    hsv = cv2.cvtColor(img, cv2.COLOR_RGB2HSV)
    hsv[..., 0] = (hsv[..., 0].astype(int) + p['hue']) % 180
    img = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
  if not p['contrast_first'] and p['contrast_on']:
    img = convert(img, alpha=p['contrast'])
  return img[..., ::-1]


@pytest.mark.parametrize('backend', ['opencv', 'tf'])
def test_photometric_matches_the_reference_arithmetic(backend, monkeypatch):
  rng = np.random.default_rng(3)
  # 100 columns: 64-pixel blocks leave a 36-pixel row tail, 32-pixel ones a 4-pixel tail.
  image = rng.integers(0, 256, (24, 100, 3), dtype=np.uint8)
  max_diff, differ, total = 0.0, 0, 0
  for i in range(12):
    p = np_tree(T.photometric_params(seed_of(i)))
    p = {k: (bool(v) if v.dtype == bool else v.item()) for k, v in p.items()}
    tf_p = {k: tf.constant(v) for k, v in p.items()}
    tf_p['hue'] = tf.constant(p['hue'], tf.int32)
    ours = T.apply_photometric(tf.constant(image, tf.float32), tf_p, backend).numpy()
    ref = _reference_photometric(image, p).astype(np.float32)
    if backend == 'opencv':
      np.testing.assert_array_equal(ours, ref)
      continue
    max_diff = max(max_diff, float(np.abs(ours - ref).max()))
    differ, total = differ + int((ours != ref).sum()), total + ours.size
    # With the installed OpenCV's own SIMD block the TF path is its arithmetic exactly.
    with monkeypatch.context() as m:
      m.setattr(T, 'OPENCV_HSV_BLOCK', opencv_hsv_block())
      exact = T.apply_photometric(tf.constant(image, tf.float32), tf_p, backend).numpy()
    np.testing.assert_array_equal(exact, ref)
  if backend == 'tf':
    check_hsv_bound('photometric', max_diff, differ / total)


def test_rotation_matches_opencv_warp_affine():
  _, label = block_scene(48, 64, block=8, seed=4)
  for angle in (-30, -7, 12, 29):
    _, ours = T.rotate(tf.zeros((48, 64, 3)), label, angle)
    m = cv2.getRotationMatrix2D((64 / 2, 48 / 2), angle, 1)
    ref = cv2.warpAffine(label, m, (64, 48), flags=cv2.INTER_NEAREST, borderValue=255)
    assert (ours.numpy() == ref).mean() > 0.98


def test_normalize_and_pad_equal_numpy():
  rng = np.random.default_rng(5)
  for h, w in ((64, 64), (40, 64), (33, 17)):
    image = rng.integers(0, 256, (h, w, 3)).astype(np.float32)
    label = rng.integers(0, 256, (h, w)).astype(np.uint8)
    x, y = T.normalize_and_pad(image, label, (64, 64), MEAN, STD)
    top, left = (64 - h) // 2, (64 - w) // 2
    want = np.zeros((64, 64, 3), np.float32)
    want[top:top + h, left:left + w] = (image - np.array(MEAN)) / np.array(STD)
    want_lab = np.full((64, 64), 255, np.uint8)
    want_lab[top:top + h, left:left + w] = label
    np.testing.assert_allclose(x.numpy(), want, atol=1e-5)
    np.testing.assert_array_equal(y.numpy(), want_lab)


# ----------------------------------------------------------------------------- crop rule

def _acceptable(crop, ratio=0.75):
  values, counts = np.unique(crop, return_counts=True)
  counts = counts[values != 255]
  return len(counts) > 1 and counts.max() / counts.sum() < ratio


def test_crop_respects_cat_max_ratio_when_a_valid_crop_exists():
  # Left 70% of the columns: one class; right part: stripes of two classes. A 32x32 crop is
  # acceptable iff it reaches far enough right, which most offsets do.
  label = np.zeros((64, 200), np.uint8)
  label[:, 60:] = np.where((np.arange(140) // 4) % 2 == 0, 1, 2)[None, :]
  label[:, :60] = 3
  accepted = 0
  for i in range(40):
    top, left, h, w = [int(v) for v in T.choose_crop(seed_of(i), label, (32, 32), 0.75)]
    assert (h, w) == (32, 32)
    accepted += _acceptable(label[top:top + h, left:left + w])
  # P(no acceptable crop in 10 tries) < 1e-6 per example here.
  assert accepted == 40
  # cat_max_ratio >= 1 disables the rule: the first draw is kept even if it is uniform.
  uniform = np.full((64, 64), 3, np.uint8)
  t, l, h, w = [int(v) for v in T.choose_crop(seed_of(0), uniform, (32, 32), 0.75)]
  assert (h, w) == (32, 32) and 0 <= t <= 32 and 0 <= l <= 32


def test_crop_is_the_whole_image_when_smaller_than_crop():
  label = np.arange(20 * 30, dtype=np.int64).reshape(20, 30).astype(np.uint8)
  assert [int(v) for v in T.choose_crop(seed_of(1), label, (64, 64), 0.75)] == [0, 0, 20, 30]


# ----------------------------------------------------------------------------- flip

def test_flip_swaps_lip_left_right_classes():
  rng = np.random.default_rng(6)
  label = rng.integers(0, 20, (16, 24)).astype(np.uint8)
  label[0, 0] = 255
  image = rng.integers(0, 256, (16, 24, 3)).astype(np.float32)
  pairs = ((14, 15), (16, 17), (18, 19))
  x, y = T.random_flip(seed_of(0), image, label, prob=1.0, swap_pairs=pairs)
  want = label[:, ::-1].copy()
  for a, b in pairs:
    want[label[:, ::-1] == a] = b
    want[label[:, ::-1] == b] = a
  np.testing.assert_array_equal(y.numpy(), want)
  np.testing.assert_array_equal(x.numpy(), image[:, ::-1])
  x, y = T.random_flip(seed_of(0), image, label, prob=0.0, swap_pairs=pairs)
  np.testing.assert_array_equal(y.numpy(), label)


# ----------------------------------------------------------------------------- eager == tf.data

def _ops():
  image, label = block_scene(50, 70, seed=7)
  cfg = data_config(backend='tf')
  lip = data_config(keep_ratio=False, train_scale=(80, 80), ratio_range=(0.75, 1.25),
                    flip_swap_pairs=((1, 2), (3, 4)), rotate_prob=0.6)
  return [
      ('resize_and_crop', lambda s, x, y: T.resize_and_crop(
          s, x, y, scale=(256, 64), ratio_range=(0.5, 2.0), keep_ratio=True, crop_size=(64, 64),
          cat_max_ratio=0.75), image, label),
      ('flip', lambda s, x, y: T.random_flip(s, tf.cast(x, tf.float32), y, 0.5, ((1, 2),)),
       image, label),
      ('photometric_opencv', lambda s, x, y: T.photometric_distortion(s, x, 'opencv'),
       image, label),
      ('photometric_tf', lambda s, x, y: T.photometric_distortion(s, x, 'tf'), image, label),
      ('rotate', lambda s, x, y: T.random_rotate(s, x, y, 1.0, 30), image, label),
      ('normalize_and_pad', lambda s, x, y: T.normalize_and_pad(x, y, (64, 80), MEAN, STD),
       image, label),
      ('train_transform', lambda s, x, y: T.train_transform(s, x, y, cfg), image, label),
      ('train_transform_lip', lambda s, x, y: T.train_transform(s, x, y, lip), image, label),
  ]


@pytest.mark.parametrize('index', range(8))
def test_each_op_gives_the_same_result_eagerly_and_in_tf_data(index):
  name, fn, image, label = _ops()[index]
  for i in range(2):
    seed = seed_of(i)
    eager = np_tree(fn(seed, tf.constant(image), tf.constant(label)))
    graph = in_tf_data(fn, seed, image, label)
    tf.nest.map_structure(np.testing.assert_array_equal, eager, graph)


# ----------------------------------------------------------------------------- alignment

def _label_from_image(image_normalised):
  rgb = image_normalised * np.array(STD) + np.array(MEAN)
  d = np.linalg.norm(rgb[..., None, :] - COLOURS[None, None].astype(np.float64), axis=-1)
  return d.argmin(-1)


@pytest.mark.parametrize('lip', [False, True])
def test_image_and_label_stay_aligned_through_the_train_transform(lip):
  image, label = block_scene(160, 200, block=32, seed=8)
  if lip:
    cfg = data_config(photometric=False, keep_ratio=False, train_scale=(160, 160),
                      ratio_range=(0.75, 1.25), rotate_prob=1.0, crop_size=(128, 128))
  else:
    cfg = data_config(photometric=False)
  fractions = []
  for i in range(6):
    x, y = T.train_transform(seed_of(i), image, label, cfg)
    x, y = x.numpy(), y.numpy()
    # Padding is 0 after normalisation; rotation fills the image with 0 and the label with
    # ignore before normalisation: both are excluded with the ignore label.
    valid = (y != 255)
    assert valid.any()
    agree = (_label_from_image(x)[valid] == y[valid]).mean()
    fractions.append(agree)
  # Block edges are blended by the bilinear image resize (and rotation), the rest must agree.
  # (a one-pixel shift would already cost ~6% at block size 32).
  assert min(fractions) > 0.9 and np.mean(fractions) > 0.95
  # Photometric distortion moves colours only: labels are unchanged for the same seed.
  cfg.photometric = True
  for i in range(3):
    _, y_photo = T.train_transform(seed_of(i), image, label, cfg)
    cfg.photometric = False
    _, y_plain = T.train_transform(seed_of(i), image, label, cfg)
    cfg.photometric = True
    np.testing.assert_array_equal(y_photo.numpy(), y_plain.numpy())


# ----------------------------------------------------------------------------- statistics

def test_random_resize_ratio_statistics():
  rs = np.array([float(T.random_rescale_size(seed_of(i), (512, 683), (2048, 512), (0.5, 2.0),
                                             True)[1]) for i in range(400)])
  assert rs.min() >= 0.5 and rs.max() < 2.0
  # U[0.5, 2): mean 1.25, sd 0.433; 400 draws -> standard error 0.022.
  assert abs(rs.mean() - 1.25) < 0.09
  assert abs(rs.std() - 1.5 / np.sqrt(12)) < 0.06
  assert rs.min() < 0.6 and rs.max() > 1.9


def test_photometric_parameter_statistics():
  draws = [np_tree(T.photometric_params(seed_of(i))) for i in range(400)]
  col = lambda k: np.array([d[k] for d in draws])
  assert -32 <= col('brightness').min() and col('brightness').max() <= 32
  for k in ('contrast', 'saturation'):
    assert 0.5 <= col(k).min() and col(k).max() <= 1.5
    assert abs(col(k).mean() - 1.0) < 0.06
  hue = col('hue')
  assert hue.dtype.kind == 'i' and hue.min() == -18 and hue.max() == 17
  for k in ('brightness_on', 'contrast_on', 'contrast_first', 'saturation_on', 'hue_on'):
    # Each coin is fair: 400 flips, 4.5 standard deviations = 0.11.
    assert abs(col(k).mean() - 0.5) < 0.11, k
  rot = [np_tree(T.rotation_params(seed_of(i), 0.6, 30)) for i in range(400)]
  on = np.array([r[0] for r in rot])
  angles = np.array([r[1] for r in rot])
  assert abs(on.mean() - 0.6) < 0.11
  assert angles.dtype.kind == 'i' and angles.min() == -30 and angles.max() == 29
