"""Entry point: `python -m ibs.main --config=configs/default.py --workdir=/tmp/ibs`.

Every host of a TPU pod runs the same command. Config overrides by flag
(`--config.schedule.batch_size=256`), variants by argument
(`--config=configs/cifar10_wrn.py:schedule=hybrid`). Everything testable lives in
ibs.train so notebooks and tests use the same code.
"""

import os

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


def _is_multihost_tpu() -> bool:
  """A TPU VM that is one worker of several (the runtime lists every worker's host)."""
  return len([h for h in os.environ.get('TPU_WORKER_HOSTNAMES', '').split(',') if h]) > 1


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  # Imported only now: XLA's C++ logging, like TensorFlow's (which ibs.train imports),
  # reads TF_CPP_MIN_LOG_LEVEL once.
  import jax  # noqa: PLC0415

  # Before any JAX computation, so that every process sees the global device set.
  if _COORDINATOR.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
  elif _is_multihost_tpu():
    jax.distributed.initialize()

  import tensorflow as tf  # noqa: PLC0415

  # TFDS may use TensorFlow; keep it off the accelerators JAX needs.
  tf.config.set_visible_devices([], 'GPU')
  tf.config.set_visible_devices([], 'TPU')

  from ibs import preemption, train  # noqa: PLC0415

  logging.info(
    'JAX process %d / %d, local devices: %s',
    jax.process_index(),
    jax.process_count(),
    jax.local_devices(),
  )
  # [issue16] Exit statuses: ibs/preemption.py. A lost peer is one line, not a crash.
  preemption.start_peer_watchdog()
  try:
    summary = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except Exception as e:
    preemption.await_peer_watchdog(e)  # Exits with one line if a peer was lost.
    raise
  finally:
    preemption.stop_peer_watchdog()
  if summary['preempted']:
    preemption.exit_preempted()


if __name__ == '__main__':
  app.run(main)
