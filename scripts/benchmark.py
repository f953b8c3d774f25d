"""Benchmark suite: memseg_jax next to the reference (SSSegmentation 1.7.0) on the same machine.

    python scripts/benchmark.py --output=/tmp/benchmark.json       # every case, < 10 min on 2 CPUs
    python scripts/benchmark.py --reps_512=2 --reps=3 --slide_image=full  # ~40 min
    python scripts/benchmark.py --skip_reference --skip_slide      # memseg_jax only, quicker
    python scripts/benchmark.py --models=mcibi --train_sizes=512 --reps=5
    python scripts/benchmark.py --backbone=hrnetv2w48             # HRNet MCIBI: train 128, eval
    python scripts/benchmark.py --backbone=s101                   # S-101 MCIBI: train 128, eval
    python scripts/benchmark.py --models=mcibipp_upernet --train_sizes=128 --skip_update

One run prints one table (every figure side by side: memseg_jax, the reference, their ratio)
and writes the same numbers as JSON to --output. Cases, for the ADE20K R-50-D8 MCIBI model and
the DeepLabV3 baseline (150 classes):

  train      one SGD step (forward, memory update, losses incl. the memory loss as from epoch 2,
             backward, optimizer), batch --batch_size, square crops of --train_sizes; images/s.
             The FLOPs of the step come from XLA's cost analysis of the compiled step; FLOP/s
             = FLOPs / median time, set beside the FLOP/s of a 4096^3 float32 matmul on the same
             device (`matmul`): their quotient is the fraction of the practical peak.
  eval       the eval forward of one 512x512 image (logits at 1/8 resolution).
  slide      slide inference of one 1024x2048 image, 512x1024 windows, stride 341 (15 windows),
             up to the probabilities at full size (memseg_jax `evaluate.inference`, the
             reference `auginference`); MCIBI only, --slide_reps repetitions. On 2 CPU cores one
             512x1024 window takes ~13 s on either side, so the whole image costs ~7 minutes
             for the pair; by default (--slide_image=strip) the same code runs on the image's
             top 512x1706 strip (3 of the 15 windows, the same window shape and stride) and the
             table shows that time x5 as the estimate for the whole image (the row says so);
             --slide_image=full runs all 15 windows.
  update     the memory update alone at 512x512, batch --update_batch_size, ~30 classes present:
             naive (upsample F to 512x512, then update), fused (`update_memory_fused`), and the
             reference (`F.interpolate` + `FeaturesMemory.update`), with their peak memory.

--backbone picks the model's backbone from `BACKBONES` (name -> config file, reference cfg,
default cases): 'r50' (the default, above), 'hrnetv2w48' (the ADE20K HRNetV2p-W48 MCIBI
config with SSSegmentation 1.7.0's stem ReLU so both sides compute the same numbers; MCIBI only;
by default the train step at 128x128 and the 512x512 eval forward, no slide case) or 's101'
(the ADE20K S-101-D8 MCIBI config; the same cases as 'hrnetv2w48').

Timing: every case runs --warmup untimed calls, then --reps timed calls; the table shows the
median (JSON: every time, warm-up calls included). The 512x512 train steps take ~30-50 s per
side on 2 cores, so by default they get one timed call after one warm-up call on the memseg_jax
side (--warmup_512, --reps_512) and none on the reference's (--ref_warmup_512). The warm-up
matters for XLA: the first call of the compiled 512x512 step costs ~7 s more than the next
ones (DeepLabV3: 36.3 s, then 28.7 and 28.9 s; MCIBI: 52.1 s, then 47.0 and 43.7 s; 0.7 s
more at 128x128). The reference's first call is not slower than its next ones (DeepLabV3:
28.7 s, then 30.7 and 29.4 s; MCIBI: 52.6 s, then 54.0 and 52.4 s), so its warm-up is off by
default to keep the run short; --ref_warmup_512=1 gives both sides the same treatment (~1.5 min
more). With these defaults and the slide strip the whole run stays under 10 minutes on a
2-core machine; the time each case took is printed as it ends. memseg_jax
programs are compiled ahead of time (`jit(...).lower(...).compile()`), so compile time is
reported apart and never enters a median. Both sides run on all the CPUs this process may use:
XLA's thread pool and `torch.set_num_threads` get the same count.

Peak memory of the update, two measures: `xla_temp` is the temporary buffer size of the
compiled program (`compiled.memory_analysis().temp_size_in_bytes`: what XLA allocates beyond
inputs and outputs, exact and load-independent); `rss_peak` is the rise of the process's peak
resident memory (VmHWM, reset through /proc/self/clear_refs after `malloc_trim`) during one
call, the only measure available for the reference (PyTorch allocates through malloc). The
acceptance ratio (naive / fused) uses `xla_temp`.

Same inputs on both sides: the reference is built with random weights and calibrated BN
(tests/reference_utils.py) and its state_dict is converted with `memseg_jax.convert`, so both
networks hold the same numbers (activations of a realistic scale, no denormals in one side
only). Without torch / sssegmentation (or with --skip_reference) memseg_jax runs alone from a
random initialisation. Keep the machine otherwise idle: the 1-minute load average is recorded
before and after.
"""

import argparse
import contextlib
import copy
import ctypes
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

NUM_CLASSES = 150
REF_IGNORE = -100           # the reference's ignore label; the project uses 255
SLIDE_SHAPE = (1024, 2048)
SLIDE_CROP = (512, 1024)
SLIDE_STRIDE = (341, 341)
# Models besides the MCIBI / DeepLabV3 of configs/ade20k.py: name -> (config, MCIBI++ variant of
# tests/mcibipp_reference.py). `mcibipp_upernet` is MCIBI++ UPerNet R-50-D8 (ADE20K): its train
# step has no memory loss (the reference's forward gets the lr and epoch all the same).
EXTRA_MODELS = {'mcibipp_upernet': ('configs/mcibipp/upernet_ade20k.py', 'upernet')}


def _hrnet_reference_cfg(model_name):
  from tests.hrnet_reference import reference_hrnet_cfg  # pylint: disable=import-outside-toplevel
  del model_name   # MCIBI only
  return reference_hrnet_cfg('hrnetv2_w48')


def _hrnet_config(config):
  config.model.backbone.stem_relu = True    # SSSegmentation 1.7.0's stem, as the reference
  return config


def _s101_reference_cfg(model_name):
  from tests import reference_utils as ru  # pylint: disable=import-outside-toplevel
  return ru.reference_cfg(model=model_name, backbone={
      'type': 'ResNeSt', 'depth': 101, 'structure_type': 'resnest101', 'pretrained': False,
      'outstride': 8, 'selected_indices': (0, 1, 2, 3)})


# --backbone name -> the config file, the reference cfg (per model name), the project config
# tweak, the models it runs, and the default train sizes and slide case.
BACKBONES = {
    'r50': dict(config='ade20k.py', reference=lambda model_name: None, adapt=lambda c: c,
                models=('mcibi', 'deeplabv3', *EXTRA_MODELS), train_sizes='128,512', slide=True),
    'hrnetv2w48': dict(config='ade20k_hrnetv2w48.py', reference=_hrnet_reference_cfg,
                       adapt=_hrnet_config, models=('mcibi',), train_sizes='128', slide=False),
    's101': dict(config='ade20k_s101.py', reference=_s101_reference_cfg, adapt=lambda c: c,
                 models=('mcibi',), train_sizes='128', slide=False),
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='mcibi,deeplabv3',
                 help='comma list: mcibi, deeplabv3, mcibipp_upernet')
  p.add_argument('--backbone', default='r50', choices=sorted(BACKBONES),
                 help='the model: backbone of the ADE20K MCIBI config (BACKBONES)')
  p.add_argument('--train_sizes', default=None,
                 help="square train crop sizes (default: the backbone's, r50 '128,512')")
  p.add_argument('--batch_size', type=int, default=2,
                 help="train batch (>= 2: the reference's BN on ASPP's pooled branch needs it)")
  p.add_argument('--update_batch_size', type=int, default=2, help='memory update batch')
  p.add_argument('--eval_size', type=int, default=512)
  p.add_argument('--warmup', type=int, default=1)
  p.add_argument('--reps', type=int, default=2, help='timed repetitions of the cheap cases')
  p.add_argument('--warmup_512', type=int, default=1,
                 help='untimed calls before the train steps with crops >= 512')
  p.add_argument('--ref_warmup_512', type=int, default=0,
                 help="the reference's untimed calls before its train steps with crops >= 512 "
                      '(its first call is not slower than the next: see above)')
  p.add_argument('--reps_512', type=int, default=1,
                 help='timed repetitions of train steps with crops >= 512 (slow on a CPU)')
  p.add_argument('--slide_reps', type=int, default=1, help='slide inference, no warm-up call')
  p.add_argument('--windows_per_call', type=int, default=1, help='slide windows per network call')
  p.add_argument('--slide_image', default='strip', choices=('strip', 'full'),
                 help='slide on the 1024x2048 image, or on its top 512x1706 strip (3 of the 15 '
                      'windows) with the time scaled x5 (see above)')
  p.add_argument('--classes_present', type=int, default=30, help='classes in the update labels')
  p.add_argument('--dtype', default='float32', choices=('float32', 'bfloat16'),
                 help='memseg_jax compute dtype (the reference always runs float32)')
  p.add_argument('--conv_impl', default=None, choices=('auto', 'native', 'taps'),
                 help="config.model.conv_impl (default: the config's, 'auto')")
  p.add_argument('--naive_update', action='store_true',
                 help='train steps with the naive (upsampling) memory update')
  p.add_argument('--skip_reference', action='store_true')
  p.add_argument('--skip_train', action='store_true')
  p.add_argument('--skip_eval', action='store_true')
  p.add_argument('--skip_slide', action='store_true')
  p.add_argument('--skip_update', action='store_true')
  p.add_argument('--output', default='', help='JSON file for every number')
  return p.parse_args(argv)


# ------------------------------------------------------------------------------------ helpers
def _threads():
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:
    return os.cpu_count() or 1


def _load():
  try:
    return os.getloadavg()[0]
  except OSError:
    return float('nan')


def _time_calls(fn, *, warmup, reps):
  """{'median', 'min', 'times'} in seconds of `fn()` (which must block until done)."""
  warm = []
  for _ in range(warmup):
    t = time.perf_counter()
    fn()
    warm.append(time.perf_counter() - t)
  times = []
  for _ in range(max(reps, 1)):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return {'median': statistics.median(times), 'min': min(times), 'times': times,
          'warmup_times': warm}


def _proc_status_kib(field):
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  raise KeyError(field)


def _peak_rss_rise(fn):
  """Bytes by which the process's peak RSS rises above its current RSS during `fn()`, or None."""
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')            # resets VmHWM to the current RSS
    base = _proc_status_kib('VmRSS')
    fn()
    return (_proc_status_kib('VmHWM') - base) * 1024
  except (OSError, KeyError):
    return None


def _labels(rng, batch, size, num_present, ignore):
  """(B, H, W) int32: 32x32 blocks of `num_present` classes (each present), some ignored blocks."""
  h, w = size
  bh, bw = -(-h // 32), -(-w // 32)
  num_present = min(num_present, batch * bh * bw)    # 16 blocks in one 128x128 crop
  classes = rng.choice(NUM_CLASSES, num_present, replace=False)
  blocks = classes[rng.randint(0, num_present, (batch, bh, bw))]
  blocks.reshape(-1)[:num_present] = classes      # every chosen class occurs
  blocks[rng.rand(batch, bh, bw) < 0.05] = ignore
  labels = np.repeat(np.repeat(blocks, 32, axis=1), 32, axis=2)[:, :h, :w]
  return labels.astype(np.int32)


def _to_ref_labels(labels):
  return np.where(labels == 255, REF_IGNORE, labels)


def _gflops(flops, seconds):
  return None if not flops or not seconds else flops / seconds / 1e9


class Context:
  """Everything shared by the cases: config, reference availability, collected results."""

  def __init__(self, args):
    import jax
    self.args = args
    self.jax = jax
    self.results = {}
    self.reference = None
    self._calibrated = {}       # model name -> calibrated reference network (build)
    if not args.skip_reference:
      try:
        import torch  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        from tests import reference_utils  # pylint: disable=import-outside-toplevel
        reference_utils.import_ssseg_builder()
        self.reference = reference_utils
      except Exception as e:  # pylint: disable=broad-except
        print(f'reference unavailable ({type(e).__name__}: {e}); memseg_jax only', flush=True)
    if self.reference is not None:
      import torch  # pylint: disable=import-outside-toplevel
      torch.set_num_threads(_threads())
      self.torch = torch

  def config(self, model_name, crop):
    from memseg_jax.config_validation import load_config  # pylint: disable=import-outside-toplevel
    if model_name in EXTRA_MODELS:
      config = load_config(os.path.join(REPO_ROOT, EXTRA_MODELS[model_name][0]))
    else:
      backbone = BACKBONES[self.args.backbone]
      config = backbone['adapt'](load_config(os.path.join(REPO_ROOT, 'configs',
                                                          backbone['config'])))
      config.model.name = model_name
    config.model.dtype = self.args.dtype
    if self.args.conv_impl:
      config.model.conv_impl = self.args.conv_impl
    if self.args.naive_update:
      config.model.memory.fused_update = False
    config.train.batch_size = self.args.batch_size
    config.data.crop_size = tuple(crop)
    return config

  def _reference_context(self):
    """HRNet: the reference's 1.7.0 HRModule needs a workaround to be built (tests/)."""
    if self.args.backbone.startswith('hrnet'):
      from tests.hrnet_reference import patched_reference  # pylint: disable=import-outside-toplevel
      return patched_reference()
    return contextlib.nullcontext()

  def build(self, model_name, mode, images_nchw=None):
    """(reference torch model or None, memseg_jax variables or None) with the same weights.

    One reference network per model, its BN calibrated on the first case's images (every case
    feeds N(0, 1) images, so the statistics carry over to the others), then copied per case in
    `mode`: calibrating again at 512x512 cost ~10-15 s per case.
    """
    if self.reference is None:
      return None, None
    from memseg_jax import convert  # pylint: disable=import-outside-toplevel
    ru = self.reference
    if model_name not in self._calibrated:
      if model_name in EXTRA_MODELS:
        from tests import mcibipp_reference  # pylint: disable=import-outside-toplevel
        cfg = mcibipp_reference.reference_cfg(EXTRA_MODELS[model_name][1])
      else:
        cfg = (BACKBONES[self.args.backbone]['reference'](model_name)
               or ru.reference_cfg(model=model_name))
      with self._reference_context():
        self._calibrated[model_name] = ru.build_reference(
            cfg, 'TEST', calibration_images=images_nchw, random_memory=True)
    ref = ru.set_mode(copy.deepcopy(self._calibrated[model_name]), mode)
    config = self.config(model_name, (64, 64))
    variables = convert.convert_ssseg_state_dict(ru.to_numpy_state_dict(ref), config)
    return ref, self.jax.tree_util.tree_map(np.asarray, variables)


# -------------------------------------------------------------------------------------- cases
def bench_matmul(ctx):
  jax, jnp = ctx.jax, ctx.jax.numpy
  n = 4096
  a = jnp.asarray(np.random.RandomState(0).rand(n, n).astype(np.float32))
  f = jax.jit(lambda x, y: x @ y).lower(a, a).compile()
  flops = 2.0 * n ** 3
  t = _time_calls(lambda: f(a, a).block_until_ready(), warmup=1, reps=ctx.args.reps)
  out = {'flops': flops, 'jax': t, 'jax_gflops': _gflops(flops, t['median'])}
  if ctx.reference is not None:
    ta = ctx.torch.from_numpy(np.asarray(a))
    tr = _time_calls(lambda: ta @ ta, warmup=1, reps=ctx.args.reps)
    out['ref'] = tr
    out['ref_gflops'] = _gflops(flops, tr['median'])
  ctx.results['matmul_4096_f32'] = out
  print(f"matmul 4096^3 f32: XLA {out['jax_gflops']:.0f} GFLOP/s"
        + (f", torch {out['ref_gflops']:.0f} GFLOP/s" if 'ref' in out else ''), flush=True)


def bench_update(ctx):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from memseg_jax import ops  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import memory as mem_lib  # pylint: disable=import-outside-toplevel
  jax, args = ctx.jax, ctx.args
  size, c, b = 512, 512, args.update_batch_size
  h = w = -(-size // 8)
  rng = np.random.RandomState(1)
  memory = rng.rand(NUM_CLASSES, 1, c).astype(np.float32)
  feats = np.maximum(rng.randn(b, h, w, c), 0).astype(np.float32)
  labels = _labels(rng, b, (size, size), args.classes_present, 255)
  lr = 0.005
  momentum = float(mem_lib.momentum_at(lr, base_momentum=0.9, base_lr=0.01,
                                       adjust_by_learning_rate=True))

  def naive(m, f, y):
    return mem_lib.update_memory(m, ops.resize_bilinear(f, y.shape[1:]), y, momentum=momentum)

  def fused(m, f, y):
    return mem_lib.update_memory_fused(m, f, y, momentum=momentum)

  out = {'batch': b, 'size': size, 'classes_present': args.classes_present,
         'feature_shape': [b, h, w, c]}
  dev = [jnp.asarray(x) for x in (memory, feats, labels)]
  results = {}
  for name, fn in (('naive', naive), ('fused', fused)):
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*dev).compile()
    compile_s = time.perf_counter() - t0
    stats = compiled.memory_analysis()
    call = lambda compiled=compiled: compiled(*dev).block_until_ready()
    rss = _peak_rss_rise(call)
    t = _time_calls(call, warmup=args.warmup, reps=args.reps)
    results[name] = np.asarray(compiled(*dev))
    out[name] = {'time': t, 'compile_s': compile_s, 'xla_temp_bytes': int(stats.temp_size_in_bytes),
                 'rss_peak_bytes': rss}
  out['max_abs_diff_fused_vs_naive'] = float(np.abs(results['fused'] - results['naive']).max())
  if args.batch_size != b:   # the fused update at the train batch, for its share of the step
    tb = args.batch_size
    dev_tb = [jnp.asarray(memory), jnp.asarray(np.resize(feats, (tb, h, w, c))),
              jnp.asarray(np.resize(labels, (tb, size, size)))]
    compiled = jax.jit(fused).lower(*dev_tb).compile()
    out['fused_at_train_batch'] = {'batch': tb, 'time': _time_calls(
        lambda: compiled(*dev_tb).block_until_ready(), warmup=args.warmup, reps=args.reps)}

  if ctx.reference is not None:
    torch = ctx.torch
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    from ssseg.modules.models.segmentors.mcibi.memory import FeaturesMemory  # pylint: disable=import-outside-toplevel
    ref = FeaturesMemory(num_classes=NUM_CLASSES, feats_channels=c, transform_channels=256,
                         out_channels=512, num_feats_per_cls=1, use_context_within_image=True,
                         use_hard_aggregate=False, norm_cfg={'type': 'BatchNorm2d'},
                         act_cfg={'type': 'ReLU', 'inplace': True})
    t_feats = torch.from_numpy(np.ascontiguousarray(feats.transpose(0, 3, 1, 2)))
    t_labels = torch.from_numpy(_to_ref_labels(labels)).long()
    momentum_cfg = {'base_momentum': 0.9, 'base_lr': 0.01, 'adjust_by_learning_rate': True}

    def ref_call():
      with torch.no_grad():
        ref.memory.data.copy_(torch.from_numpy(memory))
        up = F.interpolate(t_feats, size=(size, size), mode='bilinear', align_corners=False)
        ref.update(up, t_labels, ignore_index=REF_IGNORE, strategy='cosine_similarity',
                   momentum_cfg=momentum_cfg, learning_rate=lr)

    rss = _peak_rss_rise(ref_call)
    out['ref'] = {'time': _time_calls(ref_call, warmup=0, reps=max(1, min(args.reps, 2))),
                  'rss_peak_bytes': rss}
    out['max_abs_diff_fused_vs_ref'] = float(np.abs(results['fused'] - ref.memory.data.numpy()).max())
  ctx.results['memory_update_512'] = out
  print(f"update 512 b{b}: naive {out['naive']['time']['median']:.3f} s, "
        f"fused {out['fused']['time']['median']:.4f} s"
        + (f", reference {out['ref']['time']['median']:.2f} s" if 'ref' in out else '')
        + f"; |fused - naive| {out['max_abs_diff_fused_vs_naive']:.2g}", flush=True)


def bench_train(ctx, model_name, size):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from memseg_jax import schedules, train  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  jax, args = ctx.jax, ctx.args
  b = args.batch_size
  reps = args.reps_512 if size >= 512 else args.reps
  warmup = args.warmup_512 if size >= 512 else args.warmup
  rng = np.random.RandomState(2)
  images = rng.randn(b, size, size, 3).astype(np.float32)
  labels = _labels(rng, b, (size, size), args.classes_present, 255)
  config = ctx.config(model_name, (size, size))
  total_steps = 1000
  lr_schedule = schedules.create_lr_schedule(config, total_steps)
  tx = train.create_optimizer(config, lr_schedule)
  mesh = train.create_mesh(jax.devices()[:1])
  images_nchw = images.transpose(0, 3, 1, 2)
  ref, variables = ctx.build(model_name, 'TRAIN', images_nchw)
  state = train.create_train_state(config, jax.random.PRNGKey(0), tx, image_size=(64, 64))
  if variables is not None:
    state = state.replace(params=variables['params'], opt_state=tx.init(variables['params']),
                          batch_stats=variables['batch_stats'],
                          memory=variables.get('memory', {}))
  elif state.memory:        # steady state: every class stored (the cosine branch)
    state = state.replace(memory=jax.tree_util.tree_map(
        lambda m: jnp.asarray(rng.rand(*m.shape), m.dtype), state.memory))
  state = state.replace(step=jnp.asarray(total_steps // 2, jnp.int32))
  state = train.replicate(state, mesh)
  batch = train.shard_batch({'image': images, 'label': labels}, mesh)
  step = train.make_train_step(config, build_model(config, axis_name=train.AXIS), tx,
                               lr_schedule, mesh, memory_loss=model_name == 'mcibi')
  t0 = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  holder = {'state': state}

  def call():
    new_state, metrics = compiled(holder['state'], batch)
    jax.block_until_ready(metrics)
    holder['state'] = new_state

  t = _time_calls(call, warmup=warmup, reps=reps)
  out = {'batch': b, 'size': size, 'compile_s': compile_s, 'flops': flops, 'jax': t,
         'jax_images_per_s': b / t['median'], 'jax_gflops': _gflops(flops, t['median'])}
  del holder, state, compiled, step

  if ref is not None:
    torch = ctx.torch
    _, input_structure = ctx.reference.import_ssseg_builder()
    optimizer = torch.optim.SGD(ref.parameters(), lr=float(lr_schedule(total_steps // 2)),
                                momentum=config.train.momentum,
                                weight_decay=config.train.weight_decay)
    x = torch.from_numpy(np.ascontiguousarray(images_nchw))
    y = torch.from_numpy(_to_ref_labels(labels)).long()
    kwargs = ({'learning_rate': float(lr_schedule(total_steps // 2)), 'epoch': 2}
              if model_name in ('mcibi', *EXTRA_MODELS) else {})

    def ref_call():
      optimizer.zero_grad()
      outputs = ref(input_structure(images=x, seg_targets=y, mode='TRAIN'), **kwargs)
      outputs.loss.backward()
      optimizer.step()

    ref_warmup = args.ref_warmup_512 if size >= 512 else args.warmup
    tr = _time_calls(ref_call, warmup=ref_warmup, reps=reps)
    out['ref'] = tr
    out['ref_images_per_s'] = b / tr['median']
    out['ratio'] = t['median'] / tr['median']
    del ref, optimizer
  ctx.results[f'train_{model_name}_{size}'] = out
  print(f"train {model_name} {size}x{size} b{b}: memseg_jax {t['median']:.2f} s "
        f"(compile {compile_s:.0f} s, {out['jax_gflops']:.0f} GFLOP/s)"
        + (f", reference {out['ref']['median']:.2f} s, ratio {out['ratio']:.2f}"
           if 'ref' in out else ''), flush=True)


def bench_eval(ctx, model_name):
  from memseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  jax, args = ctx.jax, ctx.args
  size = args.eval_size
  image = np.random.RandomState(3).randn(1, size, size, 3).astype(np.float32)
  config = ctx.config(model_name, (size, size))
  ref, variables = ctx.build(model_name, 'TEST', image.transpose(0, 3, 1, 2))
  model = build_model(config)
  if variables is None:
    from memseg_jax import train  # pylint: disable=import-outside-toplevel
    variables = train.init_variables(config, jax.random.PRNGKey(0), image_size=(64, 64))
  variables = jax.device_put(variables)
  forward = evaluate.make_forward_fn(model)
  t0 = time.perf_counter()
  compiled = forward.lower(variables, image).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get('flops', 0.0)) if cost else 0.0
  t = _time_calls(lambda: compiled(variables, image).block_until_ready(),
                  warmup=args.warmup, reps=args.reps)
  out = {'size': size, 'compile_s': compile_s, 'flops': flops, 'jax': t,
         'jax_gflops': _gflops(flops, t['median'])}
  if ref is not None:
    torch = ctx.torch
    _, input_structure = ctx.reference.import_ssseg_builder()
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))

    def ref_call():
      with torch.no_grad():
        return ref(input_structure(images=x, mode='TEST')).seg_logits

    tr = _time_calls(ref_call, warmup=args.warmup, reps=args.reps)
    ours = np.asarray(compiled(variables, image)).transpose(0, 3, 1, 2)
    theirs = ref_call().numpy()
    out['ref'] = tr
    out['ratio'] = t['median'] / tr['median']
    out['max_abs_logit_diff_rel'] = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
  ctx.results[f'eval_{model_name}_{size}'] = out
  print(f"eval {model_name} {size}x{size}: memseg_jax {t['median']:.2f} s "
        f"(compile {compile_s:.0f} s, {out['jax_gflops']:.0f} GFLOP/s)"
        + (f", reference {out['ref']['median']:.2f} s, ratio {out['ratio']:.2f}"
           if 'ref' in out else ''), flush=True)


def bench_slide(ctx, model_name='mcibi'):
  from memseg_jax import evaluate  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  jax, args = ctx.jax, ctx.args
  image = np.random.RandomState(4).randn(1, *SLIDE_SHAPE, 3).astype(np.float32)
  full_windows = len(evaluate.slide_windows(SLIDE_SHAPE, SLIDE_CROP, SLIDE_STRIDE))
  if args.slide_image == 'strip':   # the top row of windows, cut where its 3rd window ends
    image = np.ascontiguousarray(image[:, :SLIDE_CROP[0], :SLIDE_CROP[1] + 2 * SLIDE_STRIDE[1]])
  shape = image.shape[1:3]
  config = ctx.config(model_name, SLIDE_CROP)
  calib = image[:, :SLIDE_CROP[0], :SLIDE_CROP[1]].transpose(0, 3, 1, 2)
  ref, variables = ctx.build(model_name, 'TEST', calib)
  if variables is None:
    from memseg_jax import train  # pylint: disable=import-outside-toplevel
    variables = train.init_variables(config, jax.random.PRNGKey(0), image_size=(64, 64))
  variables = jax.device_put(variables)
  forward = evaluate.make_forward_fn(build_model(config))
  settings = evaluate.InferenceSettings(
      mode='slide', crop_size=SLIDE_CROP, stride=SLIDE_STRIDE,
      windows_per_call=args.windows_per_call, scales=(1.0,), flip=False,
      use_probs_before_resize=True, flip_swap_pairs=())
  windows = evaluate.slide_windows(shape, SLIDE_CROP, SLIDE_STRIDE)
  scale = full_windows / len(windows)      # 1 for the full image, 5 for the strip
  # Compile the network for the window batch first (jit's own cache), so the timed calls
  # include only the small per-shape helpers' first compiles on the first repetition.
  t0 = time.perf_counter()
  crops = np.zeros((args.windows_per_call, *SLIDE_CROP, 3), np.float32)
  forward(variables, crops).block_until_ready()
  compile_s = time.perf_counter() - t0

  def call():
    return jax.block_until_ready(evaluate.inference(forward, variables, image, out_hw=shape,
                                                    settings=settings))

  t = _time_calls(call, warmup=0, reps=args.slide_reps)
  out = {'shape': list(SLIDE_SHAPE), 'run_shape': list(shape), 'crop': list(SLIDE_CROP),
         'stride': list(SLIDE_STRIDE), 'windows': len(windows), 'full_windows': full_windows,
         'estimate_scale': scale, 'windows_per_call': args.windows_per_call,
         'compile_and_first_window_s': compile_s, 'jax': t,
         'jax_estimate_s': t['median'] * scale}
  if ref is not None:
    torch = ctx.torch
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    ref.cfg['inference'] = {
        'forward': {'mode': 'slide', 'cropsize': SLIDE_CROP, 'stride': SLIDE_STRIDE},
        'tta': {'multiscale': [1.0], 'flip': False, 'use_probs_before_resize': True}}
    ref.cfg['dataset'] = {'train': {'data_pipelines': []}}
    x = torch.from_numpy(np.ascontiguousarray(image.transpose(0, 3, 1, 2)))

    def ref_call():
      with torch.no_grad():
        views = ref.auginference(x)
        views = [F.interpolate(v, size=shape, mode='bilinear', align_corners=False)
                 for v in views]
        return sum(views) / len(views)

    tr = _time_calls(ref_call, warmup=0, reps=args.slide_reps)
    out['ref'] = tr
    out['ref_estimate_s'] = tr['median'] * scale
    out['ratio'] = t['median'] / tr['median']
  ctx.results[f'slide_{model_name}_{SLIDE_SHAPE[0]}x{SLIDE_SHAPE[1]}'] = out
  how = '' if scale == 1 else f' (estimated: {shape[0]}x{shape[1]} strip, {len(windows)} windows, x{scale:g})'
  print(f"slide {model_name} {SLIDE_SHAPE}{how}: memseg_jax {out['jax_estimate_s']:.1f} s"
        + (f", reference {out['ref_estimate_s']:.1f} s, ratio {out['ratio']:.2f}"
           if 'ref' in out else ''), flush=True)


# -------------------------------------------------------------------------------------- table
def _fmt(x, spec='.3f'):
  return '-' if x is None else format(x, spec)


def summarize(ctx):
  """The headline figures (acceptance quantities) and the printed table."""
  r = ctx.results
  rows = []
  peak = r.get('matmul_4096_f32', {}).get('jax_gflops')
  for key, v in r.items():
    if key.startswith(('train_', 'eval_', 'slide_')):
      ref_t = v.get('ref', {}).get('median')
      extra = []
      if 'jax_images_per_s' in v:
        extra.append(f"{v['jax_images_per_s']:.2f} img/s"
                     + (f" (ref {v['ref_images_per_s']:.2f})" if 'ref_images_per_s' in v else ''))
      if v.get('jax_gflops'):
        extra.append(f"{v['jax_gflops']:.0f} GFLOP/s"
                     + (f" = {v['jax_gflops'] / peak:.0%} of matmul" if peak else ''))
      if 'compile_s' in v:
        extra.append(f"compile {v['compile_s']:.0f} s")
      ours = v['jax']['median']
      if v.get('estimate_scale', 1) != 1:   # the slide strip, scaled to the whole image
        ours, ref_t = v['jax_estimate_s'], v.get('ref_estimate_s')
        extra.append(f"estimate: {v['run_shape'][0]}x{v['run_shape'][1]} strip "
                     f"({v['windows']} of {v['full_windows']} windows) x{v['estimate_scale']:g}")
      rows.append((key, ours, ref_t, v.get('ratio'), ', '.join(extra)))
  if 'memory_update_512' in r:
    u = r['memory_update_512']
    ref_t = u.get('ref', {}).get('time', {}).get('median')
    mib = lambda x: '-' if x is None else f'{x / 2**20:.0f} MiB'
    for name in ('naive', 'fused'):
      t = u[name]['time']['median']
      rows.append((f'update_{name}_512', t, ref_t, None if ref_t is None else t / ref_t,
                   f"xla temp {mib(u[name]['xla_temp_bytes'])}, "
                   f"rss peak {mib(u[name]['rss_peak_bytes'])}"
                   + (f" (ref rss peak {mib(u['ref']['rss_peak_bytes'])})" if 'ref' in u else '')))
  if 'matmul_4096_f32' in r:
    m = r['matmul_4096_f32']
    rows.append(('matmul_4096_f32', m['jax']['median'], m.get('ref', {}).get('median'),
                 (m['jax']['median'] / m['ref']['median']) if 'ref' in m else None,
                 f"{m['jax_gflops']:.0f} GFLOP/s"
                 + (f" (torch {m['ref_gflops']:.0f})" if 'ref_gflops' in m else '')))

  headline = {}
  if 'memory_update_512' in r:
    u = r['memory_update_512']
    headline['update_xla_temp_naive_over_fused'] = (
        u['naive']['xla_temp_bytes'] / max(u['fused']['xla_temp_bytes'], 1))
    if 'ref' in u:
      headline['update_ref_time_over_fused'] = (
          u['ref']['time']['median'] / u['fused']['time']['median'])
    train512 = r.get('train_mcibi_512')
    if train512:   # the update at the train step's batch
      fused = u.get('fused_at_train_batch', u['fused'])
      headline['update_fused_fraction_of_train_step_512'] = (
          fused['time']['median'] / train512['jax']['median'])
  for key in ('train_mcibi_128', 'train_deeplabv3_128', 'train_mcibi_512', 'train_deeplabv3_512',
              'eval_mcibi_512', 'eval_deeplabv3_512', 'slide_mcibi_1024x2048',
              'train_mcibipp_upernet_128', 'eval_mcibipp_upernet_512'):
    if key in r and 'ratio' in r[key]:
      headline[f'{key}_jax_over_ref'] = r[key]['ratio']
  if peak:
    for key in ('train_mcibi_512', 'train_deeplabv3_512', 'train_mcibi_128'):
      if key in r and r[key].get('jax_gflops'):
        headline[f'{key}_fraction_of_matmul_peak'] = r[key]['jax_gflops'] / peak
  return rows, headline


def main(argv=None):
  args = parse_args(argv)
  t_start = time.perf_counter()
  load_before = _load()
  ctx = Context(args)
  jax = ctx.jax
  backbone = BACKBONES[args.backbone]
  models = [m for m in args.models.split(',') if m]
  skipped = [m for m in models if m not in backbone['models']]
  if skipped:
    print(f'--backbone={args.backbone}: {", ".join(skipped)} not built for it, skipped',
          flush=True)
    models = [m for m in models if m in backbone['models']]
  for m in models:
    if m not in ('mcibi', 'deeplabv3', *EXTRA_MODELS):
      raise ValueError(f"--models: unknown model {m!r} (expected 'mcibi', 'deeplabv3' or one "
                       f"of {', '.join(EXTRA_MODELS)})")
  train_sizes = backbone['train_sizes'] if args.train_sizes is None else args.train_sizes
  sizes = [int(s) for s in train_sizes.split(',') if s]
  print(f'jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.device_count()} device(s)), '
        f'{_threads()} CPU threads, load {load_before:.1f}, backbone {args.backbone}'
        + (f', torch {ctx.torch.__version__} ({ctx.torch.get_num_threads()} threads)'
           if ctx.reference is not None else ''), flush=True)

  cases = [('matmul', bench_matmul, ())]
  if not args.skip_update:
    cases.append(('update', bench_update, ()))
  if not args.skip_train:
    cases += [(f'train {m} {size}', bench_train, (m, size)) for size in sizes for m in models]
  if not args.skip_eval:
    cases += [(f'eval {m}', bench_eval, (m,)) for m in models]
  if not args.skip_slide and 'mcibi' in models and backbone['slide']:
    cases.append(('slide mcibi', bench_slide, ('mcibi',)))
  wall = {}
  for name, fn, fn_args in cases:
    t0 = time.perf_counter()
    fn(ctx, *fn_args)
    wall[name] = time.perf_counter() - t0
    print(f'  [{name}: {wall[name]:.0f} s, {time.perf_counter() - t_start:.0f} s so far]',
          flush=True)

  rows, headline = summarize(ctx)
  total = time.perf_counter() - t_start
  load_after = _load()
  print(f"\n{'case':28s} {'memseg_jax s':>12s} {'reference s':>12s} {'ratio':>7s}  notes")
  for name, ours, ref, ratio, notes in rows:
    print(f'{name:28s} {_fmt(ours):>12s} {_fmt(ref):>12s} {_fmt(ratio, ".2f"):>7s}  {notes}')
  print('\nheadline:')
  for k, v in headline.items():
    print(f'  {k}: {v:.4g}')
  print(f'\ntotal benchmark time {total:.0f} s; load average {load_before:.1f} before, '
        f'{load_after:.1f} after', flush=True)

  if args.output:
    report = {
        'args': vars(args), 'jax_version': jax.__version__,
        'device': jax.devices()[0].device_kind, 'platform': platform.platform(),
        'cpu_threads': _threads(),
        'torch_version': ctx.torch.__version__ if ctx.reference is not None else None,
        'load_avg_1min_before': load_before, 'load_avg_1min_after': load_after,
        'total_seconds': total, 'case_wall_seconds': wall, 'results': ctx.results,
        'headline': headline,
        'table': [dict(zip(('case', 'jax_s', 'ref_s', 'ratio', 'notes'), row)) for row in rows],
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, 'w') as f:
      json.dump(report, f, indent=2)
    print(f'wrote {args.output}')


if __name__ == '__main__':
  main()
