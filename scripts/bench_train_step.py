"""Train-step time of MCIBI (ADE20K R-50-D8 config) here vs the PyTorch reference, on the CPU.

    python scripts/bench_train_step.py [--crop=128] [--batch=2] [--steps=5] [--threads=2]

Both sides run one full training iteration on the same input size (random images and labels,
random weights): forward in train mode, the memory update, the three CE losses, backward and
the SGD step (momentum 0.9, coupled weight decay). This project: the jitted sharded step of
`memseg_jax.train` on 1 device (compilation excluded). Reference: SSSegmentation 1.7.0's MCIBI
with `torch.set_num_threads(threads)`, plain BatchNorm2d (the same computation as SyncBatchNorm
on one process). Epoch 1 (no memory loss) unless --memory_loss. Prints the median seconds per
step of each and their ratio (reference / this project; > 1 means this project is faster).
"""

import os
import statistics
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CROP = flags.DEFINE_integer('crop', 128, 'square crop size')
_BATCH = flags.DEFINE_integer('batch', 2, 'batch size')
_STEPS = flags.DEFINE_integer('steps', 5, 'timed steps (after 2 warm-up steps)')
_THREADS = flags.DEFINE_integer('threads', 2, 'torch threads for the reference')
_MEMORY_LOSS = flags.DEFINE_bool('memory_loss', False, 'time the epoch >= 2 step')
_SKIP_REFERENCE = flags.DEFINE_bool('skip_reference', False, 'time this project only')


def _median_time(fn, steps, warmup=2):
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(steps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def bench_jax(images, labels, memory_loss):
  import jax
  from memseg_jax import schedules, train
  from memseg_jax.config_validation import load_config
  from memseg_jax.models import build_model

  config = load_config(os.path.join(REPO, 'configs', 'ade20k.py'))
  config.data.crop_size = images.shape[1:3]
  config.train.batch_size = images.shape[0]
  mesh = train.create_mesh(jax.devices()[:1])
  schedule = schedules.create_lr_schedule(config, 1000)
  tx = train.create_optimizer(config, schedule)
  step = train.make_train_step(config, build_model(config, axis_name='data'), tx, schedule, mesh,
                               memory_loss=memory_loss)
  state = train.replicate(train.create_train_state(config, jax.random.PRNGKey(0), tx), mesh)
  batch = train.shard_batch({'image': images, 'label': labels}, mesh)
  holder = {'state': state}

  def run():
    holder['state'], metrics = step(holder['state'], batch)
    jax.block_until_ready(metrics)

  start = time.perf_counter()
  run()
  print(f'this project: first step (compilation) {time.perf_counter() - start:.1f} s')
  return _median_time(run, _STEPS.value, warmup=1)


def bench_reference(images, labels, memory_loss, threads):
  import numpy as np
  import torch
  sys.path.insert(0, REPO)
  from tests import reference_utils  # the torchvision stand-in and the reference's cfg

  torch.set_num_threads(threads)
  BuildSegmentor, SSSegInputStructure = reference_utils.import_ssseg_builder()
  cfg = reference_utils.reference_cfg(num_classes=150, depth=50)
  cfg['norm_cfg'] = {'type': 'BatchNorm2d'}   # one process: the same math as SyncBatchNorm
  torch.manual_seed(0)
  model = BuildSegmentor(cfg, mode='TRAIN')
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
  x = torch.as_tensor(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
  y = torch.as_tensor(labels.astype(np.int64))

  def run():
    optimizer.zero_grad()
    outputs = model(SSSegInputStructure(images=x, seg_targets=y, mode='TRAIN'),
                    learning_rate=0.01, epoch=2 if memory_loss else 1)
    outputs.loss.backward()
    optimizer.step()

  return _median_time(run, _STEPS.value)


def main(argv):
  del argv
  import numpy as np
  rng = np.random.default_rng(0)
  shape = (_BATCH.value, _CROP.value, _CROP.value)
  images = rng.normal(size=(*shape, 3)).astype(np.float32)
  labels = rng.integers(0, 150, size=shape).astype(np.int32)
  print(f'MCIBI ADE20K R-50-D8, batch {shape[0]}, {shape[1]}x{shape[2]}, '
        f'{"with" if _MEMORY_LOSS.value else "without"} memory loss, {os.cpu_count()} CPUs')
  t_jax = bench_jax(images, labels, _MEMORY_LOSS.value)
  print(f'this project (JAX, 1 device): {t_jax:.3f} s/step')
  if _SKIP_REFERENCE.value:
    return
  t_ref = bench_reference(images, labels, _MEMORY_LOSS.value, _THREADS.value)
  print(f'reference (PyTorch, {_THREADS.value} threads): {t_ref:.3f} s/step')
  print(f'ratio reference / this project: {t_ref / t_jax:.2f}')


if __name__ == '__main__':
  app.run(main)
