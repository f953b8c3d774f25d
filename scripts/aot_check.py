"""Compile every config ahead of time for TPU v4-8 / v5e-8 / v5p-8 and an 8xH100 host, no chip.

    pip install -e '.[aot]'                       # libtpu and the CUDA plugin; no CUDA needed
    python scripts/aot_check.py                   # every config, target, step and dtype
    python scripts/aot_check.py --configs=demo,ade20k --targets=v5e-8 --steps=train_mem \
        --dtypes=bfloat16

For each config in configs/ (subfolders too) at its documented global batch it compiles, for
each target, the train step without and (MCIBI with `model.memory.use_loss`) with the memory
loss, and the evaluation forward at the config's inference shapes: whole mode at the padded
eval bucket of a typical image (or the exact image where the model cannot mask padding), slide
mode at its window shape, every scale (and flip) of the config and of its documented variants
(`configs/ade20k.py:ms_flip`). It prints one table: peak memory per device against the
device's capacity, FLOPs per device per step (XLA's cost analysis; the TPU figure is used for
the GPU, whose compiler reports none) and the images/s a chip would give at 40 % and 60 % of
its bfloat16 peak. Exit status 1 when something does not fit.

How. JAX compiles for devices it does not have: `jax.experimental.topologies` returns
compile-only devices of a TPU slice (libtpu) or of a CUDA host (the CUDA plugin, given a
`GpuTargetConfigProto` that describes the GPU: `h100_target_config` below, written from the
H100 SXM's published figures). The step is the one training and evaluation run
(`train.make_train_step`, `evaluate.make_padded_forward_fn`), lowered with abstract inputs
(`jax.ShapeDtypeStruct`s with the mesh's shardings) and compiled. The TPU compiler refuses a
program that does not fit its HBM (RESOURCE_EXHAUSTED); the GPU compiler does not check, so
arguments + outputs + temporaries - aliased bytes are compared with the GPU's memory here.

Compiles take minutes on a small CPU (a TPU compile of the ADE20K R-50 train step: 3-6 min on
2 cores), so every result is cached as JSON (`--cache_dir`, default ~/.cache/memseg_jax/aot),
keyed by the config's model structure and everything else the compiled program depends on
(losses, optimizer, batch and input shapes, dtype, step, target), the code the programs depend
on (`PROGRAM_SOURCES` and this script's compiling functions, comments and docstrings left out)
and the jax/libtpu versions: the table fills up over several runs, and configs that share a
structure (an `:ms_flip` variant's train step) compile once. `--dump_to=DIR` writes XLA's
dumps (buffer assignment, live ranges) of what it compiles, for `scripts/peak_buffers.py`.
"""

import argparse
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

GIB = float(1 << 30)


# ------------------------------------------------------------------------------------- targets
def h100_target_config() -> str:
  """GpuTargetConfigProto (text) of one H100 SXM5 80 GB, from its published hardware figures.

  Sources: NVIDIA H100 Tensor Core GPU Architecture whitepaper (SXM5: 132 SMs, 128 FP32 cores
  per SM, 50 MB L2, 80 GB HBM3 at 3.35 TB/s, 1.98 GHz boost clock) and the CUDA C++ Programming
  Guide's table for compute capability 9.0 (1024 threads per block, warps of 32, 2048 resident
  threads and 64 K 32-bit registers per SM, 64 K registers per block, 228 KB shared memory per
  SM of which 227 KB opt-in per block, 48 KB per block by default, grid limits 2^31-1 x 65535 x
  65535). cuDNN 9.8 is the oldest cuDNN jax-cuda12-plugin 0.10.2 accepts (its wheel metadata).
  XLA reads these to choose tilings and fusions; the device memory is what it plans against.
  """
  kib = 1024
  fields = {
      'threads_per_block_limit': 1024,
      'threads_per_warp': 32,
      'shared_memory_per_block': 48 * kib,
      'shared_memory_per_core': 228 * kib,
      'shared_memory_per_block_optin': 227 * kib,
      'threads_per_core_limit': 2048,
      'core_count': 132,
      'fpus_per_core': 128,
      'block_dim_limit_x': 2 ** 31 - 1,
      'block_dim_limit_y': 65535,
      'block_dim_limit_z': 65535,
      'memory_bandwidth': 3_350_000_000_000,          # bytes/s
      'l2_cache_size': 50 * kib * kib,
      'clock_rate_ghz': 1.98,
      'device_memory_size': 80 * 1_000_000_000,       # "80 GB" (decimal) HBM3
      'registers_per_core_limit': 65536,
      'registers_per_block_limit': 65536,
  }
  body = '\n'.join(f'  {k}: {v}' for k, v in fields.items())
  return ('gpu_device_info {\n' + body + '\n  cuda_compute_capability { major: 9 minor: 0 }\n}\n'
          'platform_name: "CUDA"\n'
          'dnn_version_info { major: 9 minor: 8 patch: 0 }\n'
          'device_description_str: "NVIDIA H100 80GB HBM3"\n')


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice or host to compile for: how to get its devices, its memory and its bf16 peak."""
  name: str
  platform: str                 # 'tpu' or 'cuda'
  topology: Dict[str, Any]
  capacity_gib: float           # per device
  peak_tflops: float            # bf16 dense, per chip (= per device here)
  chips: int
  note: str = ''


TARGETS = {
    # HBM capacities as libtpu 0.0.42.1 reports them (its RESOURCE_EXHAUSTED messages); peaks
    # from the Cloud TPU system architecture pages (bf16 TFLOP/s per chip). v4 runs in megacore
    # mode (one device per chip; without it libtpu lists 8 TensorCores that meshes refuse).
    'v4-8': Target('v4-8', 'tpu', dict(topology_name='v4:2x2x1', chip_config_name='megacore'),
                   30.75, 275.0, 4),
    'v5e-8': Target('v5e-8', 'tpu', dict(topology_name='v5e:2x4', chips_per_host_bounds=(2, 4, 1)),
                    15.75, 197.0, 8),
    'v5p-8': Target('v5p-8', 'tpu', dict(topology_name='v5p:2x2x1'), 95.74, 459.0, 4),
    # 80 GB = 74.5 GiB; CUDA and the driver keep about 0.5 GiB of it, and JAX by default lets
    # XLA use 75 % of what is left (XLA_PYTHON_CLIENT_MEM_FRACTION; set 0.95 to use nearly all).
    # The check is against 0.95 of the 74.5 GiB.
    '8xH100': Target('8xH100', 'cuda', dict(topology='1x1x8'), 0.95 * 80e9 / GIB, 989.0, 8,
                     note='GPU: memory not checked by the compiler; capacity = 0.95 x 80 GB'),
}
# libtpu 0.0.42.1 crashes compiling BatchNorm steps for v6e (fixed in 0.0.52): left out.


def topology_devices(target: Target):
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs = dict(target.topology)
  if target.platform == 'cuda':
    kwargs['target_config'] = h100_target_config()
  return list(topologies.get_topology_desc(platform=target.platform, **kwargs).devices)


# ------------------------------------------------------------------------------------- configs
def discover_configs(root: str) -> List[str]:
  """configs/**/*.py except default.py and helpers (files without get_config)."""
  paths = []
  for path in sorted(glob.glob(os.path.join(root, '**', '*.py'), recursive=True)):
    name = os.path.basename(path)
    if name in ('default.py', '__init__.py') or name.startswith('_'):
      continue
    with open(path) as f:
      if 'def get_config' not in f.read():
        continue
    paths.append(path)
  return paths


def config_name(path: str, root: str) -> str:
  return os.path.splitext(os.path.relpath(path, root))[0]


def documented_variants(path: str) -> List[str]:
  """The `:arg` variants a config's docstrings name (`configs/ade20k.py:ms_flip`, `:flip`)."""
  with open(path) as f:
    text = f.read()
  found = re.findall(r'\.py:(\w+)|`:(\w+)`', text)
  variants = []
  for a, b in found:
    v = a or b
    if v not in variants:
      variants.append(v)
  return variants


def load(path: str, arg: Optional[str] = None):
  from memseg_jax.config_validation import load_config  # pylint: disable=import-outside-toplevel
  return load_config(path + (f':{arg}' if arg else ''))


# ------------------------------------------------------------------------------------- jobs
@dataclasses.dataclass
class Job:
  """One program to compile: a step of a config at given shapes, dtype and target."""
  config: str                   # config name (with :variant)
  step: str                     # 'train', 'train_mem' or 'eval'
  dtype: str
  target: str
  kind: str                     # 'train', 'eval_padded', 'eval_exact'
  shape: tuple                  # train: (B, H, W); eval: (N, H, W)
  calls: int = 1                # eval: calls of this shape per image
  images: float = 1.0           # images per call (train: global batch)
  cfg: Any = None

  def key(self, revision: str) -> str:
    c = self.cfg
    model = json.loads(c.model.to_json())
    model['backbone'].pop('pretrained', None)
    model['dtype'] = self.dtype
    structure = {
        'model': model, 'loss': json.loads(c.loss.to_json()),
        'optimizer': [float(c.train.momentum), float(c.train.weight_decay), float(c.train.lr)],
        'ignore_index': int(c.data.ignore_index), 'kind': self.kind, 'shape': list(self.shape),
        'memory_loss': self.step == 'train_mem', 'target': self.target, 'revision': revision}
    if os.environ.get('XLA_FLAGS'):   # they change the compiled program: cached apart
      structure['xla_flags'] = os.environ['XLA_FLAGS']
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()[:24]


def typical_eval_image(config):
  """(h, w) of a typical test-resized image: a 3:4 landscape photo (ADE20K, COCO), or 1:2 for
  Cityscapes, through the config's test-time resize."""
  from memseg_jax import input_pipeline  # pylint: disable=import-outside-toplevel
  d = config.data
  short = int(min(d.eval_scale))
  aspect = 2.0 if d.name.startswith('cityscapes') else 4.0 / 3.0
  orig = (short, int(round(short * aspect)))
  return input_pipeline.test_resize_size_np(orig, d.eval_scale, bool(d.eval_keep_ratio))


def eval_jobs(name, config, dtype, target):
  """The evaluation forwards one typical image needs (see the module docstring)."""
  from memseg_jax import evaluate, models  # pylint: disable=import-outside-toplevel
  settings = evaluate.InferenceSettings.from_config(config)
  h, w = typical_eval_image(config)
  views = 2 if settings.flip else 1
  shapes = {}
  if settings.mode == 'whole' and settings.padded_whole and models.supports_valid_hw(config):
    mult = int(config.data.get('eval_pad_multiple', 64))
    hp, wp = -(-h // mult) * mult, -(-w // mult) * mult
    for view_hw, _ in evaluate.padded_whole_tables((h, w), (hp, wp), (h, w), (hp, wp), settings,
                                                  models.logits_stride(config)):
      key = ('eval_padded', (views,) + tuple(view_hw))
      shapes[key] = shapes.get(key, 0) + 1
  else:
    for s in settings.scales:
      vh, vw = (h, w) if s == 1.0 else (int(math.floor(h * s)), int(math.floor(w * s)))
      if settings.mode == 'whole':
        key = ('eval_exact', (views, vh, vw))
        shapes[key] = shapes.get(key, 0) + 1
      else:
        windows = evaluate.slide_windows((vh, vw), settings.crop_size, settings.stride)
        y1, y2, x1, x2 = windows[0]
        key = ('eval_exact', (settings.windows_per_call, y2 - y1, x2 - x1))
        calls = views * -(-len(windows) // settings.windows_per_call)
        shapes[key] = shapes.get(key, 0) + calls
  return [Job(name, 'eval', dtype, target, kind, shape, calls=calls, images=1.0 / calls,
              cfg=config) for (kind, shape), calls in shapes.items()]


def jobs_for(path, root, steps, dtypes, targets) -> List[Job]:
  name = config_name(path, root)
  jobs = []
  base = load(path)
  variants = [(name, base)] + [(f'{name}:{v}', load(path, v)) for v in documented_variants(path)]
  for target in targets:
    for dtype in dtypes:
      cfg = base.copy_and_resolve_references()
      cfg.model.dtype = dtype
      b = int(cfg.train.batch_size)
      h, w = (int(v) for v in cfg.data.crop_size)
      if 'train' in steps:
        jobs.append(Job(name, 'train', dtype, target, 'train', (b, h, w), images=b, cfg=cfg))
      if ('train_mem' in steps and cfg.model.name == 'mcibi' and cfg.model.memory.use_loss):
        jobs.append(Job(name, 'train_mem', dtype, target, 'train', (b, h, w), images=b, cfg=cfg))
      if 'eval' in steps:
        seen = set()
        for vname, vcfg in variants:
          vcfg = vcfg.copy_and_resolve_references()
          vcfg.model.dtype = dtype
          vjobs = eval_jobs(vname, vcfg, dtype, target)
          sig = tuple((j.kind, j.shape, j.calls) for j in vjobs)
          if sig in seen:        # a variant that changes nothing at evaluation
            continue
          seen.add(sig)
          jobs.extend(vjobs)
  return jobs


# ------------------------------------------------------------------------------------- compile
# The source the compiled programs depend on: the models, the steps, their math. Data loading,
# checkpoints, the CLI and this script's table printing are left out, so editing them keeps the
# cache; the compiling functions of this script are hashed by their own code. Comments and
# docstrings do not count (`_code_digest`).
PROGRAM_SOURCES = ('memseg_jax/models/**/*.py', 'memseg_jax/train.py', 'memseg_jax/evaluate.py',
                   'memseg_jax/losses.py', 'memseg_jax/schedules.py', 'memseg_jax/ops.py',
                   'memseg_jax/metrics.py', 'memseg_jax/distributed.py')


def _code_digest(source: str) -> bytes:
  """The code of a Python source without its comments and docstrings (edits to those leave the
  compiled programs, and so the cache, as they are)."""
  import ast  # pylint: disable=import-outside-toplevel
  import textwrap  # pylint: disable=import-outside-toplevel
  tree = ast.parse(textwrap.dedent(source))
  for node in ast.walk(tree):
    body = getattr(node, 'body', None)
    if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
      node.body = body[1:] or [ast.Pass()]
  return ast.dump(tree).encode()


def revision() -> str:
  """Hash of the code the compiled programs depend on and of the compilers' versions."""
  import inspect  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  h = hashlib.sha256()
  files = sorted({f for pattern in PROGRAM_SOURCES
                  for f in glob.glob(os.path.join(REPO_ROOT, pattern), recursive=True)})
  for path in files:
    with open(path) as f:
      h.update(os.path.relpath(path, REPO_ROOT).encode() + _code_digest(f.read()))
  for fn in (h100_target_config, topology_devices, compile_job, _memory, _hlo_conv_stats):
    h.update(_code_digest(inspect.getsource(fn)))
  h.update(repr(sorted(TARGETS.items())).encode())
  versions = [jax.__version__]
  try:
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    versions += [metadata.version(p) for p in ('libtpu', 'jax-cuda12-plugin')]
  except Exception:  # pylint: disable=broad-except
    pass
  h.update(' '.join(versions).encode())
  return h.hexdigest()[:16]


def _hlo_conv_stats(text: str) -> Dict[str, int]:
  """Convolution ops in the optimized HLO: total, 3x3 windows, and with each rhs dilation."""
  convs = re.findall(r'= [^\n]*? convolution\([^\n]*', text)
  stats = {'convolutions': len(convs),
           'conv_3x3': sum(1 for c in convs if 'size=3x3' in c)}
  for c in convs:
    m = re.search(r'rhs_dilate=(\d+)x(\d+)', c)
    if m:
      k = f'rhs_dilate_{m.group(1)}'
      stats[k] = stats.get(k, 0) + 1
  stats['cudnn_convolutions'] = text.count('__cudnn$conv')
  return stats


def _memory(target: Target, compiled) -> Dict[str, float]:
  ma = compiled.memory_analysis()
  out = {k: float(getattr(ma, f'{k}_size_in_bytes', 0) or 0)
         for k in ('argument', 'output', 'temp', 'alias', 'generated_code')}
  total = out['argument'] + out['output'] + out['temp'] - out['alias']
  peak = float(getattr(ma, 'peak_memory_in_bytes', 0) or 0)
  # TPU: the compiler's own peak (heap simulation); GPU: the sum (no peak simulation there).
  out['peak'] = peak if (target.platform == 'tpu' and peak > 0) else total
  return out


def compile_job(job: Job, target: Target, devices, dump_to: Optional[str] = None):
  """Compiles one job; returns its record (peak, flops, compile time, HLO convolutions)."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=import-outside-toplevel
  from memseg_jax import evaluate, schedules, train  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel

  config = job.cfg
  platform = devices[0].platform
  mesh = Mesh(devices, (train.AXIS,))
  lr_schedule = schedules.create_lr_schedule(config, 100_000)
  tx = train.create_optimizer(config, lr_schedule)
  abstract = train._abstract_state_without_pretrained(config, tx, mesh)  # pylint: disable=protected-access
  t0 = time.time()
  if job.kind == 'train':
    model = build_model(config, axis_name=train.AXIS, platform=platform)
    step = train.make_train_step(config, model, tx, lr_schedule, mesh,
                                 memory_loss=job.step == 'train_mem')
    b, h, w = job.shape
    data = NamedSharding(mesh, P(train.AXIS))
    batch = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=data),
             'label': jax.ShapeDtypeStruct((b, h, w), jnp.int32, sharding=data)}
    lowered = step.lower(abstract, batch)
  else:
    model = build_model(config, platform=platform)
    one = jax.sharding.SingleDeviceSharding(devices[0])
    variables = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), abstract.variables())
    n, h, w = job.shape
    images = jax.ShapeDtypeStruct((n, h, w, 3), jnp.float32, sharding=one)
    if job.kind == 'eval_padded':
      valid = jax.ShapeDtypeStruct((n, 2), jnp.int32, sharding=one)
      lowered = evaluate.make_padded_forward_fn(model).lower(variables, images, valid)
    else:
      lowered = evaluate.make_forward_fn(model).lower(variables, images)
  options = None
  if dump_to:
    os.makedirs(dump_to, exist_ok=True)
    options = {'xla_dump_to': dump_to}
  compiled = lowered.compile(options) if options else lowered.compile()
  seconds = time.time() - t0
  cost = compiled.cost_analysis()
  if isinstance(cost, list):
    cost = cost[0] if cost else None
  record = {'compile_seconds': seconds, 'memory': _memory(target, compiled),
            'flops': float(cost['flops']) if cost and 'flops' in cost else None,
            'hlo': _hlo_conv_stats(compiled.as_text()), 'fits': True}
  record['fits'] = record['memory']['peak'] <= target.capacity_gib * GIB
  return record


def oom_record(error: BaseException, seconds: float) -> Dict[str, Any]:
  from memseg_jax import resources  # pylint: disable=import-outside-toplevel
  needed, available = resources.parse_out_of_memory(str(error))
  return {'compile_seconds': seconds, 'fits': False, 'oom': True,
          'memory': {'peak': needed, 'available': available}, 'flops': None, 'hlo': {},
          'error': str(error).splitlines()[0][:500]}


# Without a device XLA's GPU compiler cannot autotune: it takes its default Triton tiling for
# each fused matmul, and for some shapes (ViT-L's bfloat16 attention projections, [2050, 1024]
# in the train step at 2 images per GPU; the float32 PPM pooling of the UPerNet and MCIBI++
# PSPNet/UPerNet heads, [24576, 6]; demo_mcibipp's memory update, [64, 8]) finds none that fits
# and fails (`resources.is_gpu_tiling_failure`); the row then says how to compile it anyway.


def error_record(error: BaseException, seconds: float, target: Target) -> Dict[str, Any]:
  """The record of a compile that failed for another reason than device memory."""
  from memseg_jax import resources  # pylint: disable=import-outside-toplevel
  text = str(error)
  first = next((line for line in text.splitlines() if line.strip()), repr(error))
  record = {'compile_seconds': seconds, 'fits': False, 'compile_error': True,
            'memory': {'peak': None}, 'flops': None, 'hlo': {}, 'error': first[:500],
            'xla_flags': os.environ.get('XLA_FLAGS', '')}
  if target.platform != 'tpu' and resources.is_gpu_tiling_failure(error):
    record['hint'] = ('XLA found no Triton tiling for a matmul without a GPU to autotune on; '
                      f'compile it with {resources.GPU_TILING_WORKAROUND} (cached apart, as a '
                      'program of its own)')
  return record


# ------------------------------------------------------------------------------------- table
def images_per_second(target: Target, flops: Optional[float], images_per_chip: float,
                      fraction: float) -> Optional[float]:
  if not flops:
    return None
  return images_per_chip / (flops / (fraction * target.peak_tflops * 1e12))


def summarise(jobs: List[Job], records: Dict[int, Dict], tpu_flops: Dict[tuple, float]):
  """Table rows: one per train job, one per (config, dtype, target) for all eval shapes."""
  rows = []
  groups: Dict[tuple, List[int]] = {}
  for i, job in enumerate(jobs):
    key = (job.target, job.config, job.step, job.dtype)
    groups.setdefault(key, []).append(i)
  for (tname, cname, step, dtype), idx in groups.items():
    if any(i not in records for i in idx):   # not (all) compiled yet: --cached_only
      continue
    target = TARGETS[tname]
    recs = [records[i] for i in idx]
    flops = []
    failed = any(r.get('compile_error') or r.get('oom') for r in recs)
    for i, r in zip(idx, recs):
      f = r.get('flops')
      if f is None and not failed:  # GPU: no cost analysis; the TPU count of the same program
        f = _tpu_flops_for(jobs[i], tpu_flops)
      flops.append(f)
    peak = max((r['memory'].get('peak') or 0.0) for r in recs)
    fits = all(r.get('fits') for r in recs)
    job0 = jobs[idx[0]]
    ndev = target.chips
    if step == 'eval':
      # Each image runs on one device; all its forwards (every scale, flip, window) add up.
      total = (sum(f * jobs[i].calls for i, f in zip(idx, flops))
               if all(f is not None for f in flops) else None)
      per_chip_images = 1.0
      shapes = ' + '.join(f'{jobs[i].calls}x{tuple(jobs[i].shape)}' for i in idx)
      batch = '1 image'
    else:
      total = flops[0]
      per_chip_images = job0.shape[0] / ndev
      shapes = f'{tuple(job0.shape)}'
      batch = f'{job0.shape[0] // ndev} ({job0.shape[0]})'
    rows.append({
        'target': tname, 'config': cname, 'step': step, 'dtype': dtype, 'batch': batch,
        'shapes': shapes, 'compile_s': sum(r['compile_seconds'] for r in recs),
        'peak_gib': peak / GIB if peak else None, 'capacity_gib': target.capacity_gib,
        'margin_pct': (100.0 * (1 - peak / (target.capacity_gib * GIB))) if peak else None,
        'tflop': total / 1e12 if total else None,
        'flops_from_tpu': any(r.get('flops') is None for r in recs) and total is not None,
        'img_s_40': images_per_second(target, total, per_chip_images, 0.4),
        'img_s_60': images_per_second(target, total, per_chip_images, 0.6),
        'fits': fits, 'oom': any(r.get('oom') for r in recs),
        'error': next((r['error'] for r in recs if r.get('compile_error')), None),
        'hlo': recs[0].get('hlo', {}), 'cached': all(r.get('cached') for r in recs),
    })
  return rows


def _flops_key(job: Job):
  return (job.config, job.step, job.dtype, job.kind, tuple(job.shape))


def _tpu_flops_for(job: Job, tpu_flops) -> Optional[float]:
  """FLOPs per device of the same program compiled for a TPU target.

  Train steps split the global batch over the devices: a TPU slice with another device count
  gives the per-device figure scaled by the device-count ratio (the batch-proportional work
  dominates; the replicated optimizer update is a fraction of a percent).
  """
  chips = TARGETS[job.target].chips
  found = tpu_flops.get(_flops_key(job))
  if not found:
    return None
  by_chips = dict(found)
  if chips in by_chips:
    return by_chips[chips]
  other, flops = next(iter(by_chips.items()))
  return flops * other / chips if job.kind == 'train' else flops


def _fmt(x, spec):
  return '-' if x is None else format(x, spec)


def print_table(rows, out=sys.stdout):
  header = ('| target | config | step | dtype | images/device (global) | compile s | '
            'peak GiB/device (of) | margin % | TFLOP/device/step | img/s/chip @40% / 60% |')
  print(header, file=out)
  print('|' + '---|' * 10, file=out)
  for r in rows:
    peak = ('OOM ' if r['oom'] else '') + _fmt(r['peak_gib'], '.2f')
    if r.get('error'):
      peak = 'compile error'
    tflop = _fmt(r['tflop'], '.3f') + ('*' if r['flops_from_tpu'] else '')
    print(f"| {r['target']} | {r['config']} | {r['step']} | {r['dtype']} | {r['batch']} | "
          f"{r['compile_s']:.0f}{' (cached)' if r['cached'] else ''} | "
          f"{peak} ({r['capacity_gib']:.2f}) | {_fmt(r['margin_pct'], '.0f')} | {tflop} | "
          f"{_fmt(r['img_s_40'], '.1f')} / {_fmt(r['img_s_60'], '.1f')} |", file=out)
  if any(r['flops_from_tpu'] for r in rows):
    print('* FLOPs from the TPU compile of the same program (the GPU compiler reports none).',
          file=out)


# ------------------------------------------------------------------------------------- main
def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='', help='comma list of config names (default: all), '
                 'e.g. demo,ade20k,mcibipp/ade20k')
  p.add_argument('--targets', default=','.join(TARGETS), help=f'comma list of {list(TARGETS)}')
  p.add_argument('--steps', default='train,train_mem,eval', help='comma list of train, '
                 'train_mem (with the memory loss), eval')
  p.add_argument('--dtypes', default='float32,bfloat16')
  p.add_argument('--per_device_batch', type=int, default=0,
                 help='train at this many images per device instead of the documented batch')
  p.add_argument('--config_root', default=os.path.join(REPO_ROOT, 'configs'))
  p.add_argument('--cache_dir', default=os.path.expanduser(
      os.environ.get('MEMSEG_AOT_CACHE', '~/.cache/memseg_jax/aot')))
  p.add_argument('--no_cache', action='store_true', help='compile even what the cache holds')
  p.add_argument('--dump_to', default='', help='XLA dump folder (buffer assignment, live ranges)')
  p.add_argument('--json_out', default='', help='write the rows (and records) here as JSON')
  p.add_argument('--dry_run', action='store_true', help='list the jobs, compile nothing')
  p.add_argument('--cached_only', action='store_true',
                 help='compile nothing: the table from the cache, and what is not compiled yet')
  return p.parse_args(argv)


def set_environment():
  """Environment for compile-only TPU and GPU devices in a CPU process (before importing jax)."""
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  # libtpu otherwise asks the (absent) TPU VM metadata server about the slice.
  # ALLOW_MULTIPLE_LIBTPU_LOAD: libtpu otherwise holds a machine-wide lock file, and a second
  # process (another aot_check, a test) fails to start.
  for k, v in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_ACCELERATOR_TYPE', 'v5litepod-8'),
               ('TPU_WORKER_ID', '0'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
               ('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')):
    os.environ.setdefault(k, v)
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # The test suite's quick compiles (tests/conftest.py) would give peaks and FLOPs of programs
  # XLA barely optimised, under the same cache key as the real ones: a process started with the
  # switch set compiles at XLA's default level all the same. (Once jax is imported the switch
  # has been read; a caller in the same process keeps its own setting.)
  if 'jax' not in sys.modules and os.environ.pop('JAX_DISABLE_MOST_OPTIMIZATIONS', None):
    print("aot_check: JAX_DISABLE_MOST_OPTIMIZATIONS ignored: the programs are built at XLA's "
          'default optimization level', file=sys.stderr)


def main(argv=None) -> int:
  args = parse_args(argv)
  set_environment()
  import jax  # pylint: disable=import-outside-toplevel,unused-import
  from memseg_jax import resources  # pylint: disable=import-outside-toplevel

  targets = [t.strip() for t in args.targets.split(',') if t.strip()]
  for t in targets:
    if t not in TARGETS:
      raise SystemExit(f'--targets: unknown target {t!r} (expected some of {list(TARGETS)})')
  steps = {s.strip() for s in args.steps.split(',') if s.strip()}
  if not steps <= {'train', 'train_mem', 'eval'}:
    raise SystemExit(f'--steps: unknown step in {sorted(steps)} (train, train_mem, eval)')
  dtypes = [d.strip() for d in args.dtypes.split(',') if d.strip()]
  if not set(dtypes) <= {'float32', 'bfloat16'}:
    raise SystemExit(f'--dtypes: expected float32 and/or bfloat16, got {dtypes}')
  paths = discover_configs(args.config_root)
  if args.configs:
    wanted = [c.strip() for c in args.configs.split(',') if c.strip()]
    by_name = {config_name(p, args.config_root): p for p in paths}
    missing = [c for c in wanted if c not in by_name]
    if missing:
      raise SystemExit(f'--configs: no config named {missing} in {args.config_root} '
                       f'(known: {sorted(by_name)})')
    paths = [by_name[c] for c in wanted]

  # GPU rows borrow the TPU FLOP count, so the TPU compiles come first.
  order = sorted(targets, key=lambda t: TARGETS[t].platform != 'tpu')
  jobs = []
  for path in paths:
    jobs.extend(jobs_for(path, args.config_root, steps, dtypes, order))
  if args.per_device_batch:
    for job in jobs:
      if job.kind == 'train':
        b = args.per_device_batch * TARGETS[job.target].chips
        job.shape = (b,) + tuple(job.shape[1:])
        job.images = b
  if args.dry_run:
    for job in jobs:
      print(job.target, job.config, job.step, job.dtype, job.kind, job.shape, job.calls)
    return 0

  rev = revision()
  os.makedirs(args.cache_dir, exist_ok=True)
  records: Dict[int, Dict] = {}
  tpu_flops: Dict[tuple, float] = {}
  device_cache = {}
  missing: List[Job] = []
  for i, job in enumerate(jobs):
    key = job.key(rev)
    path = os.path.join(args.cache_dir, f'{key}.json')
    target = TARGETS[job.target]
    record = None
    if not args.no_cache and os.path.exists(path):
      with open(path) as f:
        record = json.load(f)
      record['cached'] = True
    if record is None and args.cached_only:
      missing.append(job)
      continue
    if record is None:
      if job.target not in device_cache:
        device_cache[job.target] = topology_devices(target)
      print(f'compiling {job.target} {job.config} {job.step} {job.dtype} {job.kind} '
            f'{job.shape} ...', file=sys.stderr, flush=True)
      t0 = time.time()
      try:
        record = compile_job(job, target, device_cache[job.target], args.dump_to or None)
      except Exception as e:  # pylint: disable=broad-except
        if resources.is_resource_exhausted(e):
          record = oom_record(e, time.time() - t0)
          record['memory']['available'] = (record['memory']['available']
                                            or target.capacity_gib * GIB)
          per_device = job.shape[0] // target.chips if job.kind == 'train' else job.shape[0]
          print(resources.out_of_memory_message(
              f'{job.config} on {job.target}', per_device, record['memory']['peak'],
              record['memory']['available'], dtype=job.dtype,
              has_remat='remat' in job.cfg.model,
              what='the train step' if job.kind == 'train' else 'the evaluation forward'),
                file=sys.stderr, flush=True)
        else:   # the compiler failed otherwise: a row of the table, and the run goes on
          record = error_record(e, time.time() - t0, target)
          print(f'compile error: {job.config} {job.step} {job.dtype} {job.kind} '
                f"{tuple(job.shape)} on {job.target}: {record['error']}"
                + (f"\n  {record['hint']}" if record.get('hint') else ''),
                file=sys.stderr, flush=True)
      record['job'] = {'config': job.config, 'step': job.step, 'dtype': job.dtype,
                       'target': job.target, 'kind': job.kind, 'shape': list(job.shape),
                       'revision': rev}
      with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1)
      os.replace(path + '.tmp', path)
      record['cached'] = False
    records[i] = record
    if target.platform == 'tpu' and record.get('flops'):
      tpu_flops.setdefault(_flops_key(job), {}).setdefault(target.chips, record['flops'])
  rows = summarise(jobs, records, tpu_flops)
  print_table(rows)
  if missing:
    print(f'\nnot compiled yet ({len(missing)} of {len(jobs)} compiles; run without '
          '--cached_only to compile them):')
    for job in missing:
      print(f'  {job.target} {job.config} {job.step} {job.dtype} {job.kind} '
            f'{tuple(job.shape)}')
  if args.json_out:
    with open(args.json_out, 'w') as f:
      json.dump({'revision': rev, 'rows': rows,
                 'records': [dict(records[i], job=records[i].get('job')) for i in records]},
                f, indent=1)
  bad = [r for r in rows if not r['fits']]
  for r in bad:
    if r.get('error'):
      print(f"did not compile: {r['config']} {r['step']} {r['dtype']} on {r['target']}: "
            f"{r['error']}", file=sys.stderr)
      continue
    print(f"does not fit: {r['config']} {r['step']} {r['dtype']} on {r['target']} "
          f"({r['batch']} images per device)", file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
