"""Steering writes to models: hooks, weight edits, checkpoints."""
