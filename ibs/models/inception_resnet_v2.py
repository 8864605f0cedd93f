"""Inception-ResNet-V2 (Szegedy et al. 2016), the ImageNet network of the paper's §5.3.

Layer for layer the TF-slim / `keras.applications` network on 299×299 inputs: a stem to
35×35×192, mixed 5b (320 channels), 10× block35 (residual scale 0.17), reduction A
(mixed 6a, 1088), 20× block17 (0.1), reduction B (mixed 7a, 2080), 9× block8 (0.2)
and a last block8 with scale 1.0 and no activation (both references write it
`block8(net, activation_fn=None)` with the default scale 1.0), a 1×1 conv to 1536,
global average pooling and a dense classifier (no dropout).

Each conv is followed by batch norm *without* scale (`scale=False` in keras, `center`
only in slim: a ReLU or a linear 1×1 follows, so a scale adds nothing) and has no bias,
except the 1×1 convolution that closes each residual block: it has a bias and no batch
norm, so the branch it scales is a plain linear map. With these choices, for 1000
classes the parameters (what keras calls trainable) number exactly 55,813,192, and the
60,544 batch-norm running means and variances (keras's non-trainable weights) make
55,873,736, keras's total.

`repeats` and `width_multiplier` give tiny variants for CPU tests; 75×75 is the smallest
input the valid-padded stem and reductions accept.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ibs.models import layers


class ConvBN(nn.Module):
  """Conv (no bias) → ghost BN without scale → optional ReLU: keras's `conv2d_bn`."""

  features: int
  kernel: tuple[int, int]
  ghost_batch_size: int
  strides: int = 1
  padding: str = 'SAME'
  activation: bool = True
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = nn.Conv(
      self.features,
      self.kernel,
      strides=self.strides,
      padding=self.padding,
      use_bias=False,
      kernel_init=nn.initializers.xavier_uniform(),
      dtype=self.dtype,
    )(x)
    x = layers.ghost_batch_norm(self, use_scale=False)(x, train=train)
    return nn.relu(x) if self.activation else x


class InceptionResNetBlock(nn.Module):
  """x + scale · up(concat(branches(x))), then ReLU unless `activation` is False.

  `branches` lists each branch as (features, kernel) convolutions, already scaled by the
  width multiplier: it alone makes the block a block35, block17 or block8.
  """

  branches: tuple[tuple[tuple[int, tuple[int, int]], ...], ...]
  scale: float
  activation: bool
  ghost_batch_size: int
  bn_momentum: float
  bn_epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    outputs = []
    for branch in self.branches:
      y = x
      for features, kernel in branch:
        y = ConvBN(
          features,
          kernel,
          self.ghost_batch_size,
          bn_momentum=self.bn_momentum,
          bn_epsilon=self.bn_epsilon,
          dtype=self.dtype,
        )(y, train=train)
      outputs.append(y)
    mixed = jnp.concatenate(outputs, axis=-1)
    up = nn.Conv(
      x.shape[-1],
      (1, 1),
      use_bias=True,
      kernel_init=nn.initializers.xavier_uniform(),
      dtype=self.dtype,
    )(mixed)
    x = x + self.scale * up
    return nn.relu(x) if self.activation else x


class InceptionResNetV2(nn.Module):
  """Inception-ResNet-V2 for 299×299 images (≥ 75×75); logits are float32.

  Attributes:
    num_classes: classifier outputs.
    ghost_batch_size: examples per batch-norm group (32 in the paper's Fig. 6, 64 in
      Fig. 7).
    repeats: number of block35, block17 and block8 blocks; (10, 20, 10) published.
      The last block8 (no activation, scale 1) counts among the third number.
    width_multiplier: scales every convolution's channel count; e.g. 1/8 for tests.
    bn_momentum, bn_epsilon: TF-slim's values (0.9997, 1e-3). The running averages
      move once per ghost batch, so their time constant is G/(1 − μ) examples
      (≈213k, a sixth of an ImageNet epoch, at G = 64).
    dtype: computation dtype; parameters stay float32.
  """

  num_classes: int
  ghost_batch_size: int
  repeats: tuple[int, int, int] = (10, 20, 10)
  width_multiplier: float = 1.0
  bn_momentum: float = 0.9997
  bn_epsilon: float = 1e-3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if min(x.shape[1:3]) < 75:
      raise ValueError(
        f'InceptionResNetV2 needs images of at least 75×75, got {x.shape[1:3]}: '
        'its stem and reductions use valid padding. Resize the input.'
      )
    if self.repeats[2] < 1:
      raise ValueError(
        f'InceptionResNetV2 needs repeats[2] >= 1 for its last block8, got repeats='
        f'{self.repeats}. Set config.model_kwargs.repeats=(a, b, c) with c >= 1.'
      )

    def width(channels: int) -> int:
      return max(1, round(channels * self.width_multiplier))

    def conv(y, features, kernel, strides=1, padding='SAME'):
      if isinstance(kernel, int):
        kernel = (kernel, kernel)
      return ConvBN(
        width(features),
        kernel,
        self.ghost_batch_size,
        strides=strides,
        padding=padding,
        bn_momentum=self.bn_momentum,
        bn_epsilon=self.bn_epsilon,
        dtype=self.dtype,
      )(y, train=train)

    def max_pool(y):
      return nn.max_pool(y, (3, 3), strides=(2, 2), padding='VALID')

    def blocks(y, count, scale, branches, last_linear=False):
      branches = tuple(
        tuple((width(features), kernel) for features, kernel in branch)
        for branch in branches
      )
      for index in range(count):
        final = last_linear and index == count - 1
        y = InceptionResNetBlock(
          branches,
          scale=1.0 if final else scale,
          activation=not final,
          ghost_batch_size=self.ghost_batch_size,
          bn_momentum=self.bn_momentum,
          bn_epsilon=self.bn_epsilon,
          dtype=self.dtype,
        )(y, train=train)
      return y

    # Stem: 299 → 35×35×192.
    x = conv(x, 32, 3, strides=2, padding='VALID')
    x = conv(x, 32, 3, padding='VALID')
    x = conv(x, 64, 3)
    x = max_pool(x)
    x = conv(x, 80, 1, padding='VALID')
    x = conv(x, 192, 3, padding='VALID')
    x = max_pool(x)

    # Mixed 5b (Inception-A): 35×35×320. TF's 'SAME' average pool ignores the padding.
    pooled = nn.avg_pool(
      x, (3, 3), strides=(1, 1), padding='SAME', count_include_pad=False
    )
    x = jnp.concatenate(
      [
        conv(x, 96, 1),
        conv(conv(x, 48, 1), 64, 5),
        conv(conv(conv(x, 64, 1), 96, 3), 96, 3),
        conv(pooled, 64, 1),
      ],
      axis=-1,
    )

    x = blocks(
      x,
      self.repeats[0],
      0.17,
      (
        ((32, (1, 1)),),
        ((32, (1, 1)), (32, (3, 3))),
        ((32, (1, 1)), (48, (3, 3)), (64, (3, 3))),
      ),
    )

    # Mixed 6a (Reduction-A): 17×17×1088.
    x = jnp.concatenate(
      [
        conv(x, 384, 3, strides=2, padding='VALID'),
        conv(conv(conv(x, 256, 1), 256, 3), 384, 3, strides=2, padding='VALID'),
        max_pool(x),
      ],
      axis=-1,
    )

    x = blocks(
      x,
      self.repeats[1],
      0.1,
      (
        ((192, (1, 1)),),
        ((128, (1, 1)), (160, (1, 7)), (192, (7, 1))),
      ),
    )

    # Mixed 7a (Reduction-B): 8×8×2080.
    x = jnp.concatenate(
      [
        conv(conv(x, 256, 1), 384, 3, strides=2, padding='VALID'),
        conv(conv(x, 256, 1), 288, 3, strides=2, padding='VALID'),
        conv(conv(conv(x, 256, 1), 288, 3), 320, 3, strides=2, padding='VALID'),
        max_pool(x),
      ],
      axis=-1,
    )

    x = blocks(
      x,
      self.repeats[2],
      0.2,
      (
        ((192, (1, 1)),),
        ((192, (1, 1)), (224, (1, 3)), (256, (3, 1))),
      ),
      last_linear=True,
    )

    x = conv(x, 1536, 1)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
