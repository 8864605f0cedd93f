"""Everything about data, in one package, from the example order to the model-ready batch.

  order.py     which example each stream position holds: a pure function of (seed,
               position), so a run resumes anywhere (docs/DESIGN.md decision 5)
  catalog.py   sizes and shapes of the datasets (the DatasetSpec), without TFDS
  sources.py   random access to a split: in memory, JPEG bytes, or synthetic
  mnist1d.py   MNIST-1D as a local TFDS builder, generated offline
  prepared.py  CIFAR-10 and ImageNet from a prepared TFDS directory; never a download
  prepare.py   `python -m ibs.data.prepare`: writes those directories (array_record)
  augment.py   preprocessing keyed by (data seed, position)
  pipeline.py  the loaders a run calls: sources by split, training and evaluation batches
  resident.py  a train split that fits on the devices: the host sends indices (and
               augmentation choices), the step gathers and augments there

Nothing is imported here, so `from ibs.data import catalog` stays free of TFDS and
TensorFlow (the schedule calculator needs only the catalog).
"""
