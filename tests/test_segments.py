"""The schedule interface the loop drives (ibs/segments.py): segments against the clock,
a fixed schedule that never decides, the adaptive one's record and opening table."""

import math

import pytest

from configs import default
from ibs import adaptive, clock, schedules, segments, setup
from ibs.durability import checkpoint

N = 1000


def _schedule():
  phases = (
    schedules.Phase(0.0, 32, 0.1, 0.9),
    schedules.Phase(1.5, 96, 0.1, 0.9),
    schedules.Phase(2.25, 200, 0.1, 0.9),
  )
  return schedules.Schedule(phases, 3.0, N)


def test_segments_answer_what_the_clock_answers_at_every_step():
  schedule = _schedule()
  segs = segments.Segments.of(schedule)
  assert segs.num_steps == clock.num_steps(schedule)
  for step in range(segs.num_steps):
    where = clock.position(schedule, step)
    assert segs.at(step).index == where.phase
    assert segs.examples_at(step) == where.examples_seen
  assert segs.examples_at(segs.num_steps) == clock.phase_spans(schedule)[-1].end_examples


def test_a_fixed_schedule_never_decides_and_compiles_the_phases_to_come():
  fixed = segments.Fixed(_schedule())
  assert fixed.decide_every_examples == 0 and not fixed.host_sets_hyperparams
  assert fixed.to_record(fixed.initial()) == {}
  spans = clock.phase_spans(fixed.schedule)
  assert fixed.batch_sizes((), 0) == [32, 96, 200]
  assert fixed.batch_sizes((), spans[1].first_step) == [96, 200]
  assert fixed.total_steps(()) == clock.num_steps(fixed.schedule)
  with pytest.raises(AssertionError):
    fixed.decide((), 0, segments.Measured(1.0, 1.0))


def test_the_run_schedule_of_each_kind():
  config, n = default.get_config(), 20_000
  schedule = schedules.from_config(config, n)
  assert isinstance(setup.run_schedule(config, schedule), segments.Fixed)
  config.schedule.kind = 'adaptive'
  adaptive_schedule = setup.run_schedule(config, schedule)
  assert isinstance(adaptive_schedule, adaptive.AdaptiveSchedule)
  assert adaptive_schedule.decide_every_examples == 0.5 * n
  assert adaptive_schedule.total_steps(adaptive_schedule.initial()) is None


def test_adaptive_decisions_restore_from_the_record_fields_they_always_had():
  ladder = tuple(schedules.Phase(0.0, b, 0.1, 0.9) for b in (10, 20, 40))
  s = adaptive.AdaptiveSchedule(ladder, adaptive.Rules(2.0, 100, 200, 50), 10, N)
  growth = adaptive.Growth((adaptive.Switch(1010, 1),), 1500)
  record = checkpoint.CheckpointRecord.from_json(
    {
      'step': 7,
      'examples_seen': 1600,
      'phase': 1,
      'data_seed': 0,
      'config_fingerprint': 'f',
      **s.to_record(growth),
    }
  )
  assert s.from_record(record) == growth
  assert s.batch_sizes(growth, 0) == [20, 40]  # the rungs from the current one up


def test_a_decision_reads_the_measurement_and_says_what_it_switched_to():
  ladder = tuple(schedules.Phase(0.0, b, 0.1, 0.9) for b in (10, 20))
  s = adaptive.AdaptiveSchedule(ladder, adaptive.Rules(2.0, 0, 0, 50), 10, N)
  decision = s.decide(s.initial(), 50, segments.Measured(25.0, math.nan))
  assert decision.switched and decision.decisions.rung == 1
  assert decision.scalars()['adaptive/switch_to_batch'] == 20
  assert 'batch 20' in decision.describe(5)
  assert not s.decide(s.initial(), 50, segments.Measured(19.0, 0.5)).switched


def test_the_adaptive_opening_table_shows_the_ladder_and_the_budget_not_a_phase():
  config = default.get_config()
  config.schedule.kind = 'adaptive'
  s = adaptive.AdaptiveSchedule.from_config(config, 20_000)
  table = s.describe()
  assert 'budget: 2,000,000 examples = 100 epochs of N=20,000' in table
  for batch in (32, 160, 800, 4000):
    assert f' {batch} ' in table
  assert '62,500' not in table  # the steps of a first rung run to the end: no such phase
