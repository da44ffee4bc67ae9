"""The parts of a training run; ``ptuning_v2/train.py`` is the recipe that puts them together.

- ``settings``: the flags and settings file (``parse_args``), every check made before anything is loaded
  (``check_settings``), the default output directory, ``run_config.yaml``.
- ``output``: the output directory and the checkpoint to resume (``plan_output_dir``, ``start_run``), checkpoint
  rotation, and ``writing``: a write that a full or read-only disk refuses becomes one line saying what failed and
  how to resume.
- ``scoring``: the datasets of each task type, the scorers (generation, NLU heads), the before/after table and the
  loss curve.
- ``trainer``: the hooked HF Trainer (``TuningTrainer``, ``make_trainer``), the health checks that stop a bad run,
  the non-strict DeepSpeed checkpoint load.
"""
