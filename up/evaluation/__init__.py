"""Judging images and runs: fidelity, calibration, selective generation (each declares
its metrics: metrics.py), the evaluator network, frontiers, the report."""
