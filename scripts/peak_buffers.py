"""The largest buffers live at the memory peak of a compiled XLA module, from its dump.

    python scripts/aot_check.py --configs=ade20k --targets=v4-8 --steps=train_mem \
        --dtypes=bfloat16 --dump_to=/tmp/dump --no_cache
    python scripts/peak_buffers.py /tmp/dump                 # the largest module in the dump
    python scripts/peak_buffers.py /tmp/dump --module=jit_step_fn --top=25
    python scripts/peak_buffers.py --saved_residuals=configs/ade20k.py --per_device_batch=4

XLA writes, per compiled module, the buffer assignment (`*-buffer-assignment.txt`: every value
with its allocation, offset and size) and the live ranges (`*-live-range.txt`: the first and
last position of every value in the scheduled instruction sequence). At each position the bytes
in use are the union, per allocation of device memory (color 0), of the [offset, offset + size)
ranges of the live values; the peak is the largest such total. Listed are the values live at
the peak, largest first, with their shape and the JAX operation they come from (the
`op_name` metadata of the optimized HLO), grouped into a summary by dtype and by source.
"""

import argparse
import collections
import glob
import os
import re
import sys

_VALUE = re.compile(r'^\s*value: <\d+ (\S+?) @(\d+)> \(size=(\d+),offset=(\d+)\): (.*)$')
_ALLOC = re.compile(r'^allocation (\d+): size (\d+)(.*):$')
_RANGE = re.compile(r'^\s+(\S+\{[^}]*\}):(\d+)-(\d+)$')


def _norm(name):
  return name if '{' in name else name + '{}'


def parse_buffer_assignment(path):
  """[(allocation, kind, value name, color, size, offset, shape)] from a buffer-assignment file."""
  values, alloc, kind = [], None, ''
  with open(path) as f:
    for line in f:
      m = _ALLOC.match(line)
      if m:
        alloc, kind = int(m.group(1)), m.group(3)
        continue
      if line.strip() and not line.startswith(' '):
        alloc = None if not line.startswith('allocation') else alloc
      m = _VALUE.match(line)
      if m and alloc is not None:
        values.append((alloc, kind, _norm(m.group(1)), int(m.group(2)), int(m.group(3)),
                       int(m.group(4)), m.group(5)))
  return values


def parse_live_ranges(path):
  """{value name: (start, end)} and the sequence length from a live-range file."""
  ranges, length = {}, 0
  with open(path) as f:
    for line in f:
      m = re.match(r'HloLiveRange \(max (\d+)\)', line)
      if m:
        length = int(m.group(1))
      m = _RANGE.match(line)
      if m:
        ranges[m.group(1)] = (int(m.group(2)), int(m.group(3)))
  return ranges, length


def op_names(path):
  """{instruction name: op_name metadata} from the optimized HLO text."""
  names = {}
  if not os.path.exists(path):
    return names
  pat = re.compile(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"')
  with open(path) as f:
    for line in f:
      m = pat.match(line)
      if m:
        names[m.group(1)] = m.group(2)
  return names


def _union(intervals):
  total, end = 0, -1
  for lo, hi in sorted(intervals):
    if hi <= end:
      continue
    total += hi - max(lo, end)
    end = hi
  return total


def peak(prefix):
  """(peak bytes, position, [(size, name, shape, op_name, allocation kind)] live at the peak)."""
  values = parse_buffer_assignment(prefix + '-buffer-assignment.txt')
  ranges, length = parse_live_ranges(prefix + '-live-range.txt')
  ops = op_names(prefix + '.txt')
  device = [v for v in values if v[3] == 0]
  # Parameters, outputs and constants are live throughout whether or not they are listed.
  spans = {}
  for alloc, kind, name, _, size, offset, shape in device:
    start, end = ranges.get(name, (0, length))
    if 'parameter' in kind or 'output' in kind or 'constant' in kind:
      start, end = 0, length
    spans[(alloc, name, offset)] = (start, end, size, shape, kind)
  events = sorted({s for s, _, _, _, _ in spans.values()} | {e for _, e, _, _, _ in spans.values()})
  best, best_t = -1, 0
  for t in events:
    per_alloc = collections.defaultdict(list)
    for (alloc, _, offset), (s, e, size, _, _) in spans.items():
      if s <= t <= e:
        per_alloc[alloc].append((offset, offset + size))
    total = sum(_union(iv) for iv in per_alloc.values())
    if total > best:
      best, best_t = total, t
  live = []
  for (alloc, name, offset), (s, e, size, shape, kind) in spans.items():
    if s <= best_t <= e:
      base = name.split('{')[0]
      live.append((size, name, shape, ops.get(base, ''), kind.strip(', ')))
  live.sort(reverse=True)
  return best, best_t, live


def _dtype(shape):
  m = re.match(r'\(?(\w+)\[', shape)
  return m.group(1) if m else '?'


def _source(op_name):
  """A short label of where a value comes from: the Flax module path or the JAX primitive."""
  if not op_name:
    return '(unnamed)'
  parts = [p for p in op_name.split('/') if p and not p.startswith(('jit(', 'jvp(', 'transpose(',
                                                                      'shard_map', 'checkpoint',
                                                                      'remat', 'pjit'))]
  return '/'.join(parts[-3:]) if parts else op_name


def find_modules(dump_dir):
  files = glob.glob(os.path.join(dump_dir, '*after_optimizations-buffer-assignment.txt'))
  return [f[:-len('-buffer-assignment.txt')] for f in files]


def saved_residuals(config_path: str, per_device_batch: int, dtype: str, top: int = 15):
  """What the backward pass of the train forward + losses keeps, summed by dtype and source.

  JAX's own account (`saved_residuals`) of the tensors autodiff saves between the forward and
  the backward pass, for one device's share of the batch: no compile needed, so it runs in a
  minute where a TPU compile takes many. These tensors are what is live at the start of the
  backward pass, which is where the train step's memory peaks.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  from jax._src.ad_checkpoint import saved_residuals as jax_saved_residuals  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from memseg_jax import losses  # pylint: disable=import-outside-toplevel
  from memseg_jax.config_validation import load_config  # pylint: disable=import-outside-toplevel
  from memseg_jax.models import build_model  # pylint: disable=import-outside-toplevel
  config = load_config(config_path)
  config.model.dtype = dtype
  model = build_model(config, platform='tpu')
  h, w = config.data.crop_size
  images = jnp.zeros((per_device_batch, h, w, 3), jnp.float32)
  labels = jnp.zeros((per_device_batch, h, w), jnp.int32)
  variables = jax.tree_util.tree_map(
      lambda s: jnp.zeros(s.shape, s.dtype),
      jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images[:1])))

  def loss(params):
    outputs, _ = model.apply({**variables, 'params': params}, images, train=True, labels=labels,
                             lr=0.01, memory_loss=True, mutable=['batch_stats', 'memory'],
                             rngs={'dropout': jax.random.PRNGKey(0)})
    return losses.compute_losses(outputs, labels, config)['loss_total']

  found = jax_saved_residuals(loss, variables['params'])
  gib = float(1 << 30)
  rows = []
  for aval, what in found:
    if 'from the argument' in what:        # the parameters themselves, not activations
      continue
    rows.append((aval.size * aval.dtype.itemsize, str(aval.dtype), aval.str_short(), what))
  rows.sort(reverse=True)
  by_dtype = collections.Counter()
  by_source = collections.Counter()
  for size, dt, _, what in rows:
    by_dtype[dt] += size
    m = re.search(r'\((\w+(?:\.\w+)?)\)$', what)
    by_source[(dt, m.group(1) if m else what[:40])] += size
  total = sum(r[0] for r in rows)
  print(f'{config_path} {dtype}, {per_device_batch} images per device: {len(rows)} saved '
        f'activations, {total / gib:.2f} GiB')
  print('by dtype: ' + ', '.join(f'{k} {v / gib:.2f} GiB' for k, v in by_dtype.most_common()))
  print('by dtype and source:')
  for (dt, src), size in by_source.most_common(top):
    print(f'  {size / gib:7.3f} GiB  {dt:9s} {src}')
  print('largest:')
  for size, dt, shape, what in rows[:top]:
    print(f'  {size / gib:7.3f} GiB  {shape:28s} {what[:90]}')
  return total, by_dtype


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--saved_residuals', default='', help='a config file: list what autodiff '
                 'keeps for the backward pass instead of reading a dump (no compile)')
  p.add_argument('--per_device_batch', type=int, default=4)
  p.add_argument('--dtype', default='bfloat16')
  p.add_argument('dump_dir', nargs='?')
  p.add_argument('--module', default='', help='substring of the module name (default: the '
                 'module with the largest buffer assignment)')
  p.add_argument('--top', type=int, default=20)
  args = p.parse_args(argv)
  if args.saved_residuals:
    return saved_residuals(args.saved_residuals, args.per_device_batch, args.dtype, args.top)
  prefixes = find_modules(args.dump_dir)
  if args.module:
    prefixes = [x for x in prefixes if args.module in os.path.basename(x)]
  if not prefixes:
    raise SystemExit(f'{args.dump_dir}: no *after_optimizations-buffer-assignment.txt'
                     + (f' for module {args.module!r}' if args.module else ''))
  prefix = max(prefixes, key=lambda x: os.path.getsize(x + '-buffer-assignment.txt'))
  total, t, live = peak(prefix)
  gib = float(1 << 30)
  print(f'{os.path.basename(prefix)}: peak {total / gib:.3f} GiB at position {t}; '
        f'{len(live)} values live')
  print(f"{'GiB':>7s}  {'shape':40s} {'kind':18s} source")
  for size, name, shape, op, kind in live[:args.top]:
    print(f'{size / gib:7.3f}  {shape[:40]:40s} {kind[:18]:18s} {_source(op)} [{name}]')
  by_dtype = collections.Counter()
  by_source = collections.Counter()
  for size, _, shape, op, _ in live:
    by_dtype[_dtype(shape)] += size
    by_source[_source(op).split('/')[0] if op else '(unnamed)'] += size
  print('by dtype: ' + ', '.join(f'{k} {v / gib:.2f} GiB' for k, v in by_dtype.most_common()))
  print('by source: ' + ', '.join(f'{k} {v / gib:.2f} GiB' for k, v in by_source.most_common(8)))
  return total, live


if __name__ == '__main__':
  main()
  sys.exit(0)
