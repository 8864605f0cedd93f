r"""Soak test: random kill -9 and SIGTERM trials, each rerun, compared with one clean run.

  python experiments/soak.py --trials=20 --root=/tmp/ibs_soak
  python experiments/soak.py --trials=8 --processes=2 --root=/tmp/ibs_soak2  # 2 × 1
  python experiments/soak.py --measure_default --root=/tmp/ibs_soak  # SIGTERM → exit

Runs the default config's short variant (SHORT below: the default config over 4 epochs
with milestones 1, 2, 3, so B = 32 → 160 → 800 → 4000 as in the full run, a checkpoint
every epoch) once uninterrupted, then `--trials` times: start `python -m ibs.main`,
wait for training to begin, wait a random time, send kill -9 or SIGTERM (alternating,
so both are tried), then rerun the same command on the same workdir until it finishes.
A trial is identical when the final checkpoint's every array (parameters, optimizer
state with its step count, BN statistics) is bit-identical to the clean run's and every
TensorBoard scalar (except the wall-clock ones) has the clean run's value at every step
it was logged at, duplicates from a rerun included. Also reports the SIGTERM → exit
time and, for SIGTERM, that the run saved the step it reached (exit status 75).

With `--processes=N` every run is N processes of one CPU device each (jax.distributed on
localhost, the one-device-per-process layout of GPU clusters), the reference run too;
the signal goes to process 0 in two trials (kill -9, SIGTERM), then process 1, ...; after
a kill -9 every survivor must exit 76 (a lost peer, found after PEER_TIMEOUT_S) and after
a SIGTERM all exit 75, and the rerun must end identical.

`--measure_default` instead times SIGTERM → exit on the full default config, a few times.
All runs share a persistent compilation cache under --root. Prints one line per trial
and a summary; exits 1 if a trial was not identical.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHORT = [
  '--config.schedule.num_epochs=4',
  '--config.schedule.milestones=(1.0,2.0,3.0)',
  '--config.checkpoint_every_epochs=1.0',
  '--config.eval_every_epochs=2.0',
]
# Wall-clock scalars: clu's, and ibs.reporting's per log period.
TIME_SCALARS = {'steps_per_sec', 'uptime', 'examples_per_sec', 'step_time_ms'}
EXIT_PREEMPTED = 75
EXIT_PEER_LOST = 76
PEER_TIMEOUT_S = (
  10  # --processes > 1: a lost peer is found after this (IBS_PEER_TIMEOUT_S)
)


def _command(workdir, root, overrides):
  return [
    sys.executable,
    '-m',
    'ibs.main',
    f'--config={os.path.join(REPO, "configs", "default.py")}',
    f'--workdir={workdir}',
    f'--config.compilation_cache_dir={os.path.join(root, "xla_cache")}',
    f'--config.data_dir={os.path.join(root, "tfds")}',
    *overrides,
  ]


def _env():
  env = dict(os.environ, JAX_PLATFORMS='cpu', TF_CPP_MIN_LOG_LEVEL='2')
  env['PYTHONPATH'] = os.pathsep.join([REPO, env.get('PYTHONPATH', '')])
  return env


def _start(workdir, root, overrides, log_path, processes=1):
  """One run: `processes` ibs.main processes of one CPU device each on localhost (gloo),
  or one process. Returns the Popen of process 0, with the others as `.peers`."""
  flags = [[]]
  if processes > 1:
    with socket.socket() as s:
      s.bind(('127.0.0.1', 0))
      port = s.getsockname()[1]
    flags = [
      [
        f'--coordinator_address=127.0.0.1:{port}',
        f'--num_processes={processes}',
        f'--process_id={i}',
      ]
      for i in range(processes)
    ]
  launched = []
  for i, extra in enumerate(flags):
    log = open(log_path if i == 0 else f'{log_path}.{i}', 'w+')  # noqa: SIM115
    env = _env()
    if processes > 1:
      env.update(JAX_NUM_CPU_DEVICES='1', IBS_PEER_TIMEOUT_S=str(PEER_TIMEOUT_S))
    process = subprocess.Popen(
      [*_command(workdir, root, overrides), *extra],
      cwd=REPO,
      env=env,
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    process.log = log
    launched.append(process)
  launched[0].peers = launched[1:]
  return launched[0]


def _wait_for(process, pattern, timeout=1800):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline and process.poll() is None:
    process.log.seek(0)
    if re.search(pattern, process.log.read()):
      return True
    time.sleep(0.02)
  return False


def _finish(process, timeout=1800):
  """(exit status, log) of process 0; its peers' statuses, if any, as `.peer_codes`."""
  for p in getattr(process, 'peers', []):
    p.wait(timeout=timeout)
    p.log.close()
  process.wait(timeout=timeout)
  process.log.seek(0)
  text = process.log.read()
  process.log.close()
  process.peer_codes = [p.returncode for p in getattr(process, 'peers', [])]
  return process.returncode, text


def _state(workdir):
  import jax
  import orbax.checkpoint as ocp

  manager = ocp.CheckpointManager(os.path.join(workdir, 'checkpoints'))
  step = manager.latest_step()
  manager.close()
  # Onto this process's one device, whatever layout saved it (--processes).
  path = os.path.join(workdir, 'checkpoints', str(step), 'state')
  checkpointer = ocp.StandardCheckpointer()
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one),
    checkpointer.metadata(path).item_metadata.tree,
  )
  leaves = jax.tree_util.tree_leaves_with_path(checkpointer.restore(path, abstract))
  return step, {jax.tree_util.keystr(p): np.asarray(x) for p, x in leaves}


def _scalars(workdir):
  """{(tag, step): [values]} over every event file of the workdir."""
  import tensorflow as tf

  values = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag in TIME_SCALARS:
          continue
        if v.HasField('tensor'):
          array = tf.make_ndarray(v.tensor)
          if array.size != 1 or array.dtype.kind not in 'fiu':
            continue  # Hyperparameters, text.
          value = float(array.reshape(()))
        elif v.HasField('simple_value'):
          value = v.simple_value
        else:
          continue
        values[(v.tag, event.step)].append(value)
  return values


def _compare(workdir, reference):
  step, arrays = _state(workdir)
  ref_step, ref_arrays, ref_scalars = reference
  problems = []
  if step != ref_step:
    problems.append(f'step {step} != {ref_step}')
  for key, ref in ref_arrays.items():
    if key not in arrays or not np.array_equal(arrays[key], ref, equal_nan=True):
      problems.append(f'array {key} differs')
  scalars = _scalars(workdir)
  for key, ref in ref_scalars.items():
    got = scalars.get(key)
    if not got:
      problems.append(f'scalar {key} missing')
    elif any(v != ref[-1] for v in got):
      problems.append(f'scalar {key}: {got} != {ref[-1]}')
  extra = set(scalars) - set(ref_scalars)
  if extra:
    problems.append(f'extra scalars {sorted(extra)[:3]}')
  return problems


def soak(args):
  root = os.path.abspath(args.root)
  n = args.processes
  if n > 1:  # Every device needs whole ghost batches of the first phase's B = 32.
    SHORT.append(f'--config.ghost_batch_size={32 // n}')
  os.makedirs(root, exist_ok=True)
  reference_dir = os.path.join(root, 'reference')
  if not os.path.exists(os.path.join(reference_dir, 'summary.json')):
    shutil.rmtree(reference_dir, ignore_errors=True)
    start = time.monotonic()
    rc, text = _finish(
      _start(reference_dir, root, SHORT, os.path.join(root, 'reference.log'), n)
    )
    if rc:
      sys.exit(f'The reference run failed (rc {rc}):\n{text[-3000:]}')
    print(f'reference run: {time.monotonic() - start:.0f} s', flush=True)
  reference = (*_state(reference_dir), _scalars(reference_dir))
  # The training window of the reference run, from its log: where signals land.
  with open(os.path.join(root, 'reference.log')) as f:
    text = f.read()
  window = _training_seconds(text) or 5.0

  rng = random.Random(args.seed)
  identical, results, exit_times = 0, [], []
  for trial in range(args.trials):
    kind = ('kill9', 'sigterm')[trial % 2]
    victim = (trial // 2) % n  # Several processes: each signal to each in turn.
    workdir = os.path.join(root, f'trial{trial}')
    shutil.rmtree(workdir, ignore_errors=True)
    process = _start(workdir, root, SHORT, os.path.join(root, f'trial{trial}.log'), n)
    started = _wait_for(process, r'Phase 0:')
    delay = rng.uniform(0.0, window * 0.9)
    time.sleep(delay)
    sent = time.monotonic()
    target = ([process, *process.peers])[victim]
    target.send_signal(signal.SIGKILL if kind == 'kill9' else signal.SIGTERM)
    rc, text = _finish(process)
    exit_s = time.monotonic() - sent
    saved = re.search(r'stopped at step (\d+) with a checkpoint', text)
    note = ''
    if n > 1:
      codes = [process.returncode, *process.peer_codes]
      note = f'process {victim}; exit statuses {codes}, {exit_s:.1f} s; '
      rc = codes[1 - victim] if n == 2 else codes  # a survivor's (kill -9)
      if kind == 'kill9':
        survivors = [c for i, c in enumerate(codes) if i != victim]
        if any(c not in (EXIT_PEER_LOST, 0) for c in survivors):
          note += 'A SURVIVOR DID NOT EXIT 76; '
    if kind == 'sigterm':
      if rc == EXIT_PREEMPTED:
        exit_times.append(exit_s)
        note += f'saved step {saved.group(1) if saved else "?"}, exit {exit_s:.2f} s'
      else:
        note += f'rc {rc} (the signal came after training)'
    reruns = 0
    while True:
      reruns += 1
      rc2, text2 = _finish(
        _start(workdir, root, SHORT, os.path.join(root, f'trial{trial}_rerun.log'), n)
      )
      if rc2 != EXIT_PREEMPTED or reruns > 3:
        break
    problems = [f'rerun rc {rc2}'] if rc2 else _compare(workdir, reference)
    ok = started and not problems and 'DID NOT' not in note
    identical += ok
    results.append(
      {
        'trial': trial,
        'signal': kind,
        'delay_s': delay,
        'rc': rc,
        'identical': ok,
        'problems': problems[:5],
        'note': note,
      }
    )
    print(
      f'trial {trial:2d} {kind:7s} after {delay:5.2f} s: rc {rc}, '
      f'{"identical" if ok else "DIFFERENT " + "; ".join(problems[:3])} {note}',
      flush=True,
    )
  by_kind = collections.Counter((r['signal'], r['identical']) for r in results)
  summary = {
    'processes': n,
    'trials': args.trials,
    'identical': identical,
    'kill9': (
      f'{by_kind[("kill9", True)]}/{by_kind[("kill9", True)] + by_kind[("kill9", False)]}'
    ),
    'sigterm': (
      f'{by_kind[("sigterm", True)]}/'
      f'{by_kind[("sigterm", True)] + by_kind[("sigterm", False)]}'
    ),
    'sigterm_to_exit_s': sorted(round(t, 2) for t in exit_times),
  }
  print(json.dumps(summary), flush=True)
  with open(os.path.join(root, 'soak.json'), 'w') as f:
    json.dump({'summary': summary, 'trials': results}, f, indent=2)
  return identical == args.trials


def _training_seconds(text):
  times = re.findall(
    r'^I\d{4} (\d\d):(\d\d):(\d\d\.\d+) .*(?:Phase 0:|examples_per_sec)', text, re.M
  )
  if len(times) < 2:
    return None
  seconds = [int(h) * 3600 + int(m) * 60 + float(s) for h, m, s in times]
  return max(seconds) - seconds[0]


def measure_default(args):
  """SIGTERM → exit on the full default config, `--repeats` times."""
  root = os.path.abspath(args.root)
  times = []
  for i in range(args.repeats):
    workdir = os.path.join(root, f'default{i}')
    shutil.rmtree(workdir, ignore_errors=True)
    process = _start(workdir, root, [], os.path.join(root, f'default{i}.log'))
    _wait_for(process, r'Phase 0:')
    time.sleep(3.0 + i)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    rc, text = _finish(process)
    elapsed = time.monotonic() - sent
    saved = re.search(r'stopped at step (\d+) with a checkpoint', text)
    print(
      f'default config: SIGTERM → exit {elapsed:.2f} s, rc {rc}, saved step '
      f'{saved.group(1) if saved else None}',
      flush=True,
    )
    times.append(elapsed)
  print(json.dumps({'sigterm_to_exit_s': [round(t, 2) for t in times]}))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--root', default='/tmp/ibs_soak')
  parser.add_argument('--trials', type=int, default=20)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument(
    '--processes',
    type=int,
    default=1,
    help='processes of one CPU device each (jax.distributed on localhost); the signal '
    'goes to each process in turn, and the reference run has the same layout',
  )
  parser.add_argument('--measure_default', action='store_true')
  parser.add_argument('--repeats', type=int, default=3)
  args = parser.parse_args()
  if args.measure_default:
    measure_default(args)
    return
  sys.exit(0 if soak(args) else 1)


if __name__ == '__main__':
  main()
