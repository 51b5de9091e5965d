"""Quiet the notes megatron-core and torch print on every run that are not news to our users.

megatron-core warns at import about each optional GPU extra it does not find (Transformer
Engine, apex; since 0.17 also absl, for its process-group grid), which a CPU run, or a GPU run
without apex (nothing here needs it), always lacks, and flags experimental classes we never use
(MiMo); torch.distributed.checkpoint prints deprecation notices on every checkpoint load.
megatron-core 0.17+ also log, on every checkpoint, that their own async writer (the one we
choose, see ``training/checkpointing/megatron_io.py``) and the ``common.pt`` reader (the file we
keep writing for 0.16) are deprecated; and torch logs that it found no CUDA runtime whenever an
``nvcc`` is on PATH of a CPU machine (megatron-core 0.17+ import ``torch.utils.cpp_extension``).
megatron-core 0.19's DDP asks for a parameter layout it then computes itself.
The entry points call :func:`silence_import_notes` before anything imports megatron-core, which
is why this module imports nothing of ours or theirs.
"""

import logging
import warnings

_MESSAGES = (
    ".*Transformer Engine and Apex are not installed.*",
    ".*Apex is not installed.*",
    ".*full scope is deprecated.*",
    ".*absl.logging is not installed.*",
    ".*MimoModelConfig is experimental.*",
)
_DEPRECATING_MODULES = r"(torch\.distributed\.checkpoint|megatron\.core\.dist_checkpointing)"
# logger -> the start of the one message of it that is dropped
_LOG_NOTES = {
    "megatron.core.dist_checkpointing.strategies.torch": "MCore's async save is deprecated",
    "megatron.core.dist_checkpointing.strategies.common": "load_common is deprecated",
    "torch.utils.cpp_extension": "No CUDA runtime is found",
    # 0.19 asks DDP's callers to pass the distributed optimizer's parameter layout; without it
    # DDP computes the very same one itself (DistributedOptimizer.compute_full_param_layout)
    "megatron.core.distributed.distributed_data_parallel": "DistributedDataParallel: full_param_layout not provided",
}


class _DropNote(logging.Filter):
    def __init__(self, start: str):
        super().__init__()
        self.start = start

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.start)


def silence_import_notes() -> None:
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning, module=_DEPRECATING_MODULES)
    for name, start in _LOG_NOTES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNote) and f.start == start for f in logger.filters):
            logger.addFilter(_DropNote(start))
