"""Import one of the repository's scripts (examples/, tools/) by its path, as a module."""

import importlib.util
import os
import sys

from tests.torchrun import ROOT


def load_script(path: str, name: str):
    """``path`` relative to the repository root (or absolute); the module is registered as ``name`` in
    sys.modules, where dataclasses defined in it look their module up."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
