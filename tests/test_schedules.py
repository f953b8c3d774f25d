"""Poly learning rate, memory momentum and epoch bookkeeping against the spec's formulas.

Independent computations: the closed form of spec section 5 in float64 numpy, and the
momentum values the spec derives by hand (section 3: m_{T/2} ~ 0.4865 for ADE20K, m_0 = 1.0 and
m_{T/2} ~ 0.5405 for Cityscapes).
"""

import os

import numpy as np
import pytest

from memseg_jax import schedules
from memseg_jax.config_validation import load_config

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs')
T = 1000


def _numpy_poly(t, lr0, lr_min, power=0.9, total=T):
  return (1 - t / total) ** power * (lr0 - lr_min) + lr_min


@pytest.fixture(scope='module')
def ade():
  return load_config(CONFIGS + '/ade20k.py')


def test_poly_lr_matches_closed_form_at_every_step(ade):
  schedule = schedules.create_lr_schedule(ade, T)
  t = np.arange(T)
  got = np.asarray([float(schedule(i)) for i in t[::37]] + [float(schedule(T - 1))])
  want = _numpy_poly(np.concatenate([t[::37], [T - 1]]), 0.01, 1e-4)
  np.testing.assert_allclose(got, want, rtol=1e-5)   # float32 schedule vs float64 formula
  assert float(schedule(0)) == pytest.approx(0.01, rel=1e-7)   # set before step 0: lr0 itself


def test_lr_min_default_is_one_percent_and_explicit_value_wins(ade):
  assert schedules.lr_min(ade) == pytest.approx(1e-4)
  cfg = ade.copy_and_resolve_references()
  cfg.train.lr_min = 1e-3
  schedule = schedules.create_lr_schedule(cfg, T)
  assert float(schedule(T)) == pytest.approx(1e-3, rel=1e-6)
  assert float(schedule(T // 2)) == pytest.approx(_numpy_poly(T // 2, 0.01, 1e-3), rel=1e-6)


def test_memory_momentum_follows_the_lr_as_in_the_spec(ade):
  schedule = schedules.create_lr_schedule(ade, T)
  assert float(schedules.memory_momentum(ade, schedule(0))) == pytest.approx(0.9, rel=1e-6)
  assert float(schedules.memory_momentum(ade, schedule(T // 2))) == pytest.approx(0.4865, abs=1e-4)
  city = load_config(CONFIGS + '/cityscapes.py')
  schedule = schedules.create_lr_schedule(city, T)
  assert float(schedules.memory_momentum(city, schedule(0))) == pytest.approx(1.0, rel=1e-6)
  assert float(schedules.memory_momentum(city, schedule(T // 2))) == pytest.approx(0.5405, abs=1e-4)
  coco = load_config(CONFIGS + '/cocostuff10k.py')
  schedule = schedules.create_lr_schedule(coco, T)
  assert float(schedules.memory_momentum(coco, schedule(0))) == pytest.approx(1.0, rel=1e-6)


def test_num_train_steps_and_epochs(ade):
  # Spec section 5: 1,263 iterations per epoch on 8 devices x 130 epochs.
  assert schedules.num_train_steps(ade, 1263) == 1263 * 130
  cfg = ade.copy_and_resolve_references()
  cfg.train.num_train_steps = 77
  assert schedules.num_train_steps(cfg, 1263) == 77
  assert [schedules.epoch_at(t, 10) for t in (0, 9, 10, 19, 20)] == [1, 1, 2, 2, 3]


def test_memory_loss_only_from_epoch_two_and_only_where_enabled(ade):
  assert not schedules.use_memory_loss(ade, 9, 10)
  assert schedules.use_memory_loss(ade, 10, 10)
  for path in ('cityscapes.py', 'lip.py', 'cocostuff10k.py'):
    assert not schedules.use_memory_loss(load_config(CONFIGS + '/' + path), 10_000, 10), path
  cfg = ade.copy_and_resolve_references()
  cfg.model.name = 'deeplabv3'
  assert not schedules.use_memory_loss(cfg, 10_000, 10)
