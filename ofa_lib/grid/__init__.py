"""Grids of training runs (``params/grids/<name>.yaml``): validate, plan, run, status, report.

A grid is the cartesian product of its ``grid`` axes over 02_train parameters (or the union of several
such products, when ``grid`` is a list). ``run`` trains the
head-tuning run first where the grid has one, then every grid run, each by executing
``notebooks/02_train.ipynb`` with papermill (one kernel process per run), skipping finished runs
and recording failed ones (``failure.json`` + the executed notebook with its error cell) while the
rest continue; then ``report`` executes the pipeline notebooks (03_average, 04_analysis, …) and
renders their HTML. Backends: ``local`` (a process pool, CPU threads divided among its workers)
and ``slurm`` (one job array, submitted with ``sbatch``; the head run and the report are jobs with
dependencies). A lock per run (:mod:`ofa_lib.locks`) keeps two runners from training the same run.

    python -m ofa_lib.grid plan|run|status|retry-failed|report params/grids/demo.yaml

The file format is documented in ``params/grids/README.md``.
"""
