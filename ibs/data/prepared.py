"""CIFAR-10 and ImageNet from a TFDS directory the user prepared; never a download.

A catalog dataset that is not prepared makes TFDS try a download (and hang for minutes
in retries where there is no network), so nothing here calls `download_and_prepare`,
and the data directory is checked for the dataset's files *before* TFDS is asked for a
builder: a missing dataset fails in well under a second, with the command that
prepares it.

ImageNet is read by random access (`tfds.data_source`, array_record files) with the
JPEGs left encoded; CIFAR-10 is small enough to decode once into memory.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath

from ibs.data import catalog
from ibs.data.sources import ArraySource, EncodedImageSource, in_memory

_HOW_TO_PREPARE = {
  'cifar10': (
    'Prepare it with\n'
    '  python -m ibs.data.prepare cifar10 --data_dir={where}\n'
    '(it downloads cifar-10-binary.tar.gz; offline, add --manual_dir=DIR holding that '
    'archive), or point --config.data_dir / TFDS_DATA_DIR at a prepared directory.'
  ),
  'imagenet2012': (
    'ImageNet needs a manual download: put ILSVRC2012_img_train.tar and '
    'ILSVRC2012_img_val.tar from image-net.org into DIR and run\n'
    '  python -m ibs.data.prepare imagenet2012 --data_dir={where} --manual_dir=DIR\n'
    'or train on synthetic data with --config=configs/resnet50_tpu.py:fake.'
  ),
}


class DatasetNotPreparedError(RuntimeError):
  """A catalog dataset that would need a download; the message says how to prepare it."""


def data_dir_or_default(data_dir: str | None) -> str:
  """config.data_dir, else TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
  return (
    data_dir
    or os.environ.get('TFDS_DATA_DIR')
    or os.path.expanduser('~/tensorflow_datasets')
  )


def prepared_versions(name: str, data_dir: str | None) -> list[str]:
  """The versions of catalog dataset `name` prepared in `data_dir`, or
  DatasetNotPreparedError if there are none.

  Reads the directory only (neither TFDS nor TensorFlow): ibs.main asks this before it
  imports them, so that a missing dataset fails in about a second.
  """
  root = epath.Path(data_dir_or_default(data_dir))
  found = sorted(p.parent.name for p in (root / name).glob('*/dataset_info.json'))
  if not found:
    raise DatasetNotPreparedError(
      f'Dataset {name!r} is not prepared in {root} (no {name}/<version>/'
      f'dataset_info.json). ibs never downloads data during training.\n'
      + _HOW_TO_PREPARE[name].format(where=root)
    )
  return found


def prepared_builder(name: str, data_dir: str | None):
  """The TFDS builder of `name` in `data_dir`, or DatasetNotPreparedError.

  The directory is looked at first: `tfds.builder` of a dataset without local metadata
  may look for it on GCS (older TFDS releases do), which is a network call.
  """
  found = prepared_versions(name, data_dir)
  root = epath.Path(data_dir_or_default(data_dir))
  how = _HOW_TO_PREPARE[name].format(where=root)
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  builder = tfds.builder(name, data_dir=os.fspath(root))
  if str(builder.version) not in found:
    raise DatasetNotPreparedError(
      f'{name} is prepared in {root} at version(s) {found}, but TFDS '
      f'{tfds.__version__} reads version {builder.version}. Prepare it again:\n{how}'
    )
  return builder


def _tfds_split(builder, name: str, split: str) -> str:
  tfds_split = catalog.TFDS_SPLITS[name][split]
  available = list(builder.info.splits)
  if available and tfds_split not in available:
    raise DatasetNotPreparedError(
      f'{name} in {builder.data_dir} has the splits {available} but not {tfds_split!r}, '
      f'which ibs uses as its {split!r} split. Prepare it with the missing split:\n'
      + _HOW_TO_PREPARE[name].format(where=builder.data_dir_root)
    )
  return tfds_split


def _has_array_record(builder) -> bool:
  return 'array_record' in {f.value for f in builder.info.available_file_formats()}


def cifar10(split: str, data_dir: str | None) -> ArraySource:
  """CIFAR-10's split decoded into memory: uint8 images (N, 32, 32, 3), int32 labels."""
  builder = prepared_builder('cifar10', data_dir)
  tfds_split = _tfds_split(builder, 'cifar10', split)
  if _has_array_record(builder):  # Random access; no TensorFlow needed.
    return in_memory(builder.as_data_source(split=tfds_split), 'image', np.uint8)
  # tfrecord: one tf.data pass (imports TensorFlow, off the accelerators).
  import tensorflow_datasets as tfds

  from ibs import tf_setup

  tf_setup.import_tensorflow()

  chunks = list(tfds.as_numpy(builder.as_dataset(split=tfds_split).batch(4096)))
  return ArraySource(
    inputs=np.concatenate([c['image'] for c in chunks]).astype(np.uint8, copy=False),
    labels=np.concatenate([c['label'] for c in chunks]).astype(np.int32),
  )


def imagenet2012(split: str, data_dir: str | None) -> EncodedImageSource:
  """ImageNet's split ('test' = the 50,000 validation images) as JPEG bytes by index."""
  builder = prepared_builder('imagenet2012', data_dir)
  tfds_split = _tfds_split(builder, 'imagenet2012', split)
  if not _has_array_record(builder):
    raise DatasetNotPreparedError(
      f'imagenet2012 in {builder.data_dir} is prepared as '
      f'{builder.info.file_format.value if builder.info.file_format else "?"}; ibs reads '
      'ImageNet by random access (the data order is a function of the example index), '
      'which needs array_record files. Prepare it again (ibs.data.prepare writes '
      'array_record):\n'
      + _HOW_TO_PREPARE['imagenet2012'].format(where=builder.data_dir_root)
    )
  import tensorflow_datasets as tfds

  records = builder.as_data_source(
    split=tfds_split, decoders={'image': tfds.decode.SkipDecoding()}
  )
  return EncodedImageSource(records)
