"""Synthetic tasks with parallel and sequential reference solutions (``make-data``)."""
