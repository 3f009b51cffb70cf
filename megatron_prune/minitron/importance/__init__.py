"""Importance: pure statistics, the hooks that feed them, distributed reductions and the scores file."""
