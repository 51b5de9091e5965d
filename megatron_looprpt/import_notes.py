"""Quiet the notes megatron-core and torch print on every run that are not news to our users.

megatron-core warns at import about each optional GPU extra it does not find (Transformer
Engine, apex), which a CPU run, or a GPU run without apex (nothing here needs it), always
lacks; torch.distributed.checkpoint prints deprecation notices on every checkpoint load. The
entry points call :func:`silence_import_notes` before anything imports megatron-core, which is
why this module imports nothing of ours or theirs.
"""

import warnings

_MESSAGES = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
)
_DEPRECATING_MODULES = r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing)"


def silence_import_notes() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=_DEPRECATING_MODULES)
