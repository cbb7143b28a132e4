"""train.py's diffusers-style flags on tiny random models: ``--lr-scheduler`` (diffusers' get_scheduler, its position
restored on resume) and ``--report-to`` (accelerate's trackers)."""

import json
import shutil

import pytest
import torch

from support.training_fixtures import training_workspace
from training import checkpoints as ck
from training import train

LR = 1e-4  # the workspace's --lr


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return training_workspace(tmp_path_factory)


def reference_lrs(name: str, steps: int, warmup: int, **kw) -> list[float]:
    """The learning rate after each of ``steps`` optimizer steps, from diffusers' get_scheduler directly."""
    from diffusers.optimization import get_scheduler
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=steps, **kw)
    out = []
    for _ in range(steps):
        opt.step()
        sched.step()
        out.append(sched.get_last_lr()[0])
    return out


def logged_lrs(out) -> list[float]:
    return [r["lr"] for r in ck.LossLog(out / "losses.jsonl").read()]


def event_files(out) -> list:
    return list(out.rglob("events.out.tfevents.*"))


def test_lr_scheduler_gives_diffusers_sequence(ws, tmp_path):
    out = tmp_path / "run"
    assert train.main(ws.train_args(out, "--max-steps", "5", "--checkpoint-every", "5", "--report-to", "none",
                                    "--lr-scheduler", "cosine_with_restarts", "--lr-num-cycles", "2",
                                    "--lr-warmup-steps", "1")) == 0
    want = reference_lrs("cosine_with_restarts", 5, 1, num_cycles=2)
    assert logged_lrs(out) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert want == pytest.approx([LR, LR / 2, LR, LR / 2, 0], rel=1e-6, abs=1e-12)  # two cycles after the warm-up


def test_resume_continues_the_schedule_where_the_checkpoint_left_it(ws, tmp_path):
    common = ("--max-steps", "4", "--checkpoint-every", "2", "--keep-checkpoints", "0", "--lr-scheduler", "cosine",
              "--lr-warmup-steps", "1", "--report-to", "none")
    out = tmp_path / "run"
    assert train.main(ws.train_args(out, *common)) == 0
    want = reference_lrs("cosine", 4, 1)
    assert logged_lrs(out) == pytest.approx(want, rel=1e-6, abs=1e-12)
    root = out / "checkpoints"
    state = json.loads((root / "step-0000002" / "state.json").read_text())
    assert state["lr_scheduler"] == "cosine" and state["lr_warmup_steps"] == 1 and state["max_steps"] == 4
    saved = [torch.load(p, weights_only=False) for p in (root / "step-0000002").glob("scheduler*.bin")]
    assert len(saved) == 1 and saved[0]["last_epoch"] == 2

    shutil.rmtree(root / "step-0000004")  # as if the run had stopped after step 2
    assert train.main(ws.train_args(out, *common, "--resume")) == 0
    rows = ck.LossLog(out / "losses.jsonl").read()
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # a scheduler started afresh would give want[0], want[1] again for steps 3 and 4
    assert logged_lrs(out) == pytest.approx(want, rel=1e-6, abs=1e-12)
    assert want[2:] != pytest.approx(want[:2], rel=1e-3, abs=1e-12)


def test_report_to_tensorboard_writes_events_and_none_writes_none(ws, tmp_path):
    """Also: polynomial (power 2) and the default schedule follow diffusers' get_scheduler."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = tmp_path / "tb"
    assert train.main(ws.train_args(tb, "--max-steps", "3", "--checkpoint-every", "3", "--log-every", "1",
                                    "--report-to", "tensorboard", "--lr-scheduler", "polynomial", "--lr-power", "2",
                                    "--lr-warmup-steps", "1")) == 0
    assert logged_lrs(tb) == pytest.approx(reference_lrs("polynomial", 3, 1, power=2.0), rel=1e-6, abs=1e-12)
    files = event_files(tb / "logs")
    assert files
    scalars = set()
    for f in files:
        acc = EventAccumulator(str(f.parent))
        acc.Reload()
        scalars |= set(acc.Tags()["scalars"])
    assert {"train_loss", "lr"} <= scalars, scalars

    none = tmp_path / "none"
    assert train.main(ws.train_args(none, "--max-steps", "2", "--checkpoint-every", "2", "--log-every", "1",
                                    "--report-to", "none")) == 0
    assert not event_files(none) and (none / "instantfamily.safetensors").is_file()
    # the default schedule: constant_with_warmup with no warm-up, i.e. constant
    assert logged_lrs(none) == pytest.approx(reference_lrs("constant_with_warmup", 2, 0), rel=1e-6, abs=1e-12)
    assert logged_lrs(none) == pytest.approx([LR, LR], rel=1e-6, abs=1e-12)


def test_a_tracker_that_is_not_installed(ws, tmp_path, monkeypatch, capsys):
    """Asked for by name: a clear error before anything is loaded; the default falls back to no tracker."""
    monkeypatch.setattr(train, "tracker_installed", lambda name: False)
    for name in ("tensorboard", "wandb"):
        assert train.main(ws.train_args(tmp_path / name, "--max-steps", "1", "--report-to", name)) == 2
        err = capsys.readouterr().err
        assert f"error: --report-to {name}: the {name} package is not installed; pip install {name}" in err
        assert not (tmp_path / name).exists()
    assert train.resolve_report_to(None) is None and train.resolve_report_to("none") is None
    monkeypatch.setattr(train, "tracker_installed", lambda name: name == "tensorboard")
    assert train.resolve_report_to(None) == "tensorboard" and train.resolve_report_to("all") == "all"


@pytest.mark.parametrize("flags, message", [
    (("--lr-scheduler", "constant", "--lr-warmup-steps", "10"), "--lr-scheduler constant has no warm-up"),
    (("--lr-warmup-steps", "-1"), "--lr-warmup-steps: expected ≥ 0"),
    (("--lr-scheduler", "cosine_with_restarts", "--lr-num-cycles", "0"), "--lr-num-cycles: expected ≥ 1"),
])
def test_bad_schedule_flags_are_option_errors(ws, tmp_path, capsys, flags, message):
    assert train.main(ws.train_args(tmp_path / "run", "--max-steps", "1", *flags)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
