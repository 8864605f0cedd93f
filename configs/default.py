r"""Default: the paper's increasing-batch schedule on MNIST-1D, on a laptop CPU.

A 1-D CNN with ghost batch norm; the §5.1 milestone pattern (60/120/160 of 200 epochs,
here halved to 30/60/80 of 100) with factor 5, the batch growing 32 → 160 → 800 → 4000 at
a constant learning rate.

  python -m ibs.main --config=configs/default.py --workdir=/tmp/ibs_default
  python -m ibs.calculator --config=configs/default.py --baseline
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()

  config.dataset = 'mnist1d'
  config.mnist1d = ml_collections.ConfigDict(dict(num_train=20_000, num_test=5_000))
  config.fake = ml_collections.ConfigDict(
    dict(num_train=1024, num_test=256, num_classes=10, shape=(40,))
  )  # used when dataset='fake'
  config.data_dir = ''  # TFDS data directory; '' = TFDS_DATA_DIR or ~/tensorflow_datasets
  # The train split on the devices, each batch gathered (and augmented) there from keys
  # the host computes (ibs/data/resident.py): 'auto' where the split fits
  # resident_data_fraction of one device's memory (MNIST-1D, CIFAR-10), 'on' (required),
  # 'off' (the host pipeline). The same batches either way; the run's opening lines say
  # which.
  config.resident_data = 'auto'
  config.resident_data_fraction = 0.25

  config.model = 'cnn1d'
  config.model_kwargs = ml_collections.ConfigDict(dict(width=32, depth=3))
  config.ghost_batch_size = 32  # BN statistics over groups of this many examples
  config.half_precision = False  # bfloat16 compute on accelerators

  config.optimizer = 'momentum'  # sgd | momentum | nesterov | adam
  config.weight_decay = 5e-4  # L2, added to the gradient
  config.decoupled_weight_decay = False
  config.weight_decay_mask = 'all'  # all | kernels (no decay on BN and biases)

  config.schedule = ml_collections.ConfigDict()
  # decaying_lr | increasing_batch | hybrid (SGD's conversions); sqrt_scaling | seesaw
  # (Adam's); explicit (phases given); adaptive (the measured noise scale decides when
  # to climb the ladder below): ibs.schedules.SCHEDULE_KINDS.
  config.schedule.kind = 'increasing_batch'
  config.schedule.num_epochs = 100.0
  config.schedule.learning_rate = 0.1
  config.schedule.batch_size = 32
  config.schedule.momentum = 0.9
  config.schedule.milestones = (30.0, 60.0, 80.0)  # epochs
  config.schedule.decay_factor = 5.0  # ε ÷ 5 (or B × 5) at each milestone
  config.schedule.max_batch_size = 0  # hybrid's cap B_max
  config.schedule.warmup_epochs = 0.0
  # kind='adaptive' climbs the ladder above (32, 160, 800, 4000; past max_batch_size, if
  # set, ε decays instead) when the measured noise scale B_simple has stayed at or above
  # threshold × B for window_epochs, after min_epochs on the rung; decided every
  # check_every_epochs (ibs/adaptive.py). threshold = the ladder's factor: the next rung
  # is still no larger than B_simple.
  config.schedule.adaptive = ml_collections.ConfigDict(
    dict(threshold=5.0, window_epochs=2.0, min_epochs=5.0, check_every_epochs=0.5)
  )
  # kind='measured_batch' keeps the recipe's temperature g = εN/(B(1 − m)) (its ε
  # decays at the milestones) and takes, every check_every_epochs, the largest batch of
  # the ladder 32, 32·ladder_factor, … that is at most B_simple/divisor (B_simple over
  # the last window_epochs) and keeps ε = ε_recipe·B/32 at most max_learning_rate (the
  # paper's §5.2: ε 0.1 → 0.5 with B kept accuracy); ibs/measured/temperature.py.
  config.schedule.measured_batch = ml_collections.ConfigDict(
    dict(
      divisor=2.0,
      ladder_factor=2.0,
      max_learning_rate=0.5,
      window_epochs=2.0,
      check_every_epochs=0.5,
    )
  )
  # kind='plateau' ignores the milestones' epochs and climbs one rung (B × 5, or ε ÷ 5
  # once B × 5 would pass B_simple/divisor) when the loss on loss_examples training
  # examples improved by less than a fraction delta over the last window_epochs against
  # the window_epochs before; ibs/measured/plateau.py.
  config.schedule.plateau = ml_collections.ConfigDict(
    dict(
      delta=0.02,
      window_epochs=5.0,
      check_every_epochs=0.5,
      loss_examples=2048,
      divisor=1.0,
      noise_window_epochs=2.0,
    )
  )

  config.max_micro_batch_size = 800  # per-device cap; larger batches accumulate (CPU is
  # fastest near 800 examples per micro-batch for this model)
  config.steps_per_dispatch = 32  # updates per call of the compiled step: at B = 32 a
  # step is short on CPU and the host's work per call a visible share of it (32 against
  # 8: 0.92x the time per update; docs/BENCHMARKS.md, "One program per shape, 32 updates
  # per dispatch")
  # The gradient noise scale B_simple = tr(Σ)/|G|², measured in the step (ibs/gns.py):
  # moving averages over a horizon of this many examples (here one epoch). Every update
  # measures, except where one device trains one micro-batch (here B = 32, 160, 800):
  # that measures on every split_every-th update only, and at least 4 times per horizon
  # (a measuring update splits its batch, which costs more than a plain one;
  # docs/BENCHMARKS.md).
  config.gns = ml_collections.ConfigDict(
    dict(enabled=True, horizon_examples=20_000, split_every=100)
  )
  config.eval_batch_size = 1000
  config.log_every_epochs = 1.0
  config.eval_every_epochs = 5.0
  config.checkpoint_every_epochs = 25.0
  config.stop_after_steps = 0  # > 0: stop (with a checkpoint) after this many updates
  config.nonfinite = 'stop'  # NaN/inf loss or gradient: 'stop' the run, or 'skip' the
  # update (parameters kept, skips counted); docs/RELIABILITY.md
  config.nonfinite_max_skipped = 0.5  # 'skip': stop when more than this fraction of the
  # updates between two events (log, evaluation, checkpoint) were skipped

  config.seed = 0  # parameter initialisation
  config.data_seed = 0  # data order and augmentation
  config.compilation_cache_dir = ''  # persistent XLA cache; '' disables it
  return config
