"""Tiny versioned model families."""
