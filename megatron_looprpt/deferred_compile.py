"""Let megatron-core's ``torch.compile`` decorations compile on the first call, not at import.

megatron-core decorates its fusion functions (bias-GeLU, bias-SwiGLU, ...) with ``jit_fuser``,
which is ``torch.compile`` (``megatron/core/jit.py``), and since 0.17 some methods with
``torch.compile`` itself. ``torch.compile`` already compiles on the first call, but merely
calling it imports TorchDynamo and Inductor, and megatron-core calls it about 40 times while it
is imported: a third to a half of a process's start-up on a CPU, in every rank, for kernels
most runs never call (the CPU path calls none). :func:`defer_megatron_compiles` hands each
function megatron-core decorates while it is imported to ``torch.compile`` on the function's
first call instead; what is compiled, with which options, does not change. ``torch.compile`` is
replaced only while ``megatron.core`` is imported, and for plain functions only.

The entry points call it before anything imports megatron-core; without it everything works
the same, only slower to start.
"""

import functools
import importlib.abc
import importlib.machinery
import inspect
import sys

_PACKAGE = "megatron.core"


def compile_on_first_call(compile_now):
    """A stand-in for ``compile_now`` (``torch.compile``'s signature) that defers a function's
    compilation to its first call; anything but a plain function is compiled as before."""

    def deferred(model=None, **options):
        if model is None:  # @torch.compile(mode=...): the decorator comes next
            return lambda function: deferred(function, **options)
        if not inspect.isfunction(model):
            return compile_now(model, **options)
        compiled = None

        @functools.wraps(model)
        def first_call_compiles(*args, **kwargs):
            nonlocal compiled
            if compiled is None:
                compiled = compile_now(model, **options)
            return compiled(*args, **kwargs)

        return first_call_compiles

    return deferred


class _DeferWhileImported(importlib.abc.MetaPathFinder):
    """Finds ``megatron.core`` as the path finder does, and runs its import (which imports
    nearly all of megatron-core, ``megatron.core.jit`` among it) with ``torch.compile``
    deferring. ``jit_fuser`` keeps the stand-in it captured, so fusion modules imported
    later defer too."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _PACKAGE:
            return None
        sys.meta_path.remove(self)  # once
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_package = spec.loader.exec_module

        def exec_module(module):
            import torch

            compile_now = torch.compile
            torch.compile = compile_on_first_call(compile_now)
            try:
                run_package(module)
            finally:
                torch.compile = compile_now

        spec.loader.exec_module = exec_module
        return spec


def defer_megatron_compiles() -> None:
    """Install the deferral for the coming import of megatron-core (a no-op once it is imported)."""
    if _PACKAGE in sys.modules or any(isinstance(f, _DeferWhileImported) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _DeferWhileImported())
