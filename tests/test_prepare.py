"""ibs.data.prepare: the real TFDS builders, offline, on fake archives; ibs reads them."""

import dataclasses
import io
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from configs import default
from ibs.data import catalog, pipeline, prepare
from tests.test_pipeline import add_to_tar, jpeg

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_catalog(monkeypatch, name, num_train, num_test):
  spec = catalog.CATALOG[name]
  monkeypatch.setitem(
    catalog.CATALOG,
    name,
    dataclasses.replace(spec, num_train_examples=num_train, num_test_examples=num_test),
  )


@pytest.fixture
def offline(monkeypatch):
  """No download can happen; a manual archive's checksum (fake here) is not checked."""
  import tensorflow_datasets as tfds

  def no_download(self, resource):
    raise AssertionError(f'tried to download {resource}')

  monkeypatch.setattr(tfds.download.DownloadManager, '_download', no_download)
  monkeypatch.setattr(
    tfds.download.DownloadManager, '_register_or_validate_checksums', lambda *a, **k: None
  )


def write_cifar_archive(path, num_per_file):
  """cifar-10-binary.tar.gz in the real layout: 5 train batches + test, 3073 B records."""
  rng = np.random.default_rng(0)
  with tarfile.open(path, 'w:gz') as tar:
    names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
    for name in names:
      labels = rng.integers(0, 10, (num_per_file, 1), dtype=np.uint8)
      pixels = rng.integers(0, 256, (num_per_file, 3072), dtype=np.uint8)
      data = np.concatenate([labels, pixels], axis=1).tobytes()
      add_to_tar(tar, f'cifar-10-batches-bin/{name}', data)
    meta = '\n'.join(f'class{i}' for i in range(10)).encode()
    add_to_tar(tar, 'cifar-10-batches-bin/batches.meta.txt', meta)


def test_cifar10_from_a_local_archive(tmp_path, monkeypatch, offline):
  manual = tmp_path / 'manual'
  manual.mkdir()
  write_cifar_archive(manual / prepare.CIFAR10_ARCHIVE, num_per_file=4)
  where = prepare.prepare('cifar10', str(tmp_path / 'tfds'), str(manual))
  assert os.path.exists(os.path.join(where, 'dataset_info.json'))
  assert any(name.endswith('.array_record-00000-of-00001') for name in os.listdir(where))
  # Preparing again is a no-op.
  assert prepare.prepare('cifar10', str(tmp_path / 'tfds'), str(manual)) == where

  small_catalog(monkeypatch, 'cifar10', 20, 4)
  config = default.get_config()
  config.dataset, config.data_dir = 'cifar10', str(tmp_path / 'tfds')
  spec = catalog.dataset_spec(config)
  train = pipeline.load_source(config, spec, 'train')
  test = pipeline.load_source(config, spec, 'test')
  assert train.inputs.shape == (20, 32, 32, 3) and test.inputs.shape == (4, 32, 32, 3)
  assert train.labels.dtype == np.int32 and train.labels.max() < 10


def test_imagenet_from_manual_tars(tmp_path, monkeypatch, offline):
  manual = tmp_path / 'manual'
  manual.mkdir()
  rng = np.random.default_rng(1)
  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as train_tar:
    for synset in ['n01440764', 'n01443537', 'n01484850']:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(2):
          add_to_tar(class_tar, f'{synset}_{i}.JPEG', jpeg(rng, 64, 80))
      add_to_tar(train_tar, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as val_tar:
    for i in range(1, 4):
      add_to_tar(val_tar, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(rng, 70, 60))
  prepare.prepare('imagenet2012', str(tmp_path / 'tfds'), str(manual))

  small_catalog(monkeypatch, 'imagenet2012', 6, 3)
  config = default.get_config()
  config.dataset, config.data_dir = 'imagenet2012', str(tmp_path / 'tfds')
  config.image_size = 32
  spec = catalog.dataset_spec(config)
  train = pipeline.load_source(config, spec, 'train')
  assert len(train) == 6 and len(pipeline.load_source(config, spec, 'test')) == 3
  batch = pipeline.preprocess_fn(config, spec)(
    train.get(np.arange(6)), np.arange(6), True
  )
  assert batch['input'].shape == (6, 32, 32, 3)
  assert set(batch['label'].tolist()) == {0, 1, 2}


def test_missing_archives_are_one_line_errors(tmp_path):
  """The command line: exit status 2, one line naming what to put where, no traceback."""
  result = subprocess.run(
    [sys.executable, '-m', 'ibs.data.prepare', 'imagenet2012', f'--data_dir={tmp_path}']
    + [f'--manual_dir={tmp_path}'],
    capture_output=True,
    text=True,
    cwd=REPO,
    timeout=120,
  )
  assert result.returncode == 2
  assert 'Traceback' not in result.stderr
  assert 'ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar' in result.stderr
  with pytest.raises(prepare.PrepareError, match='cifar-10-binary.tar.gz'):
    prepare.prepare('cifar10', str(tmp_path), str(tmp_path))
  assert os.listdir(tmp_path) == []


def test_offline_without_manual_dir_fails_at_once_and_writes_nothing(
  tmp_path, monkeypatch, offline
):
  """The connectivity check is mocked (tests never reach a download): offline, the
  error names --manual_dir and the archive, before TFDS's minutes of retries; `~` in the
  data directory is the home directory, and neither it nor the working directory gets a
  file."""
  home, cwd = tmp_path / 'home', tmp_path / 'cwd'
  home.mkdir()
  cwd.mkdir()
  monkeypatch.setenv('HOME', str(home))
  monkeypatch.chdir(cwd)
  asked = []
  monkeypatch.setattr(prepare, 'reachable', lambda host: asked.append(host) or False)
  with pytest.raises(prepare.PrepareError) as raised:
    prepare.prepare('cifar10', '~/x')
  assert asked == ['www.cs.toronto.edu']
  message = str(raised.value)
  assert '--manual_dir=DIR holding cifar-10-binary.tar.gz' in message
  assert '\n' not in message
  assert os.listdir(cwd) == [] and os.listdir(home) == []
