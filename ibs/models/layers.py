"""Layer factories shared by the image models (ResNet, Wide ResNet, Inception-ResNet-V2).

Each is a plain factory returning a flax module, so a call inside a `@nn.compact`
method registers the layer with that method's module exactly as writing the
constructor there would: parameter names (and so checkpoints) are unchanged.
"""

from typing import Any

from flax import linen as nn

from ibs.models.ghost_batch_norm import GhostBatchNorm


def conv(
  features: int, kernel: int, strides: int, dtype: Any, name: str | None = None
) -> nn.Conv:
  """A square convolution without bias, He-initialised, padded k // 2 on each side.

  No bias: a batch norm follows every such convolution (or the sum it feeds), so a bias
  would only add parameters the published counts do not have. Symmetric padding as in
  torchvision and the TF reference's `fixed_padding`: 'SAME' would pad a stride-2
  convolution on one side only.
  """
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=strides,
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=nn.initializers.he_normal(),
    dtype=dtype,
    name=name,
  )


def ghost_batch_norm(owner: nn.Module, **kwargs: Any) -> GhostBatchNorm:
  """A `GhostBatchNorm` with the settings of `owner`, the module it belongs to.

  The image models and their blocks each carry `ghost_batch_size`, `bn_momentum`,
  `bn_epsilon` and `dtype`, and every batch norm in them must use exactly those (the
  ghost batch size is what makes gradient accumulation exact); reading them here keeps
  one place that passes them. `kwargs` go to `GhostBatchNorm` (`name`, `scale_init`,
  `use_scale`).
  """
  return GhostBatchNorm(
    owner.ghost_batch_size,
    momentum=owner.bn_momentum,
    epsilon=owner.bn_epsilon,
    dtype=owner.dtype,
    **kwargs,
  )
