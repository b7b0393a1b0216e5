r"""Couplings: how noise ``x0`` and data ``x1`` of a minibatch are paired.

Every coupling has the signature ``coupling(key, x0, x1) -> Coupled(x0, x1, i0, i1)`` where the
returned pairs are ``(x0[i0[k]], x1[i1[k]])``; ``i0`` and ``i1`` index the inputs so that
anything attached to ``x1`` (class labels, say) can follow with ``labels[i1]``. Deterministic
couplings ignore the key. Any function with this signature works with
:func:`fmjax.loss.cfm_loss`.

The minibatch couplings see the batch they are given: in the data-parallel training step
that is the per-device batch.
"""

import concurrent.futures
import itertools
import os
from collections.abc import Callable
from typing import NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray

from fmjax._checks import check_batched, check_choice, check_float, check_same_shape

__all__ = [
    "ASSIGNMENT_SOLVERS",
    "COUPLINGS",
    "Coupled",
    "Coupling",
    "exact_ot",
    "independent",
    "min_cost_assignment",
    "sinkhorn_log_plan",
    "sinkhorn_ot",
    "squared_distances",
]


#: The exact assignment solvers of :func:`min_cost_assignment` and :func:`exact_ot`.
ASSIGNMENT_SOLVERS = ("auto", "host", "jax")


class Coupled(NamedTuple):
    """Paired samples.

    Attributes:
        x0: noise, ``x0_input[i0]``, shape ``[batch, *dims]``.
        x1: data, ``x1_input[i1]``, shape ``[batch, *dims]``.
        i0: ``[batch]`` int32 indices into the input ``x0``.
        i1: ``[batch]`` int32 indices into the input ``x1``.
    """

    x0: Float[Array, " batch *dims"]
    x1: Float[Array, " batch *dims"]
    i0: Int[Array, " batch"]
    i1: Int[Array, " batch"]


class Coupling(Protocol):
    """The type of a coupling: ``(key, x0, x1) -> Coupled``."""

    def __call__(
        self, key: PRNGKeyArray, x0: Float[Array, " batch *dims"], x1: Float[Array, " batch *dims"]
    ) -> Coupled: ...


def _check_pair(x0, x1, minimum_batch: int = 1, name: str = "coupling") -> int:
    check_batched("x0", x0)
    check_float("x0", x0)
    check_float("x1", x1)
    check_same_shape("x0", x0, "x1", x1)
    n = x0.shape[0]
    if n == 0:
        raise ValueError(f"{name} needs samples to pair; got an empty batch (x0.shape={x0.shape}).")
    if n < minimum_batch:
        raise ValueError(
            f"{name} needs a batch of at least {minimum_batch} samples to pair; got batch size {n} "
            f"(x0.shape={x0.shape}). A minibatch OT plan over one sample is the identity: use "
            "`independent` instead, or a larger per-device batch."
        )
    return n


def squared_distances(
    x0: Float[Array, " n *dims"], x1: Float[Array, " m *dims"]
) -> Float[Array, "n m"]:
    r"""Pairwise squared Euclidean distances :math:`C_{ij} = \lVert x0_i - x1_j \rVert^2` of flattened samples.

    Computed in float32 (at least) at full matmul precision, so that an accelerator's
    default bf16 passes do not change which pairing is optimal.
    """
    dtype = jnp.promote_types(jnp.result_type(x0, x1), jnp.float32)
    a = x0.reshape(x0.shape[0], -1).astype(dtype)
    b = x1.reshape(x1.shape[0], -1).astype(dtype)
    cross = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(a * a, axis=1)[:, None] + jnp.sum(b * b, axis=1)[None, :] - 2.0 * cross
    return jnp.maximum(sq, 0.0)


def independent(
    key: PRNGKeyArray, x0: Float[Array, " batch *dims"], x1: Float[Array, " batch *dims"]
) -> Coupled:
    """The independent coupling: pairs as drawn (I-CFM). The key is unused.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.couplings import independent
        >>> independent(None, jnp.zeros((3, 2)), jnp.ones((3, 2))).i0
        Array([0, 1, 2], dtype=int32)
    """
    del key
    n = _check_pair(x0, x1, name="independent")
    idx = jnp.arange(n, dtype=jnp.int32)
    return Coupled(x0, x1, idx, idx)


def exact_ot(
    key: PRNGKeyArray,
    x0: Float[Array, " batch *dims"],
    x1: Float[Array, " batch *dims"],
    *,
    solver: str = "auto",
) -> Coupled:
    r"""Exact minibatch optimal transport (OT-CFM): reorders ``x0`` to the optimal pairing.

    Solves :math:`\min_\pi \sum_j \lVert x0_{\pi(j)} - x1_j \rVert^2` over permutations
    :math:`\pi` (squared Euclidean cost on flattened samples) with
    :func:`min_cost_assignment` (``solver``: ``"auto"``, ``"host"`` or ``"jax"``, see there),
    and returns ``x0[pi]`` with ``x1`` in its own order (``i1 = arange``). The result is a
    permutation: no sample is duplicated or dropped, unlike couplings that sample from a plan.
    Jittable and vmappable; the key is unused.

    Raises:
        ValueError: for a batch of one, mismatched shapes or non-float inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.couplings import exact_ot
        >>> x0 = jnp.array([[1.0], [-1.0]]); x1 = jnp.array([[-2.0], [2.0]])
        >>> exact_ot(None, x0, x1).x0[:, 0]
        Array([-1.,  1.], dtype=float32)
    """
    del key
    n = _check_pair(x0, x1, minimum_batch=2, name="exact_ot")
    # Rows are data, columns noise: the assignment gives each x1[r] its x0[c].
    i0 = min_cost_assignment(squared_distances(x1, x0), solver=solver)
    return Coupled(x0[i0], x1, i0, jnp.arange(n, dtype=jnp.int32))


def min_cost_assignment(cost: Float[Array, "n n"], *, solver: str = "auto") -> Int[Array, " n"]:
    r"""The exact minimum-cost perfect assignment of a square cost matrix.

    Returns ``col`` (int32, a permutation of ``arange(n)``) minimising
    :math:`\sum_i C_{i, \mathrm{col}_i}`. Jittable and vmappable. Two exact solvers give the
    same total cost (ties may give different optimal permutations), and both start from warm
    dual potentials: ten log-domain Sinkhorn sweeps at
    :math:`\varepsilon = 0.1\,\mathrm{std}(C)` give :math:`f, g` with
    :math:`f_i + g_j \approx C_{ij}` on the optimal pairs. Subtracting any row and column
    potentials shifts every assignment's total by the same constant, so exactness never depends
    on them; they make the augmenting paths few and short, so the solvers finish much sooner
    than from zero potentials. The solvers:

    - ``"host"``: SciPy's ``linear_sum_assignment`` (a C++ shortest-augmenting-path solver;
      SciPy is a dependency of JAX itself) on :math:`C - f - g` in float64, called from the
      compiled program through ``jax.pure_callback``. Under ``vmap`` one callback solves the
      whole stack on parallel threads (on CPU after warm starts computed one part per core).
      Not for programs that must be serialised (``jax.export``).
    - ``"jax"``: the same algorithm in XLA, in the Jonker–Volgenant style: dual potentials
      :math:`u_i + v_j \le C_{ij}` (tight on assigned pairs) start from :math:`v = g` and the
      row reduction :math:`u_i = \min_j C_{ij} - v_j`, each row taking its cheapest column
      when no lower row does; then each free row is assigned by a Dijkstra search over reduced
      costs :math:`C_{ij} - u_i - v_j \ge 0` (one column per ``lax.while_loop`` step, each an
      ``O(n)`` vector operation) followed by the dual update that keeps the matching tight.
      Duality certifies the result: a perfect matching on tight edges of feasible duals is
      optimal, so the total cost is exact up to float rounding of the reduced costs.
      ``O(n^3)`` worst case.
    - ``"auto"`` (default): ``"host"`` when the program is compiled for CPU or an NVIDIA/AMD
      GPU, ``"jax"`` elsewhere (TPU), chosen per platform at lowering time
      (``jax.lax.platform_dependent``). On CPU the host solver is the faster of the two; on a
      GPU every ``while_loop`` step of the in-graph solver is a kernel launch and a predicate
      copy to the host (figures: docs/benchmarks.md).

    Non-finite costs give an unspecified permutation rather than a hang or an error.

    Example:
        >>> import jax.numpy as jnp
        >>> from fmjax.couplings import min_cost_assignment
        >>> cost = jnp.array([[4.0, 1.0, 3.0], [2.0, 0.0, 5.0], [3.0, 2.0, 2.0]])
        >>> min_cost_assignment(cost)
        Array([1, 0, 2], dtype=int32)
        >>> min_cost_assignment(cost, solver="jax")
        Array([1, 0, 2], dtype=int32)
    """
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"min_cost_assignment needs a square [n, n] cost; got shape {cost.shape}.")
    check_float("cost", cost)
    check_choice("solver", solver, ASSIGNMENT_SOLVERS)
    cost = jax.lax.stop_gradient(cost)
    if solver == "host":
        return _assignment_on_host(cost)
    if solver == "jax":
        return _assignment_in_graph(cost)
    return jax.lax.platform_dependent(
        cost,
        cpu=_assignment_on_host,
        cuda=_assignment_on_host,
        rocm=_assignment_on_host,
        default=_assignment_in_graph,
    )


def _warm_potentials(
    cost: Float[Array, "n n"], iterations: int = 10, relative_epsilon: float = 0.1
) -> tuple[Float[Array, " n"], Float[Array, " n"]]:
    r"""Approximate OT dual potentials :math:`f_i + g_j \approx C_{ij}` on the optimal pairs.

    A few log-domain Sinkhorn iterations at :math:`\varepsilon = 0.1\,\mathrm{std}(C)`, from
    the column minima (see :func:`min_cost_assignment`). Non-finite potentials (from
    non-finite costs) become zeros.
    """
    scale = jnp.std(cost)
    epsilon = jnp.where(scale > 0, relative_epsilon * scale, jnp.ones_like(scale))
    f, g = _sinkhorn_potentials(cost, epsilon, iterations, jnp.min(cost, axis=0))
    finite = jnp.all(jnp.isfinite(f)) & jnp.all(jnp.isfinite(g))
    return jnp.where(finite, f, 0), jnp.where(finite, g, 0)


def _scipy_assignments(costs: np.ndarray, f: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``linear_sum_assignment`` of ``C - f - g`` (float64) over the leading axes of ``[..., n, n]``."""
    # Imported here: SciPy comes with JAX, but only this solver needs its optimize module.
    from scipy.optimize import linear_sum_assignment

    reduced = (
        np.asarray(costs, np.float64)
        - np.asarray(f, np.float64)[..., :, None]
        - np.asarray(g, np.float64)[..., None, :]
    )

    def solve(matrix: np.ndarray) -> np.ndarray:
        if not np.all(np.isfinite(matrix)):  # SciPy raises; keep the in-graph contract instead.
            return np.arange(matrix.shape[-1], dtype=np.int32)
        return linear_sum_assignment(matrix)[1].astype(np.int32)

    matrices = reduced.reshape(-1, *reduced.shape[-2:])
    workers = min(len(matrices), os.cpu_count() or 1)
    if workers == 1:
        cols = [solve(matrix) for matrix in matrices]
    else:  # A vmapped stack: SciPy releases the GIL, so threads use every core.
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            cols = list(pool.map(solve, matrices))
    return np.stack(cols).reshape(reduced.shape[:-1])


def _host_solve(cost: Float[Array, "*stack n n"], f, g) -> Int[Array, "*stack n"]:
    result = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(_scipy_assignments, result, cost, f, g, vmap_method="expand_dims")


@jax.custom_batching.custom_vmap
def _assignment_on_host(cost: Float[Array, "n n"]) -> Int[Array, " n"]:
    return _host_solve(cost, *_warm_potentials(cost))


@_assignment_on_host.def_vmap
def _assignment_on_host_stack(axis_size: int, in_batched: list[bool], cost):
    del in_batched  # the only argument: always batched when this rule runs

    def per_core(cost):
        # XLA's CPU runtime runs independent loops at once, and one Sinkhorn sweep uses one
        # thread: splitting the stack's warm starts into one part per core runs them in parallel.
        groups = min(axis_size, os.cpu_count() or 1)
        bounds = np.linspace(0, axis_size, groups + 1).round().astype(int)
        parts = [jax.vmap(_warm_potentials)(cost[a:b]) for a, b in itertools.pairwise(bounds)]
        return tuple(jnp.concatenate(p) for p in zip(*parts, strict=True))

    f, g = jax.lax.platform_dependent(cost, cpu=per_core, default=jax.vmap(_warm_potentials))
    # Then one callback for the whole stack (threaded, see _scipy_assignments).
    return jax.vmap(_host_solve)(cost, f, g), True


def _assignment_in_graph(cost: Float[Array, "n n"]) -> Int[Array, " n"]:
    n = cost.shape[0]
    # A NaN would make every comparison false and the searches below never find a free column.
    cost = jnp.where(jnp.all(jnp.isfinite(cost)), cost, jnp.zeros_like(cost))
    inf = jnp.array(jnp.inf, cost.dtype)
    index = jnp.arange(n, dtype=jnp.int32)
    none = jnp.int32(-1)

    # Start from warm column potentials v: each row is reduced to u_i = min_j C_ij - v_j, which
    # keeps the duals feasible, and takes its cheapest column, a tight edge, unless a lower row
    # takes the same one. Warm potentials leave few rows free and their paths short.
    v = _warm_potentials(cost)[1]
    reduced = cost - v[None, :]
    u = jnp.min(reduced, axis=1)
    best = jnp.argmin(reduced, axis=1).astype(jnp.int32)
    winner = jnp.full_like(best, n).at[best].min(index)
    col4row = jnp.where(winner[best] == index, best, none)
    row4col = jnp.where(winner < n, winner, none)

    def augment(state):
        u, v, col4row, row4col = state
        # Under vmap this body also runs for matrices already fully assigned: their source is
        # -1, which skips both loops and leaves the state unchanged.
        source = jnp.where(jnp.all(col4row >= 0), none, jnp.argmin(col4row >= 0).astype(jnp.int32))
        free_col = row4col < 0

        def scan_column(search):
            # Relax the edges of row i (reached at distance `reach`), then settle the nearest
            # unsettled column, preferring a free one on ties (it ends the search sooner).
            i, reach, dist, pred, settled, _ = search
            through_i = reach + cost[i] - u[i] - v
            better = (through_i < dist) & ~settled
            pred = jnp.where(better, i, pred)
            dist = jnp.where(better, through_i, dist)
            open_dist = jnp.where(settled, inf, dist)
            reach = jnp.min(open_dist)
            nearest = open_dist == reach
            nearest_free = nearest & free_col
            j = jnp.where(
                jnp.any(nearest_free), jnp.argmax(nearest_free), jnp.argmax(nearest)
            ).astype(jnp.int32)
            return row4col[j], reach, dist, pred, settled.at[j].set(True), j

        # full_like of the cost keeps its type under shard_map (varying over the mesh axes), as
        # while_loop needs its carry to; jnp.full would make these replicated.
        row, entry = cost[0], cost[0, 0]
        start = (source, jnp.zeros_like(entry), jnp.full_like(row, inf))
        start += (jnp.full_like(row, none, jnp.int32), jnp.full_like(row, False, bool))
        start += (jnp.full_like(entry, none, jnp.int32),)
        _, reach, dist, pred, _, sink = jax.lax.while_loop(
            lambda search: search[0] >= 0, scan_column, start
        )
        # Dual update: columns settled closer than the sink move by the difference (unsettled
        # ones are at least `reach` away, so max(., 0) skips them); this keeps every reduced
        # cost non-negative and every matched pair, old and new, tight.
        shift = jnp.maximum(reach - dist, 0)
        v = v - shift
        u = u + jnp.where(col4row >= 0, shift[jnp.maximum(col4row, 0)], 0)
        u = u.at[source].add(reach, mode="drop")

        def flip(walk):
            j, col4row, row4col = walk
            i = pred[j]
            previous = jnp.where(i == source, none, col4row[i])
            return previous, col4row.at[i].set(j), row4col.at[j].set(i)

        _, col4row, row4col = jax.lax.while_loop(
            lambda walk: walk[0] >= 0, flip, (sink, col4row, row4col)
        )
        return u, v, col4row, row4col

    _, _, col4row, _ = jax.lax.while_loop(
        lambda state: jnp.any(state[2] < 0), augment, (u, v, col4row, row4col)
    )
    return col4row


def sinkhorn_ot(epsilon: float, *, num_iters: int = 100, normalize_cost: bool = False) -> Coupling:
    r"""Entropic OT (Schrödinger-bridge CFM): a coupling that samples pairs from the Sinkhorn plan.

    The plan :math:`\pi = \arg\min_{\pi \in \Pi(u, u)} \langle \pi, C \rangle - \epsilon H(\pi)`
    between the uniform marginals ``u`` of ``x0`` and ``x1`` is computed in the log domain with
    ``num_iters`` Sinkhorn iterations. Each data sample ``x1[j]`` keeps its place and is paired
    with a noise sample drawn from the plan's conditional :math:`\pi(\cdot \mid j)`, so the
    pairs are distributed as :math:`\pi` (noise samples may repeat). As
    :math:`\epsilon \to 0` this approaches :func:`exact_ot`, as :math:`\epsilon \to \infty`
    :func:`independent`.

    Args:
        epsilon: the entropic regularisation, in units of the cost (squared distance); SB-CFM
            with bridge noise :math:`\sigma` uses :math:`2\sigma^2`.
        num_iters: Sinkhorn iterations (a fixed count keeps the function jittable).
        normalize_cost: divide the cost by its maximum first, making ``epsilon`` relative.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from fmjax.couplings import sinkhorn_ot
        >>> x0 = jnp.array([[1.0], [-1.0]]); x1 = jnp.array([[-2.0], [2.0]])
        >>> sinkhorn_ot(0.01)(jax.random.key(0), x0, x1).x0[:, 0]
        Array([-1.,  1.], dtype=float32)
    """
    if not epsilon > 0:
        raise ValueError(f"sinkhorn_ot epsilon must be positive; got epsilon={epsilon}.")
    if not (isinstance(num_iters, int) and num_iters > 0):
        raise ValueError(f"sinkhorn_ot num_iters must be a positive int; got {num_iters!r}.")

    def coupling(key, x0, x1):
        n = _check_pair(x0, x1, minimum_batch=2, name="sinkhorn_ot")
        log_plan = sinkhorn_log_plan(squared_distances(x0, x1), epsilon, num_iters, normalize_cost)
        # One categorical draw per column j from log pi(i | j) (columns: data samples).
        i0 = jax.random.categorical(key, log_plan, axis=0).astype(jnp.int32)
        return Coupled(x0[i0], x1, i0, jnp.arange(n, dtype=jnp.int32))

    return coupling


def sinkhorn_log_plan(
    cost: Float[Array, "n m"], epsilon: float, num_iters: int = 100, normalize_cost: bool = False
) -> Float[Array, "n m"]:
    r"""Log of the entropic OT plan between uniform marginals, by log-domain Sinkhorn.

    Iterates the dual potentials
    :math:`f_i = \epsilon\log a_i - \epsilon \operatorname{LSE}_j((g_j - C_{ij})/\epsilon)` and
    :math:`g_j = \epsilon\log b_j - \epsilon \operatorname{LSE}_i((f_i - C_{ij})/\epsilon)`,
    then returns :math:`\log\pi_{ij} = (f_i + g_j - C_{ij})/\epsilon` (rows sum to ``1/n``
    after convergence; columns to ``1/m`` exactly after every iteration).
    """
    cost = jax.lax.stop_gradient(cost)
    if normalize_cost:
        cost = cost / jnp.maximum(jnp.max(cost), jnp.finfo(cost.dtype).tiny)
    f, g = _sinkhorn_potentials(cost, epsilon, num_iters, jnp.zeros_like(cost[0]))
    return (f[:, None] + g[None, :] - cost) / epsilon


def _sinkhorn_potentials(cost, epsilon, num_iters: int, g):
    """``(f, g)`` after ``num_iters`` log-domain Sinkhorn sweeps (uniform marginals) from ``g``."""
    n, m = cost.shape
    log_a, log_b = -jnp.log(n), -jnp.log(m)

    def sweep(_, fg):
        f = epsilon * (log_a - jax.nn.logsumexp((fg[1][None, :] - cost) / epsilon, axis=1))
        g = epsilon * (log_b - jax.nn.logsumexp((f[:, None] - cost) / epsilon, axis=0))
        return f, g

    # Initial values shaped like the cost keep its type under shard_map, as fori_loop needs.
    return jax.lax.fori_loop(0, num_iters, sweep, (jnp.zeros_like(cost[:, 0]), g))


COUPLINGS: dict[str, Callable[..., Coupling]] = {
    "independent": lambda: independent,
    "exact_ot": lambda: exact_ot,
    "sinkhorn_ot": sinkhorn_ot,
}
"""The named couplings, name -> constructor of the coupling (called with its keyword options,
e.g. ``COUPLINGS["sinkhorn_ot"](epsilon=0.1)``); what ``config.path.coupling`` may name."""
