"""The model zoo: every architecture registers itself by name when its module is imported here."""
from kd3.models import adapters, cnn, lenet, mobilenetv2, resnet_cifar, wrn  # noqa: F401  (registration)
from kd3.models.base import Net
from kd3.models.registry import create_model, list_models, register_model

__all__ = ["Net", "create_model", "list_models", "register_model"]
