"""The benchmarks as ``datasets.Dataset`` rows in the study's layout, from the offline mirror or their public hub copy.

One concept per module; each imports only the ones listed before it:

- :mod:`ofa_lib.data.hub`: the public hub copy of every dataset (repository, configs, splits, columns).
- :mod:`ofa_lib.data.catalog`: what exists: the datasets, their label spaces, the data errors.
- :mod:`ofa_lib.data.locate`: where a split is read from now (the mirror, else the hub), which languages and
  splits can be read, and the message naming the fix when none can.
- :mod:`ofa_lib.data.readers`: the mirror's file formats, read into the study's columns.
- :mod:`ofa_lib.data.hub_rows`: a hub split, read and mapped onto the same columns and label ids.
- :mod:`ofa_lib.data.loading`: :func:`~ofa_lib.data.loading.load_split` (the entry point), subsampling, and
  where loaded data came from.
- :mod:`ofa_lib.data.features`: examples into model inputs; :mod:`ofa_lib.data.cli`: the ``ofa-data`` command.
"""
