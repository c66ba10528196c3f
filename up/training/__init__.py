"""Fitting models: the transformer's run (builder, step, loop), its losses and references,
the schedule, checkpoints, and the tokenizer's training."""
