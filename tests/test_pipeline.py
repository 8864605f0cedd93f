"""Input pipelines: order, resume, phase boundaries, shards, evaluation, datasets, errors.

Nothing here downloads: sockets are refused for every test, MNIST-1D is generated
offline, CIFAR-10 comes from `tfds.testing.mock_data` or from the real TFDS builder fed
fake local files, and ImageNet from the real TFDS builder fed a few generated JPEGs in
a fake manual directory.
"""

import dataclasses
import io
import json
import shutil
import socket
import tarfile
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from configs import default
from ibs.data import augment, catalog, order, pipeline

fast = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any attempt at a download fails at once instead of hanging in retries."""

  def refuse(*args, **kwargs):
    raise OSError('ibs tests never use the network')

  monkeypatch.setattr(socket.socket, 'connect', refuse)
  monkeypatch.setattr(socket, 'getaddrinfo', refuse)


def identity_source(n: int, image: bool = False) -> pipeline.ArraySource:
  """Example i has label i (and, as an image, a random uint8 32×32×3 picture)."""
  if image:
    inputs = np.random.default_rng(n).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
  else:
    inputs = np.arange(n, dtype=np.float32)[:, None]
  return pipeline.ArraySource(inputs=inputs, labels=np.arange(n, dtype=np.int32))


def with_positions(batch, positions, train):
  del train
  return {**batch, 'position': positions}


def read(source, preprocess, phases, *, seed=0, start=0, process_count=1):
  """Concatenated global batches of consecutive phases [(batch_size, steps), ...]."""
  batches = []
  for batch_size, steps in phases:
    shards = [
      list(
        pipeline.train_batches(
          source,
          preprocess,
          seed=seed,
          start_examples=start,
          batch_size=batch_size,
          num_steps=steps,
          process_index=p,
          process_count=process_count,
        )
      )
      for p in range(process_count)
    ]
    for step_shards in zip(*shards, strict=True):
      batches.append(
        {k: np.concatenate([s[k] for s in step_shards]) for k in step_shards[0]}
      )
    start += batch_size * steps
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


# Order, resume, phases, shards.


@fast
@given(
  n=st.integers(5, 300),
  batch_size=st.integers(1, 64),
  steps=st.integers(2, 12),
  cut=st.integers(1, 11),
  offset=st.integers(0, 1000),
)
def test_resume_anywhere_equals_the_uninterrupted_stream(
  n, batch_size, steps, cut, offset
):
  source = identity_source(n)
  cut = min(cut, steps - 1)
  whole = read(source, with_positions, [(batch_size, steps)], start=offset)
  first = read(source, with_positions, [(batch_size, cut)], start=offset)
  rest = read(
    source, with_positions, [(batch_size, steps - cut)], start=offset + cut * batch_size
  )
  for key in whole:
    np.testing.assert_array_equal(whole[key], np.concatenate([first[key], rest[key]]))
  np.testing.assert_array_equal(
    whole['position'], np.arange(offset, offset + steps * batch_size)
  )


@pytest.mark.parametrize('process_count', [1, 2])
def test_phase_boundary_neither_drops_nor_repeats(process_count):
  """Batch 128 → 640 mid-epoch (§5.1's factor 5): every epoch is each example once."""
  n = 1280
  phases = [(128, 15), (640, 6)]  # 1.5 epochs, then 3 more: 4.5 epochs in all
  stream = read(identity_source(n), with_positions, phases, process_count=process_count)
  labels = stream['label']
  np.testing.assert_array_equal(stream['position'], np.arange(len(labels)))
  for epoch in range(len(labels) // n):
    np.testing.assert_array_equal(
      np.sort(labels[epoch * n : (epoch + 1) * n]), np.arange(n)
    )


@fast
@given(
  per_process=st.integers(1, 16),
  process_count=st.integers(2, 4),
  start=st.integers(0, 500),
)
def test_process_shards_partition_each_global_batch(per_process, process_count, start):
  source = identity_source(97, image=True)
  preprocess = augment.cifar10(seed=3)
  batch_size = per_process * process_count
  one = read(source, preprocess, [(batch_size, 3)], start=start)
  many = read(
    source, preprocess, [(batch_size, 3)], start=start, process_count=process_count
  )
  for key in one:
    np.testing.assert_array_equal(one[key], many[key])


def test_stream_is_deterministic_for_a_seed(mnist1d_config):
  spec = catalog.dataset_spec(mnist1d_config)
  source = pipeline.load_source(mnist1d_config, spec, 'train')
  preprocess = pipeline.preprocess_fn(mnist1d_config, spec)
  a = read(source, preprocess, [(32, 40)], seed=5)
  b = read(source, preprocess, [(32, 40)], seed=5)
  c = read(source, preprocess, [(32, 40)], seed=6)
  np.testing.assert_array_equal(a['input'], b['input'])
  assert (a['label'] != c['label']).mean() > 0.5


def test_steps_and_arguments_are_checked_up_front():
  source = identity_source(10)
  assert (
    list(
      pipeline.train_batches(
        source, augment.cast, seed=0, start_examples=0, batch_size=4, num_steps=0
      )
    )
    == []
  )
  for kwargs, match in [
    (dict(batch_size=6, process_count=4), 'not divisible by the 4 processes'),
    (dict(batch_size=8, process_index=2, process_count=2), r'not in \[0, 2\)'),
    (dict(batch_size=4, start_examples=-4), 'must be >= 0'),
    (dict(batch_size=4, num_steps=-1), 'must be >= 0'),
    (dict(batch_size=4, seed=-1), r'seed=-1 \(config.data_seed\)'),
  ]:
    arguments = {**dict(seed=0, start_examples=0, num_steps=1), **kwargs}
    with pytest.raises(ValueError, match=match):
      pipeline.train_batches(source, augment.cast, **arguments)
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    pipeline.eval_batches(source, augment.cast, batch_size=4, process_count=3)


# Evaluation.


@pytest.mark.parametrize(
  ('n', 'batch_size', 'process_count'),
  [(10, 4, 1), (10, 4, 2), (12, 6, 3), (7, 16, 4), (500, 128, 2), (9, 3, 3)],
)
def test_evaluation_counts_each_example_once(n, batch_size, process_count):
  source = identity_source(n, image=True)
  preprocess = augment.cifar10(seed=0)
  per_process = [
    list(
      pipeline.eval_batches(
        source,
        preprocess,
        batch_size=batch_size,
        process_index=p,
        process_count=process_count,
      )
    )
    for p in range(process_count)
  ]
  counts = np.zeros(n)
  for step_shards in zip(*per_process, strict=True):
    for shard in step_shards:
      assert shard['input'].shape == (batch_size // process_count, 32, 32, 3)
      np.add.at(counts, shard['label'], shard['mask'])
  np.testing.assert_array_equal(counts, np.ones(n))
  # Evaluation is deterministic: normalisation only, no crop or flip.
  batch = per_process[0][0]
  expected = (source.inputs[batch['label']] - augment.CIFAR10_MEAN) / augment.CIFAR10_STD
  np.testing.assert_allclose(batch['input'], expected, rtol=1e-6, atol=1e-5)


# Augmentation.


def test_cifar_augmentation_is_keyed_by_position_only():
  """Same position → same crop and flip, whatever the batch size or process count."""
  source = identity_source(50, image=True)
  preprocess = augment.cifar10(seed=11)
  reference = read(source, preprocess, [(8, 25)])
  for phases, process_count in [([(40, 5)], 1), ([(20, 2), (40, 4)], 4), ([(2, 100)], 2)]:
    other = read(source, preprocess, phases, process_count=process_count)
    np.testing.assert_array_equal(reference['input'], other['input'])
  reseeded = read(source, augment.cifar10(seed=12), [(8, 25)])
  assert not np.array_equal(reference['input'], reseeded['input'])


def test_cifar_crops_are_flipped_windows_of_the_padded_image():
  source = identity_source(64, image=True)
  positions = np.arange(1000, 1064)
  out = augment.cifar10(seed=0)(source.get(np.arange(64)), positions, True)['input']
  normalised = (source.inputs - augment.CIFAR10_MEAN) / augment.CIFAR10_STD
  padded = np.pad(normalised, ((0, 0), (4, 4), (4, 4), (0, 0)))
  seen = set()
  for i in range(64):
    matches = [
      (dy, dx, flip)
      for dy in range(9)
      for dx in range(9)
      for flip in (False, True)
      if np.allclose(
        out[i], padded[i, dy : dy + 32, dx : dx + 32][:, :: -1 if flip else 1], atol=1e-5
      )
    ]
    assert len(matches) == 1
    seen.add(matches[0])
  assert len({flip for _, _, flip in seen}) == 2 and len(seen) > 30


def test_cifar_augmentation_covers_every_offset_and_flip():
  u = np.random.default_rng(0).random((4000, 3))
  padded = np.broadcast_to(np.arange(100.0).reshape(1, 10, 10, 1), (4000, 10, 10, 1))
  out = augment.crop_and_flip(padded, u, (2, 2))  # value 10·y + x reveals the window
  assert out.shape == (4000, 2, 2, 1)
  flipped = out[:, 0, 0, 0] > out[:, 0, 1, 0]
  corners = np.where(flipped, out[:, 0, 1, 0], out[:, 0, 0, 0])
  assert 0.45 < flipped.mean() < 0.55
  # A 2×2 crop of a 10×10 padded image: all 81 offsets occur, about equally often.
  counts = np.bincount(corners.astype(int), minlength=100).reshape(10, 10)
  assert counts[9].sum() == counts[:, 9].sum() == 0 and counts[:9, :9].min() > 20


# Datasets.


@pytest.fixture
def mnist1d_config(data_dir):
  config = default.get_config()
  config.data_dir = data_dir
  config.mnist1d.num_train, config.mnist1d.num_test = 1000, 200
  return config


def test_mnist1d_is_generated_offline_once(mnist1d_config):
  from ibs.data import mnist1d

  spec = catalog.dataset_spec(mnist1d_config)
  train = pipeline.load_source(mnist1d_config, spec, 'train')
  with mock.patch.object(mnist1d, 'generate', side_effect=AssertionError('generated')):
    test = pipeline.load_source(mnist1d_config, spec, 'test')  # read, not generated
  assert train.inputs.shape == (1000, 40) and test.inputs.shape == (200, 40)
  assert set(np.unique(train.labels)) == set(range(10))
  batch = pipeline.preprocess_fn(mnist1d_config, spec)(
    train.get(np.arange(4)), np.arange(4), True
  )
  np.testing.assert_array_equal(batch['input'], train.inputs[:4])
  assert batch['input'].dtype == np.float32


@pytest.mark.parametrize('shape', [(40,), (32, 32, 3), (224, 224, 3)])
def test_fake_source_is_a_pure_function_of_split_and_index(shape):
  config = default.get_config()
  config.dataset = 'fake'
  config.fake.shape = shape
  config.fake.num_classes = 1000 if len(shape) == 3 else 10
  spec = catalog.dataset_spec(config)
  train = pipeline.load_source(config, spec, 'train')
  test = pipeline.load_source(config, spec, 'test')
  assert len(train) == config.fake.num_train and len(test) == config.fake.num_test
  both = train.get(np.array([7, 3]))
  assert both['input'].shape == (2, *shape) and both['input'].dtype == np.float32
  np.testing.assert_array_equal(both['input'][1], train.get(np.array([3]))['input'][0])
  assert not np.array_equal(both['input'][1], test.get(np.array([3]))['input'][0])
  assert both['label'].dtype == np.int32


def test_fake_source_is_learnable():
  """Examples of a class are closer to their class mean than to another's."""
  source = pipeline.FakeSource(2000, (16, 16, 3), 4, 0)
  batch = source.get(np.arange(2000))
  x = batch['input'].reshape(2000, -1)
  means = np.stack([x[batch['label'] == c].mean(0) for c in range(4)])
  nearest = np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), axis=1)
  assert (nearest == batch['label']).mean() > 0.95


@pytest.mark.parametrize('name', ['cifar10', 'imagenet2012'])
def test_unprepared_catalog_dataset_fails_fast_without_download(name, tmp_path):
  config = default.get_config()
  config.dataset = name
  config.data_dir = str(tmp_path)
  with pytest.raises(
    pipeline.DatasetNotPreparedError, match=f'python -m ibs.data.prepare {name}'
  ):
    pipeline.load_source(config, catalog.dataset_spec(config), 'train')
  assert list(tmp_path.iterdir()) == []  # nothing written either


def test_bad_dataset_and_split_are_explained():
  config = default.get_config()
  spec = catalog.dataset_spec(config)  # of mnist1d
  config.dataset = 'mnist'
  with pytest.raises(ValueError, match="Unknown config.dataset='mnist'"):
    catalog.dataset_spec(config)
  # The loaders are given a resolved spec; they still refuse a name they do not know.
  with pytest.raises(ValueError, match="Unknown config.dataset='mnist'"):
    pipeline.load_source(config, spec, 'train')
  with pytest.raises(ValueError, match="Unknown config.dataset='mnist'"):
    pipeline.preprocess_fn(config, spec)
  config.dataset = 'fake'
  with pytest.raises(ValueError, match="Unknown split 'validation'"):
    pipeline.load_source(config, catalog.dataset_spec(config), 'validation')


def test_preprocessing_dispatches_per_dataset():
  config = default.get_config()
  for name, train_changes_input in [
    ('mnist1d', False),
    ('fake', False),
    ('cifar10', True),
  ]:
    config.dataset = name
    preprocess = pipeline.preprocess_fn(config, catalog.dataset_spec(config))
    images = identity_source(8, image=True).get(np.arange(8))
    train = preprocess(images, np.arange(8), True)['input']
    test = preprocess(images, np.arange(8), False)['input']
    assert train.dtype == np.float32
    assert (not np.array_equal(train, test)) == train_changes_input


# CIFAR-10 through TFDS.


def small_catalog(monkeypatch, name, num_train, num_test):
  spec = catalog.CATALOG[name]
  monkeypatch.setitem(
    catalog.CATALOG,
    name,
    dataclasses.replace(spec, num_train_examples=num_train, num_test_examples=num_test),
  )


def test_cifar10_with_tfds_mock_data(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  # The only file ibs looks for before asking TFDS; mock_data supplies the rest.
  (tmp_path / 'cifar10' / '3.0.2').mkdir(parents=True)
  (tmp_path / 'cifar10' / '3.0.2' / 'dataset_info.json').write_text('{}')
  small_catalog(monkeypatch, 'cifar10', 24, 24)
  config = default.get_config()
  config.dataset, config.data_dir = 'cifar10', str(tmp_path)
  spec = catalog.dataset_spec(config)
  with tfds.testing.mock_data(num_examples=24, policy=tfds.testing.MockPolicy.USE_CODE):
    train = pipeline.load_source(config, spec, 'train')
  assert train.inputs.shape == (24, 32, 32, 3) and train.inputs.dtype == np.uint8
  assert train.labels.dtype == np.int32 and train.labels.max() < 10
  batch = next(
    pipeline.train_batches(
      train,
      pipeline.preprocess_fn(config, spec),
      seed=0,
      start_examples=0,
      batch_size=8,
      num_steps=1,
    )
  )
  assert batch['input'].shape == (8, 32, 32, 3) and batch['input'].dtype == np.float32


def write_cifar_binaries(root, num_per_file):
  """The files of cifar-10-binary.tar.gz, extracted, with random pictures."""
  folder = root / 'cifar-10-batches-bin'
  folder.mkdir(parents=True)
  rng = np.random.default_rng(0)
  names = [f'data_batch_{i}.bin' for i in range(1, 6)] + ['test_batch.bin']
  for name in names:
    labels = rng.integers(0, 10, (num_per_file, 1), dtype=np.uint8)
    pixels = rng.integers(0, 256, (num_per_file, 3072), dtype=np.uint8)
    (folder / name).write_bytes(np.concatenate([labels, pixels], axis=1).tobytes())
  (folder / 'batches.meta.txt').write_text('\n'.join(f'class{i}' for i in range(10)))


def test_cifar10_prepared_as_array_record_is_read_without_tensorflow_data(
  tmp_path, monkeypatch
):
  """The real TFDS CIFAR-10 builder, fed local files; read back via tfds.data_source."""
  import tensorflow_datasets as tfds

  write_cifar_binaries(tmp_path / 'extracted', num_per_file=6)

  def local_files(self, url):
    assert url.endswith('cifar-10-binary.tar.gz')
    return str(tmp_path / 'extracted')

  with mock.patch.object(
    tfds.download.DownloadManager, 'download_and_extract', local_files
  ):
    tfds.builder('cifar10', data_dir=str(tmp_path / 'tfds')).download_and_prepare(
      file_format='array_record'
    )
  small_catalog(monkeypatch, 'cifar10', 30, 6)
  config = default.get_config()
  config.dataset, config.data_dir = 'cifar10', str(tmp_path / 'tfds')
  spec = catalog.dataset_spec(config)
  train = pipeline.load_source(config, spec, 'train')
  test = pipeline.load_source(config, spec, 'test')
  assert train.inputs.shape == (30, 32, 32, 3) and test.inputs.shape == (6, 32, 32, 3)
  raw = np.frombuffer(
    (tmp_path / 'extracted/cifar-10-batches-bin/test_batch.bin').read_bytes(), np.uint8
  ).reshape(6, 3073)
  # TFDS stores the examples shuffled: match them by their pixels.
  label_of = {
    image.tobytes(): label
    for label, image in zip(
      raw[:, 0], raw[:, 1:].reshape(6, 3, 32, 32).transpose(0, 2, 3, 1), strict=True
    )
  }
  assert [label_of[image.tobytes()] for image in test.inputs] == test.labels.tolist()
  assert len({image.tobytes() for image in test.inputs}) == 6


# ImageNet through TFDS (array_record, JPEGs decoded per batch).


def jpeg(rng, height, width):
  from PIL import Image

  # Smooth content, so that JPEG and reduced-size decoding stay close to the pixels.
  y, x = np.mgrid[0:height, 0:width]
  phase = rng.uniform(0, 6, 3)
  image = 127 + 100 * np.sin(x[..., None] / 23 + y[..., None] / 37 + phase)
  buffer = io.BytesIO()
  Image.fromarray(image.astype(np.uint8)).save(buffer, 'JPEG', quality=95)
  return buffer.getvalue()


def add_to_tar(tar, name, data):
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
  """The real TFDS imagenet2012 builder on a fake manual directory: 8 train, 4 val."""
  import tensorflow_datasets as tfds

  root = tmp_path_factory.mktemp('imagenet')
  manual = root / 'manual'
  manual.mkdir()
  rng = np.random.default_rng(0)
  with tarfile.open(manual / 'ILSVRC2012_img_train.tar', 'w') as train_tar:
    for synset in ['n01440764', 'n01443537']:
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode='w') as class_tar:
        for i in range(4):
          size = rng.integers(60, 300, 2)
          add_to_tar(class_tar, f'{synset}_{i}.JPEG', jpeg(rng, *size))
      add_to_tar(train_tar, f'{synset}.tar', inner.getvalue())
  with tarfile.open(manual / 'ILSVRC2012_img_val.tar', 'w') as val_tar:
    for i in range(1, 5):
      add_to_tar(val_tar, f'ILSVRC2012_val_{i:08d}.JPEG', jpeg(rng, 90, 120))
  tfds.builder('imagenet2012', data_dir=str(root / 'tfds')).download_and_prepare(
    file_format='array_record',
    download_config=tfds.download.DownloadConfig(manual_dir=str(manual)),
  )
  return root / 'tfds'


@pytest.fixture
def imagenet_config(imagenet_dir, monkeypatch):
  small_catalog(monkeypatch, 'imagenet2012', 8, 4)
  config = default.get_config()
  config.dataset, config.data_dir = 'imagenet2012', str(imagenet_dir)
  config.image_size = 48
  return config


def test_imagenet_is_decoded_cropped_and_normalised(imagenet_config):
  spec = catalog.dataset_spec(imagenet_config)
  train = pipeline.load_source(imagenet_config, spec, 'train')
  test = pipeline.load_source(imagenet_config, spec, 'test')  # TFDS 'validation'
  assert (len(train), len(test)) == (8, 4)
  preprocess = pipeline.preprocess_fn(imagenet_config, spec)
  stream = read(train, preprocess, [(4, 6)])
  assert stream['input'].shape == (24, 48, 48, 3) and stream['input'].dtype == np.float32
  assert set(np.unique(stream['label'])) == {0, 1}  # the two synsets' class indices
  assert -2.5 < stream['input'].mean() < 2.5 and 0.1 < stream['input'].std() < 3
  # Crops are keyed by position: other batch sizes and process counts agree.
  np.testing.assert_array_equal(
    stream['input'], read(train, preprocess, [(8, 1), (16, 1)], process_count=2)['input']
  )
  # Each epoch sees every image, each position a different crop of it.
  assert not np.array_equal(stream['input'][:8], stream['input'][8:16])
  indices = order.example_indices(0, np.arange(24), 8)
  for p in range(8):
    later = 8 + np.flatnonzero(indices[8:16] == indices[p])[0]
    assert not np.allclose(stream['input'][p], stream['input'][later], atol=0.1)
  evaluation = list(pipeline.eval_batches(test, preprocess, batch_size=8))
  assert len(evaluation) == 1 and evaluation[0]['mask'].tolist() == [1] * 4 + [0] * 4
  again = list(pipeline.eval_batches(test, preprocess, batch_size=8))
  np.testing.assert_array_equal(evaluation[0]['input'], again[0]['input'])


def test_imagenet_prepared_as_tfrecord_is_refused(
  imagenet_config, imagenet_dir, tmp_path
):
  """Only the metadata is needed to decide: copy it and mark the files as tfrecord."""
  version = imagenet_dir / 'imagenet2012' / '5.1.0'
  copy = tmp_path / 'imagenet2012' / '5.1.0'
  copy.mkdir(parents=True)
  for path in version.iterdir():
    if not path.name.startswith('imagenet2012-'):
      shutil.copy(path, copy)
  info = json.loads((copy / 'dataset_info.json').read_text())
  info['fileFormat'] = 'tfrecord'
  (copy / 'dataset_info.json').write_text(json.dumps(info))
  imagenet_config.data_dir = str(tmp_path)
  spec = catalog.dataset_spec(imagenet_config)
  with pytest.raises(pipeline.DatasetNotPreparedError, match='array_record'):
    pipeline.load_source(imagenet_config, spec, 'train')
  # A prepared dataset without the split ibs needs says so.
  info['fileFormat'] = 'array_record'
  info['splits'] = [s for s in info['splits'] if s['name'] != 'validation']
  (copy / 'dataset_info.json').write_text(json.dumps(info))
  with pytest.raises(pipeline.DatasetNotPreparedError, match="not 'validation'"):
    pipeline.load_source(imagenet_config, spec, 'test')


@fast
@given(
  height=st.integers(1, 2000),
  width=st.integers(1, 2000),
  u=st.lists(
    st.floats(0, 1, exclude_max=True),
    min_size=4 * augment.CROP_ATTEMPTS,
    max_size=4 * augment.CROP_ATTEMPTS,
  ),
)
def test_inception_crop_stays_inside_the_image(height, width, u):
  top, left, crop_h, crop_w = augment.inception_crop(height, width, np.array(u))
  assert top >= 0 and top + crop_h <= height and crop_h >= 1
  assert left >= 0 and left + crop_w <= width and crop_w >= 1


def test_reduced_size_decoding_matches_full_decoding():
  """`draft` decodes at 1/2–1/8 scale; the crop must still land on the same pixels."""
  from PIL import Image

  encoded = jpeg(np.random.default_rng(1), 900, 1200)
  full = np.asarray(Image.open(io.BytesIO(encoded)).convert('RGB'), np.float32)
  u = np.full(4 * augment.CROP_ATTEMPTS + 1, 0.3)
  top, left, crop_h, crop_w = augment.inception_crop(900, 1200, u)
  fast_crop = augment.decode_crop_resize(encoded, u, image_size=64, train=True)
  slow_crop = Image.fromarray(
    full[top : top + crop_h, left : left + crop_w].astype(np.uint8)
  )
  slow_crop = np.asarray(
    slow_crop.resize((64, 64), Image.Resampling.BILINEAR), np.float32
  )
  assert np.abs(fast_crop - slow_crop).mean() < 4  # of 255
  centre = augment.decode_crop_resize(encoded, u, image_size=64, train=False)
  top, left, side, _ = augment.center_crop(900, 1200, 64)
  slow_centre = Image.fromarray(
    full[top : top + side, left : left + side].astype(np.uint8)
  )
  slow_centre = np.asarray(slow_centre.resize((64, 64), Image.Resampling.BILINEAR))
  assert np.abs(centre - slow_centre.astype(np.float32)).mean() < 4
