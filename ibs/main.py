"""Entry point: `python -m ibs.main --config=configs/default.py --workdir=/tmp/ibs`.

Every host of a TPU pod runs the same command. Config overrides by flag
(`--config.schedule.batch_size=256`), variants by argument
(`--config=configs/cifar10_wrn.py:schedule=hybrid`). Everything testable lives in
ibs.train so notebooks and tests use the same code.

A mistake the user can fix (a config file that is not there, a ConfigError, a dataset
that is not prepared, a checkpoint of another config) ends the run with one line saying
what is wrong and how to fix it, exit status 2, and no traceback unless --verbosity=1.
"""

import os
import signal
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_WORKDIR = flags.DEFINE_string(
  'workdir', None, 'Directory for checkpoints and TensorBoard logs.'
)
_CONFIG = config_flags.DEFINE_config_file(
  'config', None, 'Training configuration file.', lock_config=True
)
_COORDINATOR = flags.DEFINE_string(
  'coordinator_address',
  None,
  'host:port of process 0, for multi-process runs outside TPU pods (CPU/GPU clusters). '
  'TPU pods need no flag: jax.distributed finds its peers itself.',
)
_NUM_PROCESSES = flags.DEFINE_integer(
  'num_processes', None, 'With --coordinator_address.'
)
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'With --coordinator_address.')
flags.mark_flags_as_required(['config', 'workdir'])


class UserError(Exception):
  """A mistake the person running ibs can fix; the message says how."""


def _is_multihost_tpu() -> bool:
  """A TPU VM that is one worker of several (the runtime lists every worker's host)."""
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def _is_slurm_step() -> bool:
  """One task of several of a SLURM job step (`srun`): jax.distributed reads the
  coordinator (the step's first node), the task count and this task's rank from it."""
  return (
    'SLURM_STEP_NODELIST' in os.environ and os.environ.get('SLURM_NTASKS', '1') != '1'
  )


def load_config():
  """The --config value, or UserError naming the file; imports neither TF nor JAX."""
  from ibs import reporting  # absl and etils only

  try:
    config = _CONFIG.value
    config.keys()  # a file that failed to load raises here, on first use
    return config
  except Exception as e:  # ml_collections wraps every load failure in an OSError.
    raise UserError(reporting.config_file_message(sys.argv, e)) from e


def _user_errors() -> tuple[type[BaseException], ...]:
  """Exception types that are the user's to fix (imported lazily: they pull in JAX)."""
  from ibs import config_checks
  from ibs.data import prepared
  from ibs.durability import checkpoint, divergence, lock

  return (
    UserError,
    config_checks.ConfigError,
    prepared.DatasetNotPreparedError,
    checkpoint.ConfigMismatchError,
    checkpoint.CheckpointError,
    lock.WorkdirLocked,
    divergence.Diverged,
  )


def _is_user_error(e: BaseException) -> bool:
  if isinstance(e, UserError):  # no import: it may come before JAX is loaded
    return True
  return isinstance(e, _user_errors())


def check_before_building(config, workdir: str) -> None:
  """The config, a catalog dataset's files and the workdir, checked in about a second.

  Before the data is read, the model initialised and the steps compiled (and before
  TensorFlow, where the run needs it at all: ibs/tf_setup.py): a mistake found here
  needs none of them. The workdir comes last, so a config or a dataset that fails
  leaves no directory behind. train_and_evaluate checks the config again: it is also
  called from notebooks and tests.
  """
  import jax

  from ibs import config_checks
  from ibs.data import catalog, prepared

  config_checks.check_config(config, jax.device_count(), jax.process_count())
  if config.dataset in catalog.CATALOG:
    prepared.prepared_versions(config.dataset, config.data_dir)
  config_checks.check_workdir(workdir)


def run(config, workdir: str) -> None:
  # Imported only now: XLA's C++ logging, like TensorFlow's (ibs/tf_setup.py), reads
  # TF_CPP_MIN_LOG_LEVEL once (set by reporting.quiet_logging).
  import jax

  from ibs.durability import coordinator

  # Before any JAX computation, so that every process sees the global device set. The
  # coordination service runs beside process 0, not in it: losing process 0 is then a
  # lost peer like any other (ibs/durability/coordinator.py).
  if _COORDINATOR.value:
    coordinator.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _is_multihost_tpu() or _is_slurm_step():
    coordinator.initialize()  # jax.distributed reads the cluster from the environment

  check_before_building(config, workdir)
  from ibs import reporting, train
  from ibs.durability import checkpoint, preemption

  logging.info(
    'JAX process %d / %d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  # Exit statuses: ibs/durability/preemption.py. A lost peer is one line, not a crash.
  preemption.start_peer_watchdog()
  try:
    summary = train.train_and_evaluate(config, workdir)
  except checkpoint.ConfigMismatchError as e:
    changed = reporting.describe_config_change(
      workdir, config, checkpoint.TRAJECTORY_FIELDS
    )
    if changed:
      raise checkpoint.ConfigMismatchError(f'{e} Changed: {changed}.') from e
    raise
  except Exception as e:
    preemption.await_peer_watchdog(e)  # Exits with one line if a peer was lost.
    raise
  finally:
    preemption.stop_peer_watchdog()
  if summary['preempted']:
    preemption.exit_preempted()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  from ibs.durability import preemption  # absl only

  preemption.exit_on_signals_until_training()  # start-up: nothing to save
  config = load_config()  # before TF/JAX: a misspelled path fails in a second
  run(config, _WORKDIR.value)
  # Trained, saved and summarised: a SIGINT or SIGTERM during the interpreter's teardown
  # (JAX's atexit clean-up) has nothing left to save, and must not end the run with a
  # KeyboardInterrupt traceback.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  signal.signal(signal.SIGTERM, signal.SIG_IGN)


if __name__ == '__main__':
  from ibs import reporting  # absl and etils only

  reporting.run_command(main, _is_user_error)
