"""The files family: where a run's files live and what they hold.

  storage.py         one path layer for local directories and object stores (`gs://`, `s3://`)
  checkpoint.py      Orbax checkpoints: save, resume, strict `load_params`
  workdir.py         a run directory's file names and its record (config, plan, data, launches)
  metric_writers.py  `metrics.jsonl` and TensorBoard

Nothing here knows of VGG, plans or the loop; every file a run writes goes through here.
"""
