"""torch.hub entry points: ``torch.hub.load("path/to/resnet_fast", "resnet50", source="local",
weights="DEFAULT")`` from a clone (the extension built, or the reference backend with a
warning). ``torch.hub.list`` shows every model of the family."""

dependencies = ["torch", "torchvision"]

from resnet_fast.models import (  # noqa: E402,F401  (the entry points)
    resnet18,
    resnet20,
    resnet32,
    resnet34,
    resnet44,
    resnet50,
    resnet56,
    resnet101,
    resnet110,
    resnet152,
    resnext50_32x4d,
    resnext101_32x8d,
    resnext101_64x4d,
    wide_resnet50_2,
    wide_resnet101_2,
)
