r"""Input-pipeline throughput beside the train step's consumption, on this machine.

For each workload and batch size it measures, in examples per second:
  pipeline  `ibs.data.pipeline.train_batches` alone (order, gather, augmentation,
            prefetch);
  step      the compiled train step fed one fixed host batch (`train_step(state,
            [batch], metrics)`, which includes its host → device layout);
  loop      both together, one step per dispatch (ibs.train can dispatch several
            steps at once, config.steps_per_dispatch: see experiments/bench_step.py).
The pipeline should deliver at least twice what the step consumes, so that it never
stalls training. Each repetition times the three back to back; the table gives the
median and (min–max) over repetitions, so load from other processes shows as spread.
Workloads:
  mnist1d   the default config (MNIST-1D, 20,000 examples; the cnn1d step) at the four
            batch sizes of its schedule;
  cifar     CIFAR-10-shaped uint8 images in memory (50,000 × 32×32×3, what the cifar10
            source holds) through the CIFAR-10 training augmentation; the step of the
            CPU smoke model of configs/cifar10_wrn.py:data=fake (WRN-10-1), in one
            micro-batch, at §5.1's batch sizes 128 and 640;
  imagenet  pipeline only: synthetic 500×375 JPEGs through the ImageNet decode, crop and
            resize to 224 (no ImageNet-sized step runs on a CPU);
  fake224   pipeline only: the `fake` source at 224×224×3 (smoke runs).

  python -m experiments.bench_input                  # all: ~20 min on 2 busy CPU cores
  python -m experiments.bench_input --workloads=cifar --seconds=5 --repetitions=5
  python -m experiments.bench_input --workloads=mnist1d --gns=off
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax
import numpy as np

from configs import cifar10_wrn, default
from ibs import setup
from ibs.data import augment, catalog, pipeline

WORKLOADS = ('mnist1d', 'cifar', 'imagenet', 'fake224')
ARGS = argparse.Namespace(seconds=3.0, repetitions=3, gns='on')


def examples_per_second(batches, batch_size: int, finish=lambda: None) -> float:
  """Pulls batches for at least --seconds and 3 batches, after two warm-up batches."""
  for _ in range(2):
    next(batches)
  finish()
  start, count = time.perf_counter(), 0
  while time.perf_counter() - start < ARGS.seconds or count < 3:
    next(batches)
    count += 1
  finish()
  return count * batch_size / (time.perf_counter() - start)


def summary(rates: list[float]) -> str:
  """Median (min–max) over the repetitions: load from other processes shows as spread."""
  if len(rates) == 1:
    return f'{rates[0]:,.0f}'
  return f'{statistics.median(rates):,.0f} ({min(rates):,.0f}–{max(rates):,.0f})'


def stream(source, preprocess, batch_size: int, num_steps: int = 10**6):
  """The training stream from position 0 (data seed 0), one process."""
  return pipeline.train_batches(
    source,
    preprocess,
    seed=0,
    start_examples=0,
    batch_size=batch_size,
    num_steps=num_steps,
  )


def pipeline_rate(source, preprocess, batch_size: int) -> float:
  return examples_per_second(stream(source, preprocess, batch_size), batch_size)


def step_measurers(config, source, preprocess, batch_size: int):
  """Two callables timing (step alone, pipeline + step) in examples/s at `batch_size`:
  the training step of `config`'s run, built as training builds it (`ibs.setup.build`,
  BENCH mode), fed this workload's batches."""
  config.gns.enabled = ARGS.gns == 'on'
  config.steps_per_dispatch = 1  # one step per dispatch (see the module docstring)
  built = setup.build(config, None, setup.Mode.BENCH, batch_sizes=[batch_size])
  step = built.steps[batch_size]
  local = next(stream(source, preprocess, batch_size, num_steps=1))
  holder = {'state': built.state, 'metrics': built.metrics}

  def run(batches):
    for host_batch in batches:
      holder['state'], holder['metrics'] = step(
        holder['state'], [host_batch], holder['metrics']
      )
      yield

  def finish():
    jax.block_until_ready(holder['state'])

  def repeat():
    while True:
      yield local

  def alone():
    return examples_per_second(run(repeat()), batch_size, finish)

  def fed():
    return examples_per_second(
      run(stream(source, preprocess, batch_size)), batch_size, finish
    )

  return alone, fed


def measure(label: str, batch_size: int, source, preprocess, config=None) -> None:
  """One table row; the three measurements interleave within each repetition."""
  measurers = {'pipeline': lambda: pipeline_rate(source, preprocess, batch_size)}
  if config is not None:
    measurers['step'], measurers['loop'] = step_measurers(
      config, source, preprocess, batch_size
    )
  rates = {name: [] for name in measurers}
  for _ in range(ARGS.repetitions):
    for name, measurer in measurers.items():
      rates[name].append(measurer())
  row = f'| {label} | {batch_size} | {summary(rates["pipeline"])} |'
  if config is None:
    row += ' – | – | – |'
  else:
    ratio = statistics.median(rates['pipeline']) / statistics.median(rates['step'])
    row += f' {summary(rates["step"])} | {ratio:,.1f}× | {summary(rates["loop"])} |'
  print(row, flush=True)


def bench_mnist1d(data_dir: str) -> None:
  config = default.get_config()
  config.data_dir = data_dir
  spec = catalog.dataset_spec(config)
  source = pipeline.load_source(config, spec, 'train')
  preprocess = pipeline.preprocess_fn(config, spec)
  for batch_size in (32, 160, 800, 4000):  # the default schedule's four phases
    measure('MNIST-1D / cnn1d', batch_size, source, preprocess, config)


def bench_cifar(data_dir: str) -> None:
  del data_dir
  rng = np.random.default_rng(0)
  source = pipeline.ArraySource(
    inputs=rng.integers(0, 256, (50_000, 32, 32, 3), dtype=np.uint8),
    labels=rng.integers(0, 10, 50_000).astype(np.int32),
  )
  preprocess = augment.cifar10(seed=0)  # the cifar10 dataset's training preprocessing
  for batch_size in (128, 640):  # §5.1's first two phases
    config = cifar10_wrn.get_config('data=fake')
    # One micro-batch: on XLA:CPU a convolutional model accumulates in a host loop
    # (ibs/step.py), A + 1 dispatches, which would measure the loop, not the model.
    config.max_micro_batch_size = batch_size
    measure('CIFAR-10 augmentation / WRN-10-1', batch_size, source, preprocess, config)


class _JpegList:
  """A list of encoded JPEGs with the `__getitems__` of a TFDS data source."""

  def __init__(self, images, labels):
    self.images, self.labels = images, labels

  def __len__(self):
    return len(self.images)

  def __getitems__(self, keys):
    return [{'image': self.images[k], 'label': self.labels[k]} for k in keys]


def bench_imagenet(data_dir: str) -> None:
  del data_dir
  from PIL import Image

  rng = np.random.default_rng(0)
  images = []
  for _ in range(64):  # smooth content plus noise compresses roughly like a photograph
    y, x = np.mgrid[0:375, 0:500]
    image = 127 + 60 * np.sin(x[..., None] / rng.uniform(5, 40, 3) + y[..., None] / 17)
    image += rng.normal(0, 20, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
      buffer, 'JPEG', quality=90
    )
    images.append(buffer.getvalue())
  source = pipeline.EncodedImageSource(_JpegList(images, np.arange(64) % 1000))
  for batch_size in (64, 256):
    measure(
      f'ImageNet 500×375 JPEG → 224 crop ({os.cpu_count()} threads)',
      batch_size,
      source,
      augment.imagenet(seed=0, image_size=224),
    )


def bench_fake224(data_dir: str) -> None:
  del data_dir
  source = pipeline.FakeSource(100_000, (224, 224, 3), 1000, 0)
  for batch_size in (64, 256):
    measure('fake 224×224×3', batch_size, source, augment.cast)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workloads', default=','.join(WORKLOADS))
  parser.add_argument('--seconds', type=float, default=3.0, help='per measurement')
  parser.add_argument('--repetitions', type=int, default=3)
  parser.add_argument(
    '--gns',
    choices=('on', 'off'),
    default='on',
    help='measure the gradient noise scale in the step (config.gns.enabled)',
  )
  parser.add_argument(
    '--data_dir', default='/tmp/ibs_bench_tfds', help='where MNIST-1D is generated, once'
  )
  args = parser.parse_args()
  unknown = set(args.workloads.split(',')) - set(WORKLOADS)
  if unknown:
    parser.error(
      f'unknown --workloads {sorted(unknown)}; choose from {",".join(WORKLOADS)}'
    )
  ARGS.seconds, ARGS.repetitions, ARGS.gns = args.seconds, args.repetitions, args.gns
  print(
    f'{jax.device_count()} {jax.devices()[0].platform} device(s), {os.cpu_count()} CPU '
    f'cores; examples/s, median (min–max) of {args.repetitions} × >= {args.seconds:g} s; '
    f'noise scale {args.gns}.\n'
  )
  print('| workload / step | batch | pipeline | step | pipeline ÷ step | loop |')
  print('|---|---:|---:|---:|---:|---:|')
  for workload in args.workloads.split(','):
    globals()[f'bench_{workload}'](args.data_dir)


if __name__ == '__main__':
  main()
