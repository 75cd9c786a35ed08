"""Post-hoc evaluation of trained models: AutoAttack (eval.autoattack), quick PGD / CW attacks
(eval.pgd) and RobustBench export (eval.export_robustbench). Imports `at`, never the reverse."""
from .common import EvalError, load_model

__all__ = ["EvalError", "load_model"]
