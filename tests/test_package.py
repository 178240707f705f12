"""Package-level behaviour: importing never fails for want of the extension but warns once
with the reason and the fix, the backend report says why a backend is missing, and optional
features name the extra that installs what they need."""

import subprocess
import sys

import pytest

import resnet_fast
from resnet_fast._optional import require
from resnet_fast.bench.runner import progress_bar

_WITHOUT_EXTENSION = """
import sys, importlib.abc

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "resnet_fast._C":
            raise ImportError("simulated: extension not built")
        return None

sys.meta_path.insert(0, Block())
import warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch, resnet_fast
    import resnet_fast._extension  # imported already: no second warning
ours = [str(w.message) for w in caught if w.category is resnet_fast.ExtensionWarning]
assert len(ours) == 1, ours
for part in (resnet_fast._extension.LOAD_ERROR, "simulated: extension not built",
             "pip install --no-build-isolation", "resnet-fast backends"):
    assert part in ours[0], (part, ours[0])
status = resnet_fast.available_backends()
assert status["reference"].available
cpu = status["cpu"]
assert not cpu.available and "could not be imported" in cpu.detail, cpu
x = torch.randn(2, 3, 4, 4)
assert torch.equal(resnet_fast.ops.add_relu(x, x), torch.relu(x + x))  # auto -> reference
try:
    resnet_fast.ops.add_relu(x, x, backend="cpu")
except resnet_fast.BackendUnavailableError as e:
    assert "could not be imported" in str(e)
else:
    raise AssertionError("backend='cpu' must not fall back silently")
model = resnet_fast.resnet18().eval()
with torch.no_grad():
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)
print("ok")
"""


@pytest.mark.slow
def test_import_and_models_work_without_the_extension():
    result = subprocess.run([sys.executable, "-c", _WITHOUT_EXTENSION], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_cli_lists_backends(capsys):
    from resnet_fast.cli import main
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "reference" in out and "cpu" in out and "triton" in out
    with pytest.raises(SystemExit) as exit_:  # argparse: an unknown command is a usage error
        main(["frobnicate"])
    assert exit_.value.code == 2


def test_version():
    assert resnet_fast.__version__


def test_optional_dependency_names_its_extra():
    with pytest.raises(ImportError, match=r"the frobnicator needs no_such_module_x .*"
                                          r"pip install 'resnet_fast\[bench\]'"):
        require("no_such_module_x", "bench", "the frobnicator")


def test_bench_progress_bar_without_tqdm_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now raises ImportError
    with pytest.raises(ImportError, match=r"needs tqdm .*pip install 'resnet_fast\[bench\]'"):
        progress_bar(1, "x", enabled=True)
    bar = progress_bar(1, "x", enabled=False)  # --no-progress: tqdm not needed
    bar.update(1)
    bar.close()
