"""ftlab: fine-tuning studies of VGG networks in JAX."""

import functools
import importlib.metadata
import os
import subprocess

try:
  __version__ = importlib.metadata.version('ftlab')
except importlib.metadata.PackageNotFoundError:  # run from a checkout that is not installed
  __version__ = 'unknown'


@functools.cache
def version() -> str:
  """The version checkpoints and exports record: the package's, and the git commit of the
  checkout it runs from where there is one (`0.1.0+f86119e`), so a record names the code that
  wrote it even between releases."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if not os.path.exists(os.path.join(root, '.git')):
    return __version__
  try:
    found = subprocess.run(
      ['git', '-C', root, 'rev-parse', '--short', 'HEAD'],
      capture_output=True,
      text=True,
      timeout=10,
    )
  except (OSError, subprocess.TimeoutExpired):  # no git on this machine
    return __version__
  commit = found.stdout.strip() if found.returncode == 0 else ''
  return f'{__version__}+{commit}' if commit else __version__
