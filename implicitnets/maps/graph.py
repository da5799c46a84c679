"""The implicit graph layer of IGNN (Gu et al. 2020): ``Z = φ(W Z Â + Ω X Â)``.

``Â`` (n × n) is a sparse normalised adjacency, ``X`` (p × n) node features and ``Z``
(m × n) node states, one column per node.  With ``vec(W Z Â) = (Âᵀ ⊗ W) vec(Z)`` and φ
component-wise 1-Lipschitz (ReLU, tanh), the equation is well posed and Picard iteration
converges when

    λ_pf(|Âᵀ ⊗ W|) = λ_pf(Â) · λ_pf(|W|) ≤ λ_pf(Â) · ‖W‖_∞ ≤ κ < 1,

so W is kept in the ∞-norm ball of radius ``κ / λ_pf(Â)``: by projection after every
optimiser step (:meth:`GraphMap.project_`, the IGNN way) or by a rescaling
parametrization (``parametrize=True``).

**State layout.**  States are ``(B, m, n)`` and inputs ``(B, p, n)``: the first axis is a
batch of B feature sets on the *same* graph (B = 1 for one graph).  The solvers treat the first
axis as the batch (Anderson mixes each sample's whole ``m × n`` state jointly, as it must: the
nodes are coupled through Â); a single graph's state is therefore ``(1, m, n)``, not
``(m, n)``, whose rows Anderson would wrongly treat as independent problems.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize as torch_parametrize

from ..parametrizations.infinity_norm import InfNormBound, inf_norm, project_inf_norm_
from .perron_frobenius import perron_frobenius
from .protocol import Map
from .sizes import check_sizes

__all__ = ["GraphMap", "normalized_adjacency"]


def normalized_adjacency(edges: Tensor, num_nodes: int, *, self_loops: bool = True,
                         dtype: torch.dtype | None = None) -> Tensor:
    """Sparse ``Â = D^{-1/2} (A + I) D^{-1/2}`` (``A`` without ``I`` if ``self_loops=False``)
    of the undirected graph with ``edges`` of shape (2, E), each edge listed once or twice.

    Its λ_pf is 1 with self-loops (eigenvector ``D^{1/2} 1``) and on any graph without
    isolated nodes.

    Args:
        edges: Integer node indices of shape (2, E), each in ``0..num_nodes − 1``.
        num_nodes: Number of nodes n.
        self_loops: Keyword only.  Whether to add ``I`` to the adjacency.
        dtype: Keyword only.  Dtype of the values (default: ``torch.get_default_dtype()``).

    Returns:
        The coalesced sparse COO tensor ``Â`` of shape (n, n), on ``edges``' device.

    Raises:
        ValueError: ``edges`` is not of shape (2, E) or holds an index outside the nodes.
    """
    if edges.dim() != 2 or edges.shape[0] != 2:
        raise ValueError(f"normalized_adjacency: edges must have shape (2, E), got {tuple(edges.shape)}")
    if edges.numel() and (int(edges.min()) < 0 or int(edges.max()) >= num_nodes):
        raise ValueError(f"normalized_adjacency: edge indices must lie in 0..{num_nodes - 1}")
    dtype = dtype or torch.get_default_dtype()
    rows = torch.cat([edges[0], edges[1]])
    cols = torch.cat([edges[1], edges[0]])
    if self_loops:
        loop = torch.arange(num_nodes, device=edges.device)
        rows, cols = torch.cat([rows, loop]), torch.cat([cols, loop])
    ones = torch.ones(rows.numel(), dtype=dtype, device=edges.device)
    A = _sparse(torch.stack([rows, cols]), ones, (num_nodes, num_nodes))
    A = _sparse(A.indices(), torch.ones_like(A.values()), A.shape)  # duplicate edges count once
    degree = torch.zeros(num_nodes, dtype=dtype, device=edges.device).index_add_(0, A.indices()[0], A.values())
    scale = degree.clamp_min(1).rsqrt()
    i, j = A.indices()
    return _sparse(A.indices(), scale[i] * A.values() * scale[j], A.shape)


def _sparse(indices: Tensor, values: Tensor, shape: tuple[int, int] | torch.Size) -> Tensor:
    return torch.sparse_coo_tensor(indices, values, shape, check_invariants=False).coalesce()


class GraphMap(Map):
    """``Φ(Z, X) = φ(W Z Â + Ω X Â)`` on a fixed graph, W kept in ``‖W‖_∞ ≤ κ / λ_pf(Â)``.

    ``adjacency`` is Â, square and non-negative, dense or ``torch.sparse`` (stored sparse).
    ``activation`` must be component-wise and 1-Lipschitz (default ReLU).  ``kappa`` ∈ (0, 1)
    is the well-posedness margin; λ_pf comes from a power iteration
    (:func:`~implicitnets.diagnostics.perron_frobenius`, its upper Collatz–Wielandt bound).
    With ``parametrize=False`` (default) call :meth:`project_` after every optimiser step
    (W is projected once at construction); with ``parametrize=True`` W is rescaled into the
    ball at every evaluation (:class:`~implicitnets.parametrizations.InfNormBound`).
    States ``(B, width, n)``, inputs ``(B, in_features, n)``; see the module docstring.

    Args:
        in_features: Features p per node of the input, an int >= 1.
        width: State size m per node, an int >= 1.
        adjacency: The (n, n) non-negative adjacency ``Â``, dense or sparse, with at least
            one edge (e.g. from :func:`normalized_adjacency`).
        kappa: Keyword only.  The well-posedness margin κ in ``(0, 1)``.
        activation: Keyword only.  The component-wise 1-Lipschitz φ.
        parametrize: Keyword only.  Rescale W into the ball at every evaluation instead of
            projecting it with :meth:`project_`.
        device: Keyword only.  Device of the parameters and of ``Â``.
        dtype: Keyword only.  Dtype of the parameters and of ``Â`` (default: the
            adjacency's if floating point, else the default dtype).

    Raises:
        ValueError: A size is not an int >= 1, ``kappa`` is not in ``(0, 1)``,
            ``activation`` is not callable, or ``adjacency`` is not square or has no edges.
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        adjacency: Tensor,
        *,
        kappa: float = 0.95,
        activation: Callable[[Tensor], Tensor] = torch.relu,
        parametrize: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        check_sizes("GraphMap", in_features=in_features, width=width)
        if isinstance(kappa, bool) or not isinstance(kappa, (int, float)) or not 0 < kappa < 1:
            raise ValueError(f"GraphMap: kappa must be in (0, 1), got {kappa!r}")
        if not callable(activation):
            raise ValueError(f"GraphMap: activation must be callable, got {activation!r}")
        if not isinstance(adjacency, Tensor) or adjacency.dim() != 2 or adjacency.shape[0] != adjacency.shape[1]:
            shape = tuple(adjacency.shape) if isinstance(adjacency, Tensor) else type(adjacency).__name__
            raise ValueError(f"GraphMap: adjacency must be a square (n, n) tensor, got {shape}")
        dtype = dtype or (adjacency.dtype if adjacency.is_floating_point() else torch.get_default_dtype())
        adj = (adjacency if adjacency.is_sparse else adjacency.to_sparse()).to(device=device, dtype=dtype).coalesce()
        pf = perron_frobenius(adj)
        if not pf.upper > 0:
            raise ValueError("GraphMap: the adjacency has λ_pf = 0 (no edges); nothing to propagate")
        self.in_features, self.width, self.num_nodes = in_features, width, adj.shape[0]
        self.kappa, self.activation = float(kappa), activation
        self.lambda_pf = pf.upper
        self.bound = self.kappa / self.lambda_pf
        self.register_buffer("adjacency_t", adj.t().coalesce())  # Z Â = (Âᵀ Zᵀ)ᵀ
        factory = {"device": device, "dtype": dtype}
        self.W = nn.Parameter(torch.empty(width, width, **factory).uniform_(-1, 1) / math.sqrt(width))
        self.Omega = nn.Parameter(torch.empty(width, in_features, **factory).uniform_(-1, 1) / math.sqrt(in_features))
        self.parametrized = bool(parametrize)
        if self.parametrized:
            torch_parametrize.register_parametrization(self, "W", InfNormBound(self.bound))
        else:
            self.project_()

    def propagate(self, z: Tensor) -> Tensor:
        """``Z Â`` for ``z`` of shape (B, c, n), as one sparse product with the (n, B·c) matrix.

        Args:
            z: Node states, shape (B, c, n).

        Returns:
            ``Z Â``, shape (B, c, n).
        """
        B, c, n = z.shape
        flat = z.permute(2, 0, 1).reshape(n, B * c)
        return torch.sparse.mm(self.adjacency_t, flat).reshape(n, B, c).permute(1, 2, 0)

    def inject(self, x: Tensor) -> Tensor:
        """The input term ``U = Ω X Â``, computed once per solve.

        Args:
            x: Node features, shape (batch, in_features, n).

        Returns:
            ``U``, shape (batch, width, n).

        Raises:
            ValueError: ``x`` is not of shape (batch, in_features, n).
        """
        if x.dim() != 3 or x.shape[1] != self.in_features or x.shape[2] != self.num_nodes:
            raise ValueError(
                f"GraphMap expects x of shape (batch, {self.in_features}, {self.num_nodes}), got {tuple(x.shape)}"
            )
        return self.propagate(torch.matmul(self.Omega, x))

    def step(self, z: Tensor, u: Tensor) -> Tensor:
        """One map evaluation ``φ(W Z Â + U)``.

        Args:
            z: Node states, shape (batch, width, n).
            u: The input term, shape (batch, width, n).
        """
        return self.activation(self.propagate(torch.matmul(self.W, z)) + u)

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return self.step(z, self.inject(x))

    def initial_state(self, x: Tensor) -> Tensor:
        """``Z₀ = 0`` of shape (B, width, n).

        Args:
            x: Node features, shape (B, in_features, n).
        """
        return x.new_zeros(x.shape[0], self.width, x.shape[2])

    @torch.no_grad()
    def project_(self) -> GraphMap:
        """Project W in place onto ``‖W‖_∞ ≤ κ / λ_pf(Â)`` (a no-op when parametrized)."""
        if not self.parametrized:
            project_inf_norm_(self.W, self.bound)
        return self

    @torch.no_grad()
    def well_posedness(self) -> float:
        """``λ_pf(Â) · ‖W‖_∞``: below 1 the equilibrium exists, is unique and Picard converges."""
        return self.lambda_pf * float(inf_norm(self.W))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, width={self.width}, num_nodes={self.num_nodes}, "
                f"kappa={self.kappa}, lambda_pf={self.lambda_pf:.6g}, parametrized={self.parametrized}")
