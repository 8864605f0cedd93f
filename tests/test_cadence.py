"""Events keyed to examples (ibs/cadence.py), as properties over random periods, batches
and dispatch sizes, each against a brute-force reference: one example at a time."""

from hypothesis import given, settings
from hypothesis import strategies as st

from ibs import cadence

periods = st.dictionaries(
  st.sampled_from(('log', 'eval', 'checkpoint', 'decide')),
  st.integers(1, 500),
  min_size=1,
)


def _crossed(period: int, before: int, after: int) -> bool:
  """Whether a multiple of `period` lies in (before, after], counted one by one."""
  return any(e % period == 0 for e in range(before + 1, after + 1))


@settings(max_examples=200, deadline=None)
@given(periods, st.integers(0, 2000), st.integers(1, 300))
def test_steps_until_next_is_the_first_step_that_crosses_a_period(p, examples, batch):
  events = cadence.Cadence(p)
  s = events.steps_until_next(examples, batch)
  crossed = [
    any(_crossed(q, examples, examples + k * batch) for q in p.values())
    for k in range(1, s + 1)
  ]
  assert crossed == [False] * (s - 1) + [True]


@settings(max_examples=200, deadline=None)
@given(periods, st.integers(0, 2000), st.integers(0, 600))
def test_due_names_every_period_crossed(p, before, length):
  after = before + length
  expected = {name for name, q in p.items() if _crossed(q, before, after)}
  assert cadence.Cadence(p).due(before, after) == expected


@settings(max_examples=100, deadline=None)
@given(periods, st.integers(1, 64), st.integers(1, 8), st.integers(1, 60))
def test_events_fall_on_the_same_steps_whatever_the_dispatch(p, batch, k, num_steps):
  """The loop's use: dispatches of up to K steps, cut where an event is due, fire the
  events after the same steps as one step per dispatch does."""
  events = cadence.Cadence(p)

  def fired(k):
    step, examples, out = 0, 0, []
    while step < num_steps:
      n = min(k, num_steps - step, events.steps_until_next(examples, batch))
      before, examples, step = examples, examples + n * batch, step + n
      out += [(step, name) for name in sorted(events.due(before, examples))]
    return out

  assert fired(k) == fired(1)


def test_a_period_of_zero_adds_no_event():
  events = cadence.Cadence({'log': 10})
  assert events.with_period('decide', 0) == events
  assert events.with_period('decide', 7).periods == {'log': 10, 'decide': 7}
