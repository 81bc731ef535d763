"""Low-rank / subset projections of gradient matrices, shared by GaLore-style, FRUGAL and SN-SM (docs/projection.md).

Plain functions over plain tensors: the projector's state lives in the parameter's optimizer-state dict as
tensors and ints only (``proj_basis`` or ``proj_indices``/``proj_seed``, ``proj_refreshed_at``), so it
round-trips through ``torch.load(weights_only=True)``.

Side rule ("std", GaLore): for an m×n gradient G with m ≥ n project on the right, ``R = G Pᵀ`` with P r×n
(orthonormal rows); otherwise on the left, ``R = Pᵀ G`` with P m×r (orthonormal columns). State then lives in
R's shape, r×max(m, n). Index selections keep k whole columns (``columns``) or rows (``rows``) of G instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

SELECTIONS = ("svd", "randomized_svd", "random", "columns", "rows")
BLOCK_ORDERS = ("random", "descending")
ON_REFRESH = ("keep", "reset", "reproject")
INDEX_STORAGE = ("int32", "seed")


def projection_side(shape: tuple[int, int]) -> str:
    """"right" when m ≥ n (project the smaller side, n), else "left"."""
    m, n = shape
    return "right" if m >= n else "left"


def projection_rank(shape: tuple[int, int], rank: Optional[int] = None, density: Optional[float] = None) -> int:
    """r = ``rank`` or ``round(density · min(m, n))``, clamped to [1, min(m, n)]."""
    mu = min(shape)
    if (rank is None) == (density is None):
        raise ValueError("give exactly one of rank and density")
    r = rank if rank is not None else int(round(density * mu))
    return max(1, min(mu, r))


def _orient(q: Tensor, side: str) -> Tensor:
    # q holds r orthonormal columns in the projected dimension; the right-side basis is stored as rows.
    return q.t().contiguous() if side == "right" else q.contiguous()


def svd_basis(grad: Tensor, r: int, side: str) -> Tensor:
    """Top-r singular vectors of the gradient (fp32 SVD): r×n rows (right) or m×r columns (left)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    return vh[:r].contiguous() if side == "right" else u[:, :r].contiguous()


def randomized_svd_basis(grad: Tensor, r: int, side: str, *, oversample: int = 8, n_iter: int = 2,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """Approximate top-r singular subspace by a randomized range finder (Halko et al. 2011) with ``n_iter``
    power iterations: O(m n (r + oversample)) instead of a full SVD's O(m n min(m, n))."""
    g = grad.float()
    a = g.t() if side == "right" else g  # find the column space of a: the side being projected
    k = min(r + oversample, min(a.shape))
    omega = torch.randn(a.shape[1], k, generator=generator, device="cpu").to(a.device)
    q, _ = torch.linalg.qr(a @ omega)
    for _ in range(n_iter):
        q, _ = torch.linalg.qr(a.t() @ q)
        q, _ = torch.linalg.qr(a @ q)
    ub, _, _ = torch.linalg.svd(q.t() @ a, full_matrices=False)
    return _orient((q @ ub)[:, :r], side)


def random_orthogonal_basis(shape: tuple[int, int], r: int, side: str, *, device=None,
                            generator: Optional[torch.Generator] = None) -> Tensor:
    """A random r-dimensional orthonormal basis of the projected side (QR of a Gaussian matrix)."""
    dim = shape[1] if side == "right" else shape[0]
    q, _ = torch.linalg.qr(torch.randn(dim, r, generator=generator))
    return _orient(q, side).to(device)


def random_indices(count: int, k: int, seed: int) -> Tensor:
    """k distinct sorted indices in [0, count) drawn from ``seed`` (int32): the same seed gives the same set."""
    gen = torch.Generator().manual_seed(int(seed))
    return torch.sort(torch.randperm(count, generator=gen)[:k]).values.to(torch.int32)


def project(grad: Tensor, basis: Tensor, side: str) -> Tensor:
    """Down: ``G Pᵀ`` (right) or ``Pᵀ G`` (left), in fp32."""
    g = grad.float()
    return g @ basis.t() if side == "right" else basis.t() @ g


def project_back(low: Tensor, basis: Tensor, side: str) -> Tensor:
    """Up: ``R P`` (right) or ``P R`` (left)."""
    return low @ basis if side == "right" else basis @ low


def select(grad: Tensor, indices: Tensor, axis: int) -> Tensor:
    """The selected columns (axis 1) or rows (axis 0) of the gradient, fp32."""
    return grad.float().index_select(axis, indices.long().to(grad.device))


def scatter_back(low: Tensor, indices: Tensor, axis: int, shape: tuple[int, int]) -> Tensor:
    """A full-shape tensor holding ``low`` at the selected columns/rows and zeros elsewhere."""
    out = low.new_zeros(shape)
    out.index_copy_(axis, indices.long().to(low.device), low)
    return out


def reproject_linear(state: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
    """Lift state kept in the old subspace with the old basis and project it onto the new one:
    ``(P_old-lift) → P_new-projection``. Exact for first moments (linear in the gradient)."""
    transition = new @ old.t() if side == "right" else new.t() @ old  # r_new × r_old
    return state @ transition.t() if side == "right" else transition @ state


def reproject_square(state: Tensor, old: Tensor, new: Tensor, side: str) -> Tensor:
    """Second-moment-like state (non-negative, per coordinate): move it with the element-wise squared
    transition matrix, which keeps it non-negative and equals :func:`reproject_linear` when the new basis
    is a permutation of the old."""
    transition = new @ old.t() if side == "right" else new.t() @ old
    t2 = transition * transition
    return state @ t2.t() if side == "right" else t2 @ state


@dataclass(frozen=True)
class ProjectionConfig:
    """How one method projects: plain values, stored in param groups."""

    selection: str = "svd"
    rank: Optional[int] = None
    density: Optional[float] = 0.25
    update_gap: int = 200
    on_refresh: str = "keep"
    index_storage: str = "int32"

    def validate(self) -> None:
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection={self.selection!r} is not one of {SELECTIONS}")
        if self.on_refresh not in ON_REFRESH:
            raise ValueError(f"on_refresh={self.on_refresh!r} is not one of {ON_REFRESH}")
        if self.index_storage not in INDEX_STORAGE:
            raise ValueError(f"index_storage={self.index_storage!r} is not one of {INDEX_STORAGE}")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0):
            raise ValueError(f"rank={self.rank!r} must be a positive int")
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"density={self.density!r} must be in (0, 1]")
        if (self.rank is None) == (self.density is None):
            raise ValueError("give exactly one of rank and density")
        if isinstance(self.update_gap, bool) or not isinstance(self.update_gap, int) or self.update_gap <= 0:
            raise ValueError(f"update_gap={self.update_gap!r} must be a positive int")


def refresh_due(state: dict, step: int, config: ProjectionConfig) -> bool:
    """Whether the subspace must be (re)chosen at this step (first use, or ``update_gap`` steps since)."""
    last = state.get("proj_refreshed_at")
    return last is None or step - last >= config.update_gap


def refresh(state: dict, grad: Tensor, step: int, config: ProjectionConfig,
            generator: Optional[torch.Generator] = None) -> Optional[Tensor]:
    """Choose a new subspace for ``grad`` and record it in ``state``. Returns the previous basis (for
    ``reproject``) when there was one, else ``None``. Index selections store int32 indices or only the seed."""
    if grad.dim() != 2:
        raise ValueError(f"projection needs a 2-D gradient, got shape {tuple(grad.shape)}")
    shape = tuple(grad.shape)
    side = projection_side(shape)
    previous = state.get("proj_basis")
    sel = config.selection
    if sel in ("columns", "rows"):
        axis = 1 if sel == "columns" else 0
        k = _index_count(shape[axis], config)
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
        state["proj_seed"] = seed
        state["proj_k"] = k
        if config.index_storage == "int32":
            state["proj_indices"] = random_indices(shape[axis], k, seed).to(grad.device)
        else:
            state.pop("proj_indices", None)
    else:
        r = projection_rank(shape, config.rank, config.density)
        if sel == "svd":
            basis = svd_basis(grad, r, side)
        elif sel == "randomized_svd":
            basis = randomized_svd_basis(grad, r, side, generator=generator)
        else:
            basis = random_orthogonal_basis(shape, r, side, device=grad.device, generator=generator)
        state["proj_basis"] = basis
    state["proj_refreshed_at"] = int(step)
    return previous


def indices_of(state: dict, shape: tuple[int, int], selection: str) -> Tensor:
    """The selected indices, stored or regenerated from the stored seed."""
    if "proj_indices" in state:
        return state["proj_indices"]
    axis = 1 if selection == "columns" else 0
    return random_indices(shape[axis], state["proj_k"], state["proj_seed"])


def down(state: dict, grad: Tensor, selection: str) -> Tensor:
    """The projected (state-full) part of ``grad`` in the current subspace."""
    if selection in ("columns", "rows"):
        return select(grad, indices_of(state, tuple(grad.shape), selection), 1 if selection == "columns" else 0)
    return project(grad, state["proj_basis"], projection_side(tuple(grad.shape)))


def up(state: dict, low: Tensor, shape: tuple[int, int], selection: str) -> Tensor:
    """Map a subspace tensor back to the full matrix shape."""
    if selection in ("columns", "rows"):
        axis = 1 if selection == "columns" else 0
        return scatter_back(low, indices_of(state, shape, selection), axis, shape)
    return project_back(low, state["proj_basis"], projection_side(shape))


def _index_count(count: int, config: ProjectionConfig) -> int:
    k = config.rank if config.rank is not None else int(round(config.density * count))
    return max(1, min(count, k))


def projected_shape(shape: tuple[int, int], config: ProjectionConfig) -> tuple[int, int]:
    """Shape of ``down(G)`` for an m×n gradient: where subspace state lives."""
    m, n = shape
    if config.selection == "columns":
        return (m, _index_count(n, config))
    if config.selection == "rows":
        return (_index_count(m, config), n)
    r = projection_rank(shape, config.rank, config.density)
    return (m, r) if projection_side(shape) == "right" else (r, n)


def selector_shapes(shape: tuple[int, int], config: ProjectionConfig) -> dict[str, tuple]:
    """Shapes of the projector's own state tensors (``proj_basis`` or ``proj_indices``) for an m×n gradient."""
    m, n = shape
    if config.selection in ("columns", "rows"):
        return {"proj_indices": (_index_count(n if config.selection == "columns" else m, config),)}
    r = projection_rank(shape, config.rank, config.density)
    return {"proj_basis": (r, n) if projection_side(shape) == "right" else (m, r)}


def projected_numel(shape: tuple[int, int], config: ProjectionConfig) -> int:
    """Elements of one subspace state tensor for this shape (for memory formulas)."""
    a, b = projected_shape(shape, config)
    return a * b


def is_orthonormal(basis: Tensor, side: str, atol: float = 1e-4) -> bool:
    gram = basis @ basis.t() if side == "right" else basis.t() @ basis
    return bool(torch.allclose(gram, torch.eye(gram.shape[0], device=gram.device), atol=atol))


def active_count(n_tensors: int, density: float) -> int:
    """How many of ``n_tensors`` whole tensors are state-full in each round of the ``blocks`` selection."""
    if not 0 < density <= 1:
        raise ValueError(f"density={density!r} must be in (0, 1]")
    return max(1, min(n_tensors, int(round(density * n_tensors))))


def active_blocks(n_tensors: int, density: float, order: str, round_index: int, seed: int = 0) -> list[int]:
    """``blocks`` selection (BAdam-like): which of ``n_tensors`` whole tensors are state-full in refresh round
    ``round_index``. ``descending`` walks from the last tensor to the first, ``round(density · n)`` at a time,
    and wraps around; ``random`` draws a fresh subset each round from ``seed + round_index``."""
    if order not in BLOCK_ORDERS:
        raise ValueError(f"order={order!r} is not one of {BLOCK_ORDERS}")
    k = active_count(n_tensors, density)
    if order == "random":
        gen = torch.Generator().manual_seed(int(seed) + int(round_index))
        return sorted(torch.randperm(n_tensors, generator=gen)[:k].tolist())
    start = (round_index * k) % n_tensors
    return sorted({n_tensors - 1 - ((start + j) % n_tensors) for j in range(k)})
