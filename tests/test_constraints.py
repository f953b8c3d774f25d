"""constraints.txt (the pinned install of README and CI) agrees with pyproject.toml.

scripts/update_constraints.sh writes constraints.txt from a fresh install of the `ci` extra
(what the README's set-up installs) and the `aot` extra (which CI adds for its slow tests).
When a dependency or an extra changes in pyproject.toml and the file is not regenerated, an
install with `-c constraints.txt` either fails to resolve (a pin that contradicts pyproject) or
silently takes whatever is newest (a dependency the file does not pin). This test catches both.
"""

import os
import re
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CI_EXTRA = 'ci'
PINNED_EXTRAS = (CI_EXTRA, 'aot')     # what constraints.txt covers
_PIN = re.compile(r'^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$')


def parse_constraints(text: str) -> dict:
  """{canonical name: Version} of a constraints file; every line must be `name==version`."""
  pins = {}
  for number, line in enumerate(text.splitlines(), 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    match = _PIN.match(line)
    if not match:
      raise ValueError(f'constraints.txt line {number}: {line!r} is not `name==version`')
    name = canonicalize_name(match.group(1))
    if name in pins:
      raise ValueError(f'constraints.txt line {number}: {name} is pinned twice')
    pins[name] = Version(match.group(2))
  return pins


def ci_requirements(pyproject: dict) -> list:
  """(extra or 'base', Requirement) of the base dependencies and the pinned extras, expanded.

  The `ci` extra names this project's own extras (`memseg_jax[test,parity]`); those are
  expanded recursively. Requirements whose environment marker is false on this platform (with
  `extra` set to the extra that lists them) are left out.
  """
  project = pyproject['project']
  own = canonicalize_name(project['name'])
  extras = project.get('optional-dependencies', {})
  out, seen = [], set()

  def add(group, specs):
    for spec in specs:
      req = Requirement(spec)
      env = {'extra': '' if group == 'base' else group}
      if req.marker is not None and not req.marker.evaluate(env):
        continue
      if canonicalize_name(req.name) == own:
        for extra in sorted(req.extras):
          if extra not in extras:
            raise ValueError(f'pyproject.toml: extra {extra!r} (named in {group!r}) is not defined')
          if extra not in seen:
            seen.add(extra)
            add(extra, extras[extra])
      else:
        out.append((group, req))

  add('base', project.get('dependencies', []))
  for name in PINNED_EXTRAS:
    if name not in extras:
      raise ValueError(f'pyproject.toml: no {name!r} extra')
    if name not in seen:
      seen.add(name)
      add(name, extras[name])
  return out


def disagreements(pyproject_text: str, constraints_text: str) -> list:
  """One line per requirement of pyproject that constraints.txt does not satisfy."""
  pins = parse_constraints(constraints_text)
  pyproject = tomllib.loads(pyproject_text)
  problems = []
  for group, req in ci_requirements(pyproject):
    name = canonicalize_name(req.name)
    if name not in pins:
      problems.append(f'{req} ({group}): not pinned in constraints.txt')
    elif not req.specifier.contains(pins[name], prereleases=True):
      problems.append(f'{req} ({group}): constraints.txt pins {name}=={pins[name]}')
  if canonicalize_name(pyproject['project']['name']) in pins:
    problems.append('constraints.txt pins this project itself')
  return problems


def _read(name):
  with open(os.path.join(REPO, name)) as f:
    return f.read()


def test_constraints_pin_every_dependency_of_the_ci_install_at_the_pyproject_version():
  problems = disagreements(_read('pyproject.toml'), _read('constraints.txt'))
  assert not problems, (
      'pyproject.toml and constraints.txt disagree; rerun scripts/update_constraints.sh:\n  '
      + '\n  '.join(problems))


def test_the_readme_and_ci_install_the_ci_extra_with_the_constraints():
  command = "-c constraints.txt -e '.[ci]'"
  assert command in _read('README.md')
  assert command in _read('.ci/run')


def test_ci_runs_the_readme_test_command():
  setup = next(line for line in _read('README.md').splitlines()
               if "-e '.[ci]'" in line and 'pytest' in line)
  command = setup[setup.index('python -m pytest'):].strip()
  assert command.startswith('python -m pytest -q -m "not slow"'), command
  assert command in _read('.ci/run'), command


def test_the_check_fails_on_a_mismatch():
  pyproject, constraints = _read('pyproject.toml'), _read('constraints.txt')
  assert 'flax==0.12.8' in pyproject and 'flax==0.12.8' in constraints
  # A version pinned in pyproject that constraints.txt pins differently.
  problems = disagreements(pyproject.replace('"flax==0.12.8"', '"flax==0.12.9"'), constraints)
  assert problems == ['flax==0.12.9 (base): constraints.txt pins flax==0.12.8']
  problems = disagreements(pyproject, constraints.replace('flax==0.12.8', 'flax==0.12.7'))
  assert problems == ['flax==0.12.8 (base): constraints.txt pins flax==0.12.7']
  # A dependency (base, an extra named by `ci`, or one a new extra in `ci` brings) missing.
  for name, group in (('clu', 'base'), ('pytest-timeout', 'test'),
                      ('sssegmentation', 'parity')):
    lines = [l for l in constraints.splitlines()
             if canonicalize_name(l.split('==')[0]) != name]
    problems = disagreements(pyproject, '\n'.join(lines))
    assert len(problems) == 1 and problems[0].endswith(
        f'({group}): not pinned in constraints.txt'), (name, problems)
  ci_line = next(l for l in pyproject.splitlines() if l.startswith('ci = '))
  with_new_extra = pyproject.replace(ci_line, ci_line.replace(']"]', ',extra_x]"]') + '\n'
                                     'extra_x = ["not-a-pinned-package>=1"]')
  assert disagreements(with_new_extra, constraints) == [
      'not-a-pinned-package>=1 (extra_x): not pinned in constraints.txt']
  # Environment markers: the tensorflow line of another machine type is not required here,
  # tensorflow-cpu is (on x86-64; the other way round elsewhere).
  required = {canonicalize_name(r.name) for _, r in ci_requirements(tomllib.loads(pyproject))}
  import platform  # pylint: disable=import-outside-toplevel
  if platform.machine() in ('x86_64', 'AMD64'):
    assert 'tensorflow-cpu' in required and 'tensorflow' not in required
  else:
    assert 'tensorflow' in required and 'tensorflow-cpu' not in required
  # A line that is not a pin.
  with pytest.raises(ValueError, match='line 3'):
    parse_constraints('# header\nnumpy==2.4.6\nscipy>=1\n')
