"""Embedding stack layout, projector shapes and the checkpoint schema."""


import pytest
import torch
from safetensors.torch import save_file

from instantfamily_core.checkpoint import CheckpointMeta, load_checkpoint, read_metadata, save_checkpoint
from instantfamily_core.errors import CheckpointError, EmbeddingError, IdentityCountError
from instantfamily_core.identity import IdentityFeatures
from instantfamily_core.projector import IdentityProjector, ProjectorConfig
from instantfamily_core.stack import SlotLayout, stack_context

SMALL = ProjectorConfig(global_dim=16, local_dim=8, grid=3, token_dim=12, hidden_dim=20)


def ident(seed, cfg=SMALL, name="id"):
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(cfg.global_dim, generator=g)
    return IdentityFeatures(e / e.norm(), torch.randn(cfg.local_dim, cfg.grid, cfg.grid, generator=g), name=name)


@pytest.mark.parametrize("n", [0, 1, 4, 16])
def test_stack_layout_positions(n):
    text = torch.randn(2, 77, 12)
    ids = torch.randn(n, 10, 12)
    ctx, layout = stack_context(text, ids)
    assert ctx.shape == (2, 77 + 10 * n, 12) and layout.key_length == ctx.shape[1]
    assert torch.equal(ctx[:, layout.text_slice], text)
    for i in range(n):
        assert torch.equal(ctx[0, layout.identity_slice(i)], ids[i])
    owner = layout.key_owner()
    assert (owner[:77] == -1).all() and (owner[77:] >= 0).all()
    assert SlotLayout.for_key_length(ctx.shape[1], 10, n) == layout


def test_stack_per_row_tokens_and_longer_text():
    text = torch.randn(2, 154, 12)
    ids = torch.randn(2, 3, 5, 12)
    ctx, layout = stack_context(text, ids)
    assert layout.text_length == 154 and torch.equal(ctx[1, layout.identity_slice(2)], ids[1, 2])


def test_stack_errors():
    with pytest.raises(IdentityCountError):
        stack_context(torch.randn(2, 77, 12), torch.randn(3, 5, 8))
    with pytest.raises(IdentityCountError):
        SlotLayout(10, 5, 2).identity_slice(2)
    with pytest.raises(IdentityCountError):
        SlotLayout.for_key_length(9, 5, 2)


def test_projector_shapes_and_null_tokens():
    p = IdentityProjector(SMALL)
    tokens = p.project([ident(0), ident(1)])
    assert tokens.shape == (2, SMALL.tokens_per_identity, 12)
    assert p.null(3).shape == (3, 10, 12)
    assert not torch.allclose(tokens[0], tokens[1])
    assert p.project([]).shape == (0, 10, 12)
    with pytest.raises(EmbeddingError, match="different face pack"):
        p(torch.randn(1, 16), torch.randn(1, 8, 7, 7))


def test_default_projector_is_50_tokens_of_768():
    c = ProjectorConfig()
    assert c.tokens_per_identity == 50 and c.token_dim == 768


def test_identity_validation_and_averaging():
    with pytest.raises(EmbeddingError, match="NaN"):
        IdentityFeatures(torch.full((4,), float("nan")), torch.ones(2, 3, 3))
    with pytest.raises(EmbeddingError, match="zeros"):
        IdentityFeatures(torch.zeros(4), torch.ones(2, 3, 3))
    with pytest.raises(EmbeddingError, match="local"):
        IdentityFeatures(torch.ones(4), torch.ones(2, 3, 4))
    a, b = ident(0), ident(1)
    avg = IdentityFeatures.average([a, b], name="x")
    assert avg.num_images == 2 and abs(float(avg.global_embedding.norm()) - 1) < 1e-6
    torch.testing.assert_close(avg.local_map, (a.local_map + b.local_map) / 2)
    neg = IdentityFeatures(-a.global_embedding, a.local_map)
    with pytest.raises(EmbeddingError, match="cancel"):
        IdentityFeatures.average([a, neg])
    with pytest.raises(EmbeddingError, match="no encodings"):
        IdentityFeatures.average([])


def _meta(**kw):
    base = dict(face_pack="antelopev2", projector=SMALL, controlnet_layout="ldm")
    base.update(kw)
    return CheckpointMeta(**base)


def test_checkpoint_round_trip(tmp_path):
    p = IdentityProjector(SMALL)
    cn = {"input_hint_block.0.weight": torch.randn(4, 3, 3, 3)}
    path = tmp_path / "if.safetensors"
    save_checkpoint(str(path), p, cn, _meta(controlnet_config={"a": 1}))
    ck = load_checkpoint(str(path))
    assert ck.meta.face_pack == "antelopev2" and ck.meta.projector == SMALL and ck.meta.controlnet_config == {"a": 1}
    for k, v in p.state_dict().items():
        assert torch.equal(ck.projector.state_dict()[k], v)
    assert torch.equal(ck.controlnet["input_hint_block.0.weight"], cn["input_hint_block.0.weight"])
    assert not list(tmp_path.glob(".tmp-*"))


def _write(path, tensors, md):
    save_file(tensors, str(path), metadata=md)


def test_checkpoint_validation_errors(tmp_path):
    p = IdentityProjector(SMALL)
    good = tmp_path / "good.safetensors"
    save_checkpoint(str(good), p, {"w": torch.ones(1)}, _meta())
    md = read_metadata(str(good)).to_strings()
    tensors = {f"projector.{k}": v for k, v in p.state_dict().items()}
    tensors["controlnet.w"] = torch.ones(1)

    cases = {
        "format": ({**md, "format": "ipadapter"}, tensors, "not an InstantFamily"),
        "schema": ({**md, "schema_version": "99"}, tensors, "schema version"),
        "base": ({**md, "base_model": "sdxl"}, tensors, "sdxl"),
        "mode": ({**md, "mask_mode": "x"}, tensors, "mask_mode"),
        "meta": ({**md, "projector_config": "{"}, tensors, "malformed"),
        "missing": (md, {k: v for k, v in tensors.items() if "null_tokens" not in k}, "missing"),
        "shape": (md, {**tensors, "projector.null_tokens": torch.zeros(3, 3)}, "shapes"),
        "nocn": (md, {k: v for k, v in tensors.items() if k.startswith("projector.")}, "ControlNet"),
        "extra": (md, {**tensors, "junk": torch.ones(1)}, "unexpected"),
    }
    for name, (m, t, msg) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        _write(path, t, m)
        with pytest.raises(CheckpointError, match=msg):
            load_checkpoint(str(path))
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="corrupt.safetensors"):
        load_checkpoint(str(corrupt))
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(str(tmp_path / "nope.safetensors"))


def test_save_checks_config_matches(tmp_path):
    p = IdentityProjector(SMALL)
    with pytest.raises(CheckpointError, match="does not match"):
        save_checkpoint(str(tmp_path / "x.safetensors"), p, {"w": torch.ones(1)}, _meta(projector=ProjectorConfig()))


def test_failed_save_keeps_the_previous_file(tmp_path, monkeypatch):
    p = IdentityProjector(SMALL)
    path = tmp_path / "ck.safetensors"
    save_checkpoint(str(path), p, {"w": torch.ones(1)}, _meta())
    before = path.read_bytes()
    import safetensors.torch as st

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(st, "save_file", boom)
    with pytest.raises(OSError):
        save_checkpoint(str(path), p, {"w": torch.zeros(1)}, _meta())
    assert path.read_bytes() == before and not list(tmp_path.glob(".tmp-*"))


def test_identities_file_round_trip_and_errors(tmp_path):
    from instantfamily_core.identity import load_identities, save_identities
    ids = [ident(0, name="ann"), ident(1, name="bob")]
    path = str(tmp_path / "family.safetensors")
    save_identities(path, ids)
    back = load_identities(path)
    assert [b.name for b in back] == ["ann", "bob"]
    assert torch.equal(back[1].local_map, ids[1].local_map)
    with pytest.raises(EmbeddingError, match="nothing to save"):
        save_identities(path, [])
    (tmp_path / "bad.safetensors").write_bytes(b"junk")
    with pytest.raises(EmbeddingError, match="bad.safetensors"):
        load_identities(str(tmp_path / "bad.safetensors"))
    other = tmp_path / "ck.safetensors"
    save_checkpoint(str(other), IdentityProjector(SMALL), {"w": torch.ones(1)}, _meta())
    with pytest.raises(EmbeddingError, match="not an InstantFamily identities"):
        load_identities(str(other))
