"""The two ways ``ModelPatcher.clone()`` copies ``model_options``, on the one runnable host (ComfyUI 0.3.64).

* ``"0.3.64"``: the host as it is — ``n.model_options = copy.deepcopy(self.model_options)``
  (comfy/model_patcher.py:293 of 0.3.64).
* ``"0.38"``: ComfyUI since PR #12382 ("mp: dont deep-clone objects from model_options", merged 2026-02-10, in
  0.38.x) — ``n.model_options = comfy.utils.deepcopy_list_dict(self.model_options)``, which recurses into dicts and
  lists only and shares every other object. :func:`deepcopy_list_dict` below is upstream's function as written in
  the newest ``comfy/utils.py`` (09708ea); :func:`use_clone_rule` makes 0.3.64's ``clone`` call it at the same
  place, before the ``ON_CLONE`` callbacks run, exactly where upstream's call stands.
"""

from __future__ import annotations

import contextlib
import inspect
import types

CLONE_RULES = ("0.3.64", "0.38")


def deepcopy_list_dict(obj, memo=None):
    """Deep copy limited to dicts and lists (leaves shared)."""
    if memo is None:
        memo = {}
    obj_id = id(obj)
    if obj_id in memo:
        return memo[obj_id]

    if isinstance(obj, dict):
        res = {
            deepcopy_list_dict(k, memo): deepcopy_list_dict(v, memo)
            for k, v in obj.items()
        }
    elif isinstance(obj, list):
        res = [deepcopy_list_dict(i, memo) for i in obj]
    else:
        res = obj
    memo[obj_id] = res
    return res


def _check_host_clone(model_patcher) -> None:
    """The swap below is upstream's change only if 0.3.64's ``clone`` uses ``copy`` for ``model_options`` and
    nothing else: refuse to simulate on a host where that is not so."""
    source = inspect.getsource(model_patcher.ModelPatcher.clone)
    uses = [line.strip() for line in source.splitlines() if "copy." in line and "deepcopy" in line]
    if uses != ["n.model_options = copy.deepcopy(self.model_options)"]:
        raise RuntimeError(f"ModelPatcher.clone of this host copies model_options differently ({uses}); the 0.38 "
                           "clone rule cannot be simulated by swapping its copy")


@contextlib.contextmanager
def use_clone_rule(rule: str):
    """Run the block with ``ModelPatcher.clone()`` copying ``model_options`` by ``rule`` (one of
    :data:`CLONE_RULES`). Needs the host imported."""
    if rule not in CLONE_RULES:
        raise ValueError(f"clone rule {rule!r}: expected one of {CLONE_RULES}")
    import comfy.model_patcher as mp
    if rule == "0.3.64":
        yield
        return
    import comfy.utils
    saved = mp.copy, getattr(comfy.utils, "deepcopy_list_dict", None)
    install_clone_rule_038(mp)
    try:
        yield
    finally:
        mp.copy = saved[0]
        if saved[1] is None:
            del comfy.utils.deepcopy_list_dict
        else:
            comfy.utils.deepcopy_list_dict = saved[1]


def install_clone_rule_038(model_patcher=None) -> None:
    """Make ``clone()`` use 0.38's dict/list-only copy from now on (for a server process: see
    ``standin_pack``)."""
    if model_patcher is None:
        import comfy.model_patcher as model_patcher
    if isinstance(model_patcher.copy, types.SimpleNamespace):
        return
    _check_host_clone(model_patcher)
    import comfy.utils
    if not hasattr(comfy.utils, "deepcopy_list_dict"):  # where upstream keeps it; a host's own copy is kept
        comfy.utils.deepcopy_list_dict = deepcopy_list_dict
    model_patcher.copy = types.SimpleNamespace(deepcopy=lambda obj, memo=None: comfy.utils.deepcopy_list_dict(obj))
