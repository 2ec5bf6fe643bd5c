"""The paper's networks behind a small registry: ``create``, ``names``, ``get_spec``.

Registered models (Hoffer et al. 2017, Table 1): ``f1`` (MNIST MLP), ``c1``/``c3`` (shallow
CIFAR-10/100 conv nets), ``resnet44`` (and ``resnet`` of any depth 6n+2), ``vgg`` (VGG-16-BN),
``wresnet16_4`` (CIFAR-100 wide ResNet), ``alexnet`` (ImageNet, with BN). Every model uses plain
``nn.BatchNorm``; ghost batch norm is applied afterwards with ``bigbatch.convert_ghost_batchnorm``.

Example:
    >>> from bigbatch import models
    >>> "resnet44" in models.names()
    True
    >>> models.get_spec("c3").default_dataset
    'cifar100'
"""

from __future__ import annotations

# Importing the model modules registers their builders (the one import-time registry we allow).
from bigbatch.models import alexnet, cifar_shallow, mlp, vgg, wide_resnet  # noqa: F401
from bigbatch.models.registry import ModelSpec, create, get_spec, is_registered, names, register

# Note: this rebinds the attribute ``bigbatch.models.resnet`` from the submodule to the builder
# function; import the module's other names with ``from bigbatch.models.resnet import ...``.
from bigbatch.models.resnet import resnet

__all__ = ["ModelSpec", "create", "get_spec", "is_registered", "names", "register", "resnet"]
