"""The README's library example runs as written; its host-side batch function is cheap."""

import os
import pathlib
import re
import shlex
import subprocess
import sys
import textwrap
import timeit

from ibs import clock, schedules

REPO = pathlib.Path(__file__).resolve().parents[1]
README = REPO / 'README.md'


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


def code_blocks(language: str) -> list[str]:
  """The README's fenced blocks in `language`, indentation (list items) removed."""
  blocks = re.findall(
    r'^( *)```' + language + r'\n(.*?)^\1```', README.read_text(), re.M | re.S
  )
  return [textwrap.dedent(body) for _, body in blocks]


def test_every_python_block_runs_alone():
  """Each block with the imports it shows, in a fresh namespace (a reader copies one)."""
  blocks = code_blocks('python')
  assert len(blocks) >= 2
  for block in blocks:
    namespace = {'__name__': 'readme_block'}
    exec(compile(block, str(README), 'exec'), namespace)


# Checks a command's arguments the way the command itself would, without running it:
# the module's flags defined and parsed by the one error path (reporting.parse_flags),
# ibs.main's config loaded and checked as training checks it, ibs.data.prepare's
# dataset argument one it prepares.
PARSE_ONLY = """
import importlib, sys
from ibs import reporting
name = sys.argv[1]
module = importlib.import_module(name)
if hasattr(module, '_define_flags'):
  module._define_flags()
argv = reporting.parse_flags([name, *sys.argv[2:]])
if name == 'ibs.main':
  from ibs import config_checks
  config_checks.check_config(module.load_config(), 1)
if hasattr(module, 'DATASETS'):
  assert argv[1:] and argv[1] in module.DATASETS, argv
print('parsed')
"""


def bash_commands() -> list[list[str]]:
  """Every command of the README's bash blocks: `&&` chains split, comments dropped."""
  commands = []
  for block in code_blocks('bash'):
    for line in block.splitlines():
      line = line.split(' #', 1)[0].strip()
      if line and not line.startswith('#'):
        commands += [shlex.split(part) for part in line.split(' && ')]
  return commands


def test_every_bash_command_runs_or_parses(tmp_path):
  """How each command of the README's shell blocks is checked, by what it needs:

  * ibs.calculator and ibs.tools.compare run as written (seconds), compare on two
    workdirs made for it (tests/test_compare.py's fake runs) at the README's paths;
  * ibs.main (trains for minutes), ibs.tools.probe (needs a trained run) and
    ibs.data.prepare (downloads, or needs the archives) have their flags parsed by the
    one error path and, for ibs.main, the config loaded and checked as training does
    (PARSE_ONLY);
  * `pip install` names extras that pyproject.toml defines; `jupyter execute` names a
    notebook that exists (tests/test_notebooks.py runs each) and a command installed in
    this environment; `python3 -m venv`, `. .venv/bin/activate` and `python -m pytest`
    are this session's own setup.
  Paths under /tmp are moved under the test's temporary directory.
  """
  import tomllib

  from tests.test_compare import fake_run

  extras = tomllib.loads((REPO / 'pyproject.toml').read_text())['project'][
    'optional-dependencies'
  ]
  env = {**os.environ, 'PYTHONPATH': str(REPO)}
  checked, started = set(), []
  pipes = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for command in bash_commands():
    command = [arg.replace('/tmp/', f'{tmp_path}/') for arg in command]
    head = command[:3] if command[0] in ('python', 'python3') else command[:2]
    if (
      command[:3] in (['python3', '-m', 'venv'], ['python', '-m', 'pytest'])
      or command[0] == '.'
    ):
      continue
    if command[:2] == ['pip', 'install']:
      for spec in command[2:]:
        wanted = re.findall(r'\[([\w,]+)\]', spec)
        assert all(e in extras for w in wanted for e in w.split(',')), spec
      assert (REPO / command[command.index('-c') + 1]).exists()
      checked.add('pip')
      continue
    if command[:2] == ['jupyter', 'execute']:
      assert (REPO / command[2]).exists(), command
      assert os.path.exists(
        os.path.join(os.path.dirname(sys.executable), 'jupyter-execute')
      )
      checked.add('jupyter')
      continue
    assert head[:2] == ['python', '-m'], command
    module = head[2]
    if module == 'ibs.tools.compare':
      workdirs = [a for a in command[3:] if not a.startswith('-')]
      for i, workdir in enumerate(workdirs):
        fake_run(
          pathlib.Path(workdir), 'increasing_batch', [100, 200], [0.9, 0.95], 1.0 + i
        )
      run = [sys.executable, *command[1:]]
    elif module == 'ibs.calculator':
      run = [sys.executable, *command[1:]]
    else:
      run = [sys.executable, '-c', PARSE_ONLY, module, *command[3:]]
    # Started together, waited for below: each spends most of its time importing.
    started.append((command, subprocess.Popen(run, **pipes, cwd=tmp_path, env=env)))
    checked.add(module)
  for command, process in started:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, (command, stderr[-2000:])
    # What each command prints when it has done its work.
    done = {'ibs.tools.compare': 'wrote ', 'ibs.calculator': 'wrote '}
    done = {
      **dict.fromkeys(('ibs.main', 'ibs.tools.probe', 'ibs.data.prepare'), 'parsed'),
      **done,
    }
    assert done.get(command[2], '') in stdout, (command, stdout[-2000:])
  for command, _ in started:
    plots = [a.split('=', 1)[1] for a in command if a.startswith('--plot=')]
    assert all(os.path.getsize(p) > 5_000 for p in plots), command
  assert checked >= {
    'pip',
    'jupyter',
    'ibs.main',
    'ibs.calculator',
    'ibs.tools.compare',
    'ibs.tools.probe',
    'ibs.data.prepare',
  }
