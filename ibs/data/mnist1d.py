"""MNIST-1D (Greydanus 2020) as a local TFDS builder, generated offline.

The `mnist1d` package builds the data procedurally from ten templates; nothing is
downloaded. Its `get_dataset()` tries a download and writes a pickle into the current
directory, so only `make_dataset()` is used here. `make_dataset` reseeds numpy's and
`random`'s global generators; we restore them so importing ibs never changes a user's
randomness.

The generator's `num_samples` counts train + test together; the published split is 4000
train / 1000 test (length-40 sequences, 10 classes). The builder config fixes both sizes.
"""

import contextlib
import dataclasses
import io
import random

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from ibs.data import sources

SEQUENCE_LENGTH = 40


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
  num_train: int = 4000
  num_test: int = 1000
  seed: int = 42  # the generator's, as published


def builder_config(num_train: int, num_test: int, seed: int = 42) -> Mnist1dConfig:
  """A config named after its sizes, so each size lives in its own data directory."""
  if (num_train + num_test) % 10:
    raise ValueError(
      f'MNIST-1D generates equal numbers per class: config.mnist1d.num_train + '
      f'num_test = {num_train + num_test} must be a multiple of 10.'
    )
  name = f'n{num_train}_t{num_test}' + ('' if seed == 42 else f'_s{seed}')
  return Mnist1dConfig(name=name, num_train=num_train, num_test=num_test, seed=seed)


def generate(num_train: int, num_test: int, seed: int = 42) -> dict[str, np.ndarray]:
  """Runs the MNIST-1D generator, leaving the global random generators untouched."""
  from mnist1d.data import get_dataset_args, make_dataset

  args = get_dataset_args()
  args.num_samples = num_train + num_test
  # make_dataset splits at int(num_samples · train_split); the half keeps float
  # rounding from moving the split by one example.
  args.train_split = (num_train + 0.5) / args.num_samples
  args.seed = seed
  # The legacy global state is exactly what make_dataset reseeds.
  numpy_state, python_state = np.random.get_state(), random.getstate()  # noqa: NPY002
  try:
    data = make_dataset(args)
  finally:
    np.random.set_state(numpy_state)  # noqa: NPY002
    random.setstate(python_state)
  return data


def load_split(
  num_train: int, num_test: int, split: str, data_dir: str | None
) -> sources.ArraySource:
  """The split in memory, generated into `data_dir` on first use (a few seconds)."""
  tfds.disable_progress_bar()
  builder = Mnist1d(config=builder_config(num_train, num_test), data_dir=data_dir)
  if not builder.is_prepared():
    logging.info(
      'Generating MNIST-1D (%s) into %s, once.',
      builder.builder_config.name,
      builder.data_dir,
    )
    try:
      # TFDS prints "Downloading and preparing dataset Unknown size..." for a dataset
      # generated offline; the log line above says what happens.
      with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(
          file_format='array_record',
          download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    except OSError:
      # Several processes (a multi-host run on one file system) may generate at once;
      # the first to finish wins and the others read its files.
      builder = Mnist1d(config=builder.builder_config, data_dir=data_dir)
      if not builder.is_prepared():
        raise
  return sources.in_memory(builder.as_data_source(split=split), 'signal', np.float32)


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D: 40-sample 1-D signals of the ten digits, generated offline."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Generated with mnist1d.data.make_dataset.'}
  BUILDER_CONFIGS = [builder_config(4000, 1000)]

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          'signal': tfds.features.Tensor(shape=(SEQUENCE_LENGTH,), dtype=np.float32),
          'label': tfds.features.ClassLabel(num_classes=10),
        }
      ),
      supervised_keys=('signal', 'label'),
      homepage='https://github.com/greydanus/mnist1d',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    c = self.builder_config
    data = generate(c.num_train, c.num_test, c.seed)
    return {
      'train': self._generate_examples(data['x'], data['y']),
      'test': self._generate_examples(data['x_test'], data['y_test']),
    }

  def _generate_examples(self, signals, labels):
    for i, (signal, label) in enumerate(zip(signals, labels, strict=True)):
      yield i, {'signal': signal.astype(np.float32), 'label': int(label)}
