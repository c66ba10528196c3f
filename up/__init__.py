"""The library, in wings whose imports point down only:
core <- models <- data <- training | generation <- evaluation."""
