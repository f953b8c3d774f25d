"""Test-wide setup: 8 virtual CPU devices for anything distributed, quick compiles (LLVM's
optimizer off), accelerators hidden from TF, compiled programs freed as tests end."""

import ctypes
import gc
import os

import pytest

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Quick compiles: JAX's jax_disable_most_optimizations (LLVM at level 0 without its expensive
# passes; XLA's HLO passes, fusion and layouts included, run as always). At the tests' tiny
# shapes compiling is most of the time: the ADE20K config's train step with the resume test took
# 151 s against 204 s. The machine code differs, and with it the order of some float sums, so
# the parity tests, whose tolerances are those of a user's run, compile with XLA's defaults
# (`pytest_runtest_setup` below). Processes the tests start inherit the setting through the
# environment; JAX_DISABLE_MOST_OPTIMIZATIONS=0 runs every test with XLA's defaults.
os.environ.setdefault('JAX_DISABLE_MOST_OPTIMIZATIONS', '1')

import jax  # pylint: disable=wrong-import-position  (after the environment above)

_QUICK = 'jax_disable_most_optimizations'
_QUICK_COMPILES = jax.config.values[_QUICK]       # as JAX read it from the environment


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
  """A parity test (and the fixtures it sets up) compiles with XLA's default optimization.

  At level 0 the MCIBI++ PSPNet gradients landed 1.1e-2 from the float64 reference, against
  5.1e-3 at XLA's default on the same AVX2 machine, past the test's 1e-2 floor: the test's
  bounds are for the code a user's run gets.
  """
  quick = _QUICK_COMPILES and item.get_closest_marker('parity') is None
  if quick != jax.config.values[_QUICK]:
    jax.config.update(_QUICK, quick)
    jax.clear_caches()          # the setting is not part of jit's cache key


try:  # glibc: hands the freed heap pages back to the system (not on macOS)
  _malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):
  _malloc_trim = None


def _release_compiled_programs():
  jax.clear_caches()
  gc.collect()
  # Without it the process keeps the freed memory: after configs/ade20k.py's train step on 8
  # devices (an 11 GiB peak) 2.7 GiB stayed resident, 0.6 GiB once trimmed.
  if _malloc_trim is not None:
    _malloc_trim(0)


@pytest.fixture(autouse=True, scope='module')
def _free_programs_after_each_module():
  """Drops every compiled program when a test module ends.

  A test process (a pytest-xdist worker above all) runs many modules, and jit's caches would
  keep every program each of them compiled. Freed this way (and after each slow test), a
  process running the config train steps fell back to 2.8-5.6 GiB between them.
  """
  yield
  _release_compiled_programs()


@pytest.fixture(autouse=True)
def _free_programs_after_each_slow_test(request):
  """The slow tests compile whole models (a config's train step each): free them one by one."""
  yield
  if request.node.get_closest_marker('slow') is not None:
    _release_compiled_programs()
