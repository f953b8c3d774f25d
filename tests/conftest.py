"""Test-wide setup: 8 virtual CPU devices for anything distributed, quick compiles (LLVM's
optimizer off), accelerators hidden from TF, compiled programs freed as tests end."""

import ctypes
import gc
import os
import re
import sys

import pytest

# Must happen before jax is imported anywhere in the test session.
_flags = os.environ.get('XLA_FLAGS', '')
# The tests compile with LLVM's optimizer off. XLA's own passes (fusion, layouts, algebraic
# simplification) run as always, so a test runs the same HLO program as a user's run, in machine
# code that is slower to run and much quicker to build; at the tests' tiny shapes compiling is
# most of the time (the ADE20K config's train step and the resume test: 139 s against 206 s at
# XLA's default level). A level set in XLA_FLAGS is kept:
# `XLA_FLAGS=--xla_backend_optimization_level=3 python -m pytest ...` tests with XLA's default.
if '--xla_backend_optimization_level' not in _flags:
  _flags += ' --xla_backend_optimization_level=0'
# The training processes tests start (tests/test_preemption.py, tests/test_multihost.py) compile
# the same way, with their own device count.
os.environ['MEMSEG_TEST_XLA_FLAGS'] = re.sub(r'--xla_force_host_platform_device_count=\d+', '',
                                             _flags).strip()
if '--xla_force_host_platform_device_count' not in _flags:
  _flags += ' --xla_force_host_platform_device_count=8'
os.environ['XLA_FLAGS'] = _flags.strip()
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
