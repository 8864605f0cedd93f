"""ResNet v1.5 for ImageNet (He et al. 2016), the network of the paper's §5.4.

"v1.5" puts the stride of a downsampling bottleneck in its 3×3 convolution, not its
first 1×1 (as torchvision, the flax ImageNet example and the MLPerf/TPU reference do);
it is ~0.5% more accurate than v1 at the same parameter count. ResNet-50 for 1000
classes has exactly 25,557,032 parameters: convolutions without bias (a batch norm
follows each), batch norm with scale and bias, a 1×1 projection (conv + BN) wherever
the shape changes, and a dense classifier with bias. Running statistics not counted.

`ResNet18/34/50/101/152` fix the standard stage sizes; `width` and `stage_sizes` give
the tiny variants that tests and CPU benchmarks need.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ibs.models import layers


class ResidualBlock(nn.Module):
  """Basic (two 3×3) or bottleneck (1×1, 3×3 with the stride, 1×1 ×4) block.

  With `zero_init_last_bn_scale` the last batch norm of the residual branch starts with
  scale 0, so each block starts as the identity (Goyal et al. 2017, §5.1): this is what
  lets very large batches with a high learning rate train from step one.
  """

  features: int
  strides: int
  bottleneck: bool
  ghost_batch_size: int
  zero_init_last_bn_scale: bool
  bn_momentum: float
  bn_epsilon: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    def norm(y, name, scale_init=nn.initializers.ones):
      return layers.ghost_batch_norm(self, scale_init=scale_init, name=name)(
        y, train=train
      )

    last_scale_init = (
      nn.initializers.zeros if self.zero_init_last_bn_scale else nn.initializers.ones
    )
    if self.bottleneck:
      out_features = 4 * self.features
      y = layers.conv(self.features, 1, 1, self.dtype, 'conv1')(x)
      y = nn.relu(norm(y, 'bn1'))
      y = layers.conv(self.features, 3, self.strides, self.dtype, 'conv2')(y)
      y = nn.relu(norm(y, 'bn2'))
      y = layers.conv(out_features, 1, 1, self.dtype, 'conv3')(y)
      y = norm(y, 'bn3', last_scale_init)
    else:
      out_features = self.features
      y = layers.conv(self.features, 3, self.strides, self.dtype, 'conv1')(x)
      y = nn.relu(norm(y, 'bn1'))
      y = layers.conv(self.features, 3, 1, self.dtype, 'conv2')(y)
      y = norm(y, 'bn2', last_scale_init)
    if x.shape[-1] != out_features or self.strides != 1:
      x = layers.conv(out_features, 1, self.strides, self.dtype, 'proj_conv')(x)
      x = norm(x, 'proj_bn')
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet v1.5 for 224×224 images (any size ≥ 32 works); logits are float32.

  Attributes:
    num_classes: classifier outputs.
    ghost_batch_size: examples per batch-norm group (32 or 64 in the paper).
    stage_sizes: blocks per stage; (3, 4, 6, 3) is ResNet-50.
    bottleneck: bottleneck blocks (ResNet-50 and deeper) or basic blocks (18, 34).
    width: channels of the stem and the first stage (64 published); stage i has
      width·2^i, times 4 at a bottleneck's output. 8 gives a tiny CPU variant.
    zero_init_last_bn_scale: start each residual branch's last BN scale at zero.
    bn_momentum, bn_epsilon: batch norm, as in the flax and TPU references (0.9, 1e-5).
    dtype: computation dtype; parameters stay float32.
  """

  num_classes: int
  ghost_batch_size: int
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)
  bottleneck: bool = True
  width: int = 64
  zero_init_last_bn_scale: bool = False
  bn_momentum: float = 0.9
  bn_epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = layers.conv(self.width, 7, 2, self.dtype, 'stem_conv')(x)
    x = layers.ghost_batch_norm(self, name='stem_bn')(x, train=train)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for stage, num_blocks in enumerate(self.stage_sizes):
      for block in range(num_blocks):
        x = ResidualBlock(
          features=self.width * 2**stage,
          strides=2 if stage > 0 and block == 0 else 1,
          bottleneck=self.bottleneck,
          ghost_batch_size=self.ghost_batch_size,
          zero_init_last_bn_scale=self.zero_init_last_bn_scale,
          bn_momentum=self.bn_momentum,
          bn_epsilon=self.bn_epsilon,
          dtype=self.dtype,
        )(x, train=train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), bottleneck=False)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=False)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), bottleneck=True)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), bottleneck=True)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), bottleneck=True)
