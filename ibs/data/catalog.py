"""Sizes and shapes of the datasets ibs knows, without importing TFDS or TensorFlow.

The schedule arithmetic (and the noise-scale calculator) needs N, the number of training
examples, before any data is read; the input pipeline checks these against the prepared
dataset's own metadata. A run resolves its spec once (ibs.config_checks.check_config) and
passes that one value to the model and the loaders, so they cannot disagree.
"""

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  num_train_examples: int
  num_test_examples: int
  num_classes: int
  input_shape: tuple[int, ...]  # of one example, after preprocessing


# Fixed-size catalog datasets (TFDS names).
CATALOG = {
  'cifar10': DatasetSpec(50_000, 10_000, 10, (32, 32, 3)),
  'imagenet2012': DatasetSpec(1_281_167, 50_000, 1000, (224, 224, 3)),
}
DATASETS = ('mnist1d', 'cifar10', 'imagenet2012', 'fake')
SPLITS = ('train', 'test')
# ibs's split → the TFDS split it reads. ImageNet's labelled held-out set is 'validation'.
TFDS_SPLITS = {
  'cifar10': {'train': 'train', 'test': 'test'},
  'imagenet2012': {'train': 'train', 'test': 'validation'},
}


def dataset_spec(config: Any) -> DatasetSpec:
  """The spec of `config.dataset`; sizes of generated datasets come from the config."""
  name = config.dataset
  if name == 'mnist1d':
    return DatasetSpec(
      int(config.mnist1d.num_train), int(config.mnist1d.num_test), 10, (40,)
    )
  if name == 'fake':
    return DatasetSpec(
      int(config.fake.num_train),
      int(config.fake.num_test),
      int(config.fake.num_classes),
      tuple(int(d) for d in config.fake.shape),
    )
  if name in CATALOG:
    spec = CATALOG[name]
    if name == 'imagenet2012' and config.get('image_size'):
      spec = dataclasses.replace(
        spec, input_shape=(config.image_size, config.image_size, 3)
      )
    return spec
  raise unknown_dataset(name)


def unknown_dataset(name: str) -> ValueError:
  """The error for a config.dataset ibs does not know, worded alike wherever it is met."""
  return ValueError(f'Unknown config.dataset={name!r}. Choose one of {list(DATASETS)}.')
