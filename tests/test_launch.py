"""The example launcher refuses a multi-node launch it cannot rendezvous, with one line, before
torchrun starts (the defaults would hang every node); the SLURM example parses."""

import os
import subprocess

import pytest

from tests.torchrun import ROOT


def _source(env):
    # launch() would exec torchrun: only the checks and the settings are run here
    script = 'source examples/_launch.sh; echo "$MASTER_ADDR $NODE_RANK $NNODES"'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          env={**{k: v for k, v in os.environ.items()
                                  if k not in ("MASTER_ADDR", "NODE_RANK", "NNODES")},
                               "GPUS_PER_NODE": "1", **env})


@pytest.mark.parametrize("env, flag", [
    ({"NNODES": "2", "NODE_RANK": "0"}, "MASTER_ADDR"),
    ({"NNODES": "2", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1"}, "MASTER_ADDR"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1"}, "NODE_RANK"),
    ({"NNODES": "2", "MASTER_ADDR": "10.0.0.1", "NODE_RANK": "2"}, "NODE_RANK"),
])
def test_multi_node_launch_without_its_rendezvous_fails_with_one_line(env, flag):
    result = _source(env)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and flag in lines[0], result.stderr


def test_single_node_and_complete_multi_node_settings_pass():
    assert _source({}).stdout.split() == ["127.0.0.1", "0", "1"]
    assert _source({"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "node-0"}).stdout.split() == ["node-0", "3", "4"]


def test_slurm_example_parses():
    result = subprocess.run(["bash", "-n", os.path.join(ROOT, "examples", "slurm", "pretrain.sbatch")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
