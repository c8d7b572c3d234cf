"""Data loaders for the experiments (no downloads: everything ships with a package)."""
