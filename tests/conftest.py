"""Shared fixtures: a shrunk default config and a per-session TFDS data directory.

Compiled programs are shared across the session through a persistent XLA compilation
cache in a fresh directory (`_COMPILATION_CACHE_DIR`); the fast subset compiles them with
less machine-code optimisation (`pytest_configure`).
"""

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import tempfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

# train_and_evaluate compiles its steps ahead of time with new jit objects on every
# call, so JAX's in-memory caches never match across runs; the persistent cache matches
# equal programs (the same config in several tests, in this process or in an ibs.main
# subprocess, which inherits these variables) and hands back the executable the first
# compilation produced: the same code, the same numbers, without compiling again.
# A fresh directory per session, so that a session's time is that of a cold start (the
# processes of one session, pytest-xdist's workers too, share it through the variable).
_COMPILATION_CACHE_DIR = os.environ.get('IBS_TESTS_XLA_CACHE_DIR', '')
if not _COMPILATION_CACHE_DIR:
  _COMPILATION_CACHE_DIR = tempfile.mkdtemp(prefix='ibs-tests-xla-cache-')
  atexit.register(shutil.rmtree, _COMPILATION_CACHE_DIR, ignore_errors=True)
  os.environ['IBS_TESTS_XLA_CACHE_DIR'] = _COMPILATION_CACHE_DIR
os.environ['JAX_COMPILATION_CACHE_DIR'] = _COMPILATION_CACHE_DIR
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0.2'

import hypothesis  # noqa: E402
import jax  # noqa: E402 - after the variables that configure it
import pytest  # noqa: E402

from configs import default  # noqa: E402

jax.config.update('jax_compilation_cache_dir', _COMPILATION_CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)

# No test asserts wall-clock time: Hypothesis's default deadline (200 ms an example) is
# one, and on a loaded machine an example of tests/test_schedules.py that takes 0.4 ms
# idle once took 288 ms and failed the run.
hypothesis.settings.register_profile('ibs', deadline=None)
hypothesis.settings.load_profile('ibs')


def pytest_configure(config):
  """XLA:CPU's backend optimisation level for this session (and its child processes).

  Most of a fast test's time is XLA compiling small programs, most of that LLVM
  optimising machine code that then runs for milliseconds. The fast subset
  (`-m "not slow"`) compiles at level 0, in less time (README's Development section has
  the measurement and its command): the same HLO programs after the same HLO passes
  (buffer assignment and memory analysis too), only the machine code less optimised,
  which can change rounding in the last bits. So its tests compare programs compiled in
  the same session, never numbers recorded from another build.
  Every other session compiles at XLA's default, level 3, as users' runs do: the full
  suite (CI) tests what users run, and the slow tests compare long trajectories across
  device counts at a float tolerance measured there (at level 0 one element of
  test_training_on_8_devices_equals_1_device ends 1.8e-5 away, above its 1e-5).
  IBS_TESTS_XLA_BACKEND_OPTIMIZATION_LEVEL overrides the choice. Runs before any test
  touches a device, which is when XLA reads XLA_FLAGS; child processes inherit it
  (tests/test_multidevice.py's _cpu_env keeps it).
  """
  from jax._src import xla_bridge

  assert not xla_bridge.backends_are_initialized(), (
    'a JAX backend started before pytest_configure: XLA_FLAGS set now would be ignored'
  )
  level = os.environ.get('IBS_TESTS_XLA_BACKEND_OPTIMIZATION_LEVEL')
  if level is None:
    level = '0' if _deselects_slow_tests(config.getoption('markexpr')) else '3'
    os.environ['IBS_TESTS_XLA_BACKEND_OPTIMIZATION_LEVEL'] = level
  os.environ['XLA_FLAGS'] = ' '.join(
    [
      *(
        flag
        for flag in os.environ.get('XLA_FLAGS', '').split()
        if not flag.startswith('--xla_backend_optimization_level')
      ),
      f'--xla_backend_optimization_level={level}',
    ]
  )


def _deselects_slow_tests(markexpr: str) -> bool:
  """Whether `-m markexpr` leaves out a test marked only `slow`."""
  from _pytest.mark.expression import Expression  # how pytest itself evaluates -m

  if not markexpr:
    return False
  return not Expression.compile(markexpr).evaluate(lambda name, **_: name == 'slow')


def pytest_report_header(config):
  level = os.environ['IBS_TESTS_XLA_BACKEND_OPTIMIZATION_LEVEL']
  return f'XLA:CPU backend optimisation level {level} (tests/conftest.py)'


@pytest.fixture
def without_compilation_cache():
  """This test compiles every program itself: nothing comes from the session's cache.

  For tests that count XLA compilations (a cache hit is not one).
  """
  from jax.experimental.compilation_cache import compilation_cache

  jax.config.update('jax_enable_compilation_cache', False)
  compilation_cache.reset_cache()  # `enable` is read once, at the next compilation
  try:
    yield
  finally:
    jax.config.update('jax_enable_compilation_cache', True)
    compilation_cache.reset_cache()


@contextlib.contextmanager
def on_each_compile(record):
  """Calls `record(fun_name)` for every XLA compilation in the block, in the compiling
  thread (jax.monitoring's backend compile event; a compilation-cache hit is none)."""

  def listener(event, duration, **kwargs):
    if event == '/jax/core/compile/backend_compile_duration':
      record(kwargs.get('fun_name', ''))

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)


def _session_root(tmp_path_factory):
  """A directory of this test session shared by pytest-xdist's workers (their parent's
  temporary directory), or this process's own without xdist."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get('PYTEST_XDIST_WORKER') else base


@contextlib.contextmanager
def _once_per_session(tmp_path_factory, name):
  """(directory, first): `name` under the session root, with an OS lock held so that of
  all workers only the first builds what the directory holds (`first` is True there)."""
  root = _session_root(tmp_path_factory)
  directory = root / name
  with open(root / f'{name}.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    first = not (directory / '.done').exists()
    directory.mkdir(exist_ok=True)
    yield directory, first
    (directory / '.done').touch()


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """MNIST-1D is generated once per test session (per xdist worker) into this
  directory."""
  return str(tmp_path_factory.mktemp('tfds'))


def make_tiny_config(data_dir):
  """The default config shrunk to seconds: 2000 examples, 4 epochs, 4 phases."""
  config = default.get_config()
  config.data_dir = data_dir
  config.mnist1d.num_train = 2000
  config.mnist1d.num_test = 500
  config.model_kwargs.width = 16
  config.schedule.num_epochs = 4.0
  config.schedule.milestones = (1.0, 2.0, 3.0)
  config.schedule.batch_size = 32
  config.schedule.decay_factor = 2.0  # 32 → 64 → 128 → 256
  config.max_micro_batch_size = 64  # the last phases accumulate
  config.eval_batch_size = 250
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 2.0
  return config


@pytest.fixture
def tiny_config(data_dir):
  """make_tiny_config's config, the test's own to change."""
  return make_tiny_config(data_dir)


@pytest.fixture(scope='session')
def tiny_run(data_dir, tmp_path_factory):
  """tiny_config trained once, uninterrupted, for the tests that read its result or
  resume from a copy of it: (config, workdir, summary).

  Checkpointed every 1.5 epochs, so one checkpoint falls inside the run (the period is
  not part of the training: the parameters are those of any period). Do not write to
  the workdir or change the config: copy them.

  The first xdist worker to ask trains it; the others wait and read its workdir (its
  data directory too: read-only once the run has generated it).
  """
  from ibs import train

  with _once_per_session(tmp_path_factory, 'tiny_run') as (directory, first):
    workdir = str(directory / 'workdir')
    if first:
      config = make_tiny_config(data_dir)
      config.checkpoint_every_epochs = 1.5
      train.train_and_evaluate(config, workdir)
      with open(directory / 'data_dir', 'w') as f:
        f.write(data_dir)
    with open(directory / 'data_dir') as f:
      config = make_tiny_config(f.read())
    config.checkpoint_every_epochs = 1.5
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['finished'] and not summary['preempted']
  return config, workdir, summary


def fake_explicit_config(base, phases, num_epochs):
  """`base` (a tiny config) on 256 fake examples with one convolution and an explicit
  schedule of `phases` ((epoch, batch, ε, m), ...): runs whose compilations and phase
  switches a test counts, in seconds."""
  config = base.copy_and_resolve_references()
  config.model_kwargs.depth = 1
  config.dataset = 'fake'
  config.fake.num_train = 256
  config.fake.num_test = 64
  config.eval_batch_size = 64
  config.schedule.kind = 'explicit'
  config.schedule.num_epochs = num_epochs
  config.schedule.phases = phases
  return config
