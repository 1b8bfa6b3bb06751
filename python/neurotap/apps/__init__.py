"""The apps: evaluation, model ranking, quantization and the command line."""
