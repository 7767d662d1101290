"""Scoring: every photo of a whole catalog answered by the deployed model, as the service would.

Owns batch scoring: a source's records read with collect's own readers (`sources`), the
per-chunk work on Dask workers with the model loaded once per worker (`worker`), the resumable
part files, their merge into one Parquet file and its summary (`parts`), and the run that ties
them together (`run`). Answers are built by vitrine.runtime.answers, the service's own rules.
"""
