"""End to end: the default config, shrunk, trains, logs, checkpoints and resumes exactly."""

import glob
import os

import jax
import numpy as np
import pytest

from ibs import train


def _final_params(workdir):
  """Parameters of the latest checkpoint in `workdir`, as numpy arrays."""
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  restored = manager.restore(
    step, args=ocp.args.Composite(state=ocp.args.StandardRestore())
  )
  manager.close()
  return step, jax.tree.map(np.asarray, restored['state']['params'])


def test_default_config_trains_end_to_end(tiny_config, tmp_path):
  workdir = str(tmp_path)
  summary = train.train_and_evaluate(tiny_config, workdir)

  # Updates by hand: 4 phases of one epoch (2000 examples) at B = 32, 64, 128, 256,
  # each rounded up (the rounding rule); phase p starts where p − 1's last batch ended.
  examples, steps = 0, 0
  for phase, batch in enumerate((32, 64, 128, 256)):
    due = 2000 * (phase + 1)
    n = -(-(due - examples) // batch)
    steps, examples = steps + n, examples + n * batch
  assert summary['parameter_updates'] == steps
  assert summary['examples_seen'] == examples
  assert summary['finished']
  # Ten classes: chance is 0.1. Four epochs of a tiny CNN on 2000 examples clear 0.5.
  assert summary['test_accuracy'] > 0.5
  assert glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))
  step, _ = _final_params(workdir)
  assert step == steps


@pytest.mark.slow
def test_resume_ends_with_the_same_parameters(tiny_config, tmp_path):
  uninterrupted = str(tmp_path / 'uninterrupted')
  train.train_and_evaluate(tiny_config, uninterrupted)

  interrupted = str(tmp_path / 'interrupted')
  first = tiny_config.copy_and_resolve_references()
  first.stop_after_steps = 70  # Inside phase 1 (steps 63–94), not at a checkpoint period.
  partial = train.train_and_evaluate(first, interrupted)
  assert partial['parameter_updates'] == 70 and not partial['finished']
  train.train_and_evaluate(tiny_config, interrupted)  # Same command, same workdir.

  step_a, params_a = _final_params(uninterrupted)
  step_b, params_b = _final_params(interrupted)
  assert step_a == step_b
  jax.tree.map(np.testing.assert_array_equal, params_a, params_b)


def test_a_different_config_does_not_resume_someone_elses_checkpoint(
  tiny_config, tmp_path
):
  first = tiny_config.copy_and_resolve_references()
  first.stop_after_steps = 5
  train.train_and_evaluate(first, str(tmp_path))
  other = tiny_config.copy_and_resolve_references()
  other.schedule.learning_rate = 0.05
  with pytest.raises(ValueError, match='different config'):
    train.train_and_evaluate(other, str(tmp_path))
  assert os.path.isdir(os.path.join(tmp_path, 'checkpoints', '5'))
