"""The README's library example runs as written, and its host-side batch function is cheap."""

import pathlib
import re
import timeit

from ibs import clock, schedules

README = pathlib.Path(__file__).resolve().parents[1] / 'README.md'


def library_example() -> str:
  text = README.read_text()
  section = text[text.index('### As a library') :]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


def test_the_readme_library_example_runs(capsys):
  namespace = {'__name__': 'readme_example'}
  exec(compile(library_example(), str(README), 'exec'), namespace)
  schedule = namespace['schedule']
  total = clock.num_steps(schedule)
  assert namespace['step'] == total - 1
  assert namespace['examples_seen'] == clock.phase_spans(schedule)[-1].end_examples
  assert float(namespace['loss']) < 0.05  # the noise floor is 0.01
  assert capsys.readouterr().out.startswith(f'{total} updates, 10.0096 epochs')


def test_host_batch_size_matches_the_jnp_schedule_and_is_cheap():
  recipe = schedules.StepDecay(0.1, 128, 0.9, (60, 120, 160), (5, 5, 5), 200)
  schedule = schedules.Schedule(
    schedules.increasing_batch(recipe), num_epochs=200, num_train_examples=50_000
  )
  host = schedules.host_batch_size_schedule(schedule)
  traced = schedules.batch_size_schedule(schedule)
  edges = [s.first_step + d for s in clock.phase_spans(schedule) for d in (-1, 0, 1)]
  steps = [s for s in edges if s >= 0] + [clock.num_steps(schedule) + 10]
  assert [host(s) for s in steps] == [int(traced(s)) for s in steps]
  assert all(type(host(s)) is int for s in steps)
  per_call = min(timeit.repeat(lambda: host(12_345), number=2000, repeat=3)) / 2000
  assert per_call < 50e-6  # ~1 µs; the jnp function takes ~0.5 ms from the host
