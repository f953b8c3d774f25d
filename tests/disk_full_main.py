"""`python -m memseg_jax.main` on a disk that fills up at the Nth checkpoint, for tests.

    python tests/disk_full_main.py N --config=... --workdir=...   (the flags of memseg_jax.main)

The Nth checkpoint's write fails inside orbax's background thread with OSError(ENOSPC), the way
a full disk fails it: writing the checkpoint's `_METADATA` file raises after its arrays were
written. Everything else is the unchanged program.
"""

import errno
import runpy
import sys


def fail_nth_checkpoint_write(n: int) -> None:
  from etils import epath  # pylint: disable=import-outside-toplevel
  path_type = type(epath.Path('/'))
  write_text = path_type.write_text
  count = [0]

  def failing_write_text(self, *args, **kwargs):
    if self.name == '_METADATA':     # written once per checkpoint
      count[0] += 1
      if count[0] == n:
        raise OSError(errno.ENOSPC, 'No space left on device', str(self))
    return write_text(self, *args, **kwargs)
  path_type.write_text = failing_write_text


if __name__ == '__main__':
  fail_nth_checkpoint_write(int(sys.argv.pop(1)))
  runpy.run_module('memseg_jax.main', run_name='__main__', alter_sys=True)
