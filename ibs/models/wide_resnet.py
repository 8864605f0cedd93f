"""Wide ResNet (Zagoruyko & Komodakis 2016), the CIFAR-10 network of §5.1–5.2.

Pre-activation basic blocks (BN-ReLU-conv3x3, BN-ReLU-conv3x3), no dropout, ghost batch
norm everywhere. WRN-d-k has (d − 4)/6 blocks in each of three groups of 16k, 32k and 64k
channels after a 3×3, 16-channel stem, then BN-ReLU, global average pooling and a dense
classifier.

Convolutions carry no bias (a batch norm follows each one, or the sum it feeds is
normalised next) and the 1×1 projection shortcut has none either: with these choices
WRN-16-4 for 10 classes has exactly 2,748,890 parameters, the paper's "2.7M" (a bias on
every 3×3 conv of the blocks would add 1,792, one on the shortcuts 448, one on the stem
16), and WRN-28-10 36,479,194, its "36.5M"; tests/test_models.py derives both by hand.
Batch-norm running statistics are not counted.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ibs.models import layers


class WideBasicBlock(nn.Module):
  """Pre-activation block; the projection shortcut reads the pre-activated input.

  As in the reference Torch code, when the shape changes the 1×1 shortcut convolution
  is applied to BN-ReLU(x), not x, so both paths start from the same normalised tensor.
  """

  features: int
  strides: int
  ghost_batch_size: int
  bn_momentum: float
  bn_epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def norm(y):
      return layers.ghost_batch_norm(self)(y, train=train)

    def conv(y, features, kernel, strides=1):
      return layers.conv(features, kernel, strides, self.dtype)(y)

    activated = nn.relu(norm(x))
    y = conv(activated, self.features, 3, self.strides)
    y = nn.relu(norm(y))
    y = conv(y, self.features, 3)
    if x.shape[-1] != self.features or self.strides != 1:
      shortcut = conv(activated, self.features, 1, self.strides)
    else:
      shortcut = x
    return shortcut + y


class WideResNet(nn.Module):
  """WRN-`depth`-`widen_factor` for 32×32 images (CIFAR); logits are float32.

  Attributes:
    num_classes: classifier outputs.
    ghost_batch_size: examples per batch-norm group (128 in the paper).
    depth: 6n + 4 layers; 16 in the paper.
    widen_factor: k, multiplying the 16/32/64 group widths; 4 in the paper.
    bn_momentum, bn_epsilon: batch norm, as in the Torch reference (0.9, 1e-5).
    dtype: computation dtype; parameters stay float32.
  """

  num_classes: int
  ghost_batch_size: int
  depth: int = 16
  widen_factor: int = 4
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if (self.depth - 4) % 6:
      raise ValueError(
        f'WideResNet depth={self.depth} is not 6n + 4. Use 10, 16, 22, 28, 40, ... '
        '(config.model_kwargs.depth).'
      )
    blocks_per_group = (self.depth - 4) // 6
    x = layers.conv(16, 3, 1, self.dtype)(x)
    for group, base in enumerate((16, 32, 64)):
      for block in range(blocks_per_group):
        x = WideBasicBlock(
          features=base * self.widen_factor,
          strides=2 if group > 0 and block == 0 else 1,
          ghost_batch_size=self.ghost_batch_size,
          bn_momentum=self.bn_momentum,
          bn_epsilon=self.bn_epsilon,
          dtype=self.dtype,
        )(x, train=train)
    x = layers.ghost_batch_norm(self)(x, train=train)
    x = jnp.mean(nn.relu(x), axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
