"""The ComfyUI 0.38 clone break as a user meets it, over HTTP on a real server, under both clone rules.

A server runs this pack and a stand-in IPAdapter-style pack (``support/standin_pack``, whose callback calls are
counted); with ``INSTANTFAMILY_TEST_CLONE_RULE=0.38`` its ``ModelPatcher.clone()`` copies ``model_options`` as
ComfyUI 0.38 does. The user's sequence (the issue's reproduction): InstantFamily → other pack → KSampler; then
InstantFamily only, new seed (ComfyUI reuses the cached InstantFamily MODEL); then the other pack again with
another weight. Before the ON_CLONE isolation, under 0.38 the other pack's callback ran in the second graph, which
does not contain it, and twice as often in the third.
"""

from __future__ import annotations

import pytest

from support.clone_rules import CLONE_RULES
from tools.devkit.comfy_host import HOW_TO_PROVIDE, REPO, find_comfyui
from tools.devkit.workflow_format import load_twin, shrink

pytestmark = pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE)

STANDIN = "InstantFamilyTestStandInStyle"


@pytest.fixture(scope="module", params=CLONE_RULES, ids=[f"clone-{r}" for r in CLONE_RULES])
def server(request, tmp_path_factory):
    from support import comfy_files
    from test_nodes_server import COLORS
    from tools.devkit.comfy_host import import_host
    from tools.devkit.comfy_server import ComfyServer
    from tools.devkit.face_models import make_tiny_pack
    import_host()
    base = tmp_path_factory.mktemp("clone-rule")
    srv = ComfyServer(base, extra_packs={"instantfamily_standin": REPO / "tests" / "support" / "standin_pack"},
                      env={"INSTANTFAMILY_TEST_CLONE_RULE": request.param})
    models = base / "models"
    comfy_files.write_micro_sd15(str(models / "checkpoints" / "v1-5-pruned-emaonly.safetensors"))
    comfy_files.write_micro_instantfamily(str(models / "instantfamily" / "instantfamily_sd15.safetensors"))
    make_tiny_pack(models / "insightface", "antelopev2")
    comfy_files.write_face_photos(base / "in", COLORS)
    with srv:
        assert srv.get("/instantfamily_test/standin")["clone_rule"] == request.param
        yield srv


def _graphs(seed: int, weight: float | None):
    """The 4-identity template at test size; with ``weight``, the stand-in between Apply and the KSampler."""
    p = shrink(load_twin("instantfamily_4_identities_template"))
    (apply_id,) = [k for k, v in p.items() if v["class_type"] == "ApplyInstantFamily"]
    (sampler,) = [k for k, v in p.items() if v["class_type"] == "KSampler"]
    p[sampler]["inputs"]["seed"] = seed
    if weight is not None:
        p["950"] = {"class_type": STANDIN, "inputs": {"model": [apply_id, 0], "weight": weight}}
        p[sampler]["inputs"]["model"] = ["950", 0]
    return p


def _calls_during(srv, prompt) -> int:
    before = srv.get("/instantfamily_test/standin")["calls"]
    entry = srv.run(prompt)
    assert entry.get("status", {}).get("status_str") == "success", (entry.get("status"), srv.log()[-3000:])
    return srv.get("/instantfamily_test/standin")["calls"] - before


def test_another_pack_after_instantfamily_never_reaches_the_cached_model(server):
    first = _calls_during(server, _graphs(seed=1, weight=0.5))
    assert first > 0  # the other pack acts in its own graph
    assert _calls_during(server, _graphs(seed=2, weight=None)) == 0  # and not in a graph without it
    assert _calls_during(server, _graphs(seed=3, weight=0.7)) == first  # re-run: its callback once, not twice
    assert _calls_during(server, _graphs(seed=4, weight=None)) == 0
