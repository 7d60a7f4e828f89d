"""What every layer shares: the configuration error, atomic file writes, process-group helpers, the
next-token loss and the task clock. Imports nothing else of the package."""
