"""Two CPU processes under ``accelerate launch`` (DDP over gloo) train and agree on the weights.

accelerate 1.x starts a single process for ``--cpu --num_processes 2`` (its multi-CPU path needs mpirun), so the
test launches through torchrun with ``--multi_gpu`` and ``ACCELERATE_USE_CPU=true``, which gives
``DistributedType.MULTI_CPU`` with the gloo backend — the documented CPU recipe in docs/training.md."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from support.training_fixtures import training_workspace
from training import checkpoints as ck

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return training_workspace(tmp_path_factory)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_agree_on_the_weights(ws, tmp_path):
    out = tmp_path / "ddp"
    args = ws.train_args(out, "--max-steps", "2", "--checkpoint-every", "2", "--debug-weight-digest")
    args[args.index("--batch-size") + 1] = "1"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
           str(ROOT / "training" / "train.py"), *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="true")
    proc = subprocess.run(cmd, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("exported ") == 1  # one main process, not two independent runs
    assert proc.stderr.count("***** Running training *****") == 1  # accelerate's logger: the main process only
    d0 = json.loads((out / "weights-rank0.json").read_text())
    d1 = json.loads((out / "weights-rank1.json").read_text())
    assert d0 == d1 and len(d0) > 100
    rows = ck.LossLog(out / "losses.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2]
    step = out / "checkpoints" / "step-0000002"
    assert json.loads((step / "state.json").read_text())["world_size"] == 2
    assert (step / "random_states_0.pkl").is_file() and (step / "random_states_1.pkl").is_file()
    assert (out / "instantfamily.safetensors").is_file()
