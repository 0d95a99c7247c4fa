"""Evaluation protocol."""
