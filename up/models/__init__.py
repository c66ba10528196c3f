"""The networks (tokenizer, VAR VQ-VAE, transformer, VAR interop) and the maths that both
training and sampling use (uncertainty measures, per-scale temperatures)."""
