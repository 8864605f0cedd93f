"""TensorFlow, imported late and once, and kept off the accelerators JAX trains on.

ibs needs TensorFlow in two places only: clu's TensorBoard writer (`tf.summary`) for a
remote workdir (a local one is written by tensorboardX: ibs/writers.py) and TFDS's
reading of a dataset prepared as tfrecord (`tf.data`). Two facts shape how it is
imported:

- Its import is the largest of a run (2.3 s alone on a 2-core machine, `python -m
  experiments.trace_startup --tensorflow`; 3.0 s in a process that has loaded JAX and
  the data, docs/BENCHMARKS.md "No compile in the loop"). Training imports it for the
  writer in a thread that builds the writer beside the training
  (`writers.StartingWriter`), so the import is not on the run's path.
- TensorFlow claims every GPU's memory the first time it runs an operation, unless its
  GPUs (and TPUs) are hidden before that. `import_tensorflow` hides them at once after
  the import, so every path into TensorFlow in ibs goes through it.
"""

from __future__ import annotations

import threading
from typing import Any

_LOCK = threading.Lock()
_READY: list[Any] = []  # the module, once imported and off the accelerators


def import_tensorflow() -> Any:
  """The `tensorflow` module, with no GPU or TPU visible to it (idempotent, thread-safe:
  the first caller imports, the others wait for it)."""
  with _LOCK:
    if not _READY:
      import tensorflow as tf

      tf.config.set_visible_devices([], 'GPU')
      tf.config.set_visible_devices([], 'TPU')
      _READY.append(tf)
    return _READY[0]
