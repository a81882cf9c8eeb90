"""Test setup: 8 fake CPU devices, set before jax is imported anywhere; JAX's persistent
compilation cache, shared by the workers and the subprocesses they start (many tests compile
the same programs: a runlocal run takes 13.5 s cold, 5 s warm, with the same results); the
offline Fashion-MNIST prepared once, under a lock, when several pytest-xdist workers start;
scripts/ importable as the command line sees it."""

import fcntl
import os
import sys
import tempfile

os.environ['XLA_FLAGS'] = (
  os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8'
).strip()
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault(
  'JAX_COMPILATION_CACHE_DIR', os.path.join(tempfile.gettempdir(), f'ftlab-tests-xla-{os.getuid()}')
)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
# Tests load scripts as modules (`import export_weights`), and a script imports its sibling
# helpers (`readme_section`) as it does when run from the command line.
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts')
)

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope='session', autouse=True)
def eight_devices():
  assert jax.device_count() == 8, 'tests expect 8 fake CPU devices (XLA_FLAGS)'


@pytest.fixture(scope='session', autouse=True)
def fashion_mnist_prepared():
  """Prepares the `runlocal` configs' dataset (tfds default data_dir, Debian IDX files)
  before any test or subprocess reads it: two workers preparing it at once would race."""
  from ftlab.data import datasets, sources

  if not os.path.isdir(sources.DEBIAN_FASHION_MNIST_DIR):
    return
  with open(os.path.join(tempfile.gettempdir(), 'ftlab-tests-tfds.lock'), 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      datasets.build_dataset('fashion_mnist', 'test[:1]')
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  """`build_dataset` keyword arguments for a prepared fake Fashion-MNIST whose images carry
  their index (tests/test_input_pipeline.py: `write_fake_fashion_mnist`, `ids_of`)."""
  from ftlab.data import datasets
  from tests.test_input_pipeline import write_fake_fashion_mnist

  root = tmp_path_factory.mktemp('fake_fashion_mnist')
  write_fake_fashion_mnist(str(root / 'idx'))
  kwargs = dict(data_dir=str(root / 'data'), fashion_mnist_dir=str(root / 'idx'))
  datasets.build_dataset('fashion_mnist', 'train', **kwargs)  # prepare once
  return kwargs
