"""python -m ibs.tools.compare: the table, the differing config fields, the figure."""

import json
import os

import pytest

from configs import default
from ibs import reporting
from ibs.tools import compare


def fake_run(workdir, kind, updates, accuracies, wall_clock):
  """A workdir as ibs.train leaves it: config.json, event files, summary.json."""
  from clu import metric_writers

  config = default.get_config()
  config.schedule.kind = kind
  reporting.write_config_json(config, str(workdir))
  writer = metric_writers.create_default_writer(str(workdir))
  for i, (step, accuracy) in enumerate(zip(updates, accuracies, strict=True)):
    writer.write_scalars(
      step,
      {
        'train_loss': 1.0 / (i + 1),
        'test_accuracy': accuracy,
        'epoch': float(i + 1),
        'parameter_updates': step,
      },
    )
  writer.close()
  summary = {
    'test_accuracy': accuracies[-1],
    'test_loss': 0.05,
    'parameter_updates': updates[-1],
    'examples_seen': 200_000,
    'epoch': 10.0,
    'wall_clock_s': wall_clock,
    'finished': True,
  }
  (workdir / 'summary.json').write_text(json.dumps(summary))


@pytest.fixture
def two_runs(tmp_path):
  fake_run(tmp_path / 'ib', 'increasing_batch', [100, 200, 231], [0.9, 0.95, 0.976], 47.5)
  fake_run(tmp_path / 'dlr', 'decaying_lr', [200, 400, 625], [0.9, 0.96, 0.977], 42.3)
  return [str(tmp_path / 'ib'), str(tmp_path / 'dlr')]


def test_table_and_differences(two_runs):
  report = compare.compare(two_runs)
  lines = report.splitlines()
  assert lines[0].split() == [
    'run',
    'test',
    'acc',
    'test',
    'loss',
    'train',
    'loss',
    'updates',
    'examples',
    'epochs',
    'wall-clock',
  ]
  assert lines[2].split() == [
    'ib',
    '0.9760',
    '0.0500',
    '0.3333',
    '231',
    '200,000',
    '10.00',
    '47.5',
    's',
  ]
  assert lines[3].split()[:5] == ['dlr', '0.9770', '0.0500', '0.3333', '625']
  assert lines[-2:] == [
    'field          ib                dlr',
    'schedule.kind  increasing_batch  decaying_lr',
  ]


@pytest.mark.parametrize('suffix', ['pdf', 'png'])
def test_plot_is_a_paper_column_figure(two_runs, tmp_path, suffix):
  path = str(tmp_path / f'fig.{suffix}')
  assert compare.compare(two_runs, plot=path).endswith(f'wrote {path}')
  assert os.path.getsize(path) > 5_000
  if suffix == 'png':
    from PIL import Image

    width, _ = Image.open(path).size
    assert width == pytest.approx(3.4 * 300, abs=2)  # one column at 300 dpi


def test_panels_are_lettered_share_y_ranges_and_clip_nothing():
  import numpy as np

  from ibs.tools import curves

  def run(accuracies, losses):
    steps = np.array([100, 500, 1000])
    return [
      {
        'epoch': (steps, steps / 100),
        'parameter_updates': (steps, steps),
        'test_accuracy': (steps, np.array(accuracies)),
        'train_loss': (steps, np.array(losses)),
      }
    ]

  figure = curves.plot_runs(
    {
      'a': run([0.3, 0.95, 0.976], [2.0, 0.3, 0.1]),
      'b': run([0.2, 0.96, 0.97], [2.2, 0.2, 0.05]),
    }
  )
  axes = figure.axes
  assert [ax.get_title(loc='left') for ax in axes] == ['(a)', '(b)', '(c)', '(d)']
  # Loss panels (a, b) and accuracy panels (c, d) share their ranges, which hold every
  # value: 0.05–2.2 and 0.2–0.976 (the first epoch's 0.2 is not cut away).
  assert axes[0].get_ylim() == axes[1].get_ylim()
  assert axes[2].get_ylim() == axes[3].get_ylim()
  low, high = axes[0].get_ylim()
  assert low < 0.05 and 2.2 < high < 3.0
  low, high = axes[2].get_ylim()
  assert 0.15 < low < 0.2 and 0.976 < high < 0.99
  assert axes[1].get_xscale() == 'log' and axes[0].get_xscale() == 'linear'
  assert axes[2].get_yscale() == 'logit'


def test_labels_name_the_runs(two_runs, tmp_path):
  report = compare.compare(
    two_runs, str(tmp_path / 'f.png'), ['increasing batch', 'decaying LR']
  )
  assert report.splitlines()[2].startswith('increasing batch')
  with pytest.raises(
    compare.CompareError, match='--labels gives 1 labels for 2 workdirs'
  ):
    compare.compare(two_runs, None, ['one'])


def test_command_line_errors_are_one_line(tmp_path, capsys):
  for argv, message in (
    ([str(tmp_path / 'missing')], f'error: {tmp_path / "missing"} is not a directory.'),
    ([str(tmp_path)], 'not an ibs workdir'),
    (['--plot=x.png'], 'error: the following arguments are required: workdirs'),
  ):
    with pytest.raises(SystemExit) as exited:
      compare.main(argv)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and message in lines[0], lines
