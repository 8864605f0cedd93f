"""Ghost batch normalisation (Hoffer et al. 2017), as used throughout the paper.

Batch statistics are computed over fixed-size *ghost batches* of `ghost_batch_size`
consecutive examples, whatever the global batch, the gradient-accumulation count or the
number of devices. Two consequences the rest of ibs relies on (docs/PAPER.md,
"Batch norm"):

* The loss of a batch of k·G examples is the mean of the k ghost-batch losses, so its
  gradient is the mean of the ghost-batch gradients: accumulating gradients over
  micro-batches that are multiples of G is *exact*, not an approximation.
* The running averages are updated once per ghost batch, in order, so their time
  constant measured in epochs is the same at batch 128 and at batch 16000
  (docs/DESIGN.md decision 7). A batch of k ghost batches applies k successive updates
      r ← μ·r + (1 − μ)·s_j,  j = 1..k
  in closed form: r_k = μ^k·r_0 + (1 − μ)·Σ_j μ^(k−j)·s_j.

With `ghost_batch_size` equal to the batch size this is exactly `flax.linen.BatchNorm`.

Under the per-device train step (ibs/step.py, a `shard_map` over the mesh's `data`
axis) each device normalises its own ghost batches, which needs nothing from the others;
only the running averages must see every device's ghost batches, in the order: for
micro-batch a, device 0's ghost batches, then device 1's, and so on. The k·D updates of a
micro-batch are affine in r, so device d's share of them has a closed form,

    r ← μ^(Dk)·r + Σ_d μ^((D−1−d)k)·c_d,   c_d = Σ_j (1 − μ)·μ^(k−1−j)·s_dj,

and the step traces the model inside `running_statistics_across('data')`: there the layer
returns device d's term μ^(Dk)·a + μ^((D−1−d)k)·c_d of its accumulator a (the step
starts a at r on device 0 and at 0 elsewhere, carries it over micro-batches, and sums it
over devices in the update's one all-reduce: 2F floats per layer whatever B). On one
device that is the sequential update itself, operation for operation; across devices it
is the same sum in another order (float32 rounding: ibs/step.py). The axis is a
property of how the step runs the model, not of the model, hence a context rather than
a layer attribute threaded through every model.
"""

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

_STATISTICS_AXIS: contextvars.ContextVar[str | None] = contextvars.ContextVar(
  'ghost_batch_norm_statistics_axis', default=None
)


@contextlib.contextmanager
def running_statistics_across(axis_name: str | None) -> Iterator[None]:
  """Trace training-mode ghost BN as one device's share of the running averages.

  `axis_name`: the devices' axis; the layer then returns this device's closed-form term
  (see the module docstring) for the caller to sum over `axis_name`.
  """
  token = _STATISTICS_AXIS.set(axis_name)
  try:
    yield
  finally:
    _STATISTICS_AXIS.reset(token)


def ghost_statistics(x: jax.Array, ghost_batch_size: int) -> tuple[jax.Array, jax.Array]:
  """Per-ghost-batch mean and (biased) variance over all axes but the last.

  Returns arrays of shape (num_ghost_batches, features), computed in float32.
  """
  batch = x.shape[0]
  if batch % ghost_batch_size:
    raise ValueError(
      f'Batch of {batch} examples is not a multiple of ghost_batch_size='
      f'{ghost_batch_size}. Make every phase batch size and micro-batch a multiple '
      'of config.ghost_batch_size.'
    )
  groups = x.astype(jnp.float32).reshape((batch // ghost_batch_size, -1, x.shape[-1]))
  mean = jnp.mean(groups, axis=1)
  # Two-pass variance: E[(x - mean)^2] is accurate where E[x^2] - mean^2 cancels.
  variance = jnp.mean(jnp.square(groups - mean[:, None, :]), axis=1)
  return mean, variance


def contribution(observations: jax.Array, momentum: float) -> jax.Array:
  """c = Σ_j (1 − μ)·μ^(k−1−j)·s_j: what k successive updates add to μ^k·r."""
  k = observations.shape[0]
  weights = (1.0 - momentum) * momentum ** jnp.arange(k - 1, -1, -1, dtype=jnp.float32)
  return jnp.tensordot(weights, observations, axes=1)


def sequential_moving_average(
  average: jax.Array, observations: jax.Array, momentum: float
) -> jax.Array:
  """k successive updates r ← μ·r + (1 − μ)·s_j, in closed form, in order j = 1..k."""
  return momentum ** observations.shape[0] * average + contribution(
    observations, momentum
  )


def moving_average_share(
  average: jax.Array, observations: jax.Array, momentum: float
) -> jax.Array:
  """This device's share of the running-average update (the module docstring).

  Outside `running_statistics_across` it is `sequential_moving_average`.
  """
  axis_name = _STATISTICS_AXIS.get()
  k = observations.shape[0]
  c = contribution(observations, momentum)
  if axis_name is None:
    return momentum**k * average + c
  devices = jax.lax.axis_size(axis_name)
  later = devices - 1 - jax.lax.axis_index(axis_name)
  return momentum ** (devices * k) * average + jnp.float32(momentum) ** (later * k) * c


class GhostBatchNorm(nn.Module):
  """Batch norm over ghost batches of `ghost_batch_size` consecutive examples.

  Attributes:
    ghost_batch_size: examples per ghost batch (128 for CIFAR-10 in the paper, 32 or 64
      for ImageNet). Every batch this layer sees in training must be a multiple of it.
    momentum: running-average decay applied once per ghost batch.
    epsilon: added to the variance.
    dtype: computation dtype of the output (parameters and statistics stay float32).
    use_scale: learn a scale; Inception-ResNet-V2 has none (a ReLU or a linear 1×1
      follows). The offset, `bias`, is always learnt.
    scale_init: initialiser of the scale; `zeros` for the last BN of a residual block
      (Goyal et al. 2017).
  """

  ghost_batch_size: int
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = None
  use_scale: bool = True
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    features = x.shape[-1]
    running_mean = self.variable(
      'batch_stats', 'mean', lambda: jnp.zeros((features,), jnp.float32)
    )
    running_var = self.variable(
      'batch_stats', 'var', lambda: jnp.ones((features,), jnp.float32)
    )
    if train:
      mean, variance = ghost_statistics(x, self.ghost_batch_size)
      if not self.is_initializing():
        # Mean and variance together: one sum per layer where the step reduces them.
        updated = moving_average_share(
          jnp.concatenate([running_mean.value, running_var.value]),
          jax.lax.stop_gradient(jnp.concatenate([mean, variance], axis=-1)),
          self.momentum,
        )
        running_mean.value, running_var.value = jnp.split(updated, 2)
      groups = x.astype(jnp.float32).reshape((mean.shape[0], -1, features))
      normalized = (groups - mean[:, None, :]) * jax.lax.rsqrt(
        variance[:, None, :] + self.epsilon
      )
      y = normalized.reshape(x.shape)
    else:
      y = (x.astype(jnp.float32) - running_mean.value) * jax.lax.rsqrt(
        running_var.value + self.epsilon
      )
    if self.use_scale:
      y = y * self.param('scale', self.scale_init, (features,), jnp.float32)
    y = y + self.param('bias', nn.initializers.zeros, (features,), jnp.float32)
    return y.astype(self.dtype or x.dtype)
