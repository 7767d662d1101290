"""Evaluation: judging models by business value and choosing which one ships.

Owns the value model and scores (`metrics`), probability calibration (`calibration`), the
champion/challenger decision (`promotion`) and the evaluation page (`report`).
"""
