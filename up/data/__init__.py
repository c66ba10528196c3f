"""Images in, tokens out: data sources, the prepared splits on disk and the token cache."""
