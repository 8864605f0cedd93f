"""Optimizers against their update rules written out in numpy, across a phase boundary.

Each chain runs six updates of a two-phase schedule (ε and m change after step 3, the
batch size does not) on fixed random gradients; the reference applies the paper's
formulas (docs/PAPER.md, "Momentum form") in float64 with the per-step ε and m typed in
by hand. The same jitted update serves both phases: the hyperparameters are inputs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ibs import models, optim, schedules

# Phase 0: steps 0–2 at ε = 0.1, m = 0.9; phase 1: steps 3–5 at ε = 0.03, m = 0.5.
# N = 30 examples, B = 10, the boundary at epoch 1: 3 steps per phase.
LEARNING_RATES = [0.1, 0.1, 0.1, 0.03, 0.03, 0.03]
MOMENTA = [0.9, 0.9, 0.9, 0.5, 0.5, 0.5]
WEIGHT_DECAY = 0.01
B2, EPS = 0.999, 1e-8


def _schedule(momentum=True):
  m0, m1 = (0.9, 0.5) if momentum else (0.0, 0.0)
  return schedules.Schedule(
    phases=(schedules.Phase(0.0, 10, 0.1, m0), schedules.Phase(1.0, 10, 0.03, m1)),
    num_epochs=2.0,
    num_train_examples=30,
  )


def _params_and_gradients(num_steps=6):
  rng = np.random.default_rng(0)
  params = {
    'dense': {'kernel': rng.normal(size=(3, 4)), 'bias': rng.normal(size=(4,))},
    'scale': rng.normal(size=(5,)),
  }
  grads = [
    jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(num_steps)
  ]
  return params, grads


def _reference(name, params, grads, decoupled, masked, momenta=MOMENTA):
  """Float64 numpy: the update rules with ε_t, m_t from the hand-typed tables."""
  leaves, treedef = jax.tree.flatten(params)
  decays = (
    jax.tree.leaves(models.weight_decay_mask(params)) if masked else [True] * len(leaves)
  )
  lam = [WEIGHT_DECAY if d else 0.0 for d in decays]
  w = [np.array(x, np.float64) for x in leaves]
  trace = [np.zeros_like(x) for x in w]  # A, or Adam's first moment
  second = [np.zeros_like(x) for x in w]
  for t, step_grads in enumerate(grads):
    lr, m = LEARNING_RATES[t], momenta[t]
    for i, g in enumerate(jax.tree.leaves(step_grads)):
      g = g if decoupled else g + lam[i] * w[i]  # L2: ĝ ← ĝ + λω
      if name == 'sgd':
        update = g
      elif name == 'momentum':  # A ← m·A + ĝ ; ω ← ω − ε·A
        trace[i] = m * trace[i] + g
        update = trace[i]
      elif name == 'nesterov':  # A ← m·A + ĝ ; ω ← ω − ε·(ĝ + m·A)
        trace[i] = m * trace[i] + g
        update = g + m * trace[i]
      elif name == 'adam':  # β1 = m; bias correction with the current β1, as optax does
        trace[i] = m * trace[i] + (1 - m) * g
        second[i] = B2 * second[i] + (1 - B2) * g**2
        mean = trace[i] / (1 - m ** (t + 1))
        variance = second[i] / (1 - B2 ** (t + 1))
        update = mean / (np.sqrt(variance) + EPS)
      if decoupled:  # decay added after the statistics, scaled by ε (SGDW/AdamW)
        update = update + lam[i] * w[i]
      w[i] = w[i] - lr * update
  return jax.tree.unflatten(treedef, w)


def _run(tx, params, grads):
  """The updates under one jit; returns final params, per-step ε and m, and traces."""
  traces = []

  @jax.jit
  def update(params, opt_state, g):
    traces.append(1)  # runs only when jit traces
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  opt_state = tx.init(params)
  used = []
  for g in grads:
    params, opt_state = update(params, opt_state, jax.tree.map(jnp.float32, g))
    if hasattr(opt_state, 'hyperparams'):
      used.append({k: float(v) for k, v in opt_state.hyperparams.items()})
  return params, used, len(traces)


@pytest.mark.parametrize('decoupled', [False, True], ids=['l2', 'decoupled'])
@pytest.mark.parametrize('masked', [False, True], ids=['all', 'kernels'])
@pytest.mark.parametrize('name', optim.OPTIMIZERS)
def test_updates_match_the_hand_written_rules(name, decoupled, masked):
  params, grads = _params_and_gradients()
  tx = optim.create_optimizer(
    name,
    _schedule(momentum=name != 'sgd'),
    weight_decay=WEIGHT_DECAY,
    decoupled_weight_decay=decoupled,
    weight_decay_mask=models.weight_decay_mask if masked else None,
  )
  got, used, num_traces = _run(tx, params, grads)

  momenta = [0.0] * 6 if name == 'sgd' else MOMENTA
  expected = _reference(name, params, grads, decoupled, masked, momenta)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6), got, expected
  )
  # The phase change reached the step as data: ε (and m) switched, nothing retraced.
  assert num_traces == 1
  np.testing.assert_allclose(
    [u['learning_rate'] for u in used], LEARNING_RATES, rtol=1e-6
  )
  if name != 'sgd':
    np.testing.assert_allclose([u['momentum'] for u in used], MOMENTA, rtol=1e-6)


def test_without_weight_decay_momentum_is_optax_sgd():
  """Cross-check against optax's own heavy-ball SGD (one phase, constant ε and m)."""
  params, grads = _params_and_gradients()
  schedule = schedules.Schedule(
    phases=(schedules.Phase(0.0, 10, 0.1, 0.9),), num_epochs=2.0, num_train_examples=30
  )
  got, _, _ = _run(optim.create_optimizer('momentum', schedule), params, grads)
  expected, _, _ = _run(optax.sgd(0.1, momentum=0.9), params, grads)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), got, expected)


def test_sgd_has_no_momentum():
  """'sgd' takes only ε from the schedule: its m, if any, neither enters nor is kept."""
  params, grads = _params_and_gradients()
  got, used, _ = _run(
    optim.create_optimizer('sgd', _schedule(), weight_decay=WEIGHT_DECAY), params, grads
  )
  expected = _reference('sgd', params, grads, False, False, [0.0] * 6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5), got, expected)
  assert all(set(u) == {'learning_rate'} for u in used)


def test_hyperparameters_are_float32_state():
  """Injected ε and m are float32 arrays in the state: a phase switch changes
  values only."""
  params, _ = _params_and_gradients()
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  state = optim.create_optimizer('nesterov', _schedule()).init(params)
  for value in state.hyperparams.values():
    assert value.dtype == jnp.float32 and value.shape == ()


def test_unknown_optimizer_names_the_field():
  with pytest.raises(ValueError, match='config.optimizer'):
    optim.create_optimizer('lamb', _schedule())
