"""Test-wide setup: 8 virtual CPU devices for anything distributed, accelerators hidden from TF,
compiled programs freed as tests end."""

import ctypes
import gc
import os
import sys

import pytest

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get('XLA_FLAGS', '')
if '--xla_force_host_platform_device_count' not in _flags:
  os.environ['XLA_FLAGS'] = (_flags + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')


try:  # glibc: hands the freed heap pages back to the system (not on macOS)
  _malloc_trim = ctypes.CDLL('libc.so.6').malloc_trim
except (OSError, AttributeError):
  _malloc_trim = None


def _release_compiled_programs():
  if 'jax' in sys.modules:
    sys.modules['jax'].clear_caches()
  gc.collect()
  # Without it the process keeps the freed memory: after configs/ade20k.py's train step (an
  # 11 GiB peak) 2.7 GiB stayed resident, 0.6 GiB once trimmed.
  if _malloc_trim is not None:
    _malloc_trim(0)


@pytest.fixture(autouse=True, scope='module')
def _free_programs_after_each_module():
  """Drops every compiled program when a test module ends.

  A test process (a pytest-xdist worker above all) runs many modules, and jit's caches would
  keep every program each of them compiled. Freed this way (and after each slow test), a
  process running the config train steps fell back to 2.8-5.6 GiB between them, and to about
  0.6 GiB with the heap trimmed.
  """
  yield
  _release_compiled_programs()


@pytest.fixture(autouse=True)
def _free_programs_after_each_slow_test(request):
  """The slow tests compile whole models (a config's train step each): free them one by one."""
  yield
  if request.node.get_closest_marker('slow') is not None:
    _release_compiled_programs()
