"""Public functional ops. Each is also ``torch.ops.resnet_fast.<name>`` when the native
extension is built (see ``resnet_fast.available_backends()``)."""

from .add_relu import add_relu

__all__ = ["add_relu"]
