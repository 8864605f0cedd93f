"""Schedules and the training clock against the paper's numbers, by hand and by property.

The expected numbers come from the paper (its reported update counts, docs/PAPER.md) or
are worked out by hand in the comments, never from the code under test.
"""

import fractions
import math

import hypothesis
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from hypothesis import strategies as st

from ibs import clock, schedules
from ibs.schedules import Phase, Schedule, ScheduleError, StepDecay

CIFAR10_N = 50_000
# §5.1: WRN 16-4, ε 0.1, m 0.9, B 128, ε ÷ 5 at epochs 60/120/160 of 200.
CIFAR10_RECIPE = StepDecay(
  learning_rate=0.1,
  batch_size=128,
  momentum=0.9,
  milestones=(60.0, 120.0, 160.0),
  factors=(5.0, 5.0, 5.0),
  num_epochs=200.0,
)


def _approximate_g(phase, n):
  return phase.learning_rate * n / (phase.batch_size * (1 - phase.momentum))


@pytest.mark.parametrize(
  ('kind', 'cap', 'learning_rates', 'batch_sizes', 'updates'),
  [
    ('decaying_lr', None, (0.1, 0.02, 0.004, 0.0008), (128,) * 4, 78_125),
    ('hybrid', 640, (0.1, 0.1, 0.02, 0.004), (128, 640, 640, 640), 34_375),
    ('increasing_batch', None, (0.1,) * 4, (128, 640, 3200, 16000), 28_875),
  ],
)
def test_cifar10_schedules_match_the_paper(
  kind, cap, learning_rates, batch_sizes, updates
):
  schedule = schedules.from_step_decay(
    CIFAR10_RECIPE, kind, CIFAR10_N, max_batch_size=cap
  )
  assert [p.start_epoch for p in schedule.phases] == [0, 60, 120, 160]
  assert [p.batch_size for p in schedule.phases] == list(batch_sizes)
  assert [p.learning_rate for p in schedule.phases] == pytest.approx(learning_rates)
  assert sum(clock.nominal_updates(schedule)) == pytest.approx(updates, abs=1e-9)
  assert _approximate_g(schedule.phases[0], CIFAR10_N) == pytest.approx(390.625)


def test_cifar10_integer_steps_by_hand():
  schedule = schedules.from_step_decay(CIFAR10_RECIPE, 'increasing_batch', CIFAR10_N)
  # Phase 0: ceil(3,000,000 / 128) = 23,438 steps, ending at 3,000,064 examples.
  # Phase 1: ceil((6,000,000 − 3,000,064) / 640) = 4,688, ending at 6,000,384.
  # Phase 2: ceil((8,000,000 − 6,000,384) / 3200) = 625, ending at 8,000,384.
  # Phase 3: ceil((10,000,000 − 8,000,384) / 16000) = 125, ending at 10,000,384.
  assert clock.phase_spans(schedule) == (
    clock.PhaseSpan(0, 23_438, 0, 3_000_064),
    clock.PhaseSpan(23_438, 4_688, 3_000_064, 6_000_384),
    clock.PhaseSpan(28_126, 625, 6_000_384, 8_000_384),
    clock.PhaseSpan(28_751, 125, 8_000_384, 10_000_384),
  )
  assert clock.num_steps(schedule) == 28_876
  assert clock.nominal_updates(schedule) == [23_437.5, 4_687.5, 625.0, 125.0]


def test_section_5_2_scaling_rules_keep_the_initial_noise_scale():
  # B_max = 5120. Increased initial LR: ε 0.5, B 640 (B ∝ ε, ×5).
  increased_lr = schedules.scale_batch_with_learning_rate(CIFAR10_RECIPE, 5.0)
  assert (increased_lr.learning_rate, increased_lr.batch_size) == (0.5, 640)
  lr_schedule = schedules.from_step_decay(
    increased_lr, 'hybrid', CIFAR10_N, max_batch_size=5120
  )
  # 60·50000/640 + 60·50000/3200 + 80·50000/5120 = 4687.5 + 937.5 + 781.25.
  assert sum(clock.nominal_updates(lr_schedule)) == pytest.approx(6_406.25)
  assert sum(clock.nominal_updates(lr_schedule)) < 6_500

  # Increased momentum: m 0.98 and B 3200 (B ∝ 1/(1 − m), ×5).
  increased_m = schedules.scale_batch_with_momentum(increased_lr, 0.98)
  assert (increased_m.learning_rate, increased_m.batch_size) == (0.5, 3200)
  assert increased_m.momentum == 0.98
  m_schedule = schedules.from_step_decay(
    increased_m, 'hybrid', CIFAR10_N, max_batch_size=5120
  )
  # 60·50000/3200 + 140·50000/5120 = 937.5 + 1367.1875.
  assert sum(clock.nominal_updates(m_schedule)) == pytest.approx(2_304.6875)
  assert sum(clock.nominal_updates(m_schedule)) < 2_500
  # At the first milestone 3200·5 > 5120: B → 5120, ε → 0.5 · 1.6 / 5 = 0.16.
  assert (m_schedule.phases[1].batch_size, m_schedule.phases[1].learning_rate) == (
    5120,
    pytest.approx(0.16),
  )
  for schedule in (lr_schedule, m_schedule):
    assert _approximate_g(schedule.phases[0], CIFAR10_N) == pytest.approx(390.625)


def test_section_5_4_resnet50_batch_doubles_and_lr_falls_five_times():
  recipe = StepDecay(3.2, 8192, 0.9, (30.0, 60.0, 80.0), (10.0, 10.0, 10.0), 90.0)
  schedule = schedules.from_step_decay(
    recipe, 'hybrid', 1_281_167, max_batch_size=16384, warmup_epochs=5.0
  )
  assert [p.batch_size for p in schedule.phases] == [8192, 16384, 16384, 16384]
  assert [p.learning_rate for p in schedule.phases] == pytest.approx(
    [3.2, 0.64, 0.064, 0.0064]
  )
  g = [_approximate_g(p, 1_281_167) for p in schedule.phases]
  assert [a / b for a, b in zip(g[:-1], g[1:], strict=True)] == pytest.approx(
    [10.0, 10.0, 10.0]
  )


def test_piecewise_constant_recipe_matches_optax():
  boundaries_and_scales = {60: 0.2, 120: 0.2, 160: 0.2}  # in epochs
  recipe = schedules.step_decay_from_piecewise_constant(
    0.1, boundaries_and_scales, batch_size=128, momentum=0.9, num_epochs=200.0
  )
  assert recipe == CIFAR10_RECIPE
  # optax's own schedule, evaluated at epochs, is the decaying-LR schedule's ε.
  optax_lr = optax.piecewise_constant_schedule(0.1, boundaries_and_scales)
  schedule = schedules.from_step_decay(recipe, 'decaying_lr', CIFAR10_N)
  for epoch in (0, 59, 60, 119, 120, 159, 160, 199):
    phase = max(i for i, p in enumerate(schedule.phases) if p.start_epoch <= epoch)
    assert float(optax_lr(epoch)) == pytest.approx(schedule.phases[phase].learning_rate)
  with pytest.raises(ScheduleError, match='does not decay the learning rate'):
    schedules.step_decay_from_piecewise_constant(
      0.1, {60: 2.0}, batch_size=128, momentum=0.9, num_epochs=200.0
    )


def test_conversion_arguments_are_checked():
  with pytest.raises(ScheduleError, match='max_batch_size=64: the hybrid schedule needs'):
    schedules.hybrid(CIFAR10_RECIPE, max_batch_size=64)
  with pytest.raises(ScheduleError, match='max_batch_size=None'):
    schedules.convert(CIFAR10_RECIPE, 'hybrid')
  with pytest.raises(ScheduleError, match="Unknown schedule kind 'cosine'"):
    schedules.convert(CIFAR10_RECIPE, 'cosine')


def _config(**fields):
  """The §5.1 recipe as `config.schedule`, with `fields` replaced or added."""
  schedule = dict(
    kind='increasing_batch',
    num_epochs=200.0,
    learning_rate=0.1,
    batch_size=128,
    momentum=0.9,
    milestones=(60.0, 120.0, 160.0),
    decay_factor=5.0,
    max_batch_size=0,
    warmup_epochs=0.0,
  )
  return ml_collections.ConfigDict(dict(schedule={**schedule, **fields}))


def test_from_config_builds_the_conversions():
  for kind, cap in (('decaying_lr', 0), ('increasing_batch', 0), ('hybrid', 640)):
    built = schedules.from_config(_config(kind=kind, max_batch_size=cap), CIFAR10_N)
    assert built == schedules.from_step_decay(
      CIFAR10_RECIPE, kind, CIFAR10_N, max_batch_size=cap or None
    )
  per_milestone = _config(decay_factor=(5.0, 5.0, 5.0), batch_size=128.0)
  assert schedules.from_config(per_milestone, CIFAR10_N).phases[-1].batch_size == 16000


def test_from_config_scaling_rules_reproduce_section_5_2():
  config = _config(
    kind='hybrid',
    max_batch_size=5120,
    scale_batch_with_learning_rate=5.0,
    scale_batch_with_momentum=0.98,
  )
  schedule = schedules.from_config(config, CIFAR10_N)
  assert schedule.phases[0] == Phase(0.0, 3200, 0.5, 0.98)
  assert sum(clock.nominal_updates(schedule)) == pytest.approx(2_304.6875)


def test_explicit_phases_from_config():
  config = _config(
    kind='explicit', num_epochs=3.0, phases=((0, 32, 0.1, 0.9), (1.5, 64, 0.1, 0.95))
  )
  schedule = schedules.from_config(config, 1000)
  assert schedule.phases == (Phase(0.0, 32, 0.1, 0.9), Phase(1.5, 64, 0.1, 0.95))


def _schedule(phases, num_epochs=4.0, n=40, warmup_epochs=0.0):
  return Schedule(tuple(Phase(*p) for p in phases), num_epochs, n, warmup_epochs)


@pytest.mark.parametrize(
  ('phases', 'kwargs', 'message'),
  [
    ([], {}, 'no phases'),
    ([(1.0, 4, 0.1, 0.9)], {}, 'must start at epoch 0'),
    (
      [(0, 4, 0.1, 0.9), (2.0, 8, 0.1, 0.9), (2.0, 16, 0.1, 0.9)],
      {},
      'strictly increase',
    ),
    (
      [(0, 4, 0.1, 0.9), (2.0, 8, 0.1, 0.9), (1.0, 16, 0.1, 0.9)],
      {},
      'strictly increase',
    ),
    ([(0, 4, 0.1, 0.9), (4.0, 8, 0.1, 0.9)], {}, 'starts at or after the end'),
    ([(0, 0, 0.1, 0.9)], {}, 'batch_size=0 must be a positive integer'),
    ([(0, 4.5, 0.1, 0.9)], {}, 'batch_size=4.5 must be a positive integer'),
    ([(0, True, 0.1, 0.9)], {}, 'batch_size=True must be a positive integer'),
    ([(0, 41, 0.1, 0.9)], {}, 'batch_size=41 exceeds the 40 training examples'),
    ([(0, 4, 0.0, 0.9)], {}, 'learning_rate=0.0 must be a positive'),
    ([(0, 4, -0.1, 0.9)], {}, 'learning_rate=-0.1 must be a positive'),
    ([(0, 4, math.nan, 0.9)], {}, 'learning_rate=nan must be a positive'),
    ([(0, 4, 0.1, 1.0)], {}, r'momentum=1.0 must be in \[0, 1\)'),
    ([(0, 4, 0.1, -0.1)], {}, r'momentum=-0.1 must be in \[0, 1\)'),
    ([(0, 4, 0.1, 0.9)], {'num_epochs': 0.0}, 'num_epochs=0.0 must be a positive'),
    ([(0, 4, 0.1, 0.9)], {'num_epochs': math.inf}, 'num_epochs=inf must be a positive'),
    ([(0, 4, 0.1, 0.9)], {'n': 0}, 'num_train_examples=0 must be a positive integer'),
    ([(0, 4, 0.1, 0.9)], {'warmup_epochs': -1.0}, 'warmup_epochs=-1.0'),
    ([(0, 4, 0.1, 0.9)], {'warmup_epochs': 5.0}, 'warmup_epochs=5.0'),
    ([(0, 1, 0.1, 0.0), (0.25, 1, 0.1, 0.0)], {'n': 1}, 'Move the first milestone later'),
    # Phase 0 is due at 4 examples but its batch of 16 reaches 16, past phase 1's end (8).
    ([(0, 16, 0.1, 0.9), (0.1, 16, 0.1, 0.9), (0.2, 32, 0.1, 0.9)], {}, 'no steps'),
  ],
)
def test_invalid_schedules_name_the_field(phases, kwargs, message):
  with pytest.raises(ScheduleError, match=message):
    _schedule(phases, **kwargs)


@pytest.mark.parametrize(
  ('fields', 'message'),
  [
    ({'kind': 'cosine'}, "Unknown config.schedule.kind='cosine'"),
    ({'decay_factor': (5.0, 5.0)}, 'decay_factor has 2 entries for 3 milestones'),
    ({'decay_factor': 1.0}, 'decay_factor=1.0 must be > 1'),
    (
      {'batch_size': 128.5},
      'config.schedule.batch_size=128.5 must be a positive integer',
    ),
    ({'kind': 'hybrid', 'max_batch_size': 0}, 'max_batch_size=0'),
    ({'kind': 'hybrid', 'max_batch_size': 64}, 'max_batch_size=64'),
    ({'kind': 'hybrid', 'max_batch_size': 700.5}, 'max_batch_size=700.5'),
    ({'decay_factor': 2.5, 'batch_size': 100}, 'batch size of 1562.5, which is not an'),
    ({'scale_batch_with_learning_rate': 1.5, 'batch_size': 101}, 'not an integer'),
    ({'scale_batch_with_learning_rate': -2.0}, 'scaling factor -2.0 must be a positive'),
    ({'scale_batch_with_momentum': 1.0}, r'1.0, must be in \[0, 1\)'),
    ({'milestones': (60.0, 60.0, 160.0)}, 'strictly increase'),
    ({'milestones': (60.0, 120.0, 200.0)}, 'starts at or after the end'),
    ({'batch_size': 5000}, 'batch_size=125000 exceeds the 50000'),
    (
      {
        'kind': 'explicit',
        'phases': ((0, 32, 0.1, 0.9),),
        'scale_batch_with_momentum': 0.98,
      },
      'write the scaled phases',
    ),
    (
      {'kind': 'explicit', 'phases': ((0, 32, 0.1),)},
      r'phases\[0\]=\(0, 32, 0.1\) must be \(start_epoch, batch_size',
    ),
    (
      {'momentum': 1.0, 'scale_batch_with_momentum': 0.98},
      r'momentum=1.0 must be in \[0, 1\)',
    ),
  ],
)
def test_invalid_configs_name_the_field(fields, message):
  with pytest.raises(ScheduleError, match=message):
    schedules.from_config(_config(**fields), CIFAR10_N)


# A small schedule whose rounding shows: N = 40, phases due to end at 40, 100 and 160
# examples. Phase 0: ceil(40/4) = 10 steps → 40. Phase 1: ceil(60/8) = 8 steps → 104 (4
# past its due point). Phase 2: ceil((160 − 104)/16) = 4 steps → 168.
SMALL_PHASES = [(0.0, 4, 0.05, 0.9), (1.0, 8, 0.05, 0.5), (2.5, 16, 0.01, 0.0)]
SMALL_TABLE = [(0.05, 0.9, 4)] * 10 + [(0.05, 0.5, 8)] * 8 + [(0.01, 0.0, 16)] * 4


def test_small_schedule_clock_by_hand():
  schedule = _schedule(SMALL_PHASES)
  assert clock.phase_spans(schedule) == (
    clock.PhaseSpan(0, 10, 0, 40),
    clock.PhaseSpan(10, 8, 40, 104),
    clock.PhaseSpan(18, 4, 104, 168),
  )
  assert clock.num_steps(schedule) == 22
  assert clock.nominal_updates(schedule) == [10.0, 7.5, 3.75]
  assert clock.position(schedule, 0) == clock.ClockPosition(0, 0, 0, 0.0)
  assert clock.position(schedule, 12) == clock.ClockPosition(12, 1, 56, 1.4)
  assert clock.position(schedule, 18) == clock.ClockPosition(18, 2, 104, 2.6)
  assert clock.position(schedule, 22) == clock.ClockPosition(22, 2, 168, 4.2)
  assert clock.step_at_examples(schedule, 56) == 12
  assert clock.step_at_examples(schedule, 57) == 13
  assert clock.step_at_epoch(schedule, 2.5) == 18  # 100 examples: step 18 begins at 104.
  with pytest.raises(ValueError, match='outside training'):
    clock.position(schedule, 23)
  with pytest.raises(ValueError, match='outside training'):
    clock.step_at_examples(schedule, 169)


def test_traced_schedules_follow_the_phase_table():
  schedule = _schedule(SMALL_PHASES)
  steps = jnp.arange(25, dtype=jnp.int32)  # three steps past the end hold the last phase
  table = SMALL_TABLE + [SMALL_TABLE[-1]] * 3
  lr = jax.jit(jax.vmap(schedules.learning_rate_schedule(schedule)))(steps)
  momentum = jax.jit(jax.vmap(schedules.momentum_schedule(schedule)))(steps)
  batch = jax.jit(jax.vmap(schedules.batch_size_schedule(schedule)))(steps)
  np.testing.assert_allclose(lr, [t[0] for t in table], rtol=1e-6)
  np.testing.assert_allclose(momentum, [t[1] for t in table], rtol=1e-6)
  np.testing.assert_array_equal(batch, [t[2] for t in table])
  assert batch.dtype == jnp.int32


def test_warmup_is_keyed_to_examples():
  schedule = _schedule(SMALL_PHASES, warmup_epochs=1.5)  # W = 60 examples
  lr = jax.jit(schedules.learning_rate_schedule(schedule))
  # Step k uses ε · (examples seen after it) / 60 until 60 examples.
  expected = {0: 0.05 * 4 / 60, 9: 0.05 * 40 / 60, 10: 0.05 * 48 / 60, 11: 0.05 * 56 / 60}
  expected.update({12: 0.05, 17: 0.05, 18: 0.01, 21: 0.01})
  for step, value in expected.items():
    assert float(lr(jnp.int32(step))) == pytest.approx(value, rel=1e-6), step


def test_plain_optax_loop_follows_the_schedule():
  """A user's own loop, written only with the public schedule functions."""
  schedule = _schedule(SMALL_PHASES)
  n = schedule.num_train_examples
  rng = np.random.default_rng(0)
  x = rng.normal(size=(n, 3)).astype(np.float32)
  y = x @ np.array([1.0, -2.0, 0.5], np.float32)

  tx = optax.inject_hyperparams(optax.sgd)(
    learning_rate=schedules.learning_rate_schedule(schedule),
    momentum=schedules.momentum_schedule(schedule),
  )
  batch_size = schedules.batch_size_schedule(schedule)

  def loss_fn(w, xb, yb):
    return 0.5 * jnp.mean((xb @ w - yb) ** 2)

  @jax.jit
  def update(w, opt_state, xb, yb):
    grads = jax.grad(loss_fn)(w, xb, yb)
    updates, opt_state = tx.update(grads, opt_state, w)
    return optax.apply_updates(w, updates), opt_state

  w = jnp.zeros(3)
  opt_state = tx.init(w)
  examples, used = 0, []
  # The same loop by hand in numpy: A ← m·A + ĝ; w ← w − ε·A with the hand table.
  w_ref, trace = np.zeros(3), np.zeros(3)
  for step in range(clock.num_steps(schedule)):
    b = int(batch_size(step))
    index = (examples + np.arange(b)) % n
    w, opt_state = update(w, opt_state, x[index], y[index])
    examples += b
    hyper = opt_state.hyperparams  # the values this update used
    used.append((float(hyper['learning_rate']), float(hyper['momentum']), b))

    lr, m, _ = SMALL_TABLE[step]
    grad = x[index].T @ (x[index] @ w_ref - y[index]) / b
    trace = m * trace + grad
    w_ref = w_ref - lr * trace

  np.testing.assert_allclose(used, SMALL_TABLE, rtol=1e-6)
  assert examples == 168 == clock.position(schedule, 22).examples_seen
  np.testing.assert_allclose(w, w_ref, rtol=1e-4, atol=1e-5)
  assert loss_fn(w, x, y) < 0.1 * loss_fn(jnp.zeros(3), x, y)


@st.composite
def recipes(draw):
  """A step-decay recipe, a dataset size and a cap that keep every B ≤ N."""
  num_epochs = draw(st.integers(2, 300))
  milestones = draw(
    st.lists(st.integers(1, num_epochs - 1), min_size=1, max_size=5, unique=True).map(
      sorted
    )
  )
  factors = draw(
    st.lists(st.integers(2, 10), min_size=len(milestones), max_size=len(milestones))
  )
  batch_size = draw(st.integers(1, 512))
  recipe = StepDecay(
    learning_rate=draw(st.floats(1e-4, 10.0)),
    batch_size=batch_size,
    momentum=draw(st.sampled_from([0.0, 0.5, 0.9, 0.975, 0.99])),
    milestones=tuple(float(e) for e in milestones),
    factors=tuple(float(f) for f in factors),
    num_epochs=float(num_epochs),
  )
  cap = draw(st.integers(batch_size, batch_size * 100))
  largest = max(batch_size * math.prod(factors), cap)
  n = largest * draw(st.integers(1, 20))
  return recipe, cap, n


@hypothesis.given(
  recipes(), st.sampled_from(['decaying_lr', 'increasing_batch', 'hybrid'])
)
def test_every_conversion_lowers_g_by_exactly_the_factor(drawn, kind):
  recipe, cap, n = drawn
  schedule = schedules.from_step_decay(recipe, kind, n, max_batch_size=cap)
  phases = schedule.phases
  assert phases[0] == Phase(0.0, recipe.batch_size, recipe.learning_rate, recipe.momentum)
  for before, after, factor in zip(phases[:-1], phases[1:], recipe.factors, strict=True):
    ratio = _approximate_g(before, n) / _approximate_g(after, n)
    assert ratio == pytest.approx(factor, rel=1e-12)
    assert after.batch_size >= before.batch_size
    assert after.learning_rate <= before.learning_rate * (1 + 1e-12)
    assert after.momentum == before.momentum
  if kind == 'decaying_lr':
    assert {p.batch_size for p in phases} == {recipe.batch_size}
  if kind == 'increasing_batch':
    assert {p.learning_rate for p in phases} == {recipe.learning_rate}
  if kind == 'hybrid':
    assert max(p.batch_size for p in phases) <= cap
    # ε only decays once B has reached the cap.
    for before, after in zip(phases[:-1], phases[1:], strict=True):
      if after.learning_rate < before.learning_rate:
        assert after.batch_size == cap


@st.composite
def explicit_schedules(draw):
  """Any valid schedule: arbitrary batch sizes, momenta and fractional phase starts."""
  n = draw(st.integers(1, 200))
  num_epochs = draw(st.integers(1, 40)) / 8
  eighths = int(num_epochs * 8)
  starts = (
    draw(st.lists(st.integers(1, eighths - 1), max_size=4, unique=True).map(sorted))
    if eighths > 1
    else []
  )
  phases = tuple(
    Phase(
      start / 8,
      draw(st.integers(1, n)),
      draw(st.floats(1e-3, 1.0)),
      draw(st.sampled_from([0.0, 0.9])),
    )
    for start in [0, *starts]
  )
  try:
    return Schedule(phases, num_epochs, n)
  except ScheduleError as e:
    hypothesis.assume('no steps' not in str(e))
    raise


@hypothesis.given(explicit_schedules(), st.data())
def test_steps_and_examples_round_trip(schedule, data):
  total = clock.num_steps(schedule)
  positions = [clock.position(schedule, k) for k in range(total + 1)]
  for k, (here, after) in enumerate(zip(positions[:-1], positions[1:], strict=True)):
    assert clock.step_at_examples(schedule, here.examples_seen) == k
    assert (
      after.examples_seen - here.examples_seen == schedule.phases[here.phase].batch_size
    )
    assert here.epoch == here.examples_seen / schedule.num_train_examples
  assert clock.step_at_examples(schedule, positions[-1].examples_seen) == total
  # Examples → step → examples: the first step beginning at or after them.
  examples = data.draw(st.integers(0, positions[-1].examples_seen))
  k = clock.step_at_examples(schedule, examples)
  assert positions[k].examples_seen >= examples
  assert k == 0 or positions[k - 1].examples_seen < examples


@hypothesis.given(explicit_schedules())
def test_integer_steps_follow_the_ceil_rule(schedule):
  n = schedule.num_train_examples
  ends = [p.start_epoch for p in schedule.phases[1:]] + [schedule.num_epochs]
  due = [round(fractions.Fraction(e) * n) for e in ends]  # S_{p+1}
  spans = clock.phase_spans(schedule)
  nominal = clock.nominal_updates(schedule)
  seen, step = 0, 0
  for p, (phase, span) in enumerate(zip(schedule.phases, spans, strict=True)):
    assert (span.first_step, span.start_examples) == (step, seen)
    assert span.num_steps == math.ceil(
      fractions.Fraction(due[p] - seen, phase.batch_size)
    )
    assert span.num_steps >= 1
    assert span.num_steps < nominal[p] + 1
    seen += span.num_steps * phase.batch_size
    step += span.num_steps
    assert span.end_examples == seen >= due[p]
    assert seen - due[p] < phase.batch_size
  assert clock.num_steps(schedule) == step


@hypothesis.given(
  recipes(), st.sampled_from(['decaying_lr', 'increasing_batch', 'hybrid'])
)
def test_integer_steps_never_fall_behind_the_papers_count(drawn, kind):
  """B never shrinks in a conversion, so steps up to any phase end ≥ nominal updates."""
  recipe, cap, n = drawn
  schedule = schedules.from_step_decay(recipe, kind, n, max_batch_size=cap)
  steps = np.cumsum([s.num_steps for s in clock.phase_spans(schedule)])
  nominal = np.cumsum(clock.nominal_updates(schedule))
  assert np.all(steps >= nominal - 1e-9)
  assert np.all(steps < nominal + np.arange(1, len(steps) + 1))
