"""Loading an artefact of ``resnet-fast fuse`` with nothing but torch (and onnxruntime for
ONNX), as a deployment would: no resnet_fast or torchvision code.

``resnet_fast.deploy`` runs this file's source in a fresh ``python -c`` process, so it imports
no module of this package, and its ``__main__`` part runs there only.
"""

import sys

import torch


def load_artefact(fmt: str, path: str):
    """A callable taking ``images`` (N, 3, H, W) and returning the logits (N, classes) of the
    artefact ``path`` written as ``fmt`` (ONNX: run by onnxruntime on CPU)."""
    if fmt == "export":
        return torch.export.load(path).module()
    if fmt == "aoti":
        return torch._inductor.aoti_load_package(path)
    if fmt == "torchscript":
        return torch.jit.load(path)
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise RuntimeError("reloading ONNX needs onnxruntime "
                               "(pip install 'resnet_fast[onnx]')") from exc
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

        def run(images: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(["logits"], {"images": images.cpu().numpy()})[0])
        return run
    raise ValueError(f"expected a format of export, aoti, onnx or torchscript, got {fmt!r}")


def run_saved_inputs(fmt: str, artefact: str, data: str) -> None:
    """Run the artefact on each input saved in ``data`` ({"inputs": [...], "device": str}) and
    save the float32 CPU outputs there as "outputs"."""
    saved = torch.load(data, weights_only=True)
    run = load_artefact(fmt, artefact)
    with torch.no_grad():
        saved["outputs"] = [run(x.to(saved["device"])).float().cpu() for x in saved["inputs"]]
    torch.save(saved, data)


if __name__ == "__main__":
    run_saved_inputs(*sys.argv[1:4])
