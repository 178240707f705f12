"""``python -m resnet_fast.doctor``: the report of ``resnet-fast backends`` (versions, CUDA, CPU
capability, the C++ extension, every kernel backend), for a bug report or a set-up check."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(["backends", *sys.argv[1:]]))
