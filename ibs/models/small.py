"""Small models for MNIST-1D and other CPU-scale studies: a 1-D CNN and an MLP.

Both use ghost batch norm, so they behave like the paper's networks when the batch grows.
The 1-D convolution is written as patches × matmul: on the 2-core CPU the studies ran on,
XLA's convolution was 6–10× slower than this identical computation (tested equal in
tests/test_models.py), and the CPU studies are the reason these models exist.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ibs.models.ghost_batch_norm import GhostBatchNorm


def conv1d_as_matmul(x: jax.Array, kernel: jax.Array, stride: int = 1) -> jax.Array:
  """'SAME'-padded 1-D convolution of x (B, L, C) with kernel (K, C, F), as XLA pads it.

  Output length ceil(L / stride); the padding total max((out − 1)·stride + K − L, 0) is
  split with the extra element on the right, as in `lax.conv_general_dilated`.
  """
  width, length = kernel.shape[0], x.shape[1]
  out = -(-length // stride)
  pad = max((out - 1) * stride + width - length, 0)
  padded = jnp.pad(x, ((0, 0), (pad // 2, pad - pad // 2), (0, 0)))
  stop = (out - 1) * stride + 1
  patches = jnp.concatenate(
    [padded[:, i : i + stop : stride] for i in range(width)], axis=-1
  )
  return patches @ kernel.reshape((-1, kernel.shape[-1]))


class Conv1D(nn.Module):
  """Same-padded 1-D convolution (no bias: a batch norm follows)."""

  features: int
  kernel_size: int
  stride: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param(
      'kernel',
      nn.initializers.he_normal(),
      (self.kernel_size, x.shape[-1], self.features),
      jnp.float32,
    )
    return conv1d_as_matmul(x.astype(self.dtype), kernel.astype(self.dtype), self.stride)


class CNN1D(nn.Module):
  """Conv-GhostBN-ReLU blocks, global average pooling, a linear classifier.

  Input (batch, length) or (batch, length, channels). Each block halves the length
  (stride 2): on MNIST-1D's 40 samples that keeps ~99% accuracy at a tenth of the
  compute of stride 1.
  """

  num_classes: int
  ghost_batch_size: int
  width: int = 32
  depth: int = 3
  kernel_size: int = 3
  stride: int = 2
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    if x.ndim == 2:
      x = x[..., None]
    for _ in range(self.depth):
      x = Conv1D(self.width, self.kernel_size, self.stride, dtype=self.dtype)(x)
      x = GhostBatchNorm(
        self.ghost_batch_size, momentum=self.bn_momentum, dtype=self.dtype
      )(x, train=train)
      x = nn.relu(x)
    x = jnp.mean(x, axis=1)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)


class MLP(nn.Module):
  """Dense-GhostBN-ReLU layers on the flattened input, then a linear classifier."""

  num_classes: int
  ghost_batch_size: int
  hidden: tuple[int, ...] = (100, 100)
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = x.reshape((x.shape[0], -1))
    for features in self.hidden:
      x = nn.Dense(features, use_bias=False, dtype=self.dtype)(x)
      x = GhostBatchNorm(
        self.ghost_batch_size, momentum=self.bn_momentum, dtype=self.dtype
      )(x, train=train)
      x = nn.relu(x)
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(jnp.float32)
