"""Adapters that give third-party classifiers the Net interface, so they can serve as teachers or students.

``TorchvisionNet`` cuts any torchvision classifier that ends in an ``nn.Linear`` into backbone and
pooling by tracing it with torch.fx; ``TimmNet`` uses timm's own ``forward_features`` /
``forward_head`` / ``get_classifier`` split (timm is an optional extra: ``pip install 'kd3[timm]'``).
"""
from __future__ import annotations

from typing import Any

import torch
import torchvision
from torch import fx, nn
from torchvision.models.feature_extraction import DualGraphModule, create_feature_extractor

from kd3.models.base import Net
from kd3.models.registry import register_model

# What counts as the pool that ends the backbone: the adaptive pooling layers and spatial means
# torchvision's classifiers use (ResNet/RegNet/EfficientNet/ConvNeXt/VGG modules, MobileNetV2 and
# DenseNet functional calls, ShuffleNetV2's ``x.mean([2, 3])``).
_POOL_MODULES = (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_POOL_FUNCTIONS = (nn.functional.adaptive_avg_pool2d, nn.functional.adaptive_max_pool2d, torch.mean)


class TorchvisionNet(Net):
    """A torchvision classifier split at ``feature_node`` into ``front`` (input -> feature map) and
    ``tail`` (feature map -> the final Linear's input), with that Linear as ``classifier``.

    ``feature_node`` is a node name as listed by ``torchvision.models.feature_extraction.get_graph_node_names``
    (e.g. ``"layer4"``); by default it is the input of the last pooling before the classifier, so
    ``pool`` is that pooling plus whatever the model runs between it and the final Linear (for VGG
    the 4096-unit hidden layers, for MobileNetV3 the 1024-unit one). Both parts are traced in train and
    eval versions so mode-dependent code (dropout, stochastic depth) behaves as in the original, and
    they hold the wrapped model's own modules: weights are shared, and ``state_dict`` keys are the
    model's own under ``front.``/``tail.``/``classifier.``. Afterwards every module is in the mode
    ``model.training`` says (``feature_channels`` is measured in eval mode, leaving BatchNorm statistics alone).
    """

    def __init__(self, model: nn.Module, image_size: int = 224, feature_node: str | None = None) -> None:
        super().__init__()
        classifier_path, classifier = _last_linear(model)
        return_nodes = {classifier_path: "logits"} if feature_node is None else {feature_node: "map",
                                                                                   classifier_path: "logits"}
        traced = create_feature_extractor(model, return_nodes=return_nodes, suppress_diff_warning=True)
        train_front, train_tail = _cut(traced.train_graph, model)
        eval_front, eval_tail = _cut(traced.eval_graph, model)
        self.front = DualGraphModule(model, train_front, eval_front)
        self.tail = DualGraphModule(model, train_tail, eval_tail)
        self.classifier = classifier
        self.train(model.training)
        self.feature_channels = self._probe_channels(_first_conv(model).in_channels, image_size)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.front(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.tail(feature_map)

    def _probe_channels(self, in_channels: int, image_size: int) -> int:
        """Run one blank image through ``front`` in eval mode, so BatchNorm statistics stay untouched."""
        training = self.training
        parameter = next(self.parameters())
        self.eval()
        try:
            with torch.no_grad():
                feature_map = self.front(torch.zeros(1, in_channels, image_size, image_size, dtype=parameter.dtype,
                                                     device=parameter.device))
        finally:
            self.train(training)
        if feature_map.dim() != 4:
            raise ValueError(f"feature node gives a {tuple(feature_map.shape)} tensor, not an N×C×H×W map")
        return feature_map.shape[1]


def _last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    linears = [(path, module) for path, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to wrap")
    return linears[-1]


def _first_conv(model: nn.Module) -> nn.Conv2d:
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module
    raise ValueError(f"{type(model).__name__} has no nn.Conv2d, so it makes no feature map")


def _cut(graph: fx.Graph, model: nn.Module) -> tuple[fx.Graph, fx.Graph]:
    """Split a feature-extractor graph returning {"logits"[, "map"]} into input->map and map->vector graphs."""
    returned = next(node for node in graph.nodes if node.op == "output").args[0]
    vector = returned["logits"].args[0]
    feature_map = returned["map"] if "map" in returned else _pool_input(vector, model)
    return _subgraph(feature_map, source=None), _subgraph(vector, source=feature_map)


def _pool_input(node: fx.Node, model: nn.Module) -> fx.Node:
    """Walk back from the classifier's input along first arguments to the pooling, and return what it pools."""
    while True:
        if _is_pool(node, model):
            return node.args[0]
        if node.op == "placeholder" or not node.args or not isinstance(node.args[0], fx.Node):
            raise ValueError(f"found no pooling before the classifier of {type(model).__name__}; "
                             "name the feature map with feature_node=")
        node = node.args[0]


def _is_pool(node: fx.Node, model: nn.Module) -> bool:
    if node.op == "call_module":
        return isinstance(model.get_submodule(node.target), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return node.op == "call_method" and node.target == "mean"


def _subgraph(output: fx.Node, source: fx.Node | None) -> fx.Graph:
    """A new graph computing ``output``: from the model input, or from ``source`` made its only input."""
    needed: set[fx.Node] = set()
    pending = [output]
    while pending:
        node = pending.pop()
        if node in needed or node is source:
            continue
        if source is not None and node.op == "placeholder":
            raise ValueError(f"the classifier's input is not computed from the feature map {source.name!r} alone")
        needed.add(node)
        pending.extend(node.all_input_nodes)
    graph = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    if source is not None:
        copies[source] = graph.placeholder("feature_map")
    for node in output.graph.nodes:  # graph order is topological, so inputs are copied first
        if node in needed:
            copies[node] = graph.node_copy(node, copies.__getitem__)
    graph.output(copies[output])
    return graph


def _replace_module(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    path = next(path for path, module in model.named_modules() if module is old)
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, new)


def torchvision_classifier(name: str, num_classes: int | None = None, in_channels: int | None = None,
                           **kwargs: Any) -> nn.Module:
    """torchvision's classifier ``name``, untrained (``weights=None``: kd3 never downloads), for ``num_classes``
    classes and ``in_channels``-channel input (a fresh first conv where it differs from 3); ``kwargs`` go to the builder."""
    classes = {} if num_classes is None else {"num_classes": num_classes}
    return resize(torchvision.models.get_model(name, weights=None, **classes, **kwargs), num_classes, in_channels)


def resize(model: nn.Module, num_classes: int | None = None, in_channels: int | None = None) -> nn.Module:
    """Replace ``model``'s final Linear / first conv, in place, with freshly initialised ones of the same shape
    but ``num_classes`` outputs / ``in_channels`` inputs, where given and different; returns ``model``."""
    _, head = _last_linear(model)
    if num_classes is not None and num_classes != head.out_features:
        _replace_module(model, head, nn.Linear(head.in_features, num_classes, bias=head.bias is not None))
    stem = _first_conv(model)
    if in_channels is not None and in_channels != stem.in_channels:
        _replace_module(model, stem, nn.Conv2d(in_channels, stem.out_channels, stem.kernel_size, stem.stride,
                                               stem.padding, stem.dilation, stem.groups, stem.bias is not None,
                                               stem.padding_mode))
    return model


def from_torchvision(name_or_module: str | nn.Module, num_classes: int | None = None,
                     in_channels: int | None = None, image_size: int = 224, feature_node: str | None = None,
                     **kwargs: Any) -> TorchvisionNet:
    """Wrap a torchvision classifier, building it by name (always ``weights=None``: kd3 never downloads).

    ``num_classes`` / ``in_channels``, when given and different from the model's, replace its final
    Linear / first conv with freshly initialised ones of the same shape otherwise (a module passed in
    is modified in place). ``kwargs`` go to the torchvision builder.
    """
    if isinstance(name_or_module, str):
        model = torchvision_classifier(name_or_module, num_classes, in_channels, **kwargs)
    elif kwargs:
        raise TypeError(f"builder arguments {sorted(kwargs)} only apply when the model is given by name")
    else:
        model = resize(name_or_module, num_classes, in_channels)
    return TorchvisionNet(model, image_size=image_size, feature_node=feature_node)


@register_model("tv_resnet18")
def tv_resnet18(num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                **kwargs: Any) -> TorchvisionNet:
    """torchvision's ImageNet ResNet-18 (7×7 stride-2 stem + max-pool): a 512×1×1 map for 28–32 pixel inputs."""
    return from_torchvision("resnet18", num_classes, in_channels, image_size, **kwargs)


class TimmNet(Net):
    """A timm CNN through its own split: ``forward_features`` gives the map, ``forward_head(pre_logits=True)``
    the pooled vector, ``get_classifier()`` the final Linear."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        if not isinstance(model.get_classifier(), nn.Linear):
            raise ValueError(f"{type(model).__name__}'s classifier is {type(model.get_classifier()).__name__}, "
                             "not an nn.Linear")
        self.model = model
        self.feature_channels = model.num_features

    @property
    def classifier(self) -> nn.Linear:  # type: ignore[override]
        # A property, not a second registration, so state_dict keeps one copy of the head's weights.
        return self.model.get_classifier()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)

    def pool(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(feature_map, pre_logits=True)


def timm_classifier(name: str, num_classes: int | None = None, in_channels: int | None = None,
                    **kwargs: Any) -> nn.Module:
    """timm's model ``name``, untrained (``pretrained=False``: kd3 never downloads), for ``num_classes`` classes
    and ``in_channels``-channel input where given; ``kwargs`` go to ``timm.create_model``."""
    try:
        import timm
    except ImportError as error:
        raise ImportError("timm models need the optional extra: pip install 'kd3[timm]'") from error
    options = {key: value for key, value in (("num_classes", num_classes), ("in_chans", in_channels))
               if value is not None}
    return timm.create_model(name, pretrained=False, **options, **kwargs)


def from_timm(name: str, num_classes: int | None = None, in_channels: int | None = None,
              **kwargs: Any) -> TimmNet:
    """Build a timm model by name (``pretrained=False``: kd3 never downloads) and wrap it."""
    return TimmNet(timm_classifier(name, num_classes, in_channels, **kwargs))
