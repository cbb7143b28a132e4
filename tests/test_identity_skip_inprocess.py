"""Encode Identity with on_no_face = skip, through the real ComfyUI host in-process: a person without a face keeps
its slot (an explicit skipped entry), later identities stay with their people, and nothing acts in the skipped
slot — no circle, no mask, no tokens."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from instantfamily_core.identity import SkippedIdentity, is_skipped, load_identities, save_identities
from instantfamily_core.render import slot_color
from tools.devkit.comfy_host import HOW_TO_PROVIDE, find_comfyui
from tools.devkit.face_models import draw_faces, session_tiny_root
from tools.devkit.identities import random_identities
from support.poses import frame, person

pytestmark = [pytest.mark.skipif(find_comfyui() is None, reason=HOW_TO_PROVIDE),
              pytest.mark.usefixtures("clone_rule")]  # every test under 0.3.64's and 0.38's clone()
GREEN, BLUE = (0, 200, 0), (0, 0, 200)
NO_TEMPLATE = "none (use pose_keypoint)"


@pytest.fixture(scope="module")
def host():
    from tools.devkit.comfy_host import import_host, load_pack
    nodes = import_host()
    pack = load_pack()
    mods = {m: sys.modules[f"{pack.__name__}.nodes.{m}"] for m in ("model_nodes", "pose_nodes", "face_nodes")}
    return nodes, mods


@pytest.fixture(scope="module")
def analyzer(tmp_path_factory):
    from instantfamily_core.faces import FaceAnalyzer
    return FaceAnalyzer(session_tiny_root(tmp_path_factory), "tinypack", provider="CPU", det_size=256)


@pytest.fixture(scope="module")
def ifmodel(host, tmp_path_factory):
    from support.comfy_models import write_tiny_checkpoint
    _, m = host
    path = tmp_path_factory.mktemp("if") / "tiny_if.safetensors"
    write_tiny_checkpoint(path)
    return m["model_nodes"].load_instantfamily(str(path))


def _image(color=None) -> torch.Tensor:
    img = (draw_faces((256, 256), [(128, 128)], [color]) if color is not None
           else np.full((256, 256, 3), 128, np.uint8))
    return torch.from_numpy(img).float().div(255).unsqueeze(0)


def _pose():
    """Three people left to right, heads at x = 24, 64, 104 on a 128 px canvas."""
    return frame([person(24 + 40 * i, 40, s=9) for i in range(3)], w=128, h=128)


HEADS = [(24, 40), (64, 40), (104, 40)]


def test_a_skipped_identity_keeps_its_place_in_the_list(host, analyzer):
    from instantfamily_core.errors import NoFaceError
    _, m = host
    enc = m["face_nodes"].EncodeIdentity()
    (ids,) = enc.encode(analyzer, _image(GREEN), "anna", "skip")
    (ids,) = enc.encode(analyzer, _image(None), "ben", "skip", identities=ids)
    (ids,) = enc.encode(analyzer, _image(BLUE), "cleo", "skip", identities=ids)
    assert [i.name for i in ids] == ["anna", "ben", "cleo"]
    assert [is_skipped(i) for i in ids] == [False, True, False]
    assert "no face" in ids[1].reason
    with pytest.raises(NoFaceError, match="ben"):
        enc.encode(analyzer, _image(None), "ben", "error", identities=ids[:1])
    (combined,) = m["face_nodes"].CombineIdentities().combine(identities_1=ids[:2], identities_2=ids[2:])
    assert [is_skipped(i) for i in combined] == [False, True, False]


def test_pose_to_masks_leaves_the_skipped_persons_slot_empty(host):
    _, m = host
    ids = random_identities(1, 0) + [SkippedIdentity("ben")] + random_identities(1, 1)
    control, masks, preview = m["pose_nodes"].PoseToMasks().run(ids, NO_TEMPLATE, 128, 128, 0.25, "auto",
                                                                  pose_keypoint=_pose())
    assert masks.shape == (3, 128, 128) and masks[1].sum() == 0
    for slot, person_ in ((0, 0), (2, 2)):  # identity 3 stays with person 3 (it used to move to person 2)
        x, y = HEADS[person_]
        assert masks[slot, y, x] == 1
        assert masks[slot, HEADS[1][1], HEADS[1][0]] == 0
    pixels = (control[0] * 255).round().int().reshape(-1, 3).tolist()
    centre = lambda x, y: tuple((control[0, y, x] * 255).round().int().tolist())  # noqa: E731
    assert centre(*HEADS[0]) == slot_color(0) and centre(*HEADS[2]) == slot_color(2)
    assert list(slot_color(1)) not in pixels  # no circle for the skipped slot
    assert centre(*HEADS[1]) not in {slot_color(n) for n in range(3)}
    assert not torch.equal(preview, control)
    # user masks cannot switch a skipped identity back on
    _, user, _ = m["pose_nodes"].PoseToMasks().run(ids, NO_TEMPLATE, 128, 128, 0.25, "auto",
                                                     pose_keypoint=_pose(), masks=torch.ones(3, 64, 64))
    assert user[1].sum() == 0 and user[0].min() == 1 and user[2].min() == 1


@pytest.mark.parametrize("mode", ["additive", "paper"])
def test_apply_gives_a_skipped_identity_no_tokens(host, ifmodel, mode):
    """[anna, skipped, cleo] samples exactly like [anna, cleo] with anna's and cleo's masks and the same pose image:
    the skipped slot contributes nothing, and cleo acts at person 3."""
    from support.comfy_models import tiny_sd15
    nodes, m = host
    anna, cleo = random_identities(2, 5, face_pack="tinypack")
    ids = [anna, SkippedIdentity("ben"), cleo]
    pose_image, masks, _ = m["pose_nodes"].PoseToMasks().run(ids, NO_TEMPLATE, 128, 128, 0.25, "auto",
                                                             pose_keypoint=_pose())
    g = torch.Generator().manual_seed(1)
    positive, negative = [[torch.randn(1, 77, 768, generator=g), {}]], [[torch.randn(1, 77, 768, generator=g), {}]]
    args = dict(weight=1.0, identity_weights="", controlnet_strength=1.0, start_at=0.0, end_at=1.0, mask_mode=mode)
    apply = m["model_nodes"].ApplyInstantFamily().apply
    model = tiny_sd15()
    with_skip = apply(model, ifmodel, ids, pose_image, masks, positive, negative, **args)
    without = apply(model, ifmodel, [anna, cleo], pose_image, masks[[0, 2]], positive, negative, **args)
    state = next(iter(with_skip[0].model_options["transformer_options"]["patches_replace"]["attn2"].values())).state
    assert state.attention.weights.tolist() == [1.0, 0.0, 1.0]
    assert state.attention.active().tolist() == [True, False, True]

    def run(patched):
        latent = {"samples": torch.zeros(1, 4, 16, 16)}
        return nodes.common_ksampler(patched[0], 0, 2, 5.0, "euler", "normal", patched[1], patched[2],
                                     latent)[0]["samples"]
    a, b = run(with_skip), run(without)
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_all_identities_skipped_still_applies_the_pose(host, ifmodel):
    from support.comfy_models import tiny_sd15
    _, m = host
    ids = [SkippedIdentity("a"), SkippedIdentity("b")]
    pose = frame([person(30, 40, s=9), person(90, 40, s=9)], w=128, h=128)
    pose_image, masks, _ = m["pose_nodes"].PoseToMasks().run(ids, NO_TEMPLATE, 128, 128, 0.25, "auto",
                                                             pose_keypoint=pose)
    assert masks.sum() == 0
    cond = [[torch.zeros(1, 77, 768), {}]]
    patched, pos, _ = m["model_nodes"].ApplyInstantFamily().apply(
        tiny_sd15(), ifmodel, ids, pose_image, masks, cond, cond, weight=1.0, identity_weights="",
        controlnet_strength=1.0, start_at=0.0, end_at=1.0, mask_mode="checkpoint")
    assert "control" in pos[0][1]


def test_skipped_entries_survive_save_and_load(tmp_path):
    ids = random_identities(1, 0, face_pack="tinypack") + [SkippedIdentity("ben", "no face in 2 images")] + \
        random_identities(1, 1, face_pack="tinypack")
    save_identities(str(tmp_path / "family.safetensors"), ids)
    back = load_identities(str(tmp_path / "family.safetensors"))
    assert [is_skipped(i) for i in back] == [False, True, False]
    assert back[1] == SkippedIdentity("ben", "no face in 2 images")
    assert torch.equal(back[2].global_embedding, ids[2].global_embedding.float())
