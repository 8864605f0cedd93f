"""Input pipelines: TFDS sources read by example position, phase-aware batches.

A *source* is random access to one split: `len(source)` and `source.get(indices)`
returning a dict of numpy arrays {'input', 'label'}. Training batches are built from
stream positions (ibs.data_order): the batch of size B at position s is positions
[s, s + B), and each process reads only its contiguous slice of it. Preprocessing
(augmentation, normalisation) is a function of (batch, positions, seed), so it is the
same after a restart or on another number of hosts.

Datasets:
  mnist1d       local TFDS builder, generated offline on first use (ibs/datasets/mnist1d.py)
  cifar10       TFDS catalog; prepare it yourself (no download is ever attempted here)
  imagenet2012  TFDS catalog, manual download; prepare it yourself
  fake          synthetic data of any shape, for smoke runs of the big configs on CPU
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from absl import logging

from ibs import data_order
from ibs.datasets import catalog

Batch = dict[str, np.ndarray]


class DatasetNotPreparedError(RuntimeError):
  """A catalog dataset that would need a download; the message says how to prepare it."""


@dataclasses.dataclass(frozen=True)
class ArraySource:
  """A split held in memory (MNIST-1D, CIFAR-10): the fastest random access there is."""

  inputs: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)

  def get(self, indices: np.ndarray) -> Batch:
    return {'input': self.inputs[indices], 'label': self.labels[indices]}


@dataclasses.dataclass(frozen=True)
class FakeSource:
  """Synthetic examples, a pure function of (split, index): class-dependent means + noise.

  Learnable (so a smoke run's loss falls) and free: nothing is stored.
  """

  num_examples: int
  shape: tuple[int, ...]
  num_classes: int
  split_seed: int

  def __len__(self) -> int:
    return self.num_examples

  def get(self, indices: np.ndarray) -> Batch:
    indices = np.asarray(indices, np.int64)
    labels = (indices * 7 + self.split_seed) % self.num_classes
    size = int(np.prod(self.shape))
    # Deterministic per example: one generator per example would be slow, so draw from
    # a hash of (split, index, element).
    u = data_order.position_uniform(self.split_seed, indices, size)
    noise = (u - 0.5).reshape((len(indices), *self.shape)).astype(np.float32)
    class_means = np.random.default_rng(1234).normal(size=(self.num_classes, *self.shape))
    inputs = class_means[labels].astype(np.float32) * 0.5 + noise
    return {'input': inputs, 'label': labels.astype(np.int32)}


def _data_dir(config: Any) -> str | None:
  return config.get('data_dir') or os.environ.get('TFDS_DATA_DIR') or None


def _mnist1d_source(config: Any, split: str) -> ArraySource:
  import tensorflow_datasets as tfds

  from ibs.datasets import mnist1d

  tfds.disable_progress_bar()
  builder = mnist1d.Mnist1d(
      config=mnist1d.builder_config(config.mnist1d.num_train, config.mnist1d.num_test),
      data_dir=_data_dir(config),
  )
  if not builder.is_prepared():
    logging.info('Generating MNIST-1D (%s) into %s, once.', builder.builder_config.name,
                 builder.data_dir)
    builder.download_and_prepare(file_format='array_record')
  source = builder.as_data_source(split=split)
  records = source.__getitems__(range(len(source)))
  return ArraySource(
      inputs=np.stack([r['signal'] for r in records]).astype(np.float32),
      labels=np.array([r['label'] for r in records], np.int32),
  )


def _catalog_source(config: Any, split: str) -> ArraySource:
  """CIFAR-10 / ImageNet from a prepared TFDS directory; never downloads."""
  import tensorflow_datasets as tfds

  name = config.dataset
  data_dir = _data_dir(config)
  builder = tfds.builder(name, data_dir=data_dir)
  if not builder.is_prepared():
    where = data_dir or '~/tensorflow_datasets'
    how = {
        'cifar10': (
            'On a machine with internet access run\n'
            f'  tfds build cifar10 --data_dir={where}\n'
            'and copy the directory here (or point --config.data_dir / TFDS_DATA_DIR '
            'at it).'
        ),
        'imagenet2012': (
            'ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
            'ILSVRC2012_img_val.tar from image-net.org into <manual_dir> and run\n'
            f'  tfds build imagenet2012 --data_dir={where} --manual_dir=<manual_dir> '
            '--file_format=array_record\n'
            'or train on synthetic data with --config=configs/resnet50_tpu.py:fake.'
        ),
    }[name]
    raise DatasetNotPreparedError(
        f'Dataset {name!r} is not prepared in {builder.data_dir}. ibs never downloads '
        f'data during training.\n{how}'
    )
  if name == 'imagenet2012':
    raise DatasetNotPreparedError(
        'imagenet2012 is prepared, but ibs has no ImageNet decoding pipeline yet '
        '(it would not fit in memory as an ArraySource).'
    )
  data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
  return ArraySource(inputs=data['image'], labels=data['label'].astype(np.int32))


def load_source(config: Any, split: str) -> Any:
  """The random-access source of `config.dataset`'s split ('train' or 'test')."""
  name = config.dataset
  if name not in catalog.DATASETS:
    raise ValueError(
        f'Unknown config.dataset={name!r}. Choose one of {list(catalog.DATASETS)}.'
    )
  spec = catalog.dataset_spec(config)
  if name == 'fake':
    n = spec.num_train_examples if split == 'train' else spec.num_test_examples
    return FakeSource(n, spec.input_shape, spec.num_classes, 0 if split == 'train' else 1)
  source = _mnist1d_source(config, split) if name == 'mnist1d' else _catalog_source(
      config, split
  )
  expected = spec.num_train_examples if split == 'train' else spec.num_test_examples
  if len(source) != expected:
    raise ValueError(
        f'{name} {split} split has {len(source)} examples, but the schedule was built for '
        f'{expected}. The prepared data does not match ibs/datasets/catalog.py.'
    )
  return source


def preprocess_fn(config: Any) -> Callable[[Batch, np.ndarray, bool], Batch]:
  """(batch, positions, train) → model-ready batch, for `config.dataset`."""

  def standardize(batch: Batch, positions: np.ndarray, train: bool) -> Batch:
    del positions, train
    return {'input': batch['input'].astype(np.float32), 'label': batch['label']}

  return standardize


def _prefetch(batches: Iterator[Any], size: int) -> Iterator[Any]:
  """Builds the next `size` batches in a background thread while the step runs."""
  with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
    queue: collections.deque = collections.deque()
    for make in batches:
      queue.append(pool.submit(make))
      if len(queue) > size:
        yield queue.popleft().result()
    while queue:
      yield queue.popleft().result()


def train_batches(
    source: Any,
    preprocess: Callable[[Batch, np.ndarray, bool], Batch],
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

  Starting anywhere costs O(1): positions, not a replayed stream, define the data.
  """
  n = len(source)

  def make(step: int) -> Callable[[], Batch]:
    start = start_examples + step * batch_size
    positions = data_order.process_positions(start, batch_size, process_index, process_count)
    return lambda: preprocess(
        source.get(data_order.example_indices(seed, positions, n)), positions, True
    )

  return _prefetch((make(i) for i in range(num_steps)), prefetch)


def eval_batches(
    source: Any,
    preprocess: Callable[[Batch, np.ndarray, bool], Batch],
    *,
    batch_size: int,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Batch]:
  """The whole split once, in order, as this process's slices of padded global batches.

  The last batch is padded by repeating example 0 and carries `mask` = 0 there, so every
  example counts exactly once in the metrics.
  """
  n = len(source)
  for start in range(0, n, batch_size):
    positions = data_order.process_positions(start, batch_size, process_index, process_count)
    valid = positions < n
    batch = preprocess(source.get(np.where(valid, positions, 0)), positions, False)
    batch['mask'] = valid.astype(np.float32)
    yield batch
