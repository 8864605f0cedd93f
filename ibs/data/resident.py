"""Device-resident training data: the split on every device, each batch gathered there.

A split that fits in device memory (MNIST-1D as float32, CIFAR-10 as uint8) is placed on
every device once, replicated. Per global batch the host then computes exactly what the
host pipeline (ibs/data/pipeline.py) computes first: the positions of its slice, the
example each holds (`order.example_indices`) and, for CIFAR-10, the random choices of
the augmentation keyed by (data seed, position) (`order.position_uniform`): crop
offsets and flip. Only those small integer arrays ("keys") travel per dispatch, laid
out on the mesh like any batch (ibs/sharding.py); the compiled step turns them into the
model's batch on the device (`Resident.materialise`): a gather by index, then for
CIFAR-10 the normalisation, the zero padding, the crop and the flip. So the data order,
a resume and the split over hosts are the host pipeline's by construction, and so are
the numbers: MNIST-1D's batch is the stored rows themselves; CIFAR-10's normalisation
reads a 256 × 3 table that the host pipeline's own `augment.normalise` computed, and
the crop and flip copy values, so the batch equals the host's bit for bit on any
backend (tests/test_resident.py).

`config.resident_data` chooses: 'auto' (the default) places the split when its bytes
fit `config.resident_data_fraction` of one device's memory, 'on' requires it, 'off'
keeps the host pipeline. ImageNet (JPEG bytes, decoded per batch) and synthetic data
(generated per batch) always use the host pipeline. Evaluation reads the host pipeline
in every case: it runs every few epochs over the test split, a few batches each.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ibs.data import augment, catalog, order
from ibs.data.sources import ArraySource, Batch

MODES = ('auto', 'on', 'off')

# The datasets whose prepared train split is an ArraySource, and its inputs' dtype.
INPUT_DTYPES = {'mnist1d': np.float32, 'cifar10': np.uint8}
WHY_NOT = {
  'imagenet2012': 'imagenet2012 is stored as JPEG bytes, decoded per batch',
  'fake': 'fake data is generated per batch',
}
LABEL_DTYPE = np.int32
STEPS_PER_CHUNK = 256  # the host computes the keys of this many batches at once


def split_bytes(dataset: str, spec: catalog.DatasetSpec) -> int:
  """Bytes of the stored train split (inputs and labels): one device's copy."""
  per_example = int(np.prod(spec.input_shape)) * np.dtype(INPUT_DTYPES[dataset]).itemsize
  return spec.num_train_examples * (per_example + np.dtype(LABEL_DTYPE).itemsize)


def device_memory_bytes() -> int:
  """Memory of one local device: `memory_stats()['bytes_limit']` where the backend
  reports it (GPU, TPU); on XLA:CPU, which reports none, the host's physical memory
  (os.sysconf) shared by the local devices, each of which holds its own copy."""
  devices = jax.local_devices()
  limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  if limit:
    return int(limit)
  physical = os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
  return int(physical) // len(devices)


@dataclasses.dataclass(frozen=True)
class Choice:
  """Whether the run's train split lives on the devices, and the one line that says so."""

  resident: bool
  bytes: int  # of one device's copy (0 when not resident)
  why: str  # why the host pipeline, when not resident

  def describe(self) -> str:
    if self.resident:
      return f'data: resident on device ({self.bytes / 1e6:.1f} MB per device)'
    return f'data: host pipeline ({self.why})'


def choose(config: Any, spec: catalog.DatasetSpec, memory: int | None = None) -> Choice:
  """The placement of `config.dataset`'s train split (see the module docstring).

  'on' where the split cannot be resident, or exceeds one device's whole memory, raises
  ValueError naming the field (ibs/config_checks.py turns it into a ConfigError before
  any data is read). `memory` overrides `device_memory_bytes()` (tests).
  """
  mode = config.get('resident_data', 'auto')
  fraction = config.get('resident_data_fraction', 0.25)
  if mode == 'off':
    return Choice(False, 0, "config.resident_data='off'")
  if config.dataset not in INPUT_DTYPES:
    why = WHY_NOT.get(config.dataset, f'{config.dataset} cannot be resident')
    if mode == 'on':
      raise ValueError(
        f"config.resident_data='on', but {why}: only "
        f"{' and '.join(INPUT_DTYPES)} can live on the device. Use 'auto' or 'off'."
      )
    return Choice(False, 0, why)
  need = split_bytes(config.dataset, spec)
  memory = device_memory_bytes() if memory is None else memory
  if mode == 'on':
    if need > memory:
      raise ValueError(
        f"config.resident_data='on', but the {config.dataset} train split needs "
        f'{need / 1e6:.1f} MB per device, more than the {memory / 1e6:.1f} MB a device '
        "has. Use 'auto' or 'off' (the host pipeline)."
      )
    return Choice(True, need, '')
  if need > fraction * memory:
    return Choice(
      False,
      0,
      f'the train split needs {need / 1e6:.1f} MB per device, more than '
      f"config.resident_data_fraction={fraction:g} of the device's "
      f'{memory / 1e6:.1f} MB',
    )
  return Choice(True, need, '')


# CIFAR-10's normalisation as a table: entry [v, c] is pixel value v of channel c after
# `augment.normalise`, computed by that function, so the device reads the host's numbers.
def _cifar10_table() -> np.ndarray:
  values = np.repeat(np.arange(256, dtype=np.uint8)[:, None, None, None], 3, axis=3)
  return augment.normalise(values, augment.CIFAR10_MEAN, augment.CIFAR10_STD)[:, 0, 0]


@dataclasses.dataclass(frozen=True, eq=False)
class Resident:
  """A train split on the devices: the arrays, and how keys become a batch there.

  `arrays` are replicated on the mesh and passed to the compiled step as arguments
  (ibs/step.py); `keys` and `train_batches` run on the host, `materialise` inside the
  step.
  """

  dataset: str
  seed: int  # config.data_seed
  num_examples: int
  arrays: dict[str, jax.Array]  # 'input', 'label' (+ 'table' for CIFAR-10)

  @classmethod
  def place(cls, config: Any, source: ArraySource, mesh: Any) -> Resident:
    """Puts `source`'s stored arrays on every device of `mesh` (each process its own
    copy, through `sharding.replicate`, the one way ibs places arrays)."""
    from ibs import sharding

    arrays = {
      'input': np.asarray(source.inputs, INPUT_DTYPES[config.dataset]),
      'label': np.asarray(source.labels, LABEL_DTYPE),
    }
    if config.dataset == 'cifar10':
      arrays['table'] = _cifar10_table()
    return cls(
      config.dataset,
      config.data_seed,
      len(source),
      sharding.replicate(arrays, mesh),
    )

  def keys(self, positions: np.ndarray) -> Batch:
    """What the host sends for `positions`: the example indices and, for CIFAR-10, the
    crop offsets (top, left) and flips of `augment.crop_and_flip`, from the same
    uniforms (`order.position_uniform(seed, positions, 3)`)."""
    index = order.example_indices(self.seed, positions, self.num_examples)
    keys = {'index': index.astype(np.int32)}
    if self.dataset == 'cifar10':
      u = order.position_uniform(self.seed, positions, 3)
      spare = 2 * augment.CIFAR_PADDING
      keys['crop'] = np.minimum((u[:, :2] * (spare + 1)).astype(np.int64), spare).astype(
        np.int32
      )
      keys['flip'] = u[:, 2] < 0.5
    return keys

  def example_keys(self) -> Batch:
    """The keys of one example: their shapes and dtypes, to compile for."""
    return self.keys(np.zeros(1, np.int64))

  def train_batches(
    self,
    *,
    start_examples: int,
    batch_size: int,
    num_steps: int,
    process_index: int = 0,
    process_count: int = 1,
  ) -> Iterator[Batch]:
    """This process's keys of `num_steps` global batches from `start_examples`: the
    positions of `pipeline.train_batches`, computed for many batches at once (a few
    microseconds a batch, so no background thread)."""
    order.check_batch_split(batch_size, process_index, process_count)
    if min(start_examples, num_steps) < 0:
      raise ValueError(
        f'start_examples={start_examples} and num_steps={num_steps} must be >= 0.'
      )
    per_process = batch_size // process_count
    offsets = process_index * per_process + np.arange(per_process, dtype=np.int64)
    for first in range(0, num_steps, STEPS_PER_CHUNK):
      steps = np.arange(first, min(first + STEPS_PER_CHUNK, num_steps), dtype=np.int64)
      positions = start_examples + steps[:, None] * batch_size + offsets[None, :]
      keys = self.keys(positions.reshape(-1))
      chunk = {
        k: v.reshape(len(steps), per_process, *v.shape[1:]) for k, v in keys.items()
      }
      for i in range(len(steps)):
        yield {k: v[i] for k, v in chunk.items()}

  def materialise(self, arrays: dict[str, jax.Array], keys: Batch) -> Batch:
    """Keys of any leading shape → {'input', 'label'} of that shape, on the device:
    what `pipeline.train_batches` would have sent (see the module docstring)."""
    index = keys['index']
    label = jnp.take(arrays['label'], index, axis=0, mode='clip')
    inputs = jnp.take(arrays['input'], index, axis=0, mode='clip')
    if self.dataset != 'cifar10':
      return {'input': inputs.astype(jnp.float32), 'label': label}
    lead = index.shape
    images = inputs.reshape(-1, *inputs.shape[len(lead) :]).astype(jnp.int32)
    height, width, channels = images.shape[1:]
    # (images − mean) / std per channel: the host's float32 values, read from its table.
    normalised = arrays['table'][images, jnp.arange(channels)]
    p = augment.CIFAR_PADDING
    padded = jnp.pad(normalised, ((0, 0), (p, p), (p, p), (0, 0)))
    crop = keys['crop'].reshape(-1, 2)

    def one(image, top_left):
      top, left = top_left[0], top_left[1]
      return jax.lax.dynamic_slice(image, (top, left, 0), (height, width, channels))

    crops = jax.vmap(one)(padded, crop)
    flip = keys['flip'].reshape(-1)[:, None, None, None]
    out = jnp.where(flip, crops[:, :, ::-1], crops)
    return {'input': out.reshape(*lead, height, width, channels), 'label': label}
