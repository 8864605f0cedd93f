"""Per-dataset preprocessing: (batch, positions, train) → {'input': float32, 'label'}.

Every random choice of position s comes from `order.position_uniform(seed, s)`, so
an example's augmentation is the same whatever the batch size, the number of processes
or a restart (docs/DESIGN.md decision 5). Evaluation is deterministic.

CIFAR-10 (the WRN recipe of Zagoruyko & Komodakis, used in the paper's §5.1): per-channel
normalisation, then a random 32×32 crop of the image padded by 4 pixels (zeros after
normalisation, i.e. the dataset mean) and a horizontal flip; evaluation normalises only.

ImageNet (Szegedy et al.'s "Inception" crop, as in the flax ImageNet example): a random
crop of 8–100% of the area with aspect ratio in [3/4, 4/3], resized to the model's size,
and a flip; evaluation resizes and takes the central image_size/(image_size + 32) crop.
JPEG decoding and resizing run in a thread pool (Pillow releases the GIL).
"""

from __future__ import annotations

import concurrent.futures
import functools
import io
import math
import os
from collections.abc import Callable

import numpy as np

from ibs.data import order
from ibs.data.sources import Batch

Preprocess = Callable[[Batch, np.ndarray, bool], Batch]

# Per-channel statistics of the CIFAR-10 training set, in pixel units.
CIFAR10_MEAN = np.array([0.4914, 0.4822, 0.4465], np.float32) * 255
CIFAR10_STD = np.array([0.2470, 0.2435, 0.2616], np.float32) * 255
CIFAR_PADDING = 4

# ImageNet RGB statistics (in pixel units), as in the flax ImageNet example.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32) * 255
CROP_AREA = (0.08, 1.0)
CROP_ASPECT_RATIO = (3 / 4, 4 / 3)
CROP_ATTEMPTS = 10
EVAL_CROP_PADDING = 32


def cast(batch: Batch, positions: np.ndarray, train: bool) -> Batch:
  """No augmentation (MNIST-1D, fake data): inputs as float32.

  Those sources already hold float32 and `get` returns a fresh gather, so nothing is
  copied: this runs once per training batch.
  """
  del positions, train
  return {'input': batch['input'].astype(np.float32, copy=False), 'label': batch['label']}


def normalise(images: np.ndarray, mean: np.ndarray, std: np.ndarray, out=None):
  """(images − mean) / std per channel, as float32 (into `out` when given).

  The constants are broadcast to the full image shape first: numpy's inner loop then
  runs over whole images instead of 3 channels at a time (15× faster here).
  """
  scale, offset = _affine(images.shape[1:], mean.tobytes(), std.tobytes())
  out = np.multiply(images, scale, out=out, dtype=np.float32)
  out += offset
  return out


@functools.lru_cache(maxsize=8)
def _affine(shape: tuple[int, ...], mean: bytes, std: bytes):
  mean, std = np.frombuffer(mean, np.float32), np.frombuffer(std, np.float32)
  scale = np.ascontiguousarray(np.broadcast_to(1 / std, shape), np.float32)
  return scale, np.ascontiguousarray(np.broadcast_to(-mean / std, shape), np.float32)


def cifar10(seed: int, padding: int = CIFAR_PADDING) -> Preprocess:
  """Normalisation, and for training a padded random crop and flip keyed by position."""

  def preprocess(batch: Batch, positions: np.ndarray, train: bool) -> Batch:
    images = batch['input']
    if not train:
      return {
        'input': normalise(images, CIFAR10_MEAN, CIFAR10_STD),
        'label': batch['label'],
      }
    num, height, width, channels = images.shape
    # Normalise straight into the middle of the zero-padded batch: the padding is then
    # the dataset mean, and no separate pad copy is made.
    padded = np.zeros(
      (num, height + 2 * padding, width + 2 * padding, channels), np.float32
    )
    normalise(
      images,
      CIFAR10_MEAN,
      CIFAR10_STD,
      out=padded[:, padding : padding + height, padding : padding + width],
    )
    u = order.position_uniform(seed, positions, 3)
    return {'input': crop_and_flip(padded, u, (height, width)), 'label': batch['label']}

  return preprocess


def crop_and_flip(padded: np.ndarray, u: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Random `size` crops of the padded images, mirrored left-right where u[:, 2] < ½.

  `u` holds three uniforms per image: vertical offset, horizontal offset, flip. One
  slice copy per image: for 32×32 crops this is ~10× faster than a per-pixel gather.
  """
  height, width = size
  spare = np.array(padded.shape[1:3]) - size
  offsets = np.minimum((u[:, :2] * (spare + 1)).astype(np.int64), spare)
  flips = u[:, 2] < 0.5
  out = np.empty((len(padded), height, width, *padded.shape[3:]), padded.dtype)
  for image, crop, (top, left), flip in zip(padded, out, offsets, flips, strict=True):
    window = image[top : top + height, left : left + width]
    crop[...] = window[:, ::-1] if flip else window
  return out


@functools.cache
def _decode_pool() -> concurrent.futures.ThreadPoolExecutor:
  return concurrent.futures.ThreadPoolExecutor(
    max_workers=os.cpu_count() or 1, thread_name_prefix='ibs_decode'
  )


def imagenet(seed: int, image_size: int) -> Preprocess:
  """Decodes JPEG bytes, crops (random or central), resizes, flips, normalises."""

  def preprocess(batch: Batch, positions: np.ndarray, train: bool) -> Batch:
    images = batch['image']
    if train:
      u = order.position_uniform(seed, positions, 4 * CROP_ATTEMPTS + 1)
    else:
      u = np.zeros((len(images), 4 * CROP_ATTEMPTS + 1))
    crops = list(
      _decode_pool().map(
        functools.partial(decode_crop_resize, image_size=image_size, train=train),
        images,
        u,
      )
    )
    out = np.stack(crops)
    if train:
      flip = u[:, -1] < 0.5
      out[flip] = out[flip, :, ::-1]
    return {'input': normalise(out, IMAGENET_MEAN, IMAGENET_STD), 'label': batch['label']}

  return preprocess


def inception_crop(height: int, width: int, u: np.ndarray) -> tuple[int, int, int, int]:
  """(top, left, crop height, crop width) of a random area/aspect crop, from uniforms.

  Up to CROP_ATTEMPTS tries, each of four uniforms (area, log aspect ratio, top, left);
  falls back to the central crop with the aspect ratio clamped to the range.
  """
  area = height * width
  log_low, log_high = (math.log(r) for r in CROP_ASPECT_RATIO)
  for attempt in range(CROP_ATTEMPTS):
    ua, ur, uy, ux = u[4 * attempt : 4 * attempt + 4]
    target = area * (CROP_AREA[0] + ua * (CROP_AREA[1] - CROP_AREA[0]))
    ratio = math.exp(log_low + ur * (log_high - log_low))
    crop_w = round(math.sqrt(target * ratio))
    crop_h = round(math.sqrt(target / ratio))
    if 0 < crop_w <= width and 0 < crop_h <= height:
      top = min(int(uy * (height - crop_h + 1)), height - crop_h)
      left = min(int(ux * (width - crop_w + 1)), width - crop_w)
      return top, left, crop_h, crop_w
  ratio = width / height
  if ratio < CROP_ASPECT_RATIO[0]:
    crop_w, crop_h = width, round(width / CROP_ASPECT_RATIO[0])
  elif ratio > CROP_ASPECT_RATIO[1]:
    crop_h, crop_w = height, round(height * CROP_ASPECT_RATIO[1])
  else:
    crop_h, crop_w = height, width
  return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def center_crop(height: int, width: int, image_size: int) -> tuple[int, int, int, int]:
  """The central square of side image_size/(image_size + 32) · min(height, width)."""
  side = max(1, round(image_size / (image_size + EVAL_CROP_PADDING) * min(height, width)))
  return (height - side) // 2, (width - side) // 2, side, side


def decode_crop_resize(
  encoded: bytes, u: np.ndarray, *, image_size: int, train: bool
) -> np.ndarray:
  """JPEG bytes → (image_size, image_size, 3) uint8 of the chosen crop.

  `Image.draft` lets libjpeg decode at 1/2, 1/4 or 1/8 scale when the crop will still
  be at least image_size pixels there: most of the decoding cost of a large photo.
  """
  from PIL import Image

  with Image.open(io.BytesIO(encoded)) as image:
    width, height = image.size
    if train:
      top, left, crop_h, crop_w = inception_crop(height, width, u)
    else:
      top, left, crop_h, crop_w = center_crop(height, width, image_size)
    image.draft(
      'RGB', (width * image_size // crop_w + 1, height * image_size // crop_h + 1)
    )
    scale_x, scale_y = width / image.size[0], height / image.size[1]
    box = (
      left / scale_x,
      top / scale_y,
      (left + crop_w) / scale_x,
      (top + crop_h) / scale_y,
    )
    rgb = image.convert('RGB') if image.mode != 'RGB' else image
    resized = rgb.resize((image_size, image_size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(resized, np.uint8)
