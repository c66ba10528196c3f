"""Judging images and runs: fidelity metrics, calibration, selective generation, the
evaluator network, frontiers, the report and its figures."""
