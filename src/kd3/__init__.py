"""kd3: knowledge distillation from webly collected images without the original training data."""

__version__ = "0.1.0"
