"""megatron-core's torch.compile decorations compile on their first call, not at import."""

import subprocess
import sys

import torch

from megatron_looprpt.deferred_compile import compile_on_first_call
from tests.torchrun import ROOT


def test_the_stand_in_compiles_a_function_once_on_its_first_call_with_its_options():
    compiled = []

    def compile_now(model, **options):
        compiled.append((model, options))
        return lambda *args, **kwargs: ("compiled", model(*args, **kwargs))

    deferred = compile_on_first_call(compile_now)

    @deferred
    def add(a, b=1):
        return a + b

    @deferred(mode="max-autotune")
    def double(a):
        return 2 * a

    assert compiled == [] and add.__name__ == "add" and double.__name__ == "double"
    assert add(2, b=3) == ("compiled", 5) and add(1) == ("compiled", 2)
    assert double(4) == ("compiled", 8)
    assert compiled == [(add.__wrapped__, {}), (double.__wrapped__, {"mode": "max-autotune"})]
    # a module is not a plain function: compiled at once, as torch.compile does
    module = torch.nn.Linear(2, 2)
    deferred(module)
    assert compiled[-1] == (module, {})


_PROBE = """
import sys
from megatron_looprpt.deferred_compile import defer_megatron_compiles
{install}
import torch
compile_before = torch.compile
from megatron.core.fusions.fused_bias_gelu import bias_gelu
from megatron_looprpt.training import loop
print(any(m.startswith("torch._dynamo") for m in sys.modules),
      bias_gelu.__code__.co_name == "first_call_compiles", torch.compile is compile_before)
"""


def _probe(install: bool) -> list:
    code = _PROBE.format(install="defer_megatron_compiles()" if install else "")
    result = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=300, env={"PYTHONPATH": ROOT, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout.split()


def test_importing_megatron_core_no_longer_imports_torchdynamo():
    # without it, megatron-core's ~40 torch.compile decorations import TorchDynamo
    assert _probe(install=False) == ["True", "False", "True"]
    # with it, its fusions compile on their first call, nothing has yet, and torch.compile is torch's
    assert _probe(install=True) == ["False", "True", "True"]
