"""Launch a script under torchrun in real processes and read back its JSON output."""

import json
import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(script: str, nproc: int, args, timeout: int = 600, env=None, python: str = sys.executable
        ) -> subprocess.CompletedProcess:
    command = [python, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
               f"--master-port={free_port()}", os.path.join(ROOT, script), *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
                "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(command, cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # torchrun starts its workers in sessions of their own: SIGTERM makes it stop them
        # (SIGKILL after its shutdown timeout) instead of leaving them running
        proc.terminate()
        try:
            proc.communicate(timeout=60)
        finally:
            proc.kill()
        raise
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def run_json(script: str, nproc: int, args, out_path, **kwargs):
    result = run(script, nproc, [*args, "--out", out_path], **kwargs)
    if result.returncode != 0:
        raise AssertionError(f"{script} failed (rc={result.returncode}):\n{result.stderr[-4000:]}")
    with open(out_path) as f:
        return json.load(f)
