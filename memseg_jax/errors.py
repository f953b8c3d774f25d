"""How bad input is reported: a typed error in the library, one `error: ...` line in a program.

Library functions (what the notebook and the tests call) raise a `UserError` subclass, or a
built-in `OSError` such as FileNotFoundError, whose message is one line naming the file, key or
value at fault; they never exit. The subclasses live next to the code that detects the problem:

    config_validation.ConfigError      a config value, key or file that cannot work
    checkpoint.CheckpointError         a checkpoint that is missing, unreadable or of another
                                       config (CheckpointMismatchError); a workdir that cannot
                                       be written (WorkdirError); a failed write
                                       (CheckpointWriteError)
    datasets.PreparationError          a download that cannot become a dataset
    datasets.DatasetNotPreparedError   a dataset that has not been prepared
    convert.ConversionError            a PyTorch checkpoint that cannot be read or converted
    predict.ImageError                 an input image that cannot be decoded
    distributed.DistributedConfigError incomplete multi-process flags
    train.NonFiniteLossError           the loss became NaN or infinite

The programs (`python -m memseg_jax.main`, `.convert`, `.predict`, scripts/prepare_datasets.py)
start through `run_program`: a bad command line (an unknown flag or config key, a value of the
wrong type, a config file that cannot be loaded) and any of the errors above end the program
with one `error: MESSAGE` line on stderr and exit status 2 (command line) or 1 (everything
else), without a traceback. Any other exception is a bug and keeps its traceback.
"""

import re
import sys
import traceback
from typing import Callable, NoReturn, Sequence

USAGE_EXIT_CODE = 2
ERROR_EXIT_CODE = 1


class UserError(Exception):
  """Bad input or a fault of the environment; the message is one line naming the culprit."""


def one_line(message) -> str:
  """The message with its line breaks (and the indentation after them) turned into spaces."""
  return re.sub(r'\s*\n\s*', ' ', str(message)).strip()


def user_error_types() -> tuple:
  """The exception types a program reports as one message (TensorFlow's file errors included)."""
  types = [UserError, OSError]
  tf = sys.modules.get('tensorflow')
  errors = getattr(tf, 'errors', None)
  if errors is not None and hasattr(errors, 'OpError'):
    types.append(errors.OpError)   # tf.io.gfile's NotFound / PermissionDenied on gs://...
  return tuple(types)


def describe(error: BaseException) -> str:
  """One line for a user error (tf.errors.OpError carry their text in `.message`)."""
  message = getattr(error, 'message', None) if not isinstance(error, UserError) else None
  return one_line(message if isinstance(message, str) and message else error)


def fail(message, exit_code: int = ERROR_EXIT_CODE) -> NoReturn:
  """Prints `error: MESSAGE` (one line) on stderr and exits with `exit_code`."""
  sys.stdout.flush()
  print(f'error: {one_line(message)}', file=sys.stderr, flush=True)
  sys.exit(exit_code)


# ------------------------------------------------------------------------------ command line
def _unknown_config_key(error: Exception, argv: Sequence[str]) -> str:
  """ml_collections' AttributeError/KeyError for `--config.a.b=v` with no key `b`, as one line.

  Its text is "'b'\\nDid you mean \"c\" instead of \"b\"?" (the hint only when a close name
  exists); the hint is kept.
  """
  inner = error
  while not isinstance(inner, KeyError) and inner.args and isinstance(inner.args[0], Exception):
    inner = inner.args[0]
  text = inner.args[0] if inner.args and isinstance(inner.args[0], str) else str(inner)
  key, _, hint = text.partition('\n')
  key = key.strip().strip('\'"')
  for arg in argv[1:]:
    match = re.fullmatch(r'--(\w+)\.([\w.]+)(=.*)?', arg, re.DOTALL)
    if match and key in match.group(2).split('.'):
      where = f'{match.group(1)}.{match.group(2)}'
      return one_line(f'{arg}: {where} is not a key of the config ({key!r} is unknown). {hint}')
  return one_line(f'unknown config key {key!r}. {hint}')


def _without_traceback(text: str) -> str:
  """A message with a formatted traceback inside (ml_collections does that for errors raised
  while a config file runs) cut down to the text before it, the last frame and the exception."""
  head, marker, trace = text.partition('Traceback (most recent call last):')
  if not marker:
    return text
  lines = [line.strip() for line in trace.strip().splitlines() if line.strip()]
  frames = re.findall(r'File "([^"]+)", line (\d+)', trace)
  frames = [f for f in frames if 'site-packages' not in f[0] and not f[0].startswith('<')]
  where = f' ({frames[-1][0]}:{frames[-1][1]})' if frames else ''
  return one_line(f'{head.rstrip(": ")}{where}: {lines[-1] if lines else ""}')


def _culprit_frame(error: BaseException) -> str:
  """'file.py:LINE' of the innermost frame outside installed packages (a user's config file)."""
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if 'site-packages' not in f.filename and not f.filename.startswith('<')]
  if isinstance(error, SyntaxError) and error.filename:
    return f'{error.filename}:{error.lineno}'
  return f'{frames[-1].filename}:{frames[-1].lineno}' if frames else ''


def _config_file_flags():
  """ml_collections' config-file flags (`--config=FILE`) among the defined flags."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  return [flags.FLAGS[name] for name in flags.FLAGS
          if type(flags.FLAGS[name]).__name__ == '_ConfigFlag']


def _flag_argument(name: str, argv: Sequence[str]) -> str:
  """The value given to --name on the command line (the last one), or ''."""
  value = ''
  for i, arg in enumerate(argv):
    if arg.startswith(f'--{name}='):
      value = arg.split('=', 1)[1]
    elif arg == f'--{name}' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_load_error(flag, error: BaseException, argv: Sequence[str]) -> str:
  filename = _flag_argument(flag.name, argv).split(':', 1)[0]
  cause = error.__cause__ or error
  if isinstance(cause, OSError) and 'Failed loading config file' in str(cause):
    import os  # pylint: disable=import-outside-toplevel
    if not os.path.isfile(filename):
      return f'--{flag.name}={filename}: no such config file'
  where = _culprit_frame(cause)
  reason = f'{type(cause).__name__}: {cause}'
  return one_line(f'--{flag.name}={filename}: cannot load the config file'
                  f'{f" ({where})" if where else ""}: {reason}')


def parse_flags(argv: Sequence[str]):
  """absl's flag parsing, with every command-line mistake reported as one line (exit 2)."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  try:
    args = flags.FLAGS(argv)
  except flags.Error as e:                       # unknown flag, bad value, missing required
    fail(_without_traceback(str(e)), USAGE_EXIT_CODE)
  except (AttributeError, KeyError) as e:       # --config.x.y for a key the config lacks
    fail(_unknown_config_key(e, argv), USAGE_EXIT_CODE)
  except Exception as e:  # pylint: disable=broad-except
    # A config file that fails to load while its overrides are applied.
    flag_list = _config_file_flags()
    if flag_list:
      fail(_config_load_error(flag_list[0], e, argv), USAGE_EXIT_CODE)
    raise
  # ml_collections defers a config file's load error to the first use of the config.
  for flag in _config_file_flags():
    try:
      getattr(flag.value, 'keys', None)
    except Exception as e:  # pylint: disable=broad-except
      fail(_config_load_error(flag, e, argv), USAGE_EXIT_CODE)
  return args


def guarded(main: Callable) -> Callable:
  """`main` with user errors and `app.UsageError` ended as one `error:` line."""
  from absl import app  # pylint: disable=import-outside-toplevel

  def wrapped(argv):
    try:
      return main(argv)
    except app.UsageError as e:
      fail(e, USAGE_EXIT_CODE)
    except user_error_types() as e:
      fail(describe(e), ERROR_EXIT_CODE)
  return wrapped


def run_program(main: Callable) -> None:
  """`absl.app.run(main)` with one-line errors for the command line and for user errors."""
  from absl import app  # pylint: disable=import-outside-toplevel
  app.run(guarded(main), flags_parser=parse_flags)


def quiet_orbax_logs():
  """Keeps orbax out of a program's log: no INFO lines, and its warnings/errors without traceback.

  orbax reports every checkpoint write at INFO, and a failed background write as ERROR records
  with tracebacks; the program reports the failure itself in one line. The filter sits on the
  'absl' logger (orbax logs through absl), whatever handler prints; it is returned, so that
  `logging.getLogger('absl').removeFilter(it)` undoes this.
  """
  import logging  # pylint: disable=import-outside-toplevel

  def keep(record) -> bool:
    if '/orbax/' not in record.pathname:
      return True
    if record.levelno < logging.WARNING:
      return False
    record.exc_info, record.exc_text, record.stack_info = None, None, None
    record.msg, record.args = record.getMessage().split('\n')[0], ()
    return True
  logging.getLogger('absl').addFilter(keep)
  return keep
