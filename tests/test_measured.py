"""The schedules decided by measurement (ibs/measured/): their rules, records, configs and
runs.

The rules are checked against hand-traced sequences of measurements; runs whose rule is
forced to one answer against the fixed schedules with the same phases (an independent
reference: the parameters must be bit-identical); and a run killed with -9 after a
decision against the same run uninterrupted.
"""

import json
import math

import jax
import numpy as np
import pytest

from configs import default
from ibs import clock, config_checks, schedules, train
from ibs.measured import base, plateau, temperature, window
from tests.test_adaptive import kill_and_rerun
from tests.test_train import _final_params, _logged_tags

N = 1000


def _inputs(b_simple, loss=math.nan):
  """Inputs whose tr(Σ)/|G|² is `b_simple` (|G|² = 1)."""
  return base.Inputs(float(b_simple), 1.0, loss)


# ------------------------------------------------------------------ the window (item 3)


def test_the_window_keeps_its_recent_finite_points_and_divides_their_sums():
  points = window.add((), 100, 2.0, 1.0, 50)
  points = window.add(points, 130, 6.0, 3.0, 50)
  points = window.add(points, 140, math.nan, 1.0, 50)  # nothing measured yet: skipped
  assert points == ((100, 2.0, 1.0), (130, 6.0, 3.0))
  # By hand: (2 + 6) / (1 + 3) = 2, not the mean of the ratios 2 and 2... nor 5/2.
  assert window.b_simple(points) == pytest.approx(2.0)
  points = window.add(points, 150, 12.0, 0.0, 50)  # 100 is 50 old: out
  assert points == ((130, 6.0, 3.0), (150, 12.0, 0.0))
  assert window.b_simple(points) == pytest.approx(18.0 / 3.0)
  # Σ|G|² ≤ 0: the noise dominates (ibs.gns.estimates reads it so); nothing: NaN.
  assert window.b_simple(((1, 5.0, -1.0), (2, 1.0, 0.5))) == math.inf
  assert math.isnan(window.b_simple(()))
  assert window.from_record(json.loads(json.dumps(window.to_record(points)))) == points


# ------------------------------------------------------- kind 1: measured_batch


def _measured_batch(**overrides):
  recipe = schedules.StepDecay(0.1, 32, 0.9, (1.0, 2.0), (5.0, 5.0), 3.0)
  values = dict(
    divisor=2.0,
    max_learning_rate=0.5,
    window_examples=100,
    check_every_examples=50,
    num_train_examples=N,
  )
  values.update(overrides)
  return temperature.MeasuredBatchSchedule(
    recipe, (32, 64, 128, 256, 512, 1024), **values
  )


def _walk(rule, points):
  """`decide` at each (examples, inputs); the decisions after each."""
  decisions, trace = rule.initial(), []
  for examples, inputs in points:
    decision = rule.decide(decisions, examples, inputs)
    decisions = decision.decisions
    trace.append(decision)
  return trace


def test_measured_batch_takes_the_largest_rung_the_noise_and_the_cap_allow():
  rule = _measured_batch()
  trace = _walk(
    rule,
    [
      (50, _inputs(1e6)),  # the window (100 examples) is not yet full: nothing
      (100, _inputs(600)),  # window (1e6 + 600)/2: B_simple/2 huge; ε cap 0.5·32/0.1
      # = 160 bounds it: 128 (ε = 0.1·128/32 = 0.4)
      (150, _inputs(10)),  # window (600 + 10)/2 = 305 → 152: 128 again; never shrinks
      (1100, _inputs(2000)),  # past milestone 1 (ε_recipe 0.02): cap 800, window of
      # this point alone (the others are > 100 old): 1000 → 512 (ε = 0.02·16 = 0.32)
      (1150, _inputs(10)),  # window (2000 + 10)/2 → 502: 256 < 512: kept
    ],
  )
  assert [d.decisions.changes for d in trace][-1] == ((100, 128), (1100, 512))
  assert [d.changed for d in trace] == [False, True, False, True, False]
  assert trace[1].scalars['decide/learning_rate'] == pytest.approx(0.4)
  assert trace[1].scalars['decide/batch_allowed_by_lr_cap'] == pytest.approx(160)
  assert trace[2].scalars['decide/b_simple'] == pytest.approx(305)
  assert trace[3].scalars['decide/learning_rate'] == pytest.approx(0.32)
  assert trace[3].scalars['decide/batch_allowed_by_noise'] == pytest.approx(1000)


def test_measured_batch_decides_nothing_without_a_measurement_nor_at_the_end():
  rule = _measured_batch(window_examples=0)
  assert not rule.decide(rule.initial(), 100, _inputs(math.nan)).changed
  # |G|² estimated ≤ 0: B_simple is unbounded, the ε cap (160) alone bounds B.
  unbounded = base.Inputs(5.0, -1.0)
  assert rule.decide(rule.initial(), 100, unbounded).decisions.changes == ((100, 128),)
  assert not rule.decide(rule.initial(), 3000, unbounded).changed


def test_measured_batch_realizes_the_recipes_temperature_at_the_batches_chosen():
  """Phases by hand (ibs/clock.py's rule): B = 32 for 3 steps to 96; B = 64 from 96, due
  at the milestone (1000): ceil(904/64) = 15 steps to 1056. A change to 256 at 1056, the
  example where the milestone's phase begins, replaces that phase (it would get no
  step). Milestone 2 at 2000: ceil(944/256) = 4 steps to 2080; the last phase to 3000:
  ceil(920/256) = 4 steps to 3104. ε = ε_recipe · B/32 throughout."""
  rule = _measured_batch()
  realized = rule.realized(temperature.Decisions(((96, 64), (1056, 256))))
  rows = [
    (round(p.start_epoch * N), p.batch_size, p.learning_rate) for p in realized.phases
  ]
  assert rows == [(0, 32, 0.1), (96, 64, 0.2), (1056, 256, 0.16), (2000, 256, 0.032)]
  spans = clock.phase_spans(realized)
  assert [(s.first_step, s.num_steps, s.end_examples) for s in spans] == [
    (0, 3, 96),
    (3, 15, 1056),
    (18, 4, 2080),
    (22, 4, 3104),
  ]
  # The paper's g = εN/(B(1 − m)) of every phase is the recipe's at its start.
  for p in realized.phases:
    recipe_lr = {0: 0.1, 1: 0.02, 2: 0.004}[int(p.start_epoch)]
    assert p.learning_rate / p.batch_size == pytest.approx(recipe_lr / 32)


def test_measured_batch_record_round_trips_and_is_checked():
  rule = _measured_batch()
  decisions = temperature.Decisions(((96, 64), (1056, 256)), ((1000, 3.5, 0.25),))
  saved = json.loads(json.dumps(decisions.to_record()))['decisions']
  assert rule.from_record(saved) == decisions
  assert rule.check_growth(decisions, 1056) == []
  assert rule.check_growth(decisions, 1000)  # a change after the examples seen
  assert rule.check_growth(temperature.Decisions(((96, 96),)), 2000)  # not a rung
  assert rule.check_growth(temperature.Decisions(((96, 128), (200, 64))), 2000)


def test_measured_batch_ladder_tops_at_the_recipes_last_batch_or_the_cap():
  config = default.get_config()  # 32 → 4000 by the recipe: the ×2 ladder ends at 2048
  recipe = schedules.recipe_from_config(config)
  top = temperature.top_batch(config, recipe, 20_000)
  assert temperature.ladder_of(recipe, 2.0, top) == (32, 64, 128, 256, 512, 1024, 2048)
  config.schedule.max_batch_size = 512
  top = temperature.top_batch(config, recipe, 20_000)
  assert temperature.ladder_of(recipe, 5.0, top) == (32, 160)


# ------------------------------------------------------------------- kind 2: plateau


def _plateau(**overrides):
  recipe = schedules.StepDecay(0.1, 32, 0.9, (3.0, 6.0), (5.0, 5.0), 10.0)
  values = dict(
    delta=0.1,
    window_examples=100,
    check_every_examples=50,
    loss_examples=64,
    divisor=1.0,
    noise_window_examples=0,
    max_batch_size=N,
    num_train_examples=N,
  )
  values.update(overrides)
  return plateau.PlateauSchedule(recipe, **values)


def test_plateau_climbs_when_the_last_window_improved_by_less_than_delta():
  rule = _plateau()
  trace = _walk(
    rule,
    [
      (50, _inputs(200, 1.0)),
      (100, _inputs(200, 0.8)),
      (150, _inputs(200, 0.75)),
      # At 200: recent (100, 200] = 0.75, 0.74 → 0.745; previous (0, 100] = 1.0, 0.8 →
      # 0.9; 0.745 < (1 − 0.1)·0.9 = 0.81: still improving.
      (200, _inputs(200, 0.74)),
      # At 250: recent 0.74, 0.73 → 0.735; previous 0.8, 0.75 → 0.775; 0.735 > 0.6975:
      # a plateau. 5 × 32 = 160 ≤ B_simple = 200: the batch climbs.
      (250, _inputs(200, 0.73)),
    ],
  )
  assert [d.changed for d in trace] == [False] * 4 + [True]
  assert trace[3].scalars['decide/loss_recent'] == pytest.approx(0.745)
  assert trace[3].scalars['decide/loss_previous'] == pytest.approx(0.9)
  decisions = trace[-1].decisions
  assert decisions.climbs == ((250, plateau.BATCH),)
  assert decisions.losses == ()  # the new rung's history starts empty
  assert rule.rungs(decisions)[-1] == (250, 160, 0.1)


def test_plateau_decays_epsilon_where_the_batch_would_pass_b_simple():
  rule = _plateau()
  on_rung_1 = plateau.Decisions(((250, plateau.BATCH),))
  flat = [(250 + 50 * k, _inputs(500, 0.5)) for k in range(1, 5)]
  decisions = on_rung_1
  changed = []
  for examples, inputs in flat:
    decision = rule.decide(decisions, examples, inputs)
    decisions, _ = decision.decisions, changed.append(decision.changed)
  # Two windows on the rung first (250 + 200 = 450); 5 × 160 = 800 > 500: ε ÷ 5.
  assert changed == [False, False, False, True]
  assert decisions.climbs[-1] == (450, plateau.LEARNING_RATE)
  assert rule.rungs(decisions)[-1] == (450, 160, pytest.approx(0.02))
  # The ladder has two rungs above the first: no third climb.
  for examples in range(500, 1000, 50):
    decision = rule.decide(decisions, examples, _inputs(1e9, 0.5))
    assert not decision.changed
    decisions = decision.decisions
  assert len(decisions.losses) == 10  # it kept judging: a plateau, with no rung left
  # The cap (max_batch_size) decays ε as B_simple does; a flat loss is a plateau as
  # soon as the rung has two windows (200 examples).
  capped = _plateau(max_batch_size=100)
  trace = _walk(capped, [(50 * k, _inputs(1e9, 1.0)) for k in range(1, 5)])
  assert trace[-1].decisions.climbs == ((200, plateau.LEARNING_RATE),)


def test_plateau_realizes_its_rungs_and_lists_the_batches_it_may_reach():
  rule = _plateau()
  decisions = plateau.Decisions(((256, plateau.BATCH), (576, plateau.LEARNING_RATE)))
  realized = rule.realized(decisions)
  rows = [
    (round(p.start_epoch * N), p.batch_size, p.learning_rate) for p in realized.phases
  ]
  assert rows == [(0, 32, 0.1), (256, 160, 0.1), (576, 160, pytest.approx(0.02))]
  # From B = 32 with factors 5, 5 and N = 1000: 32, 160, 800 (4000 > N).
  assert rule.batch_sizes(rule.initial()) == [32, 160, 800]
  assert rule.batch_sizes(decisions) == [160]
  saved = json.loads(json.dumps(decisions.to_record()))['decisions']
  assert rule.from_record(saved) == decisions
  assert rule.check_growth(decisions, 576) == []
  assert rule.check_growth(decisions, 500)
  assert rule.check_growth(plateau.Decisions(((256, 'width'),)), 576)


# ------------------------------------------------------------------------ the configs


@pytest.mark.parametrize(
  ('kind', 'field', 'value'),
  [
    ('measured_batch', 'divisor', 0.0),
    ('measured_batch', 'ladder_factor', 1.0),
    ('measured_batch', 'max_learning_rate', 0.05),
    ('measured_batch', 'window_epochs', -1.0),
    ('measured_batch', 'check_every_epochs', 0.0),
    ('plateau', 'delta', 1.0),
    ('plateau', 'window_epochs', 60.0),
    ('plateau', 'check_every_epochs', 1e9),
    ('plateau', 'loss_examples', 10**9),
    ('plateau', 'loss_examples', 0),
    ('plateau', 'divisor', -1.0),
    ('plateau', 'noise_window_epochs', math.inf),
  ],
)
def test_every_field_is_validated_by_name(kind, field, value):
  config = default.get_config()
  config.schedule.kind = kind
  config.schedule[kind][field] = value
  with pytest.raises(config_checks.ConfigError, match=f'{kind}.{field}'):
    config_checks.check_config(config, 1)


@pytest.mark.parametrize('kind', ['measured_batch', 'plateau'])
@pytest.mark.parametrize(
  ('change', 'message'),
  [
    (lambda c: setattr(c.schedule, 'warmup_epochs', 1.0), 'warmup_epochs'),
    (lambda c: setattr(c, 'optimizer', 'adam'), 'Adam'),
    (lambda c: setattr(c.gns, 'enabled', False), 'gns.enabled'),
  ],
)
def test_measured_kinds_refuse_what_they_cannot_follow(kind, change, message):
  config = default.get_config()
  config.schedule.kind = kind
  change(config)
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.check_config(config, 1)


def test_a_ladder_batch_the_step_cannot_split_is_refused_before_training():
  config = default.get_config()
  config.schedule.kind = 'measured_batch'
  config.schedule.measured_batch.ladder_factor = 2.5  # 32 → 80: not whole ghost batches
  with pytest.raises(config_checks.ConfigError, match='may choose batch 80'):
    config_checks.check_config(config, 1)
  config.schedule.measured_batch.ladder_factor = 1.5  # 32 → 48 → … → 364.5
  with pytest.raises(config_checks.ConfigError, match='ladder_factor: batch size 364.5'):
    config_checks.check_config(config, 1)


def test_the_default_config_is_valid_with_each_measured_kind():
  for kind in ('measured_batch', 'plateau'):
    config = default.get_config()
    config.schedule.kind = kind
    checked = config_checks.check_config(config, 1)
    assert checked.schedule.phases[0].batch_size == 32


# ------------------------------------------------------------------------------ runs


@pytest.fixture(scope='module')
def decaying_run(module_config, tmp_path_factory):
  """The tiny config's decaying-LR run: ε 0.1 → 0.05 → 0.025 → 0.0125 at B = 32."""
  config = module_config.copy_and_resolve_references()
  config.schedule.kind = 'decaying_lr'
  workdir = str(tmp_path_factory.mktemp('decaying'))
  return config, workdir, train.train_and_evaluate(config, workdir)


@pytest.fixture(scope='module')
def module_config(data_dir):
  from tests.conftest import make_tiny_config

  return make_tiny_config(data_dir)


def _assert_same_parameters(workdir_a, workdir_b):
  step_a, params_a = _final_params(workdir_a)
  step_b, params_b = _final_params(workdir_b)
  assert step_a == step_b
  for a, b in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_b), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_a_measured_batch_run_the_noise_never_lets_grow_is_decaying_lr(
  decaying_run, tmp_path
):
  """divisor 1e9: no batch of the ladder is ≤ B_simple/1e9, so B stays 32 and ε follows
  the recipe: the decaying-LR run's phases, set from the host instead of the step."""
  config, reference, fixed = decaying_run
  config = config.copy_and_resolve_references()
  config.schedule.kind = 'measured_batch'
  config.schedule.measured_batch.divisor = 1e9
  config.schedule.measured_batch.window_epochs = 0.5
  workdir = str(tmp_path / 'measured')
  summary = train.train_and_evaluate(config, workdir)
  assert summary['switches'] == []
  assert summary['parameter_updates'] == fixed['parameter_updates']
  _assert_same_parameters(workdir, reference)
  tags = _logged_tags(workdir)
  assert set(tags['decide/batch_size']) == {32}
  assert len(tags['decide/b_simple']) == len(tags['decide/batch_allowed_by_lr_cap']) > 0


def _climbing_plateau(config, divisor):
  """A plateau rule that climbs at the first point two windows (0.9 epochs) into every
  rung (δ = 0.999: any loss is a plateau), by B (divisor 1e-9) or by ε (1e9)."""
  config = config.copy_and_resolve_references()
  config.schedule.kind = 'plateau'
  p = config.schedule.plateau
  p.delta, p.window_epochs, p.check_every_epochs = 0.999, 0.45, 0.25
  p.loss_examples, p.divisor, p.noise_window_epochs = 256, divisor, 0.5
  return config


@pytest.mark.slow
def test_a_plateau_run_that_climbs_by_batch_is_the_fixed_increasing_batch_run(
  tiny_run, tmp_path
):
  """Decision points every 500 examples end at the first step at or past them. Rung 0
  (B = 32): 512, 1024, 1504, 2016; the first 1800 examples (two windows) in is 2016.
  Rung 1 (B = 64) from 2016: 2528, 3008, 3520, 4000 → 4000. Rung 2 (B = 128): 4512,
  5024, 5504, 6048 → 6048. The fixed run's phases end at 2016, 4000 and 6048
  (tests/test_adaptive.py), so the parameters must be bit-identical."""
  fixed_config, fixed_workdir, fixed = tiny_run
  workdir = str(tmp_path / 'plateau')
  summary = train.train_and_evaluate(_climbing_plateau(fixed_config, 1e-9), workdir)
  assert [(s['examples'], s['batch_size'], s['why']) for s in summary['switches']] == [
    (2016, 64, 'plateau: batch'),
    (4000, 128, 'plateau: batch'),
    (6048, 256, 'plateau: batch'),
  ]
  assert summary['parameter_updates'] == fixed['parameter_updates']
  _assert_same_parameters(workdir, fixed_workdir)
  tags = _logged_tags(workdir)
  assert tags['decide/climb_by_batch'] == [1.0, 1.0, 1.0]
  assert sum(tags['decide/plateau']) == 3


@pytest.mark.slow
def test_a_plateau_run_that_climbs_by_epsilon_is_the_decaying_lr_run(
  decaying_run, tmp_path
):
  """At B = 32 the points end at 512, 1024, 1504, 2016 → climb at 2016; then 2528,
  3008, 3520, 4000 → 4000; then 4512, 5024, 5504, 6016 → 6016: where the decaying-LR
  run's phases end (2000, 4000 and 6000 rounded up to whole batches)."""
  config, reference, fixed = decaying_run
  workdir = str(tmp_path / 'plateau')
  summary = train.train_and_evaluate(_climbing_plateau(config, 1e9), workdir)
  assert [(s['examples'], s['learning_rate']) for s in summary['switches']] == [
    (2016, pytest.approx(0.05)),
    (4000, pytest.approx(0.025)),
    (6016, pytest.approx(0.0125)),
  ]
  _assert_same_parameters(workdir, reference)


@pytest.mark.slow
def test_kill_9_after_a_measured_batch_decision_then_rerun_is_the_uninterrupted_run(
  tiny_config, tmp_path
):
  """The real rule (B ≤ B_simple over a half-epoch window, ε ≤ 0.5), measured on every
  update; killed once its second batch change is logged (a checkpoint lies between),
  rerun, every array compared."""
  config = tiny_config.copy_and_resolve_references()
  config.schedule.kind = 'measured_batch'
  config.schedule.num_epochs = 6.0
  k = config.schedule.measured_batch
  k.divisor, k.window_epochs, k.check_every_epochs = 1.0, 0.5, 0.25
  config.checkpoint_every_epochs = 0.5
  config.gns.split_every = 1
  kill_and_rerun(
    config, tmp_path, r'Step \d+: measured batch: (.|\n)*Step \d+: measured batch: '
  )


@pytest.mark.slow
def test_kill_9_after_a_plateau_climb_then_rerun_is_the_uninterrupted_run(
  tiny_config, tmp_path
):
  """A real plateau rule (δ = 0.5 over half-epoch windows, the loss of 256 examples):
  killed after its second climb is logged, rerun, every array compared."""
  config = tiny_config.copy_and_resolve_references()
  config.schedule.kind = 'plateau'
  config.schedule.num_epochs = 6.0
  p = config.schedule.plateau
  p.delta, p.window_epochs, p.check_every_epochs = 0.5, 0.5, 0.25
  p.loss_examples, p.noise_window_epochs = 256, 0.5
  config.checkpoint_every_epochs = 0.5
  config.gns.split_every = 1
  kill_and_rerun(config, tmp_path, r'Step \d+: plateau: (.|\n)*Step \d+: plateau: ')
