"""Training: the TrainState, the sharded train step (MCIBI's algorithm), and the loop.

One step on every device of the mesh `('data',)` (spec sections 2, 3 item 4, 4, 5), read as
the paper's algorithm:

    lr_t   = poly(t)                                    set before the step, t = 0 first
    forward(local batch, SyncBN over 'data')            memory read = memory of step t-1
    M_d    = update(M, F_d upsampled, labels_d, lr_t)   per device, from its own images only
    loss_d = CE(stage2) + 0.4 CE(stage1) + 0.4 CE(aux) [+ memory loss on M_d, epoch >= 2]
    g      = pmean_d grad(loss_d)                       (DDP's gradient average)
    M      = pmean_d M_d                                (the reference's all-reduce average)
    params = SGD(momentum 0.9, weight decay added to g)(params, g, lr_t)

The memory update runs inside the forward (`model.apply(..., mutable=['memory'])`) before the
losses and the gradient step, like the reference. The memory loss needs a separately compiled
step (a Python bool), selected per step by the epoch.

The loop (`train_and_evaluate`) checks that the workdir can be written, resumes from the
latest checkpoint of the workdir (the data stream restarts at the checkpoint's step), logs
every loss term, lr, memory momentum, steps/s, images/s and the ETA, checkpoints every
`config.train.checkpoint_every_steps` and at the end, stops at the first non-finite loss
without saving that state (NonFiniteLossError) or at a checkpoint write that failed
(checkpoint.CheckpointWriteError, the previous checkpoint kept), and evaluates at the end
through `evaluate.evaluate` (evaluation never needs the trainer: `--mode=eval` is
`evaluate.evaluate_checkpoint`).

Multi-host runs (one process per host, `memseg_jax.distributed`): the mesh spans the devices of
all processes, each process feeds its own part of every global batch (`shard_batch`), and the
step's pmeans average gradients, BN statistics and the memory over all devices of all hosts.
Only process 0 writes the config and the summaries; every process takes part in the (orbax,
collective) checkpoint saves. Preemption (`PreemptionWatcher`): on SIGTERM, or when JAX's
preemption service says so, every process saves a checkpoint at the same step, waits for it to
be written and returns normally, so the program exits with status 0; the next start resumes
from that checkpoint. The workdir may be local or `gs://...`.
"""

import functools
import json
import os
import signal
import threading
import time
from typing import Any, Callable, Dict, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import struct
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memseg_jax import checkpoint as ckpt_lib
from memseg_jax import evaluate
from memseg_jax import losses as losses_lib
from memseg_jax import schedules
from memseg_jax.errors import UserError
from memseg_jax.models import build_model
from memseg_jax.models import memory as memory_lib

AXIS = 'data'


class NonFiniteLossError(UserError, RuntimeError):
  """The loss became NaN or infinite; the message names the step."""


class TrainState(struct.PyTreeNode):
  """Everything a training run needs to continue: weights, optimizer, BN stats, memory, step, key.

  `rng` is the base key; the dropout key of step t on device d is fold_in(fold_in(rng, t), d).
  `memory` is {} for models without a memory (DeepLabV3).
  """
  step: jnp.ndarray
  params: Any
  opt_state: Any
  batch_stats: Any
  memory: Any
  rng: jnp.ndarray

  def variables(self) -> Dict[str, Any]:
    """The model variables {'params', 'batch_stats'[, 'memory']} for `model.apply`."""
    variables = {'params': self.params, 'batch_stats': self.batch_stats}
    if self.memory:
      variables['memory'] = self.memory
    return variables


# ------------------------------------------------------------------------------- construction
def create_mesh(devices=None) -> Mesh:
  """The 1-D data-parallel mesh over all devices (classic Auto axes)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (AXIS,))


def _sgd(config, lr_schedule: Callable, lr_multiplier: float = 1.0,
         wd_multiplier: float = 1.0) -> optax.GradientTransformation:
  t = config.train
  schedule = lr_schedule
  if lr_multiplier != 1.0:
    schedule = lambda step: lr_multiplier * lr_schedule(step)
  return optax.chain(
      optax.add_decayed_weights(wd_multiplier * float(t.weight_decay)),
      optax.sgd(schedule, momentum=float(t.momentum), nesterov=False))


def params_rules(config) -> Dict[str, Dict[str, float]]:
  """config.train.params_rules (pattern, lr_multiplier, wd_multiplier) as {pattern: {...}}."""
  rules = config.train.get('params_rules', ()) or ()
  return {str(pattern): {'lr_multiplier': float(lr_mult), 'wd_multiplier': float(wd_mult)}
          for pattern, lr_mult, wd_mult in rules}


BASE_GROUP = 'base_setting'     # the group of parameters no rule matches (the reference's name)


def param_group_labels(params, rules, backbone_type: str = 'resnet'):
  """The group of every parameter: the longest pattern contained in its reference name.

  Names are those of the reference state_dict (`memseg_jax.convert.torch_key`), matched as the
  reference's DefaultParamsConstructor does (substring, longest pattern first, ties by name).
  """
  from memseg_jax import convert  # pylint: disable=import-outside-toplevel
  ordered = sorted(sorted(rules), key=len, reverse=True)

  def label(path, _):
    name = convert.torch_key(('params', *(p.key for p in path)), backbone_type)
    return next((pattern for pattern in ordered if pattern in name), BASE_GROUP)

  return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(config, lr_schedule: Callable) -> optax.GradientTransformation:
  """torch.optim.SGD(momentum, dampening 0, no nesterov, weight_decay) as in the reference.

  The weight decay is added to the gradient of every parameter (BN and biases included) before
  the momentum buffer: buf = mu * buf + (g + wd * p); p -= lr_t * buf.

  With `config.train.params_rules` (the reference's `params_rules`), the parameters form groups
  (`param_group_labels`); group g runs the same SGD with lr_t * lr_multiplier_g (the reference's
  PolyScheduler sets group.lr = lr_multiplier * target lr before each step) and weight decay *
  wd_multiplier_g. Without rules the optimizer (and its state layout) is the single-group one.
  """
  rules = params_rules(config)
  if not rules:
    return _sgd(config, lr_schedule)
  transforms = {BASE_GROUP: _sgd(config, lr_schedule)}
  for pattern, rule in rules.items():
    transforms[pattern] = _sgd(config, lr_schedule, rule['lr_multiplier'], rule['wd_multiplier'])
  backbone_type = config.model.backbone.type
  return optax.multi_transform(
      transforms, functools.partial(param_group_labels, rules=rules, backbone_type=backbone_type))


@functools.lru_cache(maxsize=8)
def _jitted_init(model_json: str, ignore_index: int):
  # One compiled init per model structure (keyed by its config), not per call.
  import ml_collections  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict({'model': json.loads(model_json),
                                      'data': {'ignore_index': ignore_index}})
  model = build_model(config, axis_name=None)
  return jax.jit(functools.partial(model.init, train=False))


def init_variables(config, rng, image_size=None) -> Dict[str, Any]:
  """Fresh model variables (memory zeros), with the pretrained backbone if the config names one."""
  h, w = image_size or tuple(config.data.crop_size)
  params_rng, dropout_rng = jax.random.split(rng)
  images = jnp.zeros((1, h, w, 3), jnp.float32)
  variables = _jitted_init(config.model.to_json(), config.data.ignore_index)(
      {'params': params_rng, 'dropout': dropout_rng}, images)
  variables = flax.core.unfreeze(variables)
  if config.model.backbone.pretrained:
    variables = ckpt_lib.load_pretrained_backbone(config, variables)
  return variables


def create_train_state(config, rng, tx: optax.GradientTransformation, image_size=None) -> TrainState:
  """The step-0 TrainState (on the default device; `replicate` puts it on the mesh)."""
  init_rng, train_rng = jax.random.split(rng)
  variables = init_variables(config, init_rng, image_size)
  params = variables['params']
  return TrainState(
      step=jnp.asarray(0, jnp.int32), params=params, opt_state=tx.init(params),
      batch_stats=variables.get('batch_stats', {}), memory=variables.get('memory', {}),
      rng=train_rng)


def replicate(tree, mesh: Mesh):
  """Every leaf replicated over the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def abstract_train_state(config, tx, mesh: Mesh, image_size=None):
  """ShapeDtypeStructs (with replicated shardings) of this config's TrainState, for restoring."""
  shapes = jax.eval_shape(
      lambda: create_train_state(config, jax.random.PRNGKey(0), tx, image_size))
  sharding = NamedSharding(mesh, P())
  return jax.tree_util.tree_map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)


def _abstract_state_without_pretrained(config, tx, mesh, image_size=None):
  # Shapes do not depend on the pretrained file; don't read it just to get shapes.
  config = config.copy_and_resolve_references()
  config.model.backbone.pretrained = ''
  return abstract_train_state(config, tx, mesh, image_size)


# ---------------------------------------------------------------------------------- the step
def make_train_step(config, model, tx, lr_schedule, mesh: Mesh, *, memory_loss: bool):
  """jit(shard_map(step)): (state, batch) -> (state, metrics); the state is donated.

  `batch` = {'image': (B, H, W, 3) float32, 'label': (B, H, W) int32} sharded over 'data'
  (B global); the state is replicated. Metrics are device means of each loss term, plus 'lr'
  and 'memory_momentum'.
  """
  def step_fn(state: TrainState, batch):
    # The models with a memory (MCIBI, MCIBI++) are those whose state holds one.
    has_memory = bool(state.memory)
    mutable = ['batch_stats', 'memory'] if has_memory else ['batch_stats']
    lr = lr_schedule(state.step)
    device_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                    lax.axis_index(AXIS))
    images, labels = batch['image'], batch['label']

    def loss_fn(params):
      variables = {'params': params, 'batch_stats': state.batch_stats}
      if has_memory:
        variables['memory'] = state.memory
      # Forward, then this device's memory update (on its own images), then the memory loss on
      # the updated memory when asked: the reference's order.
      outputs, new_vars = model.apply(
          variables, images, train=True, labels=labels, lr=lr, memory_loss=memory_loss,
          rngs={'dropout': device_rng}, mutable=mutable)
      losses = losses_lib.compute_losses(outputs, labels, config)
      return losses['loss_total'], (losses, new_vars)

    (_, (losses, new_vars)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    grads = lax.pmean(grads, AXIS)
    # SyncBN already computed the statistics over the global batch; the mean only keeps the
    # replicas bit-identical.
    batch_stats = lax.pmean(new_vars['batch_stats'], AXIS)
    memory = state.memory
    if has_memory:
      memory = memory_lib.sync_memory(new_vars['memory'], AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    metrics = dict(losses)
    metrics['lr'] = lr
    if has_memory:
      metrics['memory_momentum'] = jnp.asarray(schedules.memory_momentum(config, lr), jnp.float32)
    metrics = lax.pmean(metrics, AXIS)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              batch_stats=batch_stats, memory=memory)
    return new_state, metrics

  sharded = jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), P(AXIS)), out_specs=(P(), P()),
                          check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def shard_batch(batch: Dict[str, np.ndarray], mesh: Mesh) -> Dict[str, jax.Array]:
  """Host-local numpy batch -> global arrays sharded over 'data' (works multi-host)."""
  sharding = NamedSharding(mesh, P(AXIS))
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(batch[k]))
          for k in ('image', 'label')}


# ----------------------------------------------------------------------------------- the loop
def _format_eta(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  return f'{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}'


def save_config(config, workdir: str) -> None:
  """<workdir>/config.json, written by process 0 only (local or gs:// workdir)."""
  if jax.process_index() == 0:
    gfile = ckpt_lib.gfile()
    gfile.makedirs(workdir)
    with gfile.GFile(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config.to_json_best_effort(indent=2))


class PreemptionWatcher:
  """Says at which step the loop must save and stop because the run is being preempted.

  Cloud schedulers announce a preemption (spot / preemptible TPU VMs, maintenance, job
  cancellation) with SIGTERM, some time before the machine goes away. Every process must save
  the same step, since orbax writes a checkpoint collectively:

  - jax.distributed running with its preemption service (every multi-process run; it listens
    for SIGTERM itself): `multihost_utils.reached_preemption_sync_point(step)`, called at every
    step, becomes true on all processes at the same step after any process got the signal.
  - otherwise (one process, or the service turned off): a SIGTERM handler sets a flag; with
    several processes the flags are OR-ed across processes every `agree_every` steps.

  `start()` before the loop, `close()` after it (the previous SIGTERM handler comes back).
  """

  def __init__(self, agree_every: int = 10):
    self.agree_every = int(agree_every)
    self.use_jax_service = bool(jax.distributed.is_initialized()
                                and jax.config.jax_enable_preemption_service)
    self._signalled = threading.Event()
    self._previous = None
    self._installed = False

  def _on_sigterm(self, signum, frame):  # pylint: disable=unused-argument
    self._signalled.set()

  def start(self) -> 'PreemptionWatcher':
    # JAX's service has its own SIGTERM listener; a Python handler would replace it.
    if not self.use_jax_service:
      try:
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self._installed = True
      except ValueError:    # not the main thread: SIGTERM keeps its previous meaning
        logging.warning('training outside the main thread: SIGTERM will not save a checkpoint')
    return self

  def close(self) -> None:
    if self._installed:
      signal.signal(signal.SIGTERM, self._previous)
      self._installed = False

  def should_stop(self, step: int) -> bool:
    """Call after every step (all processes, same steps); true: save `step`, then stop."""
    if self.use_jax_service:
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return bool(multihost_utils.reached_preemption_sync_point(int(step)))
    if jax.process_count() == 1:
      return self._signalled.is_set()
    if step % self.agree_every:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    flags = multihost_utils.process_allgather(np.asarray(self._signalled.is_set(), np.int32))
    return bool(np.any(flags))


class _MetricsLog:
  """Host-side running means of the step metrics between two log lines, with finiteness checks."""

  def __init__(self):
    self.sums: Dict[str, float] = {}
    self.count = 0

  def add(self, step: int, metrics) -> None:
    host = jax.device_get(metrics)
    loss = float(host['loss_total'])
    if not np.isfinite(loss):
      raise NonFiniteLossError(f'the loss is {loss} at step {step}')
    for k, v in host.items():
      self.sums[k] = self.sums.get(k, 0.0) + float(v)
    self.count += 1

  def pop(self) -> Dict[str, float]:
    means = {k: v / max(self.count, 1) for k, v in self.sums.items()}
    self.sums, self.count = {}, 0
    return means


def _run_evaluation(config, state: TrainState, workdir: str, mesh, step: int, writer):
  # evaluate() writes its scalars and summary images through the writer itself.
  results = evaluate.evaluate(config, state.variables(), workdir, mesh=mesh, step=step,
                              writer=writer)
  logging.info('evaluation at step %d: mIoU %.4f, mAcc %.4f, aAcc %.4f', step,
               results.get('mIoU', float('nan')), results.get('mAcc', float('nan')),
               results.get('aAcc', float('nan')))
  return results


def _resume(config, manager, tx, mesh, dataset_fn):
  """(start step, this process's batches from it, the state): the latest checkpoint or step 0."""
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  start_step = manager.latest_step() or 0
  # The data first: a missing dataset should fail before anything is compiled.
  if dataset_fn is None:
    dataset = input_pipeline.create_train_dataset(
        config, process_index=jax.process_index(), process_count=jax.process_count(),
        start_step=start_step)
  else:
    dataset = dataset_fn(start_step)
  abstract = _abstract_state_without_pretrained(config, tx, mesh)
  state = ckpt_lib.restore_latest(manager, abstract, config)
  if state is None:
    state = replicate(create_train_state(config, jax.random.PRNGKey(config.seed), tx), mesh)
  else:
    logging.info('resuming from the checkpoint of step %d in %s', start_step, manager.directory)
  if int(state.step) != start_step:
    raise ckpt_lib.CheckpointError(f'checkpoint {start_step} in {manager.directory} holds step '
                                   f'{int(state.step)}')
  return start_step, dataset, state


def train_and_evaluate(config, workdir: str, *, stop_at_step: Optional[int] = None,
                       dataset_fn: Optional[Callable[[int], Any]] = None) -> TrainState:
  """Trains (resuming from the workdir's latest checkpoint) and evaluates; returns the state.

  `stop_at_step` ends the run early after that step (with a checkpoint), as a preemption would;
  the schedule still runs to the full T. `dataset_fn(start_step)` replaces the input pipeline
  (an iterator of this process's host batches starting at that step). A preemption (see
  `PreemptionWatcher`) also ends the run early with a checkpoint, without the final evaluation.
  """
  from clu import metric_writers, periodic_actions  # pylint: disable=import-outside-toplevel
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel

  workdir = ckpt_lib.check_writable(workdir)   # before anything is read or compiled
  mesh = create_mesh()
  num_devices = jax.device_count()
  ipe = input_pipeline.iterations_per_epoch(config, num_devices)
  total_steps = schedules.num_train_steps(config, ipe)
  last_step = total_steps if stop_at_step is None else min(int(stop_at_step), total_steps)
  lr_schedule = schedules.create_lr_schedule(config, total_steps)
  tx = create_optimizer(config, lr_schedule)

  manager = ckpt_lib.create_manager(workdir, config)
  try:
    start_step, dataset, state = _resume(config, manager, tx, mesh, dataset_fn)
  except BaseException:
    manager.close()        # orbax's threads must not outlive the error
    raise

  save_config(config, workdir)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  # The convolution form follows the devices the step runs on (models/layers.py).
  model = build_model(config, axis_name=AXIS, platform=mesh.devices.flat[0].platform)
  steps = {}

  def train_step(memory_loss: bool):
    if memory_loss not in steps:
      steps[memory_loss] = make_train_step(config, model, tx, lr_schedule, mesh,
                                           memory_loss=memory_loss)
    return steps[memory_loss]

  logging.info('training %s on %s: %d steps (%d per epoch), global batch %d on %d devices, '
               'workdir %s', config.model.name, config.data.name, total_steps, ipe,
               config.train.batch_size, num_devices, workdir)
  log = _MetricsLog()
  pending = None              # (step, metrics) of the last dispatched step, checked lazily
  saver = ckpt_lib.Saver(manager)
  t_log, steps_since_log = time.time(), 0
  log_every = int(config.train.log_every_steps)

  def check_pending():
    nonlocal pending
    if pending is not None:
      log.add(*pending)
      pending = None

  preempted = False
  watcher = PreemptionWatcher().start()
  try:
    for step in range(start_step, last_step):
      batch = shard_batch(next(dataset), mesh)
      use_memory_loss = schedules.use_memory_loss(config, step, ipe)
      new_state, metrics = train_step(use_memory_loss)(state, batch)
      check_pending()          # the previous step, while this one runs
      saver.poll()             # a checkpoint write that failed in the background stops here
      state, pending = new_state, (step, metrics)
      steps_since_log += 1
      report_progress(step + 1)
      done = step + 1
      is_last = done == last_step
      if done % log_every == 0 or is_last:
        check_pending()
        means = log.pop()
        elapsed = max(time.time() - t_log, 1e-9)
        steps_per_sec = steps_since_log / elapsed
        means['steps_per_sec'] = steps_per_sec
        means['images_per_sec'] = steps_per_sec * config.train.batch_size
        means['eta_seconds'] = (total_steps - done) / max(steps_per_sec, 1e-9)
        means['epoch'] = schedules.epoch_at(step, ipe)
        writer.write_scalars(done, {f'train/{k}': v for k, v in means.items()})
        terms = ' '.join(f'{k[5:]} {v:.4f}' for k, v in sorted(means.items())
                         if k.startswith('loss_'))
        logging.info('step %d/%d (epoch %d): %s | lr %.3g%s | %.2f steps/s, %.1f img/s, ETA %s',
                     done, total_steps, means['epoch'], terms, means['lr'],
                     (f" memory momentum {means['memory_momentum']:.4f}"
                      if 'memory_momentum' in means else ''),
                     steps_per_sec, means['images_per_sec'], _format_eta(means['eta_seconds']))
        t_log, steps_since_log = time.time(), 0
      preempted = watcher.should_stop(done) and not is_last
      if done % int(config.train.checkpoint_every_steps) == 0 or is_last or preempted:
        check_pending()        # never save a state produced by a non-finite loss
        saver.save(done, state)
      if preempted:
        logging.warning('preemption: checkpoint of step %d saved in %s; stopping (the next start '
                        'resumes from it)', done, manager.directory)
        break
      if (config.train.eval_every_steps and done % int(config.train.eval_every_steps) == 0
          and not is_last):
        check_pending()
        _run_evaluation(config, state, workdir, mesh, done, writer)
    check_pending()
    saver.wait()
  except NonFiniteLossError as e:
    saver.wait()
    kept = (f'the last good checkpoint is step {saver.last_complete}'
            if saver.last_complete else 'no checkpoint kept')
    raise NonFiniteLossError(f'{e}; training stopped ({kept} in {manager.directory})') from None
  finally:
    watcher.close()
    saver.close()          # also on the error paths: orbax's threads must not outlive the run
    writer.flush()

  if last_step == total_steps and config.train.final_eval and not preempted:
    _run_evaluation(config, state, workdir, mesh, int(state.step), writer)
    writer.flush()
  return state
