"""Input pipelines: TFDS sources read by example position, phase-aware batches.

A *source* is random access to one split: `len(source)` and `source.get(indices)`
returning a dict of numpy arrays (ibs.data.sources). Training batches are built from
stream positions (ibs.data.order): the batch of size B at position s is positions
[s, s + B), and each process reads only its contiguous slice of it. Preprocessing
(augmentation, normalisation) is a function of (batch, positions, train) and of the
data seed, so it is the same after a restart or on another number of hosts. A train
split that fits in device memory skips the host's gather and augmentation: the run sends
its keys instead and the step builds the same batch on the device (ibs/data/resident.py).

Both loaders take the run's DatasetSpec (ibs.data.catalog), resolved once per run by
ibs.config_checks.check_config, so that the sizes and shapes the schedule and the model
were built for are the ones the data is checked against.

Datasets:
  mnist1d       local TFDS builder, generated offline on first use (ibs/data/mnist1d.py)
  cifar10       TFDS catalog, decoded into memory; prepare it yourself (never downloaded)
  imagenet2012  TFDS catalog (array_record), read by index and decoded per batch
  fake          synthetic data of any shape, for smoke runs of the big configs on CPU
"""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ibs.data import augment, catalog, order, prepared
from ibs.data.augment import Batch, Preprocess
from ibs.data.sources import ArraySource, EncodedImageSource, FakeSource

__all__ = [
  'ArraySource',
  'DatasetNotPreparedError',
  'EncodedImageSource',
  'FakeSource',
  'eval_batches',
  'load_source',
  'preprocess_fn',
  'train_batches',
]

DatasetNotPreparedError = prepared.DatasetNotPreparedError


def load_source(config: Any, spec: catalog.DatasetSpec, split: str) -> Any:
  """The random-access source of `config.dataset`'s split ('train' or 'test').

  `spec` is the run's `catalog.dataset_spec(config)`; the split must hold its number of
  examples. A catalog dataset that is not on disk raises DatasetNotPreparedError at
  once, saying how to prepare it; nothing is ever downloaded.
  """
  name = config.dataset
  if split not in catalog.SPLITS:
    raise ValueError(f'Unknown split {split!r}; ibs reads {list(catalog.SPLITS)}.')
  expected = spec.num_train_examples if split == 'train' else spec.num_test_examples
  data_dir = config.get('data_dir') or None
  if name == 'fake':
    return FakeSource(
      expected, spec.input_shape, spec.num_classes, catalog.SPLITS.index(split)
    )
  if name == 'mnist1d':
    from ibs.data import mnist1d

    source = mnist1d.load_split(
      spec.num_train_examples, spec.num_test_examples, split, data_dir
    )
  elif name == 'cifar10':
    source = prepared.cifar10(split, data_dir)
  elif name == 'imagenet2012':
    source = prepared.imagenet2012(split, data_dir)
  else:
    raise catalog.unknown_dataset(name)
  if len(source) != expected:
    raise ValueError(
      f'{name} {split} split has {len(source)} examples, but the schedule was built for '
      f'{expected}. The prepared data does not match ibs/data/catalog.py: prepare '
      'it again, or correct the sizes there if this version of the dataset is intended.'
    )
  return source


def preprocess_fn(config: Any, spec: catalog.DatasetSpec) -> Preprocess:
  """(batch, positions, train) → model-ready batch, for `config.dataset`.

  CIFAR-10: normalisation, plus padded crop and flip in training; ImageNet: decoding,
  Inception crop (training) or central crop (evaluation) to `spec.input_shape`, flip,
  normalisation; MNIST-1D and fake data: none. Randomness is keyed by
  (config.data_seed, position).
  """
  if config.dataset == 'cifar10':
    return augment.cifar10(config.data_seed)
  if config.dataset == 'imagenet2012':
    return augment.imagenet(config.data_seed, spec.input_shape[0])
  if config.dataset in ('mnist1d', 'fake'):
    return augment.cast
  raise catalog.unknown_dataset(config.dataset)


def _prefetch(batches: Iterator[Callable[[], Any]], size: int) -> Iterator[Any]:
  """Builds the next `size` batches in a background thread while the step runs."""
  with concurrent.futures.ThreadPoolExecutor(
    max_workers=1, thread_name_prefix='ibs_prefetch'
  ) as pool:
    queue: collections.deque = collections.deque()
    for make in batches:
      queue.append(pool.submit(make))
      if len(queue) > size:
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()


def train_batches(
  source: Any,
  preprocess: Preprocess,
  *,
  seed: int,
  start_examples: int,
  batch_size: int,
  num_steps: int,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
) -> Iterator[Batch]:
  """This process's slices of `num_steps` global batches starting at `start_examples`.

  Global batch i covers stream positions [start + iB, start + (i+1)B) and this process
  reads the p-th contiguous 1/P of it. Starting anywhere costs O(1): positions, not a
  replayed stream, define the data. Arguments are checked here, not at the first batch.
  """
  order.check_batch_split(batch_size, process_index, process_count)
  if min(seed, start_examples, num_steps) < 0:
    raise ValueError(
      f'seed={seed} (config.data_seed), start_examples={start_examples} and '
      f'num_steps={num_steps} must be >= 0.'
    )
  n = len(source)

  def make(step: int) -> Callable[[], Batch]:
    start = start_examples + step * batch_size
    positions = order.process_positions(start, batch_size, process_index, process_count)
    return lambda: preprocess(
      source.get(order.example_indices(seed, positions, n)), positions, True
    )

  return _prefetch((make(i) for i in range(num_steps)), prefetch)


def eval_batches(
  source: Any,
  preprocess: Preprocess,
  *,
  batch_size: int,
  process_index: int = 0,
  process_count: int = 1,
  prefetch: int = 2,
) -> Iterator[Batch]:
  """The whole split once, in order, as this process's slices of padded global batches.

  The last global batch is padded by repeating example 0 and carries `mask` = 0 there,
  so every example counts exactly once in the metrics, on any number of processes.
  """
  order.check_batch_split(batch_size, process_index, process_count)
  n = len(source)

  def make(start: int) -> Callable[[], Batch]:
    positions = order.process_positions(start, batch_size, process_index, process_count)
    valid = positions < n

    def build() -> Batch:
      batch = preprocess(source.get(np.where(valid, positions, 0)), positions, False)
      return {**batch, 'mask': valid.astype(np.float32)}

    return build

  return _prefetch((make(start) for start in range(0, n, batch_size)), prefetch)
