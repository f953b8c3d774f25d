"""Tests for memseg_jax/visualize.py."""

import numpy as np
import pytest
from PIL import Image

from memseg_jax import visualize


def test_colorize_looks_up_the_palette_and_blackens_ignore():
  palette = np.array([[10, 20, 30], [40, 50, 60], [70, 80, 90]], np.uint8)
  mask = np.array([[0, 1], [2, 255]])
  out = visualize.colorize(mask, palette)
  np.testing.assert_array_equal(out[0, 0], [10, 20, 30])
  np.testing.assert_array_equal(out[0, 1], [40, 50, 60])
  np.testing.assert_array_equal(out[1, 0], [70, 80, 90])
  np.testing.assert_array_equal(out[1, 1], [0, 0, 0])


def test_palette_png_round_trips(tmp_path):
  palette = visualize.default_palette(8)
  mask = np.random.RandomState(0).randint(0, 8, (13, 17))
  visualize.mask_to_pil(mask, palette).save(tmp_path / 'm.png')
  image = Image.open(tmp_path / 'm.png')
  assert image.mode == 'P'
  np.testing.assert_array_equal(np.asarray(image), mask)
  np.testing.assert_array_equal(np.asarray(image.convert('RGB')), visualize.colorize(mask, palette))


@pytest.mark.parity
def test_default_palette_matches_the_reference():
  from tests.reference_utils import import_ssseg_builder
  import_ssseg_builder()
  from ssseg.modules.datasets.base import BaseDataset
  np.testing.assert_array_equal(visualize.default_palette(40),
                                np.asarray(BaseDataset.randompalette(40), np.uint8))


def test_overlay_blends_and_keeps_ignore_pixels():
  image = np.full((2, 2, 3), 100, np.uint8)
  palette = np.array([[200, 0, 0]], np.uint8)
  out = visualize.overlay(image, np.array([[0, 255], [0, 0]]), palette, alpha=0.5)
  np.testing.assert_array_equal(out[0, 0], [150, 50, 50])
  np.testing.assert_array_equal(out[0, 1], [100, 100, 100])


def test_denormalize_inverts_normalization():
  rgb = np.random.RandomState(1).randint(0, 256, (5, 6, 3)).astype(np.uint8)
  mean, std = (123.675, 116.28, 103.53), (58.395, 57.12, 57.375)
  x = (rgb.astype(np.float32) - mean) / std
  np.testing.assert_array_equal(visualize.denormalize(x, mean, std), rgb)
