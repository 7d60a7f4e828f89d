"""What every layer shares: the configuration error, atomic file writes, process-group helpers and
the next-token loss. Imports nothing else of the package."""
