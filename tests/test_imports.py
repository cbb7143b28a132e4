"""The one import bootstrap (``training/_bootstrap.py``): the scripts import this repository's packages even when
another installed package of the same name comes first, run as files from anywhere or as modules from the root."""

import os
import runpy
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BOOTSTRAP = ROOT / "training" / "_bootstrap.py"


@pytest.fixture(scope="module")
def fake_site(tmp_path_factory):
    """A folder standing for site-packages that holds other packages named ``training`` and ``instantfamily_core``,
    both raising on import."""
    site = tmp_path_factory.mktemp("fake-site")
    for name in ("training", "instantfamily_core"):
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"raise ImportError('the other {name} package was imported')\n")
    return site


def _run(args, cwd, site, timeout=180):
    env = dict(os.environ, PYTHONPATH=str(site), PYTHONNOUSERSITE="1")
    return subprocess.run([sys.executable, *args], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_fake_packages_do_shadow_a_plain_import(fake_site, tmp_path):
    """Without the bootstrap the other package wins: the checks below would fail if the scripts did not fix it."""
    proc = _run(["-c", "import training"], tmp_path, fake_site)
    assert proc.returncode != 0 and "the other training package was imported" in proc.stderr


@pytest.mark.parametrize("root_on_pythonpath", [False, True])
def test_a_training_script_run_as_a_file_from_elsewhere_imports_this_repository(fake_site, tmp_path,
                                                                                  root_on_pythonpath):
    """Also with the repository root on PYTHONPATH after the other packages' folder."""
    site = f"{fake_site}{os.pathsep}{ROOT}" if root_on_pythonpath else fake_site
    proc = _run([str(ROOT / "training" / "export.py"), "--help"], tmp_path, site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: export.py" in proc.stdout and "--checkpoint" in proc.stdout


def test_a_training_script_run_as_a_module_from_the_root(fake_site):
    proc = _run(["-m", "training.export", "--help"], ROOT, fake_site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: export.py" in proc.stdout and "--checkpoint" in proc.stdout


def test_train_as_a_file_and_as_a_module_are_the_same_command(fake_site, tmp_path):
    as_file = _run([str(ROOT / "training" / "train.py"), "--help"], tmp_path, fake_site)
    as_module = _run(["-m", "training.train", "--help"], ROOT, fake_site)
    assert as_file.returncode == 0 and as_module.returncode == 0, as_file.stderr[-2000:] + as_module.stderr[-2000:]
    assert as_file.stdout == as_module.stdout and "--lr-scheduler" in as_file.stdout


def test_a_tool_run_as_a_file_imports_this_repository(fake_site, tmp_path):
    proc = _run([str(ROOT / "tools" / "identity_share.py"), "--help"], tmp_path, fake_site)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage: identity_share.py" in proc.stdout


def test_an_already_imported_other_package_stops_with_a_message(monkeypatch, tmp_path):
    """A ``.pth`` file or sitecustomize that imports another ``training`` before the script starts."""
    other = types.ModuleType("training")
    other.__file__ = str(tmp_path / "site-packages" / "training" / "__init__.py")
    monkeypatch.setitem(sys.modules, "training", other)
    monkeypatch.setattr(sys, "path", list(sys.path))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(BOOTSTRAP))
    msg = str(e.value.code)
    assert "another package named 'training'" in msg and "was imported before this script started" in msg
    assert other.__file__ in msg and str(ROOT / "training") in msg


def test_the_root_goes_first_and_the_training_folder_last(monkeypatch):
    """``python training/x.py`` puts training/ first, where its evaluate.py, data.py, model.py would shadow installed
    top-level modules of those names; it moves to the end (still there for multiprocessing's spawned children)."""
    rest = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "training")]
    monkeypatch.setattr(sys, "path", [str(ROOT / "training"), *rest])
    runpy.run_path(str(BOOTSTRAP))
    assert sys.path == [str(ROOT), *rest, str(ROOT / "training")]
    runpy.run_path(str(BOOTSTRAP))  # idempotent
    assert sys.path == [str(ROOT), *rest, str(ROOT / "training")]


def test_a_root_already_on_the_path_stays_where_it_is(monkeypatch, tmp_path):
    """A caller that inserts a folder, imports a tool and pops the folder again (tests/test_doctor.py) keeps a
    consistent sys.path when nothing before the root shadows its packages."""
    path = [str(tmp_path), str(ROOT), *[p for p in sys.path if Path(p or ".").resolve() != ROOT]]
    monkeypatch.setattr(sys, "path", list(path))
    runpy.run_path(str(BOOTSTRAP))
    assert sys.path == path
