"""Models: published parameter counts, shapes, train/eval modes, bfloat16, ghost BN.

Full-size models are only traced (`jax.eval_shape`), never run; forward passes use tiny
widths and inputs so the file runs in well under a minute on 2 CPU cores.
"""

import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from ibs import models
from ibs.models import inception_resnet_v2, resnet, small, wide_resnet
from ibs.models.ghost_batch_norm import GhostBatchNorm

GHOST = 4  # ghost batch size of the tiny models; batches below are multiples of it.


def _size(tree) -> int:
  return sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))


def _abstract_variables(model, input_shape):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros(input_shape), train=False)
  )


def _random_variables(model, input_shape, seed=0):
  """Variables of the right shapes and dtypes, filled by numpy, not by `model.init`.

  On 2 CPU cores XLA takes tens of seconds to compile the threefry draws of a 40-layer
  init, far longer than the forward pass, and these tests only need generic values:
  He-scaled normal kernels, 1-D parameters near their init, running statistics at
  their init (mean 0, variance 1).
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'var':
      return jnp.ones(leaf.shape, leaf.dtype)
    if name == 'mean':
      return jnp.zeros(leaf.shape, leaf.dtype)
    if leaf.ndim > 1:
      fan_in = int(np.prod(leaf.shape[:-1]))
      values = rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape)
    else:
      values = (1.0 if name == 'scale' else 0.0) + 0.1 * rng.normal(size=leaf.shape)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, _abstract_variables(model, input_shape))


# --- Parameter counts of the full-size models --------------------------------------


@pytest.mark.parametrize(
  'model, input_shape, expected_params',
  [
    # WRN-16-4 on CIFAR-10: Zagoruyko & Komodakis 2016 give 2.7M; the exact count is
    # derived by hand in test_wide_resnet_parameter_count_by_hand.
    (
      wide_resnet.WideResNet(10, 128, depth=16, widen_factor=4),
      (1, 32, 32, 3),
      2_748_890,
    ),
    # WRN-28-10 is "36.5M" in the paper; this is its exact count with the same choices.
    (
      wide_resnet.WideResNet(10, 128, depth=28, widen_factor=10),
      (1, 32, 32, 3),
      36_479_194,
    ),
    # torchvision ResNet-50 (v1 and v1.5 have the same count).
    (
      resnet.ResNet50(num_classes=1000, ghost_batch_size=32),
      (1, 224, 224, 3),
      25_557_032,
    ),
    # torchvision ResNet-18.
    (
      resnet.ResNet18(num_classes=1000, ghost_batch_size=32),
      (1, 224, 224, 3),
      11_689_512,
    ),
    # keras.applications.InceptionResNetV2: 55,813,192 trainable weights. Its BN has
    # scale=False (only beta is trainable), convs have no bias except each residual
    # block's closing 1x1 conv. Parameter shapes do not depend on the image size, so
    # the smallest valid input traces fastest.
    (
      inception_resnet_v2.InceptionResNetV2(1000, 64),
      (1, 75, 75, 3),
      55_813_192,
    ),
  ],
  ids=['wrn-16-4', 'wrn-28-10', 'resnet50', 'resnet18', 'inception_resnet_v2'],
)
def test_published_parameter_counts(model, input_shape, expected_params):
  variables = _abstract_variables(model, input_shape)
  assert _size(variables['params']) == expected_params


def _wide_resnet_parameters(depth, widen_factor, num_classes):
  """WRN-depth-k counted by hand, as Zagoruyko & Komodakis build it.

  A 3×3 stem of 16 channels; per block BN (scale, offset), 3×3 conv, BN, 3×3 conv and a
  1×1 projection where the width changes; a final BN and the dense classifier.
  """
  total, channels = 3 * 3 * 3 * 16, 16
  for width in (16 * widen_factor, 32 * widen_factor, 64 * widen_factor):
    for _ in range((depth - 4) // 6):
      total += 2 * channels + 9 * channels * width + 2 * width + 9 * width * width
      total += channels * width if channels != width else 0
      channels = width
  return total + 2 * channels + channels * num_classes + num_classes


def test_wide_resnet_parameter_count_by_hand():
  # The exact counts asserted above; the paper rounds them to 2.7M and 36.5M.
  assert _wide_resnet_parameters(16, 4, 10) == 2_748_890
  assert _wide_resnet_parameters(28, 10, 10) == 36_479_194
  for depth, widen_factor in ((10, 1), (16, 2), (22, 3)):
    model = wide_resnet.WideResNet(7, 2, depth=depth, widen_factor=widen_factor)
    params = _abstract_variables(model, (1, 32, 32, 3))['params']
    assert _size(params) == _wide_resnet_parameters(depth, widen_factor, 7)


def test_inception_resnet_v2_total_matches_keras_including_bn_statistics():
  # keras counts BN moving mean/variance as 60,544 non-trainable weights: 55,873,736.
  variables = _abstract_variables(
    inception_resnet_v2.InceptionResNetV2(1000, 64), (1, 75, 75, 3)
  )
  assert _size(variables['batch_stats']) == 60_544
  assert _size(variables) == 55_873_736


def test_full_size_output_shapes():
  cases = [
    (wide_resnet.WideResNet(10, 128), (2, 32, 32, 3)),
    (resnet.ResNet50(num_classes=1000, ghost_batch_size=2), (2, 224, 224, 3)),
    (inception_resnet_v2.InceptionResNetV2(1000, 2), (2, 299, 299, 3)),
  ]
  for model, input_shape in cases:
    variables = _abstract_variables(model, input_shape)
    logits = jax.eval_shape(
      lambda v, m=model, s=input_shape: m.apply(v, jnp.zeros(s), train=False),
      variables,
    )
    assert logits.shape == (2, model.num_classes)
    assert logits.dtype == jnp.float32


# --- Tiny variants: real forward passes ----------------------------------------------

TINY = {
  'wide_resnet': (
    dict(depth=10, widen_factor=1),
    (16, 16, 3),
  ),
  'resnet': (
    dict(stage_sizes=(1, 1), width=4),
    (32, 32, 3),
  ),
  'resnet_basic': (
    dict(stage_sizes=(1, 1), bottleneck=False, width=4),
    (32, 32, 3),
  ),
  'inception_resnet_v2': (
    dict(repeats=(1, 1, 1), width_multiplier=1 / 16),
    (75, 75, 3),
  ),
  'cnn1d': (dict(width=8), (40,)),
  'mlp': (dict(hidden=(16, 16)), (40,)),
}
# Inception-ResNet-V2 compiles for ~12 s even tiny: slow; the fast subset checks the
# same behaviour on the other models and its full-size shapes
# (test_full_size_output_shapes).
TINY_PARAMS = [
  pytest.param(name, marks=pytest.mark.slow) if name == 'inception_resnet_v2' else name
  for name in TINY
]
NUM_CLASSES = 5


def _tiny(name, dtype=jnp.float32):
  kwargs, image_shape = TINY[name]
  registry_name = 'resnet' if name == 'resnet_basic' else name
  model = models.create_model(
    registry_name,
    num_classes=NUM_CLASSES,
    ghost_batch_size=GHOST,
    half_precision=dtype == jnp.bfloat16,
    **kwargs,
  )
  return model, image_shape


def _inputs(image_shape, batch, seed=1):
  return jax.random.normal(jax.random.key(seed), (batch, *image_shape))


@functools.cache
def _tiny_run(name):
  """Initialises a tiny model and runs it once in each mode (cached across tests)."""
  model, image_shape = _tiny(name)
  x = _inputs(image_shape, 4 * GHOST)
  variables = _random_variables(model, x.shape)
  train = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats']))
  logits, updates = train(variables, x)
  # The first two ghost batches on their own: the same normalisation groups.
  logits_half, _ = train(variables, x[: 2 * GHOST])
  eval_logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, x)
  return variables, logits, updates, logits_half, eval_logits


@pytest.mark.parametrize('name', TINY_PARAMS)
def test_train_mode_shapes_and_batch_stats_updated(name):
  variables, logits, updates, _, _ = _tiny_run(name)
  assert logits.shape == (4 * GHOST, NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  old = jax.tree_util.tree_leaves(variables['batch_stats'])
  new = jax.tree_util.tree_leaves(updates['batch_stats'])
  assert len(old) == len(new) > 0
  assert all(not np.allclose(a, b) for a, b in zip(old, new, strict=True))


@pytest.mark.parametrize('name', TINY_PARAMS)
def test_eval_mode_uses_running_statistics(name):
  _, logits, _, _, eval_logits = _tiny_run(name)
  assert eval_logits.shape == (4 * GHOST, NUM_CLASSES)
  assert eval_logits.dtype == jnp.float32
  assert np.all(np.isfinite(eval_logits))
  # Initial running stats (0, 1) are not the batch's statistics.
  assert not np.allclose(eval_logits, logits)


@pytest.mark.parametrize('name', TINY_PARAMS)
def test_ghost_batches_are_normalised_independently_of_batch_size(name):
  _, logits, _, logits_half, _ = _tiny_run(name)
  # Not bitwise: XLA may pick different convolution algorithms for the two shapes.
  np.testing.assert_allclose(logits[: 2 * GHOST], logits_half, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('name', TINY_PARAMS)
def test_bfloat16_keeps_float32_parameters_and_logits(name):
  model, image_shape = _tiny(name, dtype=jnp.bfloat16)
  assert model.dtype == jnp.bfloat16
  shape = (2 * GHOST, *image_shape)
  variables = _abstract_variables(model, shape)
  logits, updates = jax.eval_shape(
    lambda v: model.apply(v, jnp.zeros(shape), train=True, mutable=['batch_stats']),
    variables,
  )
  assert logits.dtype == jnp.float32
  leaves = jax.tree_util.tree_leaves((variables, updates))
  assert all(leaf.dtype == jnp.float32 for leaf in leaves)


@pytest.mark.parametrize('name', ['resnet', 'cnn1d'])
def test_bfloat16_forward_pass_is_finite(name):
  # Compiling is the slow part on CPU, so only two models really run in bfloat16.
  model, image_shape = _tiny(name, dtype=jnp.bfloat16)
  x = _inputs(image_shape, 2 * GHOST)
  variables = _random_variables(model, x.shape)
  logits, _ = jax.jit(
    lambda v, x: model.apply(v, x, train=True, mutable=['batch_stats'])
  )(variables, x)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  # Near float32 as a whole (bfloat16 keeps 8 mantissa bits); single logits can move
  # more, since a tiny net's last BN normalises a few nearly equal numbers.
  model32, _ = _tiny(name)
  logits32, _ = jax.jit(
    lambda v, x: model32.apply(v, x, train=True, mutable=['batch_stats'])
  )(variables, x)
  assert np.linalg.norm(logits - logits32) < 0.2 * np.linalg.norm(logits32)


def test_zero_init_last_bn_scale():
  model = resnet.ResNet(
    NUM_CLASSES,
    GHOST,
    stage_sizes=(2, 1),
    width=4,
    zero_init_last_bn_scale=True,
  )

  def bn_scales(key):
    # Only the (constant) scales leave the jit, so XLA drops the random kernel draws.
    params = model.init(key, jnp.zeros((1, 32, 32, 3)), train=False)['params']
    flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
    return {path: leaf for path, leaf in flat.items() if path[-1] == 'scale'}

  scales = jax.jit(bn_scales)(jax.random.key(0))
  blocks = {path[0] for path in scales if path[0].startswith('ResidualBlock')}
  assert len(blocks) == 3
  for path, scale in scales.items():
    expected = 0.0 if path[1:] == ('bn3', 'scale') else 1.0
    assert np.all(scale == expected), path
  assert ('ResidualBlock_0', 'proj_bn', 'scale') in scales


def test_bad_configurations_explain_the_fix():
  with pytest.raises(ValueError, match='6n \\+ 4'):
    _abstract_variables(wide_resnet.WideResNet(10, 2, depth=15), (1, 32, 32, 3))
  with pytest.raises(ValueError, match='at least 75'):
    _abstract_variables(inception_resnet_v2.InceptionResNetV2(10, 2), (1, 64, 64, 3))
  with pytest.raises(ValueError, match='model_kwargs.repeats'):
    _abstract_variables(
      inception_resnet_v2.InceptionResNetV2(10, 2, repeats=(1, 1, 0)), (1, 75, 75, 3)
    )
  with pytest.raises(ValueError, match='Choose one of'):
    models.create_model('resnet51', num_classes=10, ghost_batch_size=2)


def test_registry_names():
  assert {'wide_resnet', 'resnet', 'resnet50', 'inception_resnet_v2'} <= set(
    models.model_names()
  )
  model = models.create_model('resnet50', num_classes=1000, ghost_batch_size=32)
  assert isinstance(model, resnet.ResNet)
  assert model.stage_sizes == (3, 4, 6, 3)
  assert model.bottleneck


# --- weight_decay_mask ---------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet', 'inception_resnet_v2', 'cnn1d', 'mlp'])
def test_weight_decay_mask_selects_exactly_the_kernels(name):
  model, image_shape = _tiny(name)
  params = _abstract_variables(model, (GHOST, *image_shape))['params']
  mask = models.weight_decay_mask(params)
  assert jax.tree_util.tree_structure(mask) == jax.tree_util.tree_structure(params)
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(params))
  flat_mask = flax.traverse_util.flatten_dict(flax.core.unfreeze(mask))
  kinds = set()
  for path in flat:
    kinds.add(path[-1])
    assert flat_mask[path] == (path[-1] == 'kernel'), path
  # Every kind of leaf was seen: kernels, BN offsets, and biases (dense, IRv2 up-conv).
  assert {'kernel', 'bias'} <= kinds


def test_weight_decay_mask_works_with_optax():
  optax = pytest.importorskip('optax')
  params = {'dense': {'kernel': jnp.ones((2, 3)), 'bias': jnp.ones((3,))}}
  decay = optax.add_decayed_weights(0.5, mask=models.weight_decay_mask)
  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  updates, _ = decay.update(zeros, decay.init(params), params)
  np.testing.assert_array_equal(updates['dense']['kernel'], 0.5)
  np.testing.assert_array_equal(updates['dense']['bias'], 0.0)


# --- Small models --------------------------------------------------------------------


def test_small_model_shapes():
  def output_shape(model, shape):
    variables = _abstract_variables(model, shape)
    return jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(shape), train=False), variables
    ).shape

  cnn = small.CNN1D(NUM_CLASSES, GHOST, width=8, kernel_size=5)
  assert output_shape(cnn, (6, 40)) == (6, NUM_CLASSES)
  # CNN1D also takes (batch, length, channels).
  assert output_shape(cnn, (6, 40, 3)) == (6, NUM_CLASSES)
  cnn_params = _abstract_variables(cnn, (1, 40, 3))['params']
  assert cnn_params['Conv1D_0']['kernel'].shape == (5, 3, 8)
  # Three convolutions without bias, each followed by BN (scale, offset); a dense layer.
  conv_and_bn = 5 * 3 * 8 + 2 * 8 + 2 * (5 * 8 * 8 + 2 * 8)
  assert _size(cnn_params) == conv_and_bn + 8 * NUM_CLASSES + NUM_CLASSES
  mlp = small.MLP(NUM_CLASSES, GHOST, hidden=(16, 7))
  assert output_shape(mlp, (6, 40)) == (6, NUM_CLASSES)
  mlp_params = _abstract_variables(mlp, (1, 40))['params']
  assert (
    _size(mlp_params) == 40 * 16 + 2 * 16 + 16 * 7 + 2 * 7 + 7 * NUM_CLASSES + NUM_CLASSES
  )


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('width', [1, 2, 3, 5])
def test_conv1d_as_matmul_equals_xla_convolution(width, stride):
  x = _inputs((17, 3), 4)
  kernel = jax.random.normal(jax.random.key(2), (width, 3, 6))
  conv = nn.Conv(6, (width,), strides=stride, padding='SAME', use_bias=False)

  @jax.jit
  def three_ways(x, kernel):
    return (
      small.conv1d_as_matmul(x, kernel, stride),
      jax.lax.conv_general_dilated(
        x, kernel, (stride,), 'SAME', dimension_numbers=('NWC', 'WIO', 'NWC')
      ),
      conv.apply({'params': {'kernel': kernel}}, x),
    )

  got, lax_out, flax_out = three_ways(x, kernel)
  assert got.shape == lax_out.shape == (4, -(-17 // stride), 6)
  np.testing.assert_allclose(got, lax_out, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(got, flax_out, rtol=1e-5, atol=1e-5)


# --- GhostBatchNorm ------------------------------------------------------------------


def _bn_params(features, seed=3):
  scale_key, bias_key = jax.random.split(jax.random.key(seed))
  return {
    'scale': 1 + 0.1 * jax.random.normal(scale_key, (features,)),
    'bias': 0.1 * jax.random.normal(bias_key, (features,)),
  }


def test_ghost_batch_norm_equals_flax_batch_norm_when_ghost_is_the_batch():
  x = 3 + 2 * _inputs((5, 5, 4), 8)
  params = _bn_params(4)
  stats = {'mean': jnp.full((4,), 0.5), 'var': jnp.full((4,), 2.0)}
  variables = {'params': params, 'batch_stats': stats}
  ghost = GhostBatchNorm(8, momentum=0.8, epsilon=1e-3)
  reference = nn.BatchNorm(momentum=0.8, epsilon=1e-3)
  for train in (True, False):

    @jax.jit
    def both(variables, x, train=train):
      return (
        ghost.apply(variables, x, train=train, mutable=['batch_stats']),
        reference.apply(
          variables, x, use_running_average=not train, mutable=['batch_stats']
        ),
      )

    (got, got_stats), (expected, expected_stats) = both(variables, x)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    for key in ('mean', 'var'):
      np.testing.assert_allclose(
        got_stats['batch_stats'][key],
        expected_stats['batch_stats'][key],
        rtol=1e-5,
        atol=1e-6,
      )


def test_ghost_batch_norm_one_call_equals_sequential_ghost_batches():
  momentum, epsilon, ghost, k = 0.7, 1e-5, 3, 4
  x = np.asarray(1 + 2 * _inputs((2, 5), ghost * k))
  params = _bn_params(5)
  layer = GhostBatchNorm(ghost, momentum=momentum, epsilon=epsilon)
  apply = jax.jit(lambda v, x: layer.apply(v, x, train=True, mutable=['batch_stats']))
  variables = {
    'params': params,
    'batch_stats': {'mean': jnp.zeros((5,)), 'var': jnp.ones((5,))},
  }
  out, updated = apply(variables, x)

  # By hand: normalise each ghost batch by its own statistics; update the running
  # averages once per ghost batch, in order.
  mean, var = np.zeros(5), np.ones(5)
  expected_out = []
  stats = variables['batch_stats']
  for j in range(k):
    group = x[j * ghost : (j + 1) * ghost].reshape(-1, 5)
    group_mean, group_var = group.mean(axis=0), group.var(axis=0)
    mean = momentum * mean + (1 - momentum) * group_mean
    var = momentum * var + (1 - momentum) * group_var
    normalised = (group - group_mean) / np.sqrt(group_var + epsilon)
    expected_out.append(normalised * params['scale'] + params['bias'])
    # The layer itself, one ghost batch per call, must agree too.
    single, single_stats = apply(
      {'params': params, 'batch_stats': stats}, x[j * ghost : (j + 1) * ghost]
    )
    stats = single_stats['batch_stats']
    np.testing.assert_allclose(
      single, out[j * ghost : (j + 1) * ghost], rtol=1e-5, atol=1e-5
    )
  np.testing.assert_allclose(
    out.reshape(-1, 5), np.concatenate(expected_out), rtol=1e-5, atol=1e-5
  )
  for key, expected in (('mean', mean), ('var', var)):
    np.testing.assert_allclose(updated['batch_stats'][key], expected, rtol=1e-5)
    np.testing.assert_allclose(stats[key], expected, rtol=1e-5)


def test_ghost_batch_norm_rejects_a_batch_that_is_not_a_multiple():
  layer = GhostBatchNorm(4)
  x = jnp.ones((6, 3))
  variables = layer.init(jax.random.key(0), x[:4], train=False)
  with pytest.raises(ValueError, match='multiple of ghost_batch_size'):
    layer.apply(variables, x, train=True, mutable=['batch_stats'])
