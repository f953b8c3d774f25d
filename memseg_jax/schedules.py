"""Step-indexed schedules of training: poly learning rate, memory momentum, epochs.

Everything here is a pure function of the step t (0 for the first step) and the config, so the
host loop, the jitted step and the tests compute the same numbers (spec section 5):

    lr_t     = (1 - t / T) ** power * (lr0 - lr_min) + lr_min      power 0.9, set before step t
    lr_min   = 0.01 * lr0 unless config.train.lr_min >= 0
    m_t      = base_momentum * lr_t / base_lr                       (memory momentum)
    epoch(t) = t // iterations_per_epoch + 1                        (epochs count from 1)

T is `config.train.num_train_steps` when positive, else num_epochs * iterations_per_epoch.
The memory loss runs from the second epoch on (`use_memory_loss`).
"""

import jax.numpy as jnp

from memseg_jax.models import memory as memory_lib


def lr_min(config) -> float:
  """The floor of the poly schedule: config.train.lr_min if >= 0, else 1% of the base lr."""
  t = config.train
  return float(t.lr_min) if t.lr_min >= 0 else 0.01 * float(t.lr)


def num_train_steps(config, iterations_per_epoch: int) -> int:
  """T: config.train.num_train_steps if positive, else num_epochs * iterations_per_epoch."""
  if config.train.num_train_steps > 0:
    return int(config.train.num_train_steps)
  return int(config.train.num_epochs) * int(iterations_per_epoch)


def create_lr_schedule(config, total_steps: int):
  """Poly schedule `step -> lr` (jittable; also usable as an optax schedule).

  Steps past T keep lr_min (the reference never gets there; a resumed run with a larger T
  would start a new decay from its own T).
  """
  lr0 = float(config.train.lr)
  floor = lr_min(config)
  power = float(config.train.lr_power)
  total = max(int(total_steps), 1)

  def schedule(step):
    progress = jnp.clip(jnp.asarray(step, jnp.float32) / total, 0.0, 1.0)
    return (1.0 - progress) ** power * (lr0 - floor) + floor

  return schedule


def memory_momentum(config, lr):
  """The memory momentum used with learning rate `lr` (see memory.momentum_at)."""
  mem = config.model.memory
  return memory_lib.momentum_at(lr, base_momentum=mem.base_momentum, base_lr=mem.base_lr,
                                adjust_by_learning_rate=mem.adjust_by_learning_rate)


def epoch_at(step: int, iterations_per_epoch: int) -> int:
  """The (1-based) epoch that step t belongs to."""
  return int(step) // max(int(iterations_per_epoch), 1) + 1


def use_memory_loss(config, step: int, iterations_per_epoch: int) -> bool:
  """Whether step t adds the memory loss: MCIBI with memory.use_loss, from epoch 2 on."""
  return (config.model.name == 'mcibi' and bool(config.model.memory.use_loss)
          and epoch_at(step, iterations_per_epoch) > 1)
