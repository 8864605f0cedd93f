r"""Prepares CIFAR-10 or ImageNet as the array_record files ibs reads.

  python -m ibs.data.prepare cifar10 --data_dir=DIR [--manual_dir=DIR_WITH_ARCHIVE]
  python -m ibs.data.prepare imagenet2012 --data_dir=DIR --manual_dir=DIR_WITH_TARS

Runs TFDS's own dataset builders through their Python API (`download_and_prepare` with
`file_format='array_record'`), which needs no Apache Beam, so it works from the base
install (TFDS's command-line tool imports Beam to start at all).

* cifar10: downloads cifar-10-binary.tar.gz from www.cs.toronto.edu, or, offline, takes
  that archive from --manual_dir (its checksum is checked against TFDS's record).
* imagenet2012: ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from image-net.org
  in --manual_dir (ImageNet is never downloaded automatically).

--data_dir defaults to config.data_dir's default: $TFDS_DATA_DIR, else
~/tensorflow_datasets; train with --config.data_dir=DIR if it is elsewhere.
"""

from __future__ import annotations

import os
import socket

from absl import app, flags, logging

DATASETS = ('cifar10', 'imagenet2012')
CIFAR10_ARCHIVE = 'cifar-10-binary.tar.gz'
IMAGENET_TARS = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')
CIFAR10_HOST = 'www.cs.toronto.edu'
CIFAR10_URL = f'https://{CIFAR10_HOST}/~kriz/{CIFAR10_ARCHIVE}'


def _define_flags() -> None:
  """The command line's flags; defined only when run as a script."""
  flags.DEFINE_string(
    'data_dir',
    None,
    'TFDS data directory to write to (default $TFDS_DATA_DIR, '
    'else ~/tensorflow_datasets).',
  )
  flags.DEFINE_string(
    'manual_dir',
    None,
    f'Directory holding the downloaded archives: {CIFAR10_ARCHIVE} (cifar10, optional: '
    f'without it the archive is downloaded) or {" and ".join(IMAGENET_TARS)} '
    '(imagenet2012, required).',
  )


def reachable(host: str, port: int = 443, timeout_s: float = 5.0) -> bool:
  """Whether a TCP connection to `host` opens within `timeout_s` (name lookup included).

  Asked before a download: offline, TFDS retries for minutes before it fails, and its
  error never names --manual_dir.
  """
  try:
    with socket.create_connection((host, port), timeout=timeout_s):
      return True
  except OSError:
    return False


class PrepareError(RuntimeError):
  """A missing archive or directory; the message says what to put where."""


def _check_manual_dir(name: str, manual_dir: str | None) -> None:
  if name == 'imagenet2012':
    if not manual_dir:
      raise PrepareError(
        f'imagenet2012 needs --manual_dir=DIR holding {" and ".join(IMAGENET_TARS)} '
        '(download them from https://image-net.org after registering).'
      )
    missing = [
      t for t in IMAGENET_TARS if not os.path.exists(os.path.join(manual_dir, t))
    ]
    if missing:
      raise PrepareError(
        f'--manual_dir={manual_dir} lacks {" and ".join(missing)} (from '
        'https://image-net.org); put them there and rerun.'
      )
  elif manual_dir and not os.path.exists(os.path.join(manual_dir, CIFAR10_ARCHIVE)):
    raise PrepareError(
      f'--manual_dir={manual_dir} has no {CIFAR10_ARCHIVE}. Copy the archive from '
      f'{CIFAR10_URL} there, or leave out '
      '--manual_dir to download it.'
    )


def _check_download(name: str, manual_dir: str | None) -> None:
  """A download that cannot happen fails now, naming --manual_dir and the archive."""
  if name == 'cifar10' and not manual_dir and not reachable(CIFAR10_HOST):
    raise PrepareError(
      f'{CIFAR10_HOST} cannot be reached (offline?). Download {CIFAR10_URL} where '
      f'there is a network, and rerun with --manual_dir=DIR holding {CIFAR10_ARCHIVE}.'
    )


def prepare(name: str, data_dir: str | None = None, manual_dir: str | None = None) -> str:
  """Builds `name` as array_record files in `data_dir`; returns the dataset directory.

  Already prepared data is left as it is (TFDS skips a builder whose files exist).
  """
  from ibs import reporting
  from ibs.data import prepared

  if name not in DATASETS:
    raise PrepareError(f'Unknown dataset {name!r}; ibs prepares {list(DATASETS)}.')
  # `~` and `$VARS` too when called from Python (the command line expands its flags).
  manual_dir = reporting.expand_path(manual_dir) if manual_dir else manual_dir
  _check_manual_dir(name, manual_dir)
  data_dir = reporting.expand_path(prepared.data_dir_or_default(data_dir))
  if not os.path.isdir(os.path.join(data_dir, name)):
    # Nothing there to find prepared: ask before importing TFDS (and TensorFlow).
    _check_download(name, manual_dir)
  import tensorflow_datasets as tfds

  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    logging.info('%s is already prepared in %s.', name, builder.data_dir)
  else:
    _check_download(name, manual_dir)
    from tensorflow_datasets.core.download import download_manager

    try:
      builder.download_and_prepare(
        file_format='array_record',
        download_config=tfds.download.DownloadConfig(
          manual_dir=manual_dir,
          # The archive in manual_dir, or the dataset's own URL: never a GCS copy.
          try_download_gcs=False,
        ),
      )
    except download_manager.NonMatchingChecksumError as e:
      raise PrepareError(
        f'An archive for {name} is not the file TFDS knows (checksum differs): '
        f'{str(e).splitlines()[0]} Download it again.'
      ) from e
  if 'array_record' not in {f.value for f in builder.info.available_file_formats()}:
    raise PrepareError(
      f'{name} in {builder.data_dir} was prepared earlier in another file format '
      f'({builder.info.file_format}); ibs reads array_record. Move that directory '
      'away and run this command again.'
    )
  return os.fspath(builder.data_dir)


def main(argv):
  if len(argv) != 2 or argv[1] not in DATASETS:
    raise app.UsageError(
      f'Give one dataset: python -m ibs.data.prepare {"|".join(DATASETS)} --data_dir=DIR '
      '[--manual_dir=DIR]'
    )
  where = prepare(argv[1], flags.FLAGS.data_dir, flags.FLAGS.manual_dir)
  print(f'{argv[1]} is prepared in {where} (array_record).')


if __name__ == '__main__':
  from ibs import reporting

  _define_flags()
  # PrepareError and DatasetNotPreparedError: one line naming what to put where.
  reporting.run_command(main, lambda e: isinstance(e, PrepareError))
