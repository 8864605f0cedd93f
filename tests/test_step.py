"""The train step: exact accumulation with ghost BN, micro-batch plans, compile policy.

References are computed without ibs.step: gradients of each ghost batch on its own
(`model.apply` on 4 examples, whose batch statistics are that ghost batch's), running
statistics by calling the model on the ghost batches one after another, and the
momentum update written out in numpy.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ibs import optim, schedules, sharding
from ibs import step as step_lib
from ibs.models import small
from ibs.models.ghost_batch_norm import GhostBatchNorm

GHOST = 4
BATCH = 32  # 8 ghost batches
LENGTH = 16
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4


def _model():
  return small.CNN1D(num_classes=10, ghost_batch_size=GHOST, width=8, depth=2)


def _data(num_steps, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'input': rng.normal(size=(BATCH, LENGTH)).astype(np.float32),
      'label': rng.integers(0, 10, size=BATCH).astype(np.int32),
    }
    for _ in range(num_steps)
  ]


def _initial_variables():
  model = _model()
  variables = model.init(jax.random.key(0), jnp.zeros((GHOST, LENGTH)), train=False)
  # Non-trivial running statistics, so the order of their updates shows.
  stats = jax.tree.map(lambda x: x + 0.3, variables['batch_stats'])
  return variables['params'], stats


def _state(params, batch_stats):
  schedule = schedules.Schedule(
    phases=(schedules.Phase(0.0, BATCH, LEARNING_RATE, MOMENTUM),),
    num_epochs=100.0,
    num_train_examples=BATCH,
  )
  tx = optim.create_optimizer('momentum', schedule, weight_decay=WEIGHT_DECAY)
  return step_lib.TrainState.create(
    apply_fn=_model().apply,
    params=jax.tree.map(jnp.copy, params),
    batch_stats=jax.tree.map(jnp.copy, batch_stats),
    tx=tx,
  )


def _compile(mesh, state, plans, host_loop=None, steps_per_dispatch=1, gns=True):
  example = {k: v[:1] for k, v in _data(1)[0].items()}
  options = step_lib.StepOptions(gns_horizon_examples=1000.0 if gns else 0.0)
  return step_lib.compile_train_steps(
    mesh,
    state,
    plans,
    example,
    ghost_batch_size=GHOST,
    steps_per_dispatch=steps_per_dispatch,
    options=options,
    host_loop=host_loop,
  )


def _run_ibs(num_steps, max_micro_batch_size, host_loop=False, gns=True):
  """`num_steps` ibs steps on one device with the given cap; the final state + metrics."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(BATCH, 1, GHOST, max_micro_batch_size)
  state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
  (step,) = _compile(mesh, state, [plan], host_loop=host_loop, gns=gns).values()
  metrics = []
  for local in _data(num_steps):
    state, m = step(state, [local], step_lib.empty_metrics(mesh))
    metrics.append({k: float(v) for k, v in m.compute().items()})
  return plan, state, metrics


@jax.jit
def _one_ghost_batch(params, batch_stats, x, y):
  """Loss gradient of one ghost batch applied alone: BN statistics are its own."""

  def loss_fn(p):
    logits, updates = _model().apply(
      {'params': p, 'batch_stats': batch_stats}, x, train=True, mutable=['batch_stats']
    )
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return per_example.mean(), (
      updates['batch_stats'],
      per_example,
      jnp.argmax(logits, -1),
    )

  (_, (batch_stats, losses, predictions)), grad = jax.value_and_grad(
    loss_fn, has_aux=True
  )(params)
  return grad, batch_stats, losses, predictions == y


def _ghost_batch_reference(params, batch_stats, inputs, labels, batch=BATCH):
  """Mean gradient over the ghost batches applied one by one; stats updated in order."""
  grads, losses, correct = [], [], []
  for start in range(0, batch, GHOST):
    x, y = inputs[start : start + GHOST], labels[start : start + GHOST]
    grad, batch_stats, loss, right = _one_ghost_batch(params, batch_stats, x, y)
    grads.append(grad)
    losses.append(loss)
    correct.append(right)
  mean_grad = jax.tree.map(lambda *g: np.mean(np.stack(g), axis=0), *grads)
  return mean_grad, batch_stats, np.concatenate(losses), np.concatenate(correct)


def _reference(num_steps):
  """Heavy-ball with L2 in float64 numpy on the ghost-batch reference gradients."""
  params, batch_stats = _initial_variables()
  trace = jax.tree.map(lambda p: np.zeros(p.shape), params)
  metrics = []
  for local in _data(num_steps):
    grad, batch_stats, losses, correct = _ghost_batch_reference(
      params, batch_stats, local['input'], local['label']
    )
    # A ← m·A + (ĝ + λω); ω ← ω − ε·A
    trace = jax.tree.map(
      lambda a, g, w: (
        MOMENTUM * a + np.asarray(g, np.float64) + WEIGHT_DECAY * np.asarray(w)
      ),
      trace,
      grad,
      params,
    )
    params = jax.tree.map(
      lambda w, a: np.float32(np.asarray(w, np.float64) - LEARNING_RATE * a),
      params,
      trace,
    )
    metrics.append({'loss': float(losses.mean()), 'accuracy': float(correct.mean())})
  return params, batch_stats, trace, metrics


def _assert_close(actual, expected, rtol=1e-5, atol=1e-6):
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol, atol),
    actual,
    expected,
  )


@pytest.mark.parametrize(
  'max_micro_batch_size, host_loop, gns',
  [
    (32, False, True),
    (32, False, False),
    (8, False, True),
    (4, False, True),
    (8, True, True),
    (4, True, False),
  ],
  ids=['A1-split', 'A1-no-gns', 'A4', 'A8', 'A4-host-loop', 'A8-host-loop-no-gns'],
)
def test_accumulated_step_equals_the_whole_batch(max_micro_batch_size, host_loop, gns):
  num_steps = 3
  plan, state, metrics = _run_ibs(num_steps, max_micro_batch_size, host_loop, gns)
  assert plan.accumulation == BATCH // max_micro_batch_size
  params, batch_stats, trace, expected_metrics = _reference(num_steps)

  _assert_close(state.params, params)
  # The running statistics saw the 8·3 ghost batches in their stream order.
  _assert_close(state.batch_stats, batch_stats)
  # The momentum buffer is Σ m^k·(ĝ + λω): the gradients themselves, step by step.
  momentum_trace = state.opt_state.inner_state[1].trace
  _assert_close(momentum_trace, trace, rtol=1e-5, atol=1e-6)
  for got, want in zip(metrics, expected_metrics, strict=True):
    assert got['loss'] == pytest.approx(want['loss'], rel=1e-5)
    assert got['accuracy'] == pytest.approx(want['accuracy'])


@pytest.mark.parametrize('host_loop', [False, True], ids=['scan', 'host-loop'])
def test_running_metrics_merge_inside_the_compiled_step(host_loop):
  """The step merges each update's metrics into the running ones: the same sums."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(BATCH, 1, GHOST, 8)
  state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
  (step,) = _compile(mesh, state, [plan], host_loop=host_loop).values()
  running = step_lib.empty_metrics(mesh)
  for local in _data(3):
    state, running = step(state, [local], running)
  *_, expected = _reference(3)
  got = {k: float(v) for k, v in running.compute().items()}
  assert got['loss'] == pytest.approx(np.mean([m['loss'] for m in expected]), rel=1e-5)
  assert got['accuracy'] == pytest.approx(np.mean([m['accuracy'] for m in expected]))


@pytest.mark.parametrize('max_micro_batch_size', [32, 8], ids=['A1', 'A4'])
def test_several_steps_per_dispatch_equal_single_steps(max_micro_batch_size):
  """K = 4 compiled once; dispatches of 3 and then 2 steps are the reference's 5 updates.

  The padded slots of each dispatch are zeros: had a step read one, the parameters, the
  BN statistics (zeros shift them) or the metrics would leave the reference.
  """
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(BATCH, 1, GHOST, max_micro_batch_size)
  state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
  (step,) = _compile(mesh, state, [plan], steps_per_dispatch=4).values()
  assert step.steps_per_dispatch == 4
  running = step_lib.empty_metrics(mesh)
  data = _data(5)
  for chunk in (data[:3], data[3:]):
    batches = sharding.train_batches_to_device(chunk, plan, mesh, steps_per_dispatch=4)
    assert batches['input'].shape == (4, *plan.shape, LENGTH)
    state, running = step(state, chunk, running)

  params, batch_stats, trace, expected = _reference(5)
  assert int(state.step) == 5
  _assert_close(state.params, params)
  _assert_close(state.batch_stats, batch_stats)
  _assert_close(state.opt_state.inner_state[1].trace, trace)
  got = {k: float(v) for k, v in running.compute().items()}
  assert got['loss'] == pytest.approx(np.mean([m['loss'] for m in expected]), rel=1e-5)
  assert got['accuracy'] == pytest.approx(np.mean([m['accuracy'] for m in expected]))


def test_one_micro_batch_measures_the_noise_scale_from_its_two_halves():
  """One device, one micro-batch of 8 ghost batches: a measuring update (step 0 is
  one) measures |G_b|² at b = 16 from the halves (4 ghost batches each),
  from one more backward pass of the same forward pass.

  Reference: each half's gradient is the mean of its ghost batches' gradients, applied
  one by one (`_one_ghost_batch`); the estimate folded in is ibs/gns.py's formula.
  """
  from ibs import gns as gns_lib

  assert step_lib.split_point(BATCH, GHOST) == BATCH // 2
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(BATCH, 1, GHOST, BATCH)
  state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
  (step,) = _compile(mesh, state, [plan]).values()
  (local,) = _data(1)
  state, _ = step(state, [local], step_lib.empty_metrics(mesh))

  params, batch_stats = _initial_variables()
  halves = []
  for half in range(2):
    rows = slice(half * BATCH // 2, (half + 1) * BATCH // 2)
    grad, batch_stats, *_ = _ghost_batch_reference(
      params, batch_stats, local['input'][rows], local['label'][rows], BATCH // 2
    )
    halves.append(grad)
  whole = jax.tree.map(lambda a, b: (a + b) / 2, *halves)

  def sq(t):
    return sum(float(np.sum(np.square(x, dtype=np.float64))) for x in jax.tree.leaves(t))

  expected = gns_lib.update(
    gns_lib.GNSState.empty(),
    np.float32((sq(halves[0]) + sq(halves[1])) / 2),
    np.float32(sq(whole)),
    BATCH / 2,
    BATCH,
    1000.0,
  )
  _assert_close(state.gns, expected, rtol=1e-4, atol=0)
  _assert_close(state.batch_stats, batch_stats)  # the 8 ghost batches in order


def test_one_ghost_batch_measures_every_nth_update_whatever_the_dispatches():
  """A batch of one ghost batch measures on the updates whose step is a multiple of
  gns_split_every only, whatever the dispatch it is in: dispatches of 3 + 4 updates (K =
  4) end bit-identical to 7 single updates (K = 1), and the last measurement folded in
  is step 6's (no examples pending after it)."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(GHOST, 1, GHOST, GHOST)
  options = step_lib.StepOptions(gns_horizon_examples=1000.0, gns_split_every=3)
  assert step_lib.measure_every(plan, options) == 3
  example = {k: v[:1] for k, v in _data(1)[0].items()}
  data = [{k: v[:GHOST] for k, v in d.items()} for d in _data(7)]
  finals = []
  for k, chunks in ((4, (data[:3], data[3:])), (1, [[d] for d in data])):
    state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
    (step,) = step_lib.compile_train_steps(
      mesh,
      state,
      [plan],
      example,
      ghost_batch_size=GHOST,
      steps_per_dispatch=k,
      options=options,
    ).values()
    running = step_lib.empty_metrics(mesh)
    for chunk in chunks:
      state, running = step(state, chunk, running)
    finals.append(state)
  jax.tree.map(np.testing.assert_array_equal, finals[0].params, finals[1].params)
  jax.tree.map(np.testing.assert_array_equal, finals[0].gns, finals[1].gns)
  assert float(finals[0].gns.pending_examples) == 0.0
  assert float(finals[0].gns.weight) > 0.0


@pytest.mark.parametrize('batch', [BATCH, GHOST], ids=['8_ghost_batches', 'one'])
def test_measuring_the_noise_scale_does_not_change_the_training(batch):
  """One device, one micro-batch, measuring on every 3rd update: the parameters and BN
  statistics after 7 updates are those of the same step compiled without the
  measurement, bit for bit (the measuring update's gradient is the plain one). The
  running metrics' sums may differ in the last bit: the losses of an update are summed
  inside the conditional with the measurement, outside without."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(batch, 1, GHOST, batch)
  example = {k: v[:1] for k, v in _data(1)[0].items()}
  data = [{k: v[:batch] for k, v in d.items()} for d in _data(7)]
  finals = []
  for horizon in (1000.0, 0.0):
    options = step_lib.StepOptions(gns_horizon_examples=horizon, gns_split_every=3)
    state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
    (step,) = step_lib.compile_train_steps(
      mesh, state, [plan], example, ghost_batch_size=GHOST, options=options
    ).values()
    running = step_lib.empty_metrics(mesh)
    for d in data:
      state, running = step(state, [d], running)
    finals.append((state, running))
  (measured, measured_metrics), (plain, plain_metrics) = finals
  assert float(measured.gns.weight) > 0.0  # it did measure
  jax.tree.map(np.testing.assert_array_equal, measured.params, plain.params)
  jax.tree.map(np.testing.assert_array_equal, measured.batch_stats, plain.batch_stats)
  jax.tree.map(
    functools.partial(np.testing.assert_allclose, rtol=1e-6),
    measured_metrics,
    plain_metrics,
  )


def test_train_batches_to_device_refuses_more_batches_than_the_dispatch_holds():
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(BATCH, 1, GHOST, BATCH)
  with pytest.raises(ValueError, match='5 batches for a dispatch of at most 4'):
    sharding.train_batches_to_device(_data(5), plan, mesh, steps_per_dispatch=4)


def test_the_whole_batch_gradient_is_the_mean_of_ghost_batch_gradients():
  """The premise of exact accumulation, checked on the model without ibs.step."""
  params, batch_stats = _initial_variables()
  (local,) = _data(1)
  model = _model()

  def loss_fn(p):
    logits, _ = model.apply(
      {'params': p, 'batch_stats': batch_stats},
      local['input'],
      train=True,
      mutable=['batch_stats'],
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, local['label']).mean()

  whole = jax.jit(jax.grad(loss_fn))(params)
  ghosts, *_ = _ghost_batch_reference(params, batch_stats, local['input'], local['label'])
  _assert_close(whole, ghosts)


@pytest.mark.parametrize(
  'batch, devices, ghost, cap, accumulation, micro',
  [
    (32, 1, 32, 800, 1, 32),
    (4000, 1, 32, 800, 5, 800),
    (256, 1, 32, 64, 4, 64),
    (256, 8, 4, 64, 1, 32),
    (640, 1, 128, 256, 5, 128),  # 640/256 → 3 splits would not be whole ghost batches
    (16384, 8, 128, 1024, 2, 1024),
    (16000, 1, 128, 1024, 25, 640),  # §5.1's last phase: 16000 = 125 ghost batches
  ],
)
def test_plan_micro_batches(batch, devices, ghost, cap, accumulation, micro):
  plan = sharding.plan_micro_batches(batch, devices, ghost, cap)
  assert (plan.accumulation, plan.micro_batch_size) == (accumulation, micro)
  assert plan.num_devices * plan.accumulation * plan.micro_batch_size == batch
  assert plan.shape == (accumulation, devices * micro)


def test_plan_errors_name_the_config_field():
  with pytest.raises(ValueError, match='ghost_batch_size'):
    sharding.plan_micro_batches(100, 8, 4, 64)  # 100 is not a multiple of 8 × 4
  with pytest.raises(ValueError, match='max_micro_batch_size'):
    sharding.plan_micro_batches(256, 1, 128, 64)


def test_batch_layout_keeps_stream_order_on_one_device():
  mesh = sharding.make_mesh(jax.devices()[:1])
  plan = sharding.plan_micro_batches(32, 1, 4, 8)
  positions = np.arange(32)
  batch = sharding.train_batches_to_device([{'label': positions}], plan, mesh, 1)
  assert batch['label'].shape == (1, 4, 8)
  np.testing.assert_array_equal(np.asarray(batch['label']).reshape(-1), positions)


@pytest.mark.parametrize('host_loop', [False, True], ids=['scan', 'host-loop'])
def test_memory_does_not_grow_with_accumulation(host_loop):
  """Compiled temp memory at a fixed micro-batch is the same for A = 4 and A = 16."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  state = jax.device_put(_state(*_initial_variables()), sharding.replicated(mesh))
  for gns in (True, False):
    # A = 1 is compared below without the noise scale only: with it, not compiled.
    accumulations = (4, 16) if gns else (1, 4, 16)
    plans = [sharding.plan_micro_batches(8 * a, 1, GHOST, 8) for a in accumulations]
    compiled = _compile(mesh, state, plans, host_loop=host_loop, gns=gns)
    temp = {
      shape[0]: c.memory_analysis().temp_size_in_bytes for shape, c in compiled.items()
    }
    assert temp[16] <= temp[4] * 1.05 + 4096, (gns, temp)
  # A = 1 skips the loop and its gradient sum: no more than A = 4 needs. (With the noise
  # scale on, one device at A = 1 back-propagates both halves of its batch at once.)
  assert temp[1] <= temp[4] * 1.05 + 4096, temp


class _ConvNet(nn.Module):
  """A model with a real convolution (small.CNN1D writes its own as a matmul)."""

  @nn.compact
  def __call__(self, x, *, train):
    x = nn.Conv(4, (3,), use_bias=False)(x[..., None])
    x = GhostBatchNorm(GHOST)(x, train=train)
    return nn.Dense(10)(jnp.mean(nn.relu(x), axis=1))


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason='an XLA:CPU workaround')
def test_on_cpu_convolutions_accumulate_in_a_host_loop():
  """XLA:CPU runs convolutions inside a while loop ~20x slower: no scan for them."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  plans = [sharding.plan_micro_batches(BATCH, 1, GHOST, cap) for cap in (32, 8)]
  for model, host_loop in ((_ConvNet(), True), (_model(), False)):
    if host_loop:
      variables = model.init(jax.random.key(0), jnp.zeros((GHOST, LENGTH)), train=False)
      state = step_lib.TrainState.create(
        apply_fn=model.apply,
        params=variables['params'],
        batch_stats=variables['batch_stats'],
        tx=optax.sgd(0.1),
      )
    else:  # The steps of test_several_steps_per_dispatch_equal_single_steps.
      state = _state(*_initial_variables())
    compiled = _compile(mesh, state, plans, steps_per_dispatch=4)
    assert compiled[(4, 8)].host_loop == host_loop
    assert not compiled[(1, 32)].host_loop
    # Several steps per dispatch would loop around the convolutions too: refused.
    expected = 1 if host_loop else 4
    assert {c.steps_per_dispatch for c in compiled.values()} == {expected}


def _counting(fn, counter):
  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    counter.append(1)
    return fn(*args, **kwargs)

  return wrapper


@pytest.mark.slow
def test_one_compilation_per_distinct_phase_shape(
  tiny_config, tmp_path, monkeypatch, without_compilation_cache
):
  """Four phases, three shapes: three compilations, each once, and the first phase's
  before the first step; the others compile beside training (their steps wait for them
  at their first call).

  Phases 0 and 2 share B = 32 but not ε: they share the compiled step. B = 32 and 64
  are one micro-batch on one device, so they measure the noise scale on every
  `gns.split_every`-th update only, inside the same program (a `lax.cond` on the step);
  B = 128 (A = 2) measures in every update. Traces of train_step are counted directly;
  XLA compilations through jax.monitoring's backend compile event, which names the
  jitted function (the session's compilation cache is off here: a program found there
  would not be compiled). One convolution: the count does not depend on the model's
  depth, the compilation time does.
  """
  from ibs import train
  from tests.conftest import fake_explicit_config, on_each_compile

  phases = (
    (0.0, 32, 0.1, 0.9),
    (1.0, 64, 0.1, 0.9),
    (2.0, 32, 0.05, 0.9),
    (3.0, 128, 0.02, 0.9),  # cap 64: A = 2
  )
  config = fake_explicit_config(tiny_config, phases, num_epochs=4.0)
  config.max_micro_batch_size = 64

  traces = []
  monkeypatch.setattr(step_lib, '_updates', _counting(step_lib._updates, traces))
  compiles_done = []
  compile_all = step_lib.compile_train_steps

  def compile_and_mark(*args, **kwargs):
    result = compile_all(*args, **kwargs)
    compiles_done.append(sorted(result))
    return result

  monkeypatch.setattr(step_lib, 'compile_train_steps', compile_and_mark)
  events = []

  # Training starts only after compile_train_steps returns: anything compiled before
  # then is marked False.
  with on_each_compile(lambda name: events.append((name, bool(compiles_done)))):
    summary = train.train_and_evaluate(config, str(tmp_path))

  assert summary['finished']
  assert compiles_done == [[(1, 32), (1, 64), (2, 64)]]
  assert len(traces) == 3
  train_step_compiles = [after for name, after in events if '_updates' in name]
  assert len(train_step_compiles) == 3, events
  # B = 32's program completes before training.
  assert train_step_compiles.count(False) >= 1, events
