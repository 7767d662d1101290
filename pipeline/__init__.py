"""Prefect orchestration for vitrine.

Prefect wraps DVC, never the reverse: flows here only run `dvc repro <stage>` subprocesses
and never import `stages/`, so `dvc repro` alone stays a complete way to run the pipeline.
"""
