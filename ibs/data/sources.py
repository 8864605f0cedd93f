"""Random-access sources: `len(source)` and `source.get(indices)` → dict of numpy arrays.

The input pipeline only ever asks a source for examples by index (docs/DESIGN.md
decision 5), so any of these can be read in any order, resumed anywhere and sharded over
hosts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import numpy as np

from ibs.data import order

Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A split held in memory (MNIST-1D, CIFAR-10): the fastest random access there is."""

  inputs: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> Batch:
    return {'input': self.inputs[indices], 'label': self.labels[indices]}


def in_memory(records: Sequence[Any], input_key: str, dtype: Any) -> ArraySource:
  """Every record of a TFDS data source (array_record), read once into memory."""
  records = records.__getitems__(range(len(records)))
  return ArraySource(
    inputs=np.stack([r[input_key] for r in records]).astype(dtype, copy=False),
    labels=np.array([r['label'] for r in records], np.int32),
  )


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedImageSource:
  """A TFDS data source (array_record) whose images stay JPEG bytes until preprocessing.

  ImageNet does not fit in memory decoded; decoding is left to the preprocessing, which
  knows the crop it needs and can decode at reduced size (ibs.data.augment).
  """

  records: Sequence[Any]  # tfds data source with the 'image' feature not decoded

  def __len__(self) -> int:
    return len(self.records)

  def get(self, indices: np.ndarray) -> Batch:
    records = self.records.__getitems__([int(i) for i in indices])
    images = np.empty(len(records), dtype=object)
    images[:] = [r['image'] for r in records]
    return {'image': images, 'label': np.array([r['label'] for r in records], np.int32)}


@dataclasses.dataclass(frozen=True, eq=False)
class FakeSource:
  """Synthetic examples, a pure function of (split, index): a class pattern plus noise.

  Learnable (so a smoke run's loss falls) and cheap at any shape: example i is its
  class's pattern plus the sum of two of 32 stored noise fields chosen by hashing
  (split, i), so a batch is a few row copies and adds, not a hash per element. Nothing
  depends on the order or grouping of requests.
  """

  num_examples: int
  shape: tuple[int, ...]
  num_classes: int
  split_seed: int

  _NOISE_FIELDS = 32
  _MAX_PATTERN_FLOATS = 1 << 22  # all classes' patterns together; longer ones tile

  def __len__(self) -> int:
    return self.num_examples

  @functools.cached_property
  def _size(self) -> int:
    return int(np.prod(self.shape))

  @functools.cached_property
  def _patterns(self) -> np.ndarray:
    """(classes, period) float32: each class's mean, tiled along the flat example."""
    period = min(self._size, max(1, self._MAX_PATTERN_FLOATS // self.num_classes))
    rng = np.random.default_rng([1234, self.num_classes, self._size])
    return (0.5 * rng.standard_normal((self.num_classes, period))).astype(np.float32)

  @functools.cached_property
  def _noise(self) -> np.ndarray:
    rng = np.random.default_rng([5678, self.split_seed, self._size])
    return rng.uniform(-0.5, 0.5, (self._NOISE_FIELDS, self._size)).astype(np.float32)

  def get(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices, np.int64)
    labels = (indices * 7 + self.split_seed) % self.num_classes
    # Two noise fields per example, keyed by (split, index); one output buffer, filled
    # row by row, keeps a 224×224×3 batch to a single pass over memory.
    u = order.position_uniform(self.split_seed + (1 << 32), indices, 2)
    fields = (u * self._NOISE_FIELDS).astype(np.int64)
    patterns, size = self._patterns, self._size
    inputs = np.empty((len(indices), size), np.float32)
    for row, (a, b), label in zip(inputs, fields, labels, strict=True):
      np.add(self._noise[a], self._noise[b], out=row)
      pattern = patterns[label]
      for start in range(0, size, len(pattern)):
        row[start : start + len(pattern)] += pattern[: size - start]
    return {
      'input': inputs.reshape((len(indices), *self.shape)),
      'label': labels.astype(np.int32),
    }


@dataclasses.dataclass(frozen=True, eq=False)
class Prefix:
  """The first `size` examples of `source`, by index: a fixed slice of the training set,
  the same at every measurement (a schedule's decision points, the probe's branches),
  so that its loss changes with the model, not with the batches."""

  source: Any
  size: int

  def __len__(self) -> int:
    return self.size

  def get(self, indices: np.ndarray) -> Batch:
    return self.source.get(indices)
