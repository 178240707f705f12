"""The ``resnet-fast`` command: ``resnet-fast bench ...`` (see ``resnet-fast bench --help``)."""

from __future__ import annotations

import sys

import torch

# The --dtype names the commands accept.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"bench": "benchmark ResNets: eager, torch.compile, ONNX Runtime, OpenVINO and "
                         "resnet_fast",
                "check": "parity of resnet_fast vs torchvision on every available backend",
                "fuse": "fold BN into a checkpoint's convs, export, reload, report the error",
                "backends": "list the kernel backends and whether they work here"}
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in commands:
        usage = "\n".join(f"  {name:<10}{text}" for name, text in commands.items())
        print(f"usage: resnet-fast <command> [args]\n\ncommands:\n{usage}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nresnet-fast: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    if argv[0] == "bench":
        from .bench import main as bench_main
        return bench_main(argv[1:])
    if argv[0] in ("check", "fuse"):
        from . import deploy
        return (deploy.check_main if argv[0] == "check" else deploy.fuse_main)(argv[1:])
    from . import available_backends
    for name, status in available_backends().items():
        print(f"{name:<10} {'yes' if status.available else 'no ':<4} {status.detail}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
