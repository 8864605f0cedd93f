r"""§5.4: ResNet-50 on ImageNet, batch 8192 → 16384, on a TPU pod (docs/PAPER.md).

The recipe is inferred from the same group's public setup: 5-epoch linear warm-up to
ε = 3.2 (0.1 per 256 examples, Goyal et al.), momentum 0.9, weight decay 1e-4 (not on BN
and biases), 90 epochs with step decays ×0.1 at epochs 30, 60 and 80. Increasing the batch
instead: the batch doubles to the cap 16384 at epoch 30 and the learning rate falls ×5
there (the hybrid cap rule), so ε/B still falls ×10 at every milestone.

Prepare ImageNet once (the two tars from image-net.org in DIR; writes array_record):
  python -m ibs.data.prepare imagenet2012 --data_dir=gs://BUCKET/tfds --manual_dir=DIR

On every host of the TPU VM (the same command everywhere), from a copy of the checkout
(configs/ comes with it). From the folder that holds your checkout ibs/:
  gcloud compute tpus tpu-vm scp --recurse ibs $TPU:~ --zone=$ZONE --worker=all
  gcloud compute tpus tpu-vm ssh $TPU --zone=$ZONE --worker=all --command="\
    cd ~/ibs && pip install -e . 'jax[tpu]' && \
    python -m ibs.main --config=configs/resnet50_tpu.py \
      --config.data_dir=gs://BUCKET/tfds --workdir=gs://BUCKET/ibs/resnet50"

Arguments (`--config=configs/resnet50_tpu.py:schedule=decaying_lr,data=fake`; a bare
value names its key, so `:decaying_lr` and `:fake` are short for them):
  schedule   increasing_batch (the batch doubles at epoch 30, then ε decays) |
             decaying_lr (the original schedule at batch 8192 throughout)
  data       imagenet2012 | fake (synthetic 64×64 images, a tiny ResNet and 2 epochs of
             512 examples: a smoke test of this recipe on a CPU)
"""

import ml_collections

from configs import default, variants


def get_grids() -> dict[str, list[str]]:
  """{experiment: config arguments}: the recipe ('') and its decaying-LR baseline."""
  return {'resnet50_5_4': ['', 'decaying_lr']}


def get_config(arg: str = '') -> ml_collections.ConfigDict:
  args = variants.parse(
    arg,
    {'schedule': ('increasing_batch', 'decaying_lr'), 'data': ('imagenet2012', 'fake')},
  )
  config = default.get_config()
  config.dataset = 'imagenet2012'
  config.image_size = 224
  config.model = 'resnet50'
  config.model_kwargs = ml_collections.ConfigDict(dict(zero_init_last_bn_scale=True))
  config.ghost_batch_size = 32  # BN over 32 examples, as Goyal et al.'s per-worker batch
  config.half_precision = True  # bfloat16 compute, float32 parameters

  config.optimizer = 'momentum'
  config.weight_decay = 1e-4
  config.weight_decay_mask = 'kernels'  # no decay on BN and biases

  config.schedule.kind = 'hybrid'
  config.schedule.num_epochs = 90.0
  config.schedule.learning_rate = 3.2  # 0.1 × 8192 / 256
  config.schedule.batch_size = 8192
  config.schedule.momentum = 0.9
  config.schedule.milestones = (30.0, 60.0, 80.0)
  config.schedule.decay_factor = 10.0
  config.schedule.max_batch_size = 16384
  config.schedule.warmup_epochs = 5.0

  # Per TPU core; 8192 on 32 cores needs no accumulation.
  config.max_micro_batch_size = 256
  # Image batches are large: one step already outlasts the host's work per call.
  config.steps_per_dispatch = 1
  config.gns.horizon_examples = 320_000  # a quarter epoch of ImageNet
  config.eval_batch_size = 2048
  config.log_every_epochs = 0.1
  config.eval_every_epochs = 2.0
  config.checkpoint_every_epochs = 1.0
  config.compilation_cache_dir = '~/.cache/ibs/jax'

  if args['schedule'] == 'decaying_lr':
    config.schedule.kind = 'decaying_lr'
  if args['data'] == 'fake':
    config.dataset = 'fake'
    config.fake = ml_collections.ConfigDict(
      dict(num_train=512, num_test=128, num_classes=10, shape=(64, 64, 3))
    )
    config.half_precision = False
    config.model = 'resnet'
    config.model_kwargs = ml_collections.ConfigDict(
      dict(stage_sizes=(1, 1, 1, 1), width=8, zero_init_last_bn_scale=True)
    )
    config.ghost_batch_size = 8
    config.schedule.num_epochs = 2.0
    config.schedule.batch_size = 32
    config.schedule.learning_rate = 0.4
    config.schedule.milestones = (1.0,)
    config.schedule.max_batch_size = 64
    config.schedule.warmup_epochs = 0.5
    config.max_micro_batch_size = 32
    config.eval_batch_size = 64
    config.log_every_epochs = 0.5
    config.eval_every_epochs = 1.0
    config.compilation_cache_dir = ''
  return config
