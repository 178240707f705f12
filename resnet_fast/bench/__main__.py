"""``python -m resnet_fast.bench``: the ``resnet-fast bench`` command, whose arguments
:mod:`resnet_fast.cli.bench` parses. An entry point only: nothing in the library imports it."""

import sys

from ..cli import main

sys.exit(main(["bench", *sys.argv[1:]]))
