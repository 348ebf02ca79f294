"""KD³ (knowledge distillation between different distributions): the method and its parts."""
from kd3.methods.kd3.method import KD3, KD3Options

__all__ = ["KD3", "KD3Options"]
