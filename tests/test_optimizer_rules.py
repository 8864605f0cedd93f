"""The optimizer-aware rules of ibs.schedules against their formulas written out by hand.

seesaw (Meterez et al. 2025): B ← B·α, ε ← ε/√α where the recipe divides ε by α.
sqrt_scaling (Malladi et al. 2022): for a batch κB, ε ← √κ·ε, 1 − β1 ← κ(1 − β1),
1 − β2 ← κ(1 − β2), ε̂ ← ε̂/√κ, applied with κ = α to each decayed phase.
scale_weight_decay (Wang & Aitchison 2024): λ_i = λ0·(B_i/B_0)·(ε_0/ε_i), so that
τ = B/(ε·λ·N) is the same in every phase.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import default, mnist1d_study
from ibs import calculator, config_checks, optim, schedules
from ibs.schedules import Phase, Schedule, ScheduleError, StepDecay

N = 50_000
# §5.1's recipe with Adam's ε: ε ÷ 5 at epochs 60/120/160 of 200.
RECIPE = StepDecay(1e-3, 128, 0.9, (60.0, 120.0, 160.0), (5.0, 5.0, 5.0), 200.0)
# Two milestones ×2: small enough for the square-root rule's β1 (κ(1 − β1) = 0.4 < 1).
SMALL_RECIPE = StepDecay(0.01, 32, 0.9, (10.0, 20.0), (2.0, 2.0), 30.0)


def test_seesaw_by_hand():
  phases = schedules.seesaw(RECIPE)
  assert [p.batch_size for p in phases] == [128, 640, 3200, 16000]
  r5 = math.sqrt(5)
  assert [p.learning_rate for p in phases] == pytest.approx(
    [1e-3, 1e-3 / r5, 1e-3 / 5, 1e-3 / (5 * r5)]
  )
  assert [p.momentum for p in phases] == [0.9] * 4
  # ε/√B falls by exactly α per milestone, as with decaying ε at fixed B.
  decaying = schedules.decaying_lr(RECIPE)
  ours = [p.learning_rate / math.sqrt(p.batch_size) for p in phases]
  theirs = [p.learning_rate / math.sqrt(p.batch_size) for p in decaying]
  assert ours == pytest.approx(theirs)
  # The paper's increasing batch lowers it by only √α per milestone.
  paper = schedules.increasing_batch(RECIPE)
  ratios = [
    (a.learning_rate / math.sqrt(a.batch_size))
    / (b.learning_rate / math.sqrt(b.batch_size))
    for a, b in zip(paper, paper[1:], strict=False)
  ]
  assert ratios == pytest.approx([r5] * 3)


def test_sqrt_scaling_by_hand():
  phases = schedules.sqrt_scaling(SMALL_RECIPE, adam_b2=0.999, adam_eps=1e-8)
  r2 = math.sqrt(2)
  assert [p.batch_size for p in phases] == [32, 64, 128]
  assert [p.learning_rate for p in phases] == pytest.approx([0.01, 0.01 / r2, 0.005])
  # 1 − β ← κ(1 − β) with κ = 2, then 4.
  assert [p.momentum for p in phases] == pytest.approx([0.9, 0.8, 0.6])
  assert [p.adam_b2 for p in phases] == pytest.approx([0.999, 0.998, 0.996])
  assert [p.adam_eps for p in phases] == pytest.approx([1e-8, 1e-8 / r2, 0.5e-8])
  # Each phase is the decayed phase (ε/α^k, B) mapped by the rule with κ = 2^k.
  for k, p in enumerate(phases):
    kappa = 2.0**k
    assert p.learning_rate == pytest.approx(0.01 / 2**k * math.sqrt(kappa))
    assert p.batch_size == 32 * kappa
  kept = schedules.sqrt_scaling(SMALL_RECIPE, scale_b1=False)
  assert [p.momentum for p in kept] == [0.9] * 3
  assert [p.adam_b2 for p in kept] == pytest.approx([0.999, 0.998, 0.996])


def test_sqrt_scaling_refuses_what_the_rule_cannot_give():
  # κ = 25 at epoch 120: 1 − β1 = 2.5.
  with pytest.raises(
    ScheduleError, match=r'κ\(1 − β1\) = 25 × 0.1 = 2.5.*sqrt_scaling_b1'
  ):
    schedules.sqrt_scaling(RECIPE)
  with pytest.raises(ScheduleError, match='adam_b2'):
    schedules.sqrt_scaling(RECIPE, adam_b2=0.9, scale_b1=False)


@pytest.mark.parametrize(
  ('kind', 'growth'),
  [('increasing_batch', 5.0), ('decaying_lr', 5.0), ('seesaw', 5.0**1.5)],
)
def test_scale_weight_decay_keeps_the_timescale(kind, growth):
  phases = schedules.scale_weight_decay(schedules.convert(RECIPE, kind), 0.1)
  assert [p.weight_decay for p in phases] == pytest.approx(
    [0.1 * growth**k for k in range(4)]
  )
  tau = [p.batch_size / (p.learning_rate * p.weight_decay * N) for p in phases]
  assert tau == pytest.approx([128 / (1e-3 * 0.1 * N)] * 4)  # 25.6 epochs
  with pytest.raises(ScheduleError, match='config.weight_decay=0.0'):
    schedules.scale_weight_decay(phases, 0.0)


def test_optional_fields_are_all_or_none():
  with pytest.raises(ScheduleError, match='set it in every phase or in none'):
    Schedule((Phase(0.0, 4, 0.1, 0.9, 0.1), Phase(1.0, 8, 0.1, 0.9)), 2.0, 40)
  with pytest.raises(ScheduleError, match=r'adam_b2=1.0 must be in \[0.0, 1.0\)'):
    Schedule((Phase(0.0, 4, 0.1, 0.9, adam_b2=1.0),), 2.0, 40)
  with pytest.raises(ScheduleError, match='weight_decay=-0.1'):
    Schedule((Phase(0.0, 4, 0.1, 0.9, weight_decay=-0.1),), 2.0, 40)


def _config(kind, **fields):
  config = ml_collections.ConfigDict(
    dict(
      weight_decay=0.1,
      schedule=dict(
        kind=kind,
        num_epochs=200.0,
        learning_rate=1e-3,
        batch_size=128,
        momentum=0.9,
        milestones=(60.0, 120.0, 160.0),
        decay_factor=5.0,
      ),
    )
  )
  for key, value in fields.items():
    config.schedule[key] = value
  return config


def test_from_config_builds_the_rules():
  seesaw = schedules.from_config(_config('seesaw'), N)
  assert seesaw.phases == schedules.seesaw(RECIPE)
  scaled = schedules.from_config(_config('increasing_batch', scale_weight_decay=True), N)
  assert [p.weight_decay for p in scaled.phases] == pytest.approx([0.1, 0.5, 2.5, 12.5])
  sqrt = schedules.from_config(
    _config('sqrt_scaling', sqrt_scaling_b1=False, adam_b2=0.9999), N
  )
  assert [p.adam_b2 for p in sqrt.phases] == pytest.approx(
    [0.9999, 0.9995, 0.9975, 0.9875]
  )
  with pytest.raises(ScheduleError, match='sqrt_scaling_b1=False'):
    schedules.from_config(_config('sqrt_scaling'), N)


def test_plain_optax_adamw_loop_takes_the_weight_decay_schedule():
  """The README's library example: λ per phase into optax.adamw, like ε and m."""
  recipe = StepDecay(1e-3, 4, 0.9, (1.0,), (2.0,), 2.0)
  schedule = Schedule(
    schedules.scale_weight_decay(schedules.increasing_batch(recipe), 0.1), 2.0, 40
  )
  tx = optax.inject_hyperparams(optax.adamw)(
    learning_rate=schedules.learning_rate_schedule(schedule),
    b1=schedules.momentum_schedule(schedule),
    weight_decay=schedules.weight_decay_schedule(schedule),
  )
  params = {'w': jnp.ones(3)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  used = []
  for _ in range(15):  # 10 steps at B = 4, then 5 at B = 8
    _, state = update({'w': jnp.zeros(3)}, state, params)
    used.append(float(state.hyperparams['weight_decay']))
  np.testing.assert_allclose(used, [0.1] * 10 + [0.2] * 5, rtol=1e-6)
  # With zero gradients AdamW's update is −ε·λ·ω alone.
  updates, _ = update({'w': jnp.zeros(3)}, state, params)
  np.testing.assert_allclose(updates['w'], -1e-3 * 0.2 * np.ones(3), rtol=1e-5)


def test_optimizer_injects_weight_decay_and_adam_terms_per_phase():
  """ibs's AdamW and Adam chains against the update written out in numpy (float64)."""
  phases = (
    Phase(0.0, 10, 0.1, 0.9, weight_decay=0.01, adam_b2=0.999, adam_eps=1e-3),
    Phase(1.0, 10, 0.03, 0.5, weight_decay=0.05, adam_b2=0.99, adam_eps=1e-4),
  )
  schedule = Schedule(phases, 2.0, 30)  # 3 steps per phase
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(4,))
  grads = [rng.normal(size=(4,)) for _ in range(6)]
  tx = optim.create_optimizer('adam', schedule, decoupled_weight_decay=True)
  params = {'w': jnp.asarray(w0, jnp.float32)}
  state = tx.init(params)
  traces = []

  @jax.jit
  def step(params, state, g):
    traces.append(1)
    updates, state = tx.update({'w': g}, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, jnp.asarray(g, jnp.float32))
  w, mu, nu = w0.copy(), np.zeros(4), np.zeros(4)
  for t, g in enumerate(grads):
    p = phases[t // 3]
    b1, b2, eps, lam = p.momentum, p.adam_b2, p.adam_eps, p.weight_decay
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g**2
    update = (mu / (1 - b1 ** (t + 1))) / (np.sqrt(nu / (1 - b2 ** (t + 1))) + eps)
    w = w - p.learning_rate * (update + lam * w)  # AdamW: ω ← ω − ε(Adam + λω)
  np.testing.assert_allclose(params['w'], w, rtol=2e-5, atol=1e-6)
  assert len(traces) == 1  # λ, β2 and ε̂ switched as data
  assert float(state.hyperparams['weight_decay']) == pytest.approx(0.05)


def test_calculator_prints_the_rules_per_phase():
  config = default.get_config()
  config.optimizer, config.decoupled_weight_decay, config.weight_decay = 'adam', True, 0.1
  s = config.schedule
  s.learning_rate, s.scale_weight_decay = 1e-3, True
  text = calculator.report(config, baseline=True)
  lines = text.splitlines()
  assert lines[0] == 'increasing_batch schedule on mnist1d (adamw)'
  assert 'g SGD' in lines[1] and 'ε√(N/B)' in lines[1] and 'τ epochs' in lines[1]
  # N = 20,000, ε 1e-3, λ0 0.1: τ = 32/(1e-3 · 0.1 · 20000) = 16 epochs in every phase;
  # ε√(N/B) = 1e-3 · √(20000/160) = 0.01118 in phase 1.
  assert lines[4].split()[5:7] == ['0.5', '16']
  assert lines[4].split()[9] == '0.01118'
  assert any(
    line.startswith("g SGD: the SGD noise scale εN/(B(1 − m)), not Adam's.")
    for line in lines
  )
  baseline = text.split('baseline: decaying learning rate')[1].splitlines()
  assert baseline[4].split()[5:7] == ['0.1', '80']  # λ fixed: τ grows ×5 as ε falls
  # ε√(N/B) = 2e-4 · √(20000/32) = 0.005: √5 below increasing batch's, which the
  # constant ε lowers by only √5 per milestone.
  assert baseline[4].split()[9] == '0.005'
  assert 'parameter updates: 23,100.0 vs 62,500.0 with decaying LR' in text


@pytest.mark.parametrize(
  ('overrides', 'message'),
  [
    ({'schedule.kind': 'seesaw'}, "kind='seesaw' converts the recipe for Adam"),
    ({'schedule.kind': 'sqrt_scaling'}, "optimizer='momentum'"),
    (
      {'optimizer': 'adam', 'schedule.adam_b2': 0.99},
      "adam_b2 is read only by kind='sqrt_scaling'",
    ),
    (
      {'schedule.scale_weight_decay': True},
      'config.decoupled_weight_decay is False',
    ),
    (
      {
        'schedule.scale_weight_decay': True,
        'decoupled_weight_decay': True,
        'weight_decay': 0.0,
      },
      'scales λ from config.weight_decay',
    ),
  ],
)
def test_meaningless_combinations_name_the_field(overrides, message):
  config = default.get_config()
  for path, value in overrides.items():
    node = config
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_config(config, num_devices=1)


@pytest.mark.parametrize(
  'arg',
  [
    'optimizer=adam,schedule=sqrt_scaling',
    'optimizer=adam,schedule=seesaw',
    'optimizer=adamw,schedule=decaying_lr',
    'optimizer=adamw,schedule=increasing_batch,weight_decay=scaled',
  ],
)
def test_study_configs_pass_their_checks(arg):
  schedule = config_checks.check_config(
    mnist1d_study.get_config(arg), num_devices=1
  ).schedule
  assert sum(p.batch_size for p in schedule.phases) in (4 * 32, 32 + 160 + 800 + 4000)


def test_study_refuses_seesaw_with_momentum():
  config = mnist1d_study.get_config('optimizer=momentum,schedule=seesaw')
  with pytest.raises(config_checks.ConfigError, match='ε/√B'):
    config_checks.check_config(config, num_devices=1)
