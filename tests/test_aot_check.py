"""scripts/aot_check.py: what it compiles, and the compiled programs for TPU and GPU.

The compile tests need the `aot` extra (libtpu and the CUDA plugin: `pip install -e '.[aot]'`)
and skip without it. They run in subprocesses: compile-only TPU devices need libtpu's
environment before JAX starts, and the test session's JAX already runs on 8 CPU devices.
"""

import importlib.util
import json
import os
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from memseg_jax.config_validation import load_config
from memseg_jax.models import attention, build_model, layers

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, 'configs')


def _aot_module():
  spec = importlib.util.spec_from_file_location('aot_check',
                                                os.path.join(REPO, 'scripts', 'aot_check.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _compile_env():
  """The test session's environment for a compile for TPU or GPU. conftest's quick compiles
  (JAX applies jax_disable_most_optimizations to every backend) do not reach it:
  `aot_check.set_environment`, which every compiling process runs before jax starts, drops
  the switch, so the programs compiled here are the ones a user's aot_check compiles."""
  return dict(os.environ, PYTHONPATH=REPO)


def _needs_aot_extra():
  pytest.importorskip('libtpu', reason="needs the 'aot' extra (pip install -e '.[aot]')")
  pytest.importorskip('jax_cuda12_plugin', reason="needs the 'aot' extra")


# ------------------------------------------------------------------------------- the job list
def test_every_config_and_its_documented_variants_are_listed():
  aot = _aot_module()
  names = {aot.config_name(p, CONFIGS) for p in aot.discover_configs(CONFIGS)}
  assert {'demo', 'ade20k', 'ade20k_r101', 'cityscapes', 'cocostuff10k', 'lip'} <= names
  assert 'default' not in names
  assert aot.documented_variants(os.path.join(CONFIGS, 'ade20k.py')) == ['ms_flip']
  assert aot.documented_variants(os.path.join(CONFIGS, 'lip.py')) == ['flip']


def test_jobs_cover_both_train_steps_and_every_eval_view():
  aot = _aot_module()
  jobs = aot.jobs_for(os.path.join(CONFIGS, 'ade20k.py'), CONFIGS,
                      {'train', 'train_mem', 'eval'}, ['bfloat16'], ['v5e-8'])
  train = [(j.step, j.shape) for j in jobs if j.kind == 'train']
  assert train == [('train', (16, 512, 512)), ('train_mem', (16, 512, 512))]
  # A 3:4 photo resized to short side 512 (512x683) sits in the 512x704 bucket; ms_flip runs
  # both views at six scales, each view size rounded up to 32.
  evals = {(j.config, j.shape) for j in jobs if j.step == 'eval'}
  assert ('ade20k', (1, 512, 704)) in evals
  ms = sorted(s for c, s in evals if c == 'ade20k:ms_flip')
  expected = sorted((2, -(-int(512 * s) // 32) * 32, -(-int(704 * s) // 32) * 32)
                    for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75))
  assert ms == expected


def test_slide_mode_counts_every_window_call():
  aot = _aot_module()
  jobs = aot.jobs_for(os.path.join(CONFIGS, 'cityscapes.py'), CONFIGS, {'eval'}, ['float32'],
                      ['v4-8'])
  # The reference's grid on a 1024x2048 image at each scale, windows (1024, 512), stride 341,
  # 4 windows per call, both views.
  calls = {}
  for s in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75):
    h, w = int(1024 * s), int(2048 * s)
    n = ((max(h - 1024 + 340, 0) // 341 + 1) * (max(w - 512 + 340, 0) // 341 + 1))
    shape = (4, min(h, 1024), min(w, 512))
    calls[shape] = calls.get(shape, 0) + 2 * -(-n // 4)
  assert {tuple(j.shape): j.calls for j in jobs} == calls


def test_the_cache_key_ignores_comments_and_docstrings_but_not_code():
  aot = _aot_module()
  base = aot._code_digest('def f(x):\n  return x + 1\n')
  assert aot._code_digest('def f(x):\n  """Adds one."""\n  return x + 1  # one\n') == base
  assert aot._code_digest('def f(x):\n  return x + 2\n') != base
  assert aot._code_digest('def f(x):\n  return x.astype(jnp.bfloat16) + 1\n') != base


def test_the_quick_compile_switch_of_the_tests_is_dropped_before_jax_starts(monkeypatch):
  # conftest sets JAX_DISABLE_MOST_OPTIMIZATIONS for the test suite; an aot_check started from
  # such a shell must still compile (and cache) the programs a chip would run.
  script = ('import os, sys; sys.path.insert(0, sys.argv[1]); aot = __import__("aot_check"); '
            'aot.set_environment(); import jax; '
            'print(os.environ.get("JAX_DISABLE_MOST_OPTIMIZATIONS"), '
            'jax.config.values["jax_disable_most_optimizations"])')
  env = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1')
  proc = subprocess.run([sys.executable, '-c', script, os.path.join(REPO, 'scripts')],
                        capture_output=True, text=True, env=env, timeout=300, check=True)
  assert proc.stdout.split() == ['None', 'False']
  assert 'JAX_DISABLE_MOST_OPTIMIZATIONS ignored' in proc.stderr
  # With jax already started (a caller in this process) the switch is left to the caller.
  # (A copy of the environment, so that set_environment's other variables go with the test.)
  monkeypatch.setattr(os, 'environ', dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS='1'))
  _aot_module().set_environment()
  assert os.environ['JAX_DISABLE_MOST_OPTIMIZATIONS'] == '1'


def test_cached_only_prints_the_cached_rows_and_lists_the_rest_without_compiling(
    tmp_path, capsys, monkeypatch):
  aot = _aot_module()
  monkeypatch.setattr(os, 'environ', dict(os.environ))   # main sets libtpu's variables
  jobs = aot.jobs_for(os.path.join(CONFIGS, 'ade20k.py'), CONFIGS, {'train_mem'}, ['bfloat16'],
                      ['v4-8', '8xH100'])
  v4, h100 = jobs
  rev = aot.revision()
  gib = 1 << 30
  # The TPU record carries the FLOPs; the GPU one has none (as the CUDA compiler reports).
  for job, peak, flops in ((v4, 5.5 * gib, 8.0e12), (h100, 3.25 * gib, None)):
    with open(tmp_path / f'{job.key(rev)}.json', 'w') as f:
      json.dump({'compile_seconds': 1.0, 'memory': {'peak': peak}, 'flops': flops,
                 'hlo': {}, 'fits': True}, f)
  args = ['--cached_only', '--configs=ade20k', '--targets=v4-8,8xH100', '--steps=train_mem',
          '--dtypes=bfloat16', f'--cache_dir={tmp_path}']
  assert aot.main(args) == 0
  out, err = capsys.readouterr()
  assert 'compiling' not in err
  rows = [line for line in out.splitlines() if 'train_mem' in line]
  assert '5.50 (30.75)' in rows[0] and '8.000' in rows[0]
  # The GPU row: 4 chips' per-device FLOPs spread over 8 GPUs.
  assert '3.25 (70.78)' in rows[1] and '4.000*' in rows[1]
  assert 'not compiled yet' not in out

  os.remove(tmp_path / f'{h100.key(rev)}.json')
  assert aot.main(args) == 0
  out, err = capsys.readouterr()
  assert 'compiling' not in err
  assert 'not compiled yet (1 of 2 compiles' in out
  assert '8xH100 ade20k train_mem bfloat16 train (16, 512, 512)' in out
  assert sum('| 8xH100 |' in line for line in out.splitlines()) == 0


def test_a_compile_that_fails_is_a_row_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
  aot = _aot_module()
  monkeypatch.setattr(os, 'environ', dict(os.environ))
  monkeypatch.setattr(aot, 'topology_devices', lambda target: [target.name])
  gib = 1 << 30
  calls = []
  mode = {'gpu_fails': True}

  # One function throughout: its source is part of the cache's revision.
  def fake_compile(job, target, devices, dump_to=None):
    calls.append(target.name)
    if target.platform == 'cuda' and mode['gpu_fails']:
      raise RuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.1")
    peak = 7.5 if target.platform == 'tpu' else 3.0
    return {'compile_seconds': 2.0, 'memory': {'peak': peak * gib}, 'flops': 1e12, 'hlo': {},
            'fits': True}

  monkeypatch.setattr(aot, 'compile_job', fake_compile)
  args = ['--configs=ade20k', '--targets=v4-8,8xH100', '--steps=train_mem',
          '--dtypes=bfloat16', f'--cache_dir={tmp_path}']
  assert aot.main(args) == 1
  out, err = capsys.readouterr()
  assert 'compile error: ade20k train_mem bfloat16 train (16, 512, 512) on 8xH100' in err
  assert 'XLA_FLAGS=--xla_gpu_enable_triton_gemm=false' in err
  assert 'did not compile: ade20k train_mem bfloat16 on 8xH100' in err
  rows = [line for line in out.splitlines() if 'train_mem' in line]
  assert '7.50 (30.75)' in rows[0] and 'compile error' in rows[1]
  # A program that did not compile has no FLOPs and no throughput (not the TPU program's).
  assert rows[1].endswith('| - | - | - / - |')
  assert calls == ['v4-8', '8xH100']

  # Both results are cached: nothing compiles again.
  mode['gpu_fails'] = False
  assert aot.main(args) == 1
  capsys.readouterr()
  assert calls == ['v4-8', '8xH100']
  # XLA_FLAGS make other programs: cached apart, compiled anew.
  os.environ['XLA_FLAGS'] = '--xla_gpu_enable_triton_gemm=false'
  assert aot.main(args) == 0
  assert calls == ['v4-8', '8xH100'] * 2
  out, _ = capsys.readouterr()
  assert '3.00 (70.78)' in out


def test_the_h100_description_has_the_published_figures():
  text = _aot_module().h100_target_config()
  for field in ('core_count: 132', 'cuda_compute_capability { major: 9 minor: 0 }',
                'device_memory_size: 80000000000', 'l2_cache_size: 52428800',
                'platform_name: "CUDA"'):
    assert field in text, field


# ------------------------------------------------------------------------------- compiles
# The start of every compile script: compile-only v5e devices (libtpu's environment is set
# before JAX starts) and `on_one`, abstract values on the first of them.
_V5E_PRELUDE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
aot = __import__('aot_check')
aot.set_environment()
import jax, jax.numpy as jnp
from memseg_jax.models import layers
devices = aot.topology_devices(aot.TARGETS['v5e-8'])
one = jax.sharding.SingleDeviceSharding(devices[0])
on_one = lambda tree: jax.tree_util.tree_map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=one), tree)
'''


def _compile_on_v5e(script: str):
  """Runs _V5E_PRELUDE + script in a fresh process; returns the JSON of its last line."""
  _needs_aot_extra()
  proc = subprocess.run([sys.executable, '-c', _V5E_PRELUDE + script,
                         os.path.join(REPO, 'scripts')],
                        capture_output=True, text=True, timeout=900,
                        env=_compile_env())
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


_AUTO_CONV_FOR_TPU = r'''
# conv_impl 'auto' without a platform: decided when lowering, for the TPU here.
block = layers.ConvBNAct(16, 3, dilation=6, conv_impl='auto')
x = jax.ShapeDtypeStruct((2, 24, 24, 8), jnp.float32, sharding=one)
variables = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), jnp.zeros((2, 24, 24, 8))))
text = jax.jit(block.apply).lower(on_one(variables), x).compile().as_text()
print(json.dumps(aot._hlo_conv_stats(text)))
'''


def test_auto_convolutions_compile_native_for_tpu_from_a_cpu_process():
  stats = _compile_on_v5e(_AUTO_CONV_FOR_TPU)
  # One native 3x3 convolution with dilation 6 (the CPU form would be per-tap matmuls).
  assert stats['convolutions'] == 1 and stats.get('rhs_dilate_6') == 1, stats


_BN_RESIDUALS_FOR_TPU = r"""
import flax.linen as nn
B, H, W, C, N = 8, 64, 64, 256, 6


class Stack(nn.Module):
  @nn.compact
  def __call__(self, x):
    for i in range(N):
      x = layers.ConvBNAct(C, 3, train=True, dtype=jnp.bfloat16, conv_impl='native',
                           name=f'block{i}')(x)
    return x


model = Stack()
variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, H, W, C))))


def loss(params, stats, x):
  y, _ = model.apply({'params': params, 'batch_stats': stats}, x, mutable=['batch_stats'])
  return jnp.sum(jnp.square(y.astype(jnp.float32)))


def temp_bytes():
  x = jax.ShapeDtypeStruct((B, H, W, C), jnp.float32, sharding=one)
  compiled = jax.jit(jax.grad(loss)).lower(on_one(variables['params']),
                                          on_one(variables['batch_stats']), x).compile()
  return compiled.memory_analysis().temp_size_in_bytes


with_barrier = temp_bytes()
jax.lax.optimization_barrier = lambda x: x      # the same program without the barrier
without_barrier = temp_bytes()
print(json.dumps({'with': with_barrier, 'without': without_barrier, 'elements': B * H * W * C,
                  'blocks': N}))
"""


@pytest.mark.slow
@pytest.mark.heavy
def test_bfloat16_batchnorm_keeps_a_bfloat16_residual_in_the_tpu_program():
  """The compiled TPU program keeps each BatchNorm input for the backward pass in bfloat16.

  Without the optimization barrier in `layers._bn_train_fwd` XLA fuses the rounding into the
  backward pass and keeps float32 values instead. How much it keeps that way is XLA's choice:
  in this small stack about one BatchNorm input's float32 excess (with libtpu 0.0.42.1: 157
  against 173 MB of temporaries), in the ADE20K R-50 step at 8 images per v5e chip most of the
  backbone's (a 9.55 GiB peak against 8.58 GiB). The barrier must make the program smaller.
  """
  r = _compile_on_v5e(_BN_RESIDUALS_FOR_TPU)
  print(r)
  assert r['with'] < r['without'], r


def analytic_train_flops(config, per_device_batch: int, memory_loss: bool) -> float:
  """FLOPs per device of one train step from the model's layer shapes.

  Every convolution (recorded with its input and output shapes while tracing the train
  forward): 2 * (output positions) * Cin * Cout per kernel tap that reads the image (taps over
  the zero padding skipped, as XLA counts them), times 3 for forward, input gradient and
  weight gradient (2 for the first, whose input needs no gradient). The attention blocks:
  q k^T and attention x v, 2 * N * M * T each, times 3. The memory read softmax(P) @ M,
  2 * N * K * C, times 2 (the memory gets no gradient). Elementwise work is left out.
  """
  h, w = config.data.crop_size
  model = build_model(config)
  convs, attns = [], []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    m = context.module
    if context.method_name == '__call__' and isinstance(m, layers.Conv):
      convs.append((args[0].shape, out.shape, m.kernel_size, m.stride, m.dilation, m.padding))
    if context.method_name == '__call__' and isinstance(m, attention.SelfAttentionBlock):
      attns.append((args[0].shape, args[1].shape, m.transform_channels))
    return out

  b = per_device_batch
  images, labels = jnp.zeros((b, h, w, 3)), jnp.zeros((b, h, w), jnp.int32)
  rngs = {'params': jax.random.PRNGKey(0), 'dropout': jax.random.PRNGKey(1)}
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(rngs, images, train=True, labels=labels, lr=0.01,
                                      memory_loss=memory_loss))
  total = 0.0
  for x, y, k, stride, dilation, padding in convs:
    rows = layers._tap_extent(y[1], x[1], k, stride, dilation, padding)
    cols = layers._tap_extent(y[2], x[2], k, stride, dilation, padding)
    positions = sum(r[1] for r in rows if r) * sum(c[1] for c in cols if c)
    total += 2.0 * y[0] * positions * x[-1] * y[-1] * (2 if x[-1] == 3 else 3)
  for q, kv, t in attns:
    total += 3 * 2 * (2.0 * q[0] * q[1] * q[2] * kv[1] * kv[2] * t)
  stride = 8
  n = b * -(-h // stride) * -(-w // stride)
  total += 2 * 2.0 * n * config.model.num_classes * config.model.head.feats_channels
  return total


@pytest.mark.slow
@pytest.mark.heavy
def test_demo_and_ade20k_fit_v5e_and_h100_with_native_convolutions_and_expected_flops(tmp_path):
  """aot_check as a user runs it: the train step with the memory loss, bfloat16."""
  _needs_aot_extra()
  out = tmp_path / 'aot.json'
  start = time.time()
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'aot_check.py'), '--configs=demo,ade20k',
       '--targets=v5e-8,8xH100', '--steps=train_mem', '--dtypes=bfloat16',
       f'--cache_dir={tmp_path / "cache"}', f'--json_out={out}'],
      capture_output=True, text=True, timeout=3600, env=_compile_env())
  print(proc.stdout)
  print(f'aot_check: {time.time() - start:.0f} s')
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  rows = {(r['config'], r['target']): r for r in result['rows']}
  assert set(rows) == {(c, t) for c in ('demo', 'ade20k') for t in ('v5e-8', '8xH100')}
  records = {(r['job']['config'], r['job']['target']): r for r in result['records']}
  for (name, target), row in rows.items():
    assert row['fits'] and not row['oom'], row
    assert row['peak_gib'] <= 0.9 * row['capacity_gib'], row
    config = load_config(os.path.join(CONFIGS, f'{name}.py'))
    config.model.dtype = 'bfloat16'
    if target == 'v5e-8':
      hlo = records[(name, target)]['hlo']
      kernels3 = sum(1 for x in jax.tree_util.tree_leaves(jax.eval_shape(
          lambda c=config: build_model(c).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)))
      )['params']) if x.ndim == 4 and x.shape[0] == 3)
      # Native: every 3x3 layer is an XLA convolution forward (and in the gradients), the
      # ASPP's dilated ones included.
      assert hlo['conv_3x3'] >= kernels3, (hlo, kernels3)
      for d in config.model.head.dilations:
        if d > 1:
          assert hlo.get(f'rhs_dilate_{d}', 0) >= 1, (d, hlo)
      expected = analytic_train_flops(config, config.train.batch_size // 8, memory_loss=True)
      measured = row['tflop'] * 1e12
      print(f'{name} on {target}: {measured / 1e12:.3f} TFLOP per device, analytic '
            f'{expected / 1e12:.3f} ({measured / expected - 1:+.1%}); peak '
            f'{row["peak_gib"]:.2f} of {row["capacity_gib"]:.2f} GiB')
      assert abs(measured / expected - 1) <= 0.10, (name, measured, expected)
    else:
      # The GPU compiler gives no FLOP count: the row carries the v5e figure (same devices).
      assert row['tflop'] == pytest.approx(rows[(name, 'v5e-8')]['tflop'])
      assert records[(name, target)]['hlo']['cudnn_convolutions'] > 0
