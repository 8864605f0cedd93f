"""The adaptive schedule (ibs/adaptive.py): its rule, its config, and runs that use it.

The rule is checked against hand-traced sequences of B_simple; a run whose rule climbs
at every decision point against the fixed increasing-batch schedule with those
milestones (an independent reference: the same phases reached by the fixed path, so the
parameters must be bit-identical); and a run killed with -9 after a switch against the
same run uninterrupted.
"""

import json
import math
import os
import signal

import jax
import numpy as np
import pytest

from configs import default
from ibs import adaptive, clock, schedules, segments, train
from tests.test_multidevice import _train_script
from tests.test_reliability import _assert_identical, _finish, _start, _wait_for
from tests.test_train import _final_params, _logged_tags

N = 1000


def _rules(threshold=2.0, window=100, minimum=200, every=50):
  return adaptive.Rules(threshold, window, minimum, every)


def _ladder(*rungs):
  return tuple(schedules.Phase(0.0, b, lr, 0.9) for b, lr in rungs)


def _measured(b_simple):
  """A decision point's measurement of B_simple (the adaptive rule reads no loss)."""
  return segments.Measured(b_simple, math.nan)


def _walk(schedule, points):
  """Applies `decide` at each (examples, B_simple); returns the growth after each."""
  growth, trace = adaptive.Growth(), []
  for examples, b_simple in points:
    growth = schedule.decide(growth, examples, _measured(b_simple)).growth
    trace.append(growth)
  return trace


def test_climbs_after_the_window_held_and_the_minimum_on_the_rung():
  s = adaptive.AdaptiveSchedule(_ladder((10, 0.1), (20, 0.1), (40, 0.1)), _rules(), 10, N)
  # Rung 0 (B = 10): ready when B_simple >= 2 · 10 = 20.
  trace = _walk(s, [(50, 25.0), (100, 25.0), (150, 25.0), (200, 30.0)])
  # Ready since 50; the window of 100 is held at 150, but the minimum of 200 examples on
  # the rung is reached only at 200: the climb happens there, not before.
  assert [g.rung for g in trace] == [0, 0, 0, 1]
  assert [g.ready_since for g in trace[:3]] == [50, 50, 50]
  assert trace[-1].switches == (adaptive.Switch(200, 1),)
  assert trace[-1].ready_since == adaptive.NOT_READY


def test_a_point_below_the_threshold_restarts_the_window():
  s = adaptive.AdaptiveSchedule(_ladder((10, 0.1), (20, 0.1)), _rules(minimum=0), 10, N)
  trace = _walk(s, [(50, 25.0), (100, 19.9), (150, 25.0), (200, 25.0), (250, 25.0)])
  # The window restarts at 150 and is held 100 examples at 250.
  assert [g.ready_since for g in trace[:3]] == [50, adaptive.NOT_READY, 150]
  assert [g.rung for g in trace] == [0, 0, 0, 0, 1]


def test_nothing_measured_is_not_ready_and_infinity_is():
  s = adaptive.AdaptiveSchedule(
    _ladder((10, 0.1), (20, 0.1)), _rules(window=0, minimum=0), 10, N
  )
  assert s.decide(adaptive.Growth(), 50, _measured(math.nan)).growth.rung == 0
  # |G|² estimated ≤ 0: the noise dominates, B_simple = inf (ibs/gns.py) is ready.
  assert s.decide(adaptive.Growth(), 50, _measured(math.inf)).growth.rung == 1


def test_never_past_the_last_rung_nor_the_budget():
  s = adaptive.AdaptiveSchedule(
    _ladder((10, 0.1), (20, 0.1)), _rules(window=0, minimum=0), 1.0, N
  )
  top = adaptive.Growth((adaptive.Switch(50, 1),))
  decision = s.decide(top, 100, _measured(1e9))
  assert not decision.switched and decision.growth.rung == 1
  # At the end of the budget (1 epoch = 1000 examples) no rung is left a step to run.
  assert not s.decide(adaptive.Growth(), 1000, _measured(1e9)).switched
  assert s.decide(adaptive.Growth(), 990, _measured(1e9)).switched


def test_past_the_cap_the_rungs_decay_epsilon_and_compare_their_effective_batch():
  """The hybrid ladder of a ×5 recipe capped at B_max = 800 (the paper's cap rule)."""
  recipe = schedules.StepDecay(0.1, 32, 0.9, (1.0, 2.0, 3.0, 4.0), (5.0,) * 4, 5.0)
  ladder = schedules.hybrid(recipe, 800)
  # By hand: B 32 → 160 → 800, then ε ÷ 5 twice at B = 800.
  assert [p.batch_size for p in ladder] == [32, 160, 800, 800, 800]
  assert [p.learning_rate for p in ladder] == pytest.approx([0.1, 0.1, 0.1, 0.02, 0.004])
  s = adaptive.AdaptiveSchedule(ladder, _rules(threshold=1.0), 5, N)
  # B_eff = B · ε₀/ε: 800 · 0.1/0.02 = 4000 and 800 · 0.1/0.004 = 20000.
  assert [s.effective_batch(k) for k in range(5)] == pytest.approx(
    [32, 160, 800, 4000, 20000]
  )
  on_rung_3 = adaptive.Growth(tuple(adaptive.Switch(100 * k, k) for k in (1, 2, 3)))
  assert s.decide(on_rung_3, 600, _measured(3999.0)).ready_at == pytest.approx(4000)
  assert (
    s.decide(on_rung_3, 600, _measured(3999.0)).growth.ready_since == adaptive.NOT_READY
  )
  assert s.decide(on_rung_3, 600, _measured(4000.0)).growth.ready_since == 600


def test_the_realized_schedule_is_the_switches_so_far():
  s = adaptive.AdaptiveSchedule(_ladder((10, 0.1), (20, 0.1), (40, 0.1)), _rules(), 3, N)
  growth = adaptive.Growth((adaptive.Switch(1010, 1), adaptive.Switch(2030, 2)))
  realized = s.realized(growth)
  spans = clock.phase_spans(realized)
  # Phase 0: 101 steps of 10 to 1010; phase 1: 51 steps of 20 to 2030; phase 2 runs
  # to the budget, 3000 examples, rounded up: ceil(970 / 40) = 25 steps, to 3030.
  assert [(x.first_step, x.num_steps, x.end_examples) for x in spans] == [
    (0, 101, 1010),
    (101, 51, 2030),
    (152, 25, 3030),
  ]
  assert s.check_growth(growth, 2030) == []
  assert s.check_growth(growth, 2000)  # a switch after the examples seen
  bad = adaptive.Growth((adaptive.Switch(1010, 2),))
  assert s.check_growth(bad, 2030)  # skips a rung


@pytest.mark.parametrize(
  ('field', 'value', 'message'),
  [
    ('threshold', 0.0, 'adaptive.threshold'),
    ('window_epochs', -1.0, 'adaptive.window_epochs'),
    ('min_epochs', 1e9, 'adaptive.min_epochs'),
    ('check_every_epochs', 0.0, 'adaptive.check_every_epochs'),
  ],
)
def test_every_adaptive_field_is_validated_by_name(field, value, message):
  config = default.get_config()
  config.schedule.kind = 'adaptive'
  config.schedule.adaptive[field] = value
  with pytest.raises(schedules.ScheduleError, match=message):
    adaptive.check_config(config)


@pytest.mark.parametrize(
  ('change', 'message'),
  [
    (lambda c: setattr(c.schedule, 'warmup_epochs', 1.0), 'warmup_epochs'),
    (lambda c: setattr(c, 'optimizer', 'adam'), 'Adam'),
    (lambda c: setattr(c.gns, 'enabled', False), 'gns.enabled'),
  ],
)
def test_adaptive_refuses_what_it_cannot_follow(change, message):
  config = default.get_config()
  config.schedule.kind = 'adaptive'
  change(config)
  with pytest.raises(schedules.ScheduleError, match=message):
    adaptive.check_config(config)


def _climbing_config(config):
  """`config` adaptive, with a rule that climbs at the first decision point 0.9 epochs
  into every rung: decision points each epoch, so the climbs fall where the fixed
  schedule's milestones (1, 2, 3) end its phases (hand-traced in the test below)."""
  config = config.copy_and_resolve_references()
  config.schedule.kind = 'adaptive'
  config.schedule.adaptive.threshold = 1e-6
  config.schedule.adaptive.window_epochs = 0.0
  config.schedule.adaptive.min_epochs = 0.9
  config.schedule.adaptive.check_every_epochs = 1.0
  return config


@pytest.mark.slow
def test_an_adaptive_run_that_climbs_at_the_milestones_is_the_fixed_schedule(
  tiny_run, tmp_path
):
  """The ladder of the tiny config is 32 → 64 → 128 → 256 over 4 epochs of 2000.

  Fixed phases (ibs/clock.py): ceil(2000/32) = 63 steps to 2016, ceil(1984/64) = 31 to
  4000, ceil(2000/128) = 16 to 6048, ceil(1952/256) = 8 to 8096. The adaptive run's
  decision points are the first dispatch ends at or past 2000, 4000 and 6000 examples:
  2016, 4000 and 6048, each ≥ 0.9 epochs (1800 examples) into its rung, so it switches
  there (B_simple, measured from step 0 on, is positive) and must train the same steps
  to bit-identical parameters. The reference is the session's fixed tiny run.
  """
  fixed_config, fixed_workdir, fixed = tiny_run
  workdir = str(tmp_path / 'adaptive')
  summary = train.train_and_evaluate(_climbing_config(fixed_config), workdir)

  assert [(s['examples'], s['batch_size']) for s in summary['switches']] == [
    (2016, 64),
    (4000, 128),
    (6048, 256),
  ]
  assert summary['parameter_updates'] == fixed['parameter_updates'] == 63 + 31 + 16 + 8
  step_a, params_a = _final_params(workdir)
  step_f, params_f = _final_params(fixed_workdir)
  assert step_a == step_f
  for a, f in zip(jax.tree.leaves(params_a), jax.tree.leaves(params_f), strict=True):
    np.testing.assert_array_equal(a, f)
  # TensorBoard shows each decision point and each switch.
  tags = _logged_tags(workdir)
  assert tags['adaptive/switch_to_batch'] == [64, 128, 256]
  # Decision points at 2016, 4000, 6048 and 8096 (the end: no rung left to climb).
  assert tags['adaptive/rung'] == [1, 2, 3, 3]
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert len(json.load(f)['switches']) == 3


def kill_and_rerun(config, tmp_path, pattern):
  """Trains `config` uninterrupted; then again in a process killed (-9) once `pattern`
  is logged, and rerun: the final state and the switches must be the uninterrupted
  run's. Shared by every kind that decides (tests/test_measured.py too)."""
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / 'reference'))
  assert len(uninterrupted['switches']) >= 2, uninterrupted['switches']
  script = _train_script(config, tmp_path)
  workdir = tmp_path / 'killed'
  process = _start(script, workdir, tmp_path / 'killed.log')
  assert _wait_for(process, pattern), 'no decision before the end'
  process.send_signal(signal.SIGKILL)
  rc, _ = _finish(process)
  assert rc == -signal.SIGKILL
  rerun = _start(script, workdir, tmp_path / 'rerun.log')
  rc, output = _finish(rerun)
  assert rc == 0, output[-3000:]
  assert 'Resumed at step' in output
  _assert_identical(str(tmp_path / 'reference'), str(workdir))
  with open(os.path.join(workdir, 'summary.json')) as f:
    assert json.load(f)['switches'] == uninterrupted['switches']


@pytest.mark.slow
def test_kill_9_after_a_switch_then_rerun_ends_where_the_uninterrupted_run_ends(
  tiny_config, tmp_path
):
  """A real rule (not the climbing one): the run decides from B_simple; kill -9 once
  the second rung is reached, rerun, and compare every array of the final state."""
  config = tiny_config
  config.schedule.kind = 'adaptive'
  config.schedule.num_epochs = 6.0
  config.schedule.adaptive.threshold = 2.0
  config.schedule.adaptive.window_epochs = 0.5
  config.schedule.adaptive.min_epochs = 1.0
  config.schedule.adaptive.check_every_epochs = 0.25
  config.checkpoint_every_epochs = 0.5
  config.gns.split_every = 1
  kill_and_rerun(config, tmp_path, r'rung 2 from step')
