"""The shared projector: bases, residuals, index selections, refresh policies, state."""

import io

import pytest
import torch

from memopt.functional import projection as P

SHAPES = [(48, 20), (20, 48), (33, 33)]


def _grad(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    # low-rank signal + noise, so the top singular subspace is well defined
    a, b = torch.randn(shape[0], 4, generator=g), torch.randn(4, shape[1], generator=g)
    return a @ b + 0.01 * torch.randn(shape, generator=g)


def test_side_and_rank_rules():
    assert P.projection_side((100, 10)) == "right" and P.projection_side((10, 100)) == "left"
    assert P.projection_rank((100, 40), density=0.25) == 10
    assert P.projection_rank((100, 40), rank=500) == 40
    with pytest.raises(ValueError, match="exactly one"):
        P.projection_rank((4, 4))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("selection", ["svd", "randomized_svd", "random"])
def test_bases_are_orthonormal_and_residual_is_orthogonal(shape, selection):
    cfg = P.ProjectionConfig(selection=selection, rank=6, density=None)
    g = _grad(shape)
    state = {}
    P.refresh(state, g, 0, cfg, generator=torch.Generator().manual_seed(1))
    side = P.projection_side(shape)
    basis = state["proj_basis"]
    assert P.is_orthonormal(basis, side)
    low = P.down(state, g, selection)
    residual = g - P.up(state, low, shape, selection)
    # the residual has no component in the subspace
    assert P.project(residual, basis, side).abs().max() < 1e-4 * g.abs().max()
    if selection != "random":  # the signal has rank 4 < 6: both SVD variants capture it
        assert residual.norm() < 0.05 * g.norm()


@pytest.mark.parametrize("selection,axis", [("columns", 1), ("rows", 0)])
@pytest.mark.parametrize("storage", ["int32", "seed"])
def test_index_selections_are_disjoint_and_regenerate_from_the_seed(selection, axis, storage):
    shape = (30, 40)
    cfg = P.ProjectionConfig(selection=selection, density=0.25, index_storage=storage)
    g = _grad(shape)
    state = {}
    P.refresh(state, g, 0, cfg, generator=torch.Generator().manual_seed(2))
    assert ("proj_indices" in state) == (storage == "int32")
    idx = P.indices_of(state, shape, selection)
    assert idx.dtype == torch.int32 and idx.numel() == round(0.25 * shape[axis])
    low = P.down(state, g, selection)
    kept = P.up(state, low, shape, selection)
    # the kept part is the gradient on the selected columns (rows) and zero elsewhere, so it and the residual
    # g - kept are disjoint and together the gradient
    mask = torch.zeros(shape[axis], dtype=torch.bool)
    mask[idx.long()] = True
    mask = mask[None, :] if axis == 1 else mask[:, None]
    assert torch.equal(kept, torch.where(mask, g, torch.zeros(())))
    assert P.projected_numel(shape, cfg) == low.numel()


def test_refresh_schedule_and_reproject():
    shape = (40, 16)
    cfg = P.ProjectionConfig(selection="svd", rank=4, density=None, update_gap=3)
    state = {}
    assert P.refresh_due(state, 0, cfg)
    P.refresh(state, _grad(shape, 0), 0, cfg)
    assert not P.refresh_due(state, 2, cfg) and P.refresh_due(state, 3, cfg)
    old = P.refresh(state, _grad(shape, 1), 3, cfg)
    new = state["proj_basis"]
    side = P.projection_side(shape)
    m_full = torch.randn(shape)
    m_old = P.project(m_full, old, side)
    moved = P.reproject_linear(m_old, old, new, side)
    # lift with the old basis, project onto the new one
    torch.testing.assert_close(moved, P.project(P.project_back(m_old, old, side), new, side))
    v = P.reproject_square(m_old.abs(), old, new, side)
    assert (v >= 0).all() and v.shape == m_old.shape


def test_state_is_plain_and_loads_weights_only():
    state = {}
    P.refresh(state, _grad((20, 30)), 5, P.ProjectionConfig(selection="columns", density=0.5))
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    assert torch.equal(loaded["proj_indices"], state["proj_indices"]) and loaded["proj_refreshed_at"] == 5


@pytest.mark.parametrize("kwargs,name", [(dict(selection="pca"), "selection"), (dict(on_refresh="drop"), "on_refresh"),
                                         (dict(rank=0, density=None), "rank"), (dict(density=1.5), "density"),
                                         (dict(update_gap=0), "update_gap"),
                                         (dict(index_storage="int8"), "index_storage")])
def test_config_validation(kwargs, name):
    with pytest.raises(ValueError, match=name):
        P.ProjectionConfig(**kwargs).validate()


def test_refuses_non_matrix_gradients():
    with pytest.raises(ValueError, match="2-D"):
        P.refresh({}, torch.randn(10), 0, P.ProjectionConfig())


def test_blocks_selection():
    assert P.active_blocks(8, 0.25, "descending", 0) == [6, 7]
    assert P.active_blocks(8, 0.25, "descending", 1) == [4, 5]
    assert P.active_blocks(8, 0.25, "descending", 4) == [6, 7]  # wraps around
    covered = set()
    for r in range(4):
        covered |= set(P.active_blocks(8, 0.25, "descending", r))
    assert covered == set(range(8))
    a, b = P.active_blocks(10, 0.3, "random", 0, seed=1), P.active_blocks(10, 0.3, "random", 0, seed=1)
    assert a == b and len(a) == 3
    with pytest.raises(ValueError, match="order"):
        P.active_blocks(4, 0.5, "ascending", 0)
