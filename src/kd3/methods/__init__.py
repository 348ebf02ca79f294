"""Every method registers itself on import; ``get_method(name)`` finds it."""
from kd3.methods import blind_kd, dafl, deepinversion, dfnd, kd3, references  # noqa: F401
from kd3.methods.base import METHODS, DistillContext, EpochPlan, Method, get_method, register_method

__all__ = ["METHODS", "DistillContext", "EpochPlan", "Method", "get_method", "register_method"]
