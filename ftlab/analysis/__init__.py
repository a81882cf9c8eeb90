"""The analysis family: finished runs read back, combined and explained.

  ensemble.py      `ExactEval`: models and output ensembles scored exactly, BatchNorm reset
  combine.py       output ensembles, soups and WiSE-FT over finished runs (`combine`)
  soups.py         exact pytree averages: uniform soups, interpolation, greedy selection
  mask_report.py   what a run trained, layer by layer; overlaps of masks
  masked_delta.py  masked-delta checkpoints: the changed entries against a base checksum
  stats.py         over seeds and tasks: means, t intervals, paired comparisons with a baseline

Everything here returns data; tables, markdown and plots are the scripts' business.
"""
