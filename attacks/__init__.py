"""Model-agnostic inner maximisation: PGD and single-step attacks over an objective callable,
`maximise` (the attack a training config names), and `frozen` for the model."""
from .pgd import pgd, project, random_start
from .single_step import fgsm, maximise, n_fgsm
from .utils import frozen

__all__ = ["pgd", "project", "random_start", "fgsm", "n_fgsm", "maximise", "frozen"]
