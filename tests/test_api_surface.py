"""What `import kd3` offers a person who has not read the source: every public name resolves,
says what it takes and returns, and the import itself stays cheap."""
import subprocess
import sys

import pytest

import kd3


@pytest.mark.parametrize("name", [n for n in kd3.__all__ if n != "__version__"])
def test_every_public_name_resolves_and_has_a_docstring(name):
    value = getattr(kd3, name)
    assert value.__doc__ and len(value.__doc__.strip()) > 20, f"kd3.{name} has no docstring"
    assert name in dir(kd3)


def test_unknown_names_are_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'distil'"):
        kd3.distil  # noqa: B018


def test_import_kd3_loads_neither_torch_nor_the_engine():
    """`import kd3` (and so `kd3 --version`) must not pay for torch: names load on first use."""
    code = "import sys, kd3; print('torch' in sys.modules, 'kd3.api' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]
