"""Step rules, loss terms and the methods table that composes them."""
from gcs_tune.methods.steps import GCSAMStep, SAMStep, SGDStep
from gcs_tune.methods.table import METHODS, Method

__all__ = ["GCSAMStep", "SAMStep", "SGDStep", "METHODS", "Method"]
