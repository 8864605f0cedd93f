"""optax chains for plain SGD, heavy-ball momentum, Nesterov momentum and Adam.

The learning rate and momentum are *injected hyperparameters* (init2winit's habit,
docs/DESIGN.md decision 2): `optax.inject_hyperparams` evaluates the schedules of
ibs.schedules from the optimizer's own update count and keeps the values in the optimizer
state, so a phase that changes ε or m but not the batch shape reuses the compiled step,
and the values in use can be read back (`opt_state.hyperparams`).

Momentum is the paper's TensorFlow heavy-ball form (docs/PAPER.md, "Momentum form"):
    A ← m·A + ĝ ;   ω ← ω − ε·A
which is `optax.trace(decay=m)` followed by a scale of −ε; a change of ε acts at once,
with no momentum correction. Weight decay is L2 added to the gradient (ĝ ← ĝ + λω, the
paper's models), or with `decoupled_weight_decay` added to the update after the
momentum/Adam statistics (SGDW / AdamW, Loshchilov & Hutter 2019). Decoupled decay is
multiplied by ε like the rest of the update (ω ← ω − ε·(A + λω)), as in optax's `adamw`
and PyTorch's AdamW; for plain SGD the two forms are the same update.

tests/test_optim.py checks every chain, both decay forms and a phase switch against these
formulas written out in numpy.
"""

import functools
from typing import Any

import optax

from ibs import schedules


def _weight_decay(weight_decay: Any, mask: Any) -> optax.GradientTransformation:
  """λω added to the update; λ a number, or an injected (array) value per phase."""
  if isinstance(weight_decay, int | float) and not weight_decay:
    return optax.identity()
  return optax.add_decayed_weights(weight_decay, mask=mask)


def _decayed(statistics, learning_rate, weight_decay, decoupled, mask):
  """L2: ω ← ω − ε·S(ĝ + λω); decoupled: ω ← ω − ε·(S(ĝ) + λω), S = `statistics`."""
  decay = _weight_decay(weight_decay, mask)
  return optax.chain(
    optax.identity() if decoupled else decay,
    statistics,
    decay if decoupled else optax.identity(),
    optax.scale_by_learning_rate(learning_rate),
  )


def sgd(learning_rate, weight_decay=0.0, decoupled=False, mask=None):
  """ω ← ω − ε·(ĝ + λω); `decoupled` is accepted for uniformity and changes nothing."""
  del decoupled  # Without momentum, L2 and decoupled decay are the same update.
  decay = _weight_decay(weight_decay, mask)
  return optax.chain(decay, optax.scale_by_learning_rate(learning_rate))


def heavy_ball(
  learning_rate, momentum, weight_decay=0.0, decoupled=False, mask=None, nesterov=False
):
  """A ← m·A + ĝ; ω ← ω − ε·A, or with `nesterov` ω ← ω − ε·(ĝ + m·A)."""
  trace = optax.trace(decay=momentum, nesterov=nesterov)
  return _decayed(trace, learning_rate, weight_decay, decoupled, mask)


def adam(
  learning_rate,
  momentum,
  weight_decay=0.0,
  decoupled=False,
  mask=None,
  b2=0.999,
  eps=1e-8,
):
  """Adam with β1 = the schedule's momentum (Kingma & Ba 2015); AdamW if decoupled."""
  moments = optax.scale_by_adam(b1=momentum, b2=b2, eps=eps)
  return _decayed(moments, learning_rate, weight_decay, decoupled, mask)


_FACTORIES = {
  'sgd': sgd,
  'momentum': heavy_ball,
  'nesterov': functools.partial(heavy_ball, nesterov=True),
  'adam': adam,
}
OPTIMIZERS = tuple(_FACTORIES)


def factory(name: str):
  """The chain-building function of optimizer `name` (one of OPTIMIZERS), for callers that
  inject their own hyperparameters (ibs/tools/branch.py gives ε as a number)."""
  return _FACTORIES[name]


def create_optimizer(
  name: str,
  schedule: schedules.Schedule,
  *,
  weight_decay: float = 0.0,
  decoupled_weight_decay: bool = False,
  weight_decay_mask: Any = None,
  host_set: bool = False,
) -> optax.GradientTransformation:
  """The optimizer `name` following `schedule`'s ε and m, with injected hyperparameters.

  For 'adam' m is Adam's β1. 'sgd' has no momentum and ignores m (ibs.config_checks
  rejects a config that sets m ≠ 0 with it). Where the phases carry λ
  (schedules.scale_weight_decay) it is injected per phase too and `weight_decay` is
  ignored; where they carry Adam's β2 and ε̂ (schedules.sqrt_scaling), so are those.

  With `host_set`, every injected value (ε, m, and a per-phase λ, β2, ε̂) starts as
  its number at step 0 and stays what the state holds until the host changes it
  (`set_hyperparams`): the adaptive schedule decides its switches on the host
  (ibs/adaptive.py), and the probe's branches set their own ε (ibs/tools/branch.py), so
  the step cannot compute them from its update count.
  """
  if name not in OPTIMIZERS:
    raise ValueError(
      f'Unknown config.optimizer={name!r}. Choose one of {list(OPTIMIZERS)}.'
    )
  first = schedule.phases[0]
  hyperparams = {
    'learning_rate': schedules.learning_rate_schedule(schedule),
    'momentum': schedules.momentum_schedule(schedule),
  }
  if name == 'sgd':
    del hyperparams['momentum']
  if first.weight_decay is not None:
    weight_decay = schedules.weight_decay_schedule(schedule)
  if first.adam_b2 is not None or first.adam_eps is not None:
    if name != 'adam':
      raise ValueError(
        f"The schedule sets Adam's β2 and epsilon per phase, "
        f'but the optimizer is {name!r}.'
      )
    hyperparams['b2'] = schedules.adam_b2_schedule(schedule)
    hyperparams['eps'] = schedules.adam_eps_schedule(schedule)
  injected_decay = callable(weight_decay)
  if host_set:  # every injected value its number at step 0, set by the host from then
    if injected_decay:
      hyperparams['weight_decay'] = weight_decay
    hyperparams = {k: float(v(0)) for k, v in hyperparams.items()}
    weight_decay = hyperparams.pop('weight_decay', weight_decay)
  # Static: these choose the chain's shape (and the mask may be a function of the params);
  # otherwise optax would inject them as traced values or call the mask with the step. A
  # per-phase λ is injected like ε and m.
  static = ('decoupled', 'mask')
  if not injected_decay:
    static = ('weight_decay', *static)
  return optax.inject_hyperparams(_FACTORIES[name], static_args=static)(
    **hyperparams,
    weight_decay=weight_decay,
    decoupled=decoupled_weight_decay,
    mask=weight_decay_mask,
  )


def set_hyperparams(opt_state: Any, **values: float) -> Any:
  """`opt_state` (of `create_optimizer(..., host_set=True)`) with new ε or m.

  Each value keeps the dtype and placement of the one it replaces, so the compiled step
  takes the new state without retracing.
  """
  import jax
  import numpy as np

  hyperparams = dict(opt_state.hyperparams)
  for name, value in values.items():
    old = hyperparams[name]
    # From the host: a device array put on a multi-process sharding can come out
    # malformed (ibs.sharding.replicate).
    hyperparams[name] = jax.device_put(np.asarray(value, old.dtype), old.sharding)
  return opt_state._replace(hyperparams=hyperparams)
