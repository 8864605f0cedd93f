"""Model registry: a config names a model and its keyword arguments.

Every model is a `flax.linen.Module` called as `model.apply(variables, x, train=...)`,
takes `num_classes`, `ghost_batch_size` and `dtype`, and keeps its parameters in float32
whatever `dtype` computes in (bfloat16 on accelerators).
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ibs.models import inception_resnet_v2, resnet, small, wide_resnet

# Classes or functools.partials of them (ResNet50 fixes the stage sizes of ResNet).
_REGISTRY: dict[str, Callable[..., nn.Module]] = {
  'cnn1d': small.CNN1D,
  'mlp': small.MLP,
  'wide_resnet': wide_resnet.WideResNet,
  'resnet': resnet.ResNet,
  'resnet50': resnet.ResNet50,
  'inception_resnet_v2': inception_resnet_v2.InceptionResNetV2,
}


def weight_decay_mask(params: Any) -> Any:
  """True for conv and dense kernels, False for batch-norm scales/offsets and biases.

  The large-batch option of not decaying batch-norm and bias parameters ("no bias
  decay", Jia et al. 2018): they are few, and shrinking them only fights the
  normalisation. Pass it as `mask` to `optax.add_decayed_weights`. Kernels are exactly
  the leaves with ndim > 1 in every ibs model.
  """
  return jax.tree_util.tree_map(lambda leaf: leaf.ndim > 1, params)


def model_names() -> list[str]:
  return sorted(_REGISTRY)


def create_model(
  name: str,
  *,
  num_classes: int,
  ghost_batch_size: int,
  half_precision: bool = False,
  **kwargs: Any,
) -> nn.Module:
  """Builds the model `name`; `half_precision` computes in bfloat16."""
  if name not in _REGISTRY:
    raise ValueError(f'Unknown config.model={name!r}. Choose one of {model_names()}.')
  dtype = jnp.bfloat16 if half_precision else jnp.float32
  return _REGISTRY[name](
    num_classes=num_classes, ghost_batch_size=ghost_batch_size, dtype=dtype, **kwargs
  )
