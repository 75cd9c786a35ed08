"""Model-agnostic inner maximisation: PGD over an objective callable, and `frozen` for the model."""
from .pgd import pgd, project, random_start
from .utils import frozen

__all__ = ["pgd", "project", "random_start", "frozen"]
