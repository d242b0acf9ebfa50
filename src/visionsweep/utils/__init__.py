"""Helpers shared by the entry points: CLI error handling, config printing, run records."""
