"""Stopping at an iteration boundary on a signal, so the loop can save and exit cleanly.

* SIGTERM: torchrun's (and SLURM's) request to stop; torchrun sends SIGKILL ~30 s later
  (``--shutdown-timeout``), SLURM after its ``KillWait``.
* SIGUSR1: SLURM's early warning (``--signal=USR1@120``: 120 s before the time limit). It must
  reach the training processes: ranks started by ``srun`` get it directly; torchrun forwards it
  only when told to (``--signals-to-handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1``).
* SIGINT: Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

EXIT_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class ExitSignals:
    """Record an exit signal instead of dying::

        with ExitSignals() as signals:
            for it in ...:
                train_step(...)
                if signals.received():        # collective: every rank calls it
                    save_checkpoint(...); break

    ``received()`` all-reduces the flag over the world group, so every rank agrees as soon as
    any rank got a signal. While the handler is installed a signal never interrupts the
    process (a second one is recorded too); use SIGKILL to force. The previous handlers are
    restored on exit.
    """

    def __init__(self, signals=EXIT_SIGNALS, group=None):
        self.signals = tuple(signals)
        self.group = group
        self._received = False
        self.signal_number: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002 - signal handler signature
        self._received = True
        self.signal_number = signum

    def __enter__(self) -> "ExitSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.signals:
                self._previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        else:
            logger.warning("ExitSignals entered outside the main thread: signals not handled")
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def received_locally(self) -> bool:
        return self._received

    def received(self) -> bool:
        """True on every rank if any rank received a signal (collective over ``group``)."""
        if not (dist.is_available() and dist.is_initialized()):
            return self._received
        device = torch.device("cpu")
        if dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if self._received else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
