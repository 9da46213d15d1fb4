"""Step rules, loss terms and the methods table that composes them."""
from gcs_tune.methods.table import METHODS, Method  # torch-free: the config imports it

__all__ = ["METHODS", "Method"]
