"""A run on disk: the run directory's layout, adapter checkpoints, and reading a finished run."""
