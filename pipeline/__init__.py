"""Prefect orchestration for vitrine.

Prefect wraps DVC, never the reverse: flows here read the pipeline through DVC (its index and
CLI) and run `dvc repro <stage>` subprocesses; they never import `stages/`, so `dvc repro`
alone stays a complete way to run the pipeline.
"""
