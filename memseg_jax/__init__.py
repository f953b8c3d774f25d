"""memseg_jax: MCIBI (dataset-level feature memory for semantic segmentation) in JAX/Flax."""

__version__ = '0.1.0'
