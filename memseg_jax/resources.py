"""Device memory: does a step fit, and what to tell the user when it does not.

XLA reports a program that does not fit its device as RESOURCE_EXHAUSTED: the TPU compiler at
compile time ("Ran out of memory in memory space hbm. Used 17.51G of 15.75G hbm."), the GPU
runtime when it allocates ("Out of memory while trying to allocate 1234 bytes."). `main` and
`scripts/aot_check.py` turn that into one message (`out_of_memory_message`) naming the config,
the per-device batch, the needed and available GiB and the ways out, instead of a traceback.
"""

import re
from typing import Optional, Tuple

GIB = float(1 << 30)
_UNITS = {'': 1, 'B': 1, 'K': 1 << 10, 'KB': 1 << 10, 'KIB': 1 << 10, 'M': 1 << 20, 'MB': 1 << 20,
          'MIB': 1 << 20, 'G': 1 << 30, 'GB': 1 << 30, 'GIB': 1 << 30, 'T': 1 << 40,
          'TB': 1 << 40, 'TIB': 1 << 40}
_SIZE = r'([\d.]+)\s*([KMGT]?i?B?)'


def is_resource_exhausted(error: BaseException) -> bool:
  """Whether `error` is XLA's out-of-device-memory error (compile or run time)."""
  text = str(error)
  return 'RESOURCE_EXHAUSTED' in text or 'Out of memory' in text or 'Ran out of memory' in text


# XLA's GPU compiler fuses matmuls into Triton kernels and picks a tiling for each; when it finds
# none that fits a shape (seen without a device to autotune on, for ViT-L's bfloat16 attention
# projections and for small float32 matmuls at full precision, the PPM pooling's 6x6 bins:
# scripts/aot_check.py) it stops with this INTERNAL error. Compiling the matmuls as
# cuBLAS calls instead avoids it.
GPU_TILING_ERROR = "Couldn't find output tile sizes"
GPU_TILING_WORKAROUND = 'XLA_FLAGS=--xla_gpu_enable_triton_gemm=false'


def is_gpu_tiling_failure(error: BaseException) -> bool:
  """Whether `error` is XLA's GPU compiler finding no Triton tiling for a fused matmul."""
  return GPU_TILING_ERROR in str(error)


def gpu_tiling_message(config_name: str, what: str = 'the train step') -> str:
  """The one-line message for `is_gpu_tiling_failure`: what failed and the workaround."""
  return (f'{config_name}: XLA\'s GPU compiler found no Triton tiling for a fused matmul of '
          f'{what} ("{GPU_TILING_ERROR}"). Run it again with {GPU_TILING_WORKAROUND} in the '
          'environment: those matmuls then compile as cuBLAS calls.')


def _bytes(number: str, unit: str) -> float:
  return float(number) * _UNITS[unit.upper()]


def parse_out_of_memory(text: str) -> Tuple[Optional[float], Optional[float]]:
  """(needed bytes, available bytes) read from an XLA out-of-memory message (None if absent).

  TPU: "Used 17.51G of 15.75G hbm"; GPU: "while trying to allocate 1.50GiB" (what the failed
  allocation asked for, not the whole program's need).
  """
  m = re.search(r'Used ' + _SIZE + r' of ' + _SIZE, text)
  if m:
    return _bytes(m.group(1), m.group(2)), _bytes(m.group(3), m.group(4))
  m = re.search(r'trying to allocate ' + _SIZE, text)
  if m:
    return _bytes(m.group(1), m.group(2)), None
  return None, None


def out_of_memory_message(config_name: str, per_device_batch: int, needed_bytes=None,
                          available_bytes=None, *, dtype: str = 'float32',
                          has_remat: bool = False, what: str = 'the train step') -> str:
  """One message: what does not fit, by how much, and the options (smaller batch, bf16, ...)."""
  def gib(b):
    return 'unknown' if b is None else f'{b / GIB:.2f} GiB'

  options = [f'a smaller per-device batch (--config.train.batch_size with fewer than '
             f'{per_device_batch} images per device, e.g. {max(per_device_batch // 2, 1)})']
  if dtype != 'bfloat16':
    options.append("bfloat16 compute (--config.model.dtype=bfloat16: about half the "
                   "activation memory; parameters, BN statistics and the memory stay float32)")
  if has_remat:
    options.append('rematerialisation (--config.model.remat=True: recomputes activations in '
                   'the backward pass)')
  options.append('a bigger slice (more devices at the same global batch), or a chip with more '
                 'memory')
  return (f'{config_name}: {what} does not fit in device memory at {per_device_batch} images per '
          f'device (needs {gib(needed_bytes)}, the device has {gib(available_bytes)}). '
          f'Options: ' + '; '.join(options) + '. scripts/aot_check.py shows what fits where '
          'without an accelerator.')
