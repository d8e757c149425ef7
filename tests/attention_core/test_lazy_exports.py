"""The package imports its config alone; every other public name comes from its module on first use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import attention_core

ROOT = Path(__file__).resolve().parents[2]


def test_every_public_name_resolves_and_is_listed_once():
    assert len(attention_core.__all__) == len(set(attention_core.__all__))
    for name in attention_core.__all__:
        assert getattr(attention_core, name).__module__.startswith("attention_core."), name
    assert sorted(dir(attention_core)) == sorted(attention_core.__all__)
    public = {n for n, v in vars(attention_core).items()
              if not n.startswith("_") and getattr(v, "__module__", "").startswith("attention_core.")}
    assert public == set(attention_core.__all__)  # nothing bound on first use is missing from __all__


def test_checking_a_config_imports_no_torch():
    code = ("import sys; from attention_core import ModelConfig; ModelConfig(vocab_size=65); "
            "assert 'torch' not in sys.modules; from attention_core import Transformer; "
            "assert 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, env={"PYTHONPATH": str(ROOT)})


def test_an_unknown_name_is_an_attribute_error():
    try:
        attention_core.Transformr  # noqa: B018
    except AttributeError as err:
        assert "Transformr" in str(err)
    else:
        raise AssertionError("no AttributeError")
