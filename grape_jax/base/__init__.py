"""Base layer: file writes and multi-host collectives; imports nothing else of the project."""
