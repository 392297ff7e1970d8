"""Experiments: validated configs and the runs they describe."""
