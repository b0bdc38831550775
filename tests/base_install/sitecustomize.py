"""Run by every interpreter the tests start (tests/conftest.py puts this folder first on PYTHONPATH in the process
that runs the tests; that process itself started before and is not affected).

It hides the packages named in GACQ_TEST_HIDE (default: transformers and scipy, which only the `test` extra
installs) from that interpreter, so that a `gacq` subprocess runs as after the README's base install
(`pip install -e .`). diffusers imports both eagerly when they are installed (transformers' quantization config
and loss modules, scipy.stats in its single-file loaders): 3.5-4 s of a new interpreter's 10 s on a 2-core AMD
EPYC (session 46). A test whose subprocess needs one of them passes GACQ_TEST_HIDE="" in its environment.

`sys.modules[name] = None` is how Python marks a module as not importable: `import name` raises ImportError and
`importlib.util.find_spec(name)` returns None, which is how diffusers asks. A sitecustomize that this one shadows
(one of the interpreter's own site folders) is still run."""

import importlib
import os
import sys

for _name in filter(None, (n.strip() for n in os.environ.get("GACQ_TEST_HIDE", "").split(","))):
    sys.modules.setdefault(_name, None)

_here = os.path.dirname(os.path.abspath(__file__))
_path = sys.path[:]
try:  # the next sitecustomize on the path, if the environment has one
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _self = sys.modules.pop("sitecustomize", None)
    try:
        importlib.import_module("sitecustomize")
    except ImportError:
        pass
    finally:
        sys.modules["sitecustomize"] = _self
finally:
    sys.path[:] = _path
