"""Per-device memory of the ViT-L MCIBI train step, from XLA's analysis of the compiled step.

    python scripts/vit_memory.py                                  # ADE20K ViT-L, 4 variants
    python scripts/vit_memory.py --config=configs/cocostuff10k_vitl.py --variants=bfloat16:remat

The sharded train step of `memseg_jax.train` (forward, memory update, losses with the memory
loss where the config uses it, backward, per-group SGD) is compiled for --devices virtual CPU
devices at the config's global batch (16 on 8 devices: 2 per device) and crop (512x512), with
abstract inputs: nothing runs and no weights are allocated. For each variant (compute dtype x
`config.model.remat`) it prints `compiled.memory_analysis()` per device: arguments (the
replicated TrainState: parameters, SGD momentum, BN statistics, memory; and this device's
batch), outputs, the aliased (donated) part, XLA's temporaries, and the peak: arguments +
temporaries + non-aliased outputs (XLA:CPU's `peak_memory_in_bytes` counts only arguments).

`--platform=cpu` (default) compiles for XLA:CPU (conv_impl 'taps'). XLA:CPU normally expands
the optimization barriers that keep `jax.checkpoint`'s recomputation apart (pass
`cse_barrier_expander`), after which CSE merges the recomputed forward with the stored one and
remat saves nothing; this script turns that pass off (XLA_FLAGS) so the CPU compile keeps the
barriers as TPU and GPU compiles do, and the remat rows show what remat saves there.
`--platform=tpu --topology=v5e-8` compiles for a TPU slice ahead of time
from this CPU (needs libtpu importable, e.g. `pip install --target DIR libtpu==0.0.42.1` and
PYTHONPATH=DIR; no TPU is used; environment in shared/ENVIRONMENT.md). A step that does not fit
the chip's HBM fails to compile on TPU; that is reported as such. Each compile takes minutes on
2 CPU cores.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GiB = 1024 ** 3


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--config', default=os.path.join(REPO, 'configs', 'ade20k_vitl.py'))
  p.add_argument('--devices', type=int, default=8, help='virtual CPU devices (the mesh)')
  p.add_argument('--batch_size', type=int, default=0, help='global batch (0: the config\'s)')
  p.add_argument('--crop', type=int, default=0, help='square crop (0: the config\'s)')
  p.add_argument('--variants', default='float32,float32:remat,bfloat16,bfloat16:remat',
                 help='comma list of dtype[:remat]')
  p.add_argument('--platform', default='cpu', choices=('cpu', 'tpu'))
  p.add_argument('--topology', default='v5e-8', choices=sorted(TPU_TOPOLOGIES),
                 help='TPU slice for --platform=tpu')
  return p.parse_args(argv)


# name -> (get_topology_desc kwargs, HBM per device in GiB as libtpu reports it).
TPU_TOPOLOGIES = {
    'v5e-8': (dict(topology_name='v5e:2x4', chips_per_host_bounds=(2, 4, 1)), 15.75),
    'v4-8': (dict(topology_name='v4:2x2x1', chip_config_name='megacore'), 30.75),
    'v5p-8': (dict(topology_name='v5p:2x2x1'), 95.74),
}


def tpu_devices(topology):
  """The devices of a TPU slice described, not attached (ahead-of-time compilation)."""
  from jax.experimental import topologies  # pylint: disable=import-outside-toplevel
  kwargs, _ = TPU_TOPOLOGIES[topology]
  return topologies.get_topology_desc(platform='tpu', **kwargs).devices


def analyse(config, devices, memory_loss, platform='cpu'):
  """(memory_analysis, parameter bytes, compile seconds) of the train step on `devices`."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from memseg_jax import schedules, train
  from memseg_jax.models import build_model

  mesh = train.create_mesh(devices)
  schedule = schedules.create_lr_schedule(config, 1000)
  tx = train.create_optimizer(config, schedule)
  model = build_model(config, axis_name=train.AXIS, platform=platform)
  step = train.make_train_step(config, model, tx, schedule, mesh, memory_loss=memory_loss)
  state = train.abstract_train_state(config, tx, mesh)
  h, w = config.data.crop_size
  b = config.train.batch_size
  sharding = NamedSharding(mesh, P(train.AXIS))
  batch = {'image': jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32, sharding=sharding),
           'label': jax.ShapeDtypeStruct((b, h, w), jnp.int32, sharding=sharding)}
  start = time.time()
  compiled = step.lower(state, batch).compile()
  seconds = time.time() - start
  stats = compiled.memory_analysis()
  params = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state.params))
  return stats, params, seconds


def main(argv=None):
  args = parse_args(argv)
  flags = os.environ.get('XLA_FLAGS', '')
  if '--xla_force_host_platform_device_count' not in flags:
    flags += f' --xla_force_host_platform_device_count={args.devices}'
  if args.platform == 'cpu' and 'cse_barrier_expander' not in flags:
    flags += ' --xla_disable_hlo_passes=cse_barrier_expander'    # keep remat (docstring)
  os.environ['XLA_FLAGS'] = flags.strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.platform == 'tpu':   # no metadata-server lookups: the slice is described, not used
    for key, value in (('TPU_SKIP_MDS_QUERY', '1'), ('TPU_ACCELERATOR_TYPE', 'v5litepod-8'),
                       ('TPU_WORKER_ID', '0'), ('TPU_WORKER_HOSTNAMES', 'localhost')):
      os.environ.setdefault(key, value)
  import jax
  from memseg_jax import schedules
  from memseg_jax.config_validation import load_config, validate

  if args.platform == 'tpu':
    devices = tpu_devices(args.topology)
    args.devices = len(devices)
    where = f'TPU {args.topology} (HBM {TPU_TOPOLOGIES[args.topology][1]} GiB per device)'
  else:
    devices = jax.devices()[:args.devices]
    where = 'XLA:CPU'

  base = load_config(args.config)
  if args.batch_size:
    base.train.batch_size = args.batch_size
  if args.crop:
    base.data.crop_size = (args.crop, args.crop)
  validate(base, args.devices)
  memory_loss = schedules.use_memory_loss(base, step=1, iterations_per_epoch=1)
  per_device = base.train.batch_size // args.devices
  print(f'{os.path.basename(args.config)} on {where}: global batch {base.train.batch_size} on '
        f'{args.devices} devices ({per_device} per device), crop {tuple(base.data.crop_size)}, '
        f'memory loss {"on" if memory_loss else "off"}')
  header = (f'{"variant":<16} {"args GiB":>9} {"out GiB":>8} {"alias GiB":>9} {"temp GiB":>9} '
            f'{"peak GiB":>9} {"compile s":>9}')
  print(header)
  params = None
  for variant in args.variants.split(','):
    dtype, _, remat = variant.partition(':')
    config = base.copy_and_resolve_references()
    config.model.dtype = dtype
    config.model.remat = remat == 'remat'
    try:
      stats, params, seconds = analyse(config, devices, memory_loss, args.platform)
    except Exception as e:  # pylint: disable=broad-except
      if 'RESOURCE_EXHAUSTED' not in str(e):
        raise
      print(f'{variant:<16} does not fit: {str(e).splitlines()[0][:160]}', flush=True)
      continue
    # XLA:CPU's peak_memory_in_bytes counts the arguments only; the bound that holds on every
    # backend is what the program keeps live at once at most: arguments + temporaries + the
    # outputs that do not reuse (alias) a donated argument.
    peak = (stats.argument_size_in_bytes + stats.output_size_in_bytes
            - stats.alias_size_in_bytes + stats.temp_size_in_bytes)
    print(f'{variant:<16} {stats.argument_size_in_bytes / GiB:9.2f} '
          f'{stats.output_size_in_bytes / GiB:8.2f} {stats.alias_size_in_bytes / GiB:9.2f} '
          f'{stats.temp_size_in_bytes / GiB:9.2f} {peak / GiB:9.2f} {seconds:9.0f}', flush=True)
  if params is not None:
    print(f'(parameters: {params / GiB:.2f} GiB float32; the SGD momentum the same again)')


if __name__ == '__main__':
  main()
