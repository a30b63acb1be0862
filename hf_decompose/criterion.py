"""The statistical criterion: which parts of a delta are supported by training, which are noise.

Null hypothesis (``null="reference"``): the fine-tuned tensor equals the reference (the base) plus
white optimizer noise of unknown scale. Three tests, each with its own p-values:

* **spectral** - singular values of the delta matrix against the largest singular value of a pure
  noise matrix of the same shape (Marchenko-Pastur edge, Tracy-Widom fluctuations, Johnstone 2001).
  The noise scale is the energy left outside the detected spikes, re-estimated until the number of
  spikes is stable (in the spirit of Kritchman & Nadler 2008); only the leading `max_rank` singular
  triplets are computed (randomized SVD). Leading directions that reject are kept as low-rank
  structure.
* **entry** - each entry of the residual (delta minus the spectral part) as z = r / sigma with a
  robust scale sigma = 1.4826 MAD; two-sided normal p-values.
* **group** - the paper's multi-channel dependency: sum of z^2 over a neuron / head / token row /
  vector, a chi-square statistic with as many degrees of freedom as entries.

Multiple testing is controlled per family (one tensor's entries, one layer's groups of a kind, one
matrix's spectral sequence) with Benjamini-Hochberg or Bonferroni.

``null="init"`` is the paper's literal form: the weight itself against N(0, initializer_range^2),
with the scale known rather than estimated.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
import numpy as np
import torch
from scipy import special

from . import kernels
from .config import DecomposedConfig
from .groups import Geometry, ParamInfo, group_ids
from .heap import release_free_memory

MAD_TO_SIGMA = 1.4826
Z_HIST_RANGE, Z_HIST_BINS = 8.0, 64  # per-tensor histogram of entry z, kept in the report for figures
# Tracy-Widom (beta=1) as a shifted gamma: Chiani (2014), "Distribution of the largest eigenvalue ...".
_TW1_SHAPE, _TW1_SCALE, _TW1_SHIFT = 46.446, 0.186054, 9.84801
CHUNK_BYTES = 4 * 2**20  # entry-wise work on a large matrix (an embedding) runs on blocks of rows this size
# The smallest noise energy the tests resolve, as a fraction of the delta's: a noise scale below 1e-3 of its RMS is
# none. A delta that is exactly structured (a merged adapter saved in float32) leaves a residual of float32 rounding
# (~1e-7 of its scale) whose robust scale would make every test weigh the device's rounding (every entry supported).
RESOLUTION = 1e-6
# at least BATCH_MIN like matrices of up to BATCH_MATRIX_BYTES each (a mixture's experts) have their randomized SVDs run
# in stacks of up to BATCH_BYTES (`batched_triplets`): small matrices' SVDs are per-call costs more than products (8-32
# MiB stacks alike; two matrices of a dense layer gain nothing measurable)
BATCH_MIN, BATCH_MATRIX_BYTES, BATCH_BYTES = 8, 4 * 2**20, 16 * 2**20


def row_chunks(t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """`t` as views of consecutive row blocks of about `CHUNK_BYTES` (one block unless `t` is a large matrix),
    so that entry-wise temporaries stay small."""
    if t.dim() != 2 or t.numel() * t.element_size() <= CHUNK_BYTES:
        return (t,)
    return t.split(max(1, CHUNK_BYTES // (t.shape[1] * t.element_size())))


def entry_support(residual: torch.Tensor, sigma: float, config: DecomposedConfig) -> torch.Tensor:
    """Entries whose |z| = |r| / sigma rejects N(0, 1), two-sided, under the configured control.

    p falls as |z| grows, so both controls keep the n entries of largest |z|. Only entries with
    p <= q can be rejected, and of them only those `_rejectable` leaves: their |z| alone are sorted, and
    p-values are computed on the sorted values a block at a time. Entries tied at the cut are kept in
    row-major order, as a stable sort of the p-values keeps them; the mask is filled a block of rows at a
    time (no index list of the entries).
    """
    if sigma <= 0:
        return residual != 0
    threshold = float(-special.ndtri(config.q / 2))  # scipy.stats' norm.isf, without its per-call overhead
    chunks = (residual,) if _compiled(residual) else row_chunks(residual)  # the kernel holds no temporaries
    blocks = [_candidates(chunk, sigma, threshold).cpu().numpy() for chunk in chunks]
    z_sorted, start = np.empty(sum(b.size for b in blocks), dtype=np.float32), 0
    while blocks:  # moved block by block, each freed and its pages returned: never two copies of all the candidates
        block = blocks.pop(0)
        z_sorted[start : start + block.size] = block
        start += block.size
        del block
        if blocks:
            release_free_memory()
    m, kept = residual.numel(), 0
    z_sorted = _rejectable(z_sorted, m, config)
    z_sorted[::-1].sort()  # descending |z|: ascending p
    for start in range(0, z_sorted.size, 1 << 20):
        p = 2 * special.ndtr(-z_sorted[start : start + (1 << 20)].astype(np.float64))  # norm.sf, 4x faster
        bound = config.q / m if config.correction == "bonferroni" else config.q * np.arange(start + 1, start + p.size + 1) / m
        below = np.nonzero(p <= bound)[0]
        kept = start + int(below[-1]) + 1 if below.size else kept
    cut = float(z_sorted[kept - 1]) if kept else math.inf
    ties = kept - int(np.count_nonzero(z_sorted[:kept] > cut))  # how many entries with |z| == cut are kept
    del z_sorted
    mask = torch.zeros_like(residual, dtype=torch.bool)
    if not kept:
        return mask
    start = 0
    for z in _z_blocks(residual, sigma):
        rows = mask[start : start + z.shape[0]]
        torch.gt(z, cut, out=rows)
        if ties:
            tied = (z == cut).nonzero()[:ties]
            rows[tuple(tied.t())] = True
            ties -= tied.shape[0]
        start += z.shape[0]
    return mask


def _rejectable(z: np.ndarray, m: int, config: DecomposedConfig) -> np.ndarray:
    """Of the candidate |z| among `m` entries, those the correction may still reject. Benjamini-Hochberg rejects the
    k entries of smallest p for the largest k with ``p_(k) <= q k / m``, so with K candidates held no entry of p above
    ``q K / m`` is among them; dropping those shrinks K, until no more drop (Bonferroni: one cut at ``q / m``). What
    remains is the entries of largest |z|, every rejected one among them, so the step-up on it finds the same k."""
    while z.size:
        k = 1 if config.correction == "bonferroni" else z.size
        threshold = float(-special.ndtri(config.q * k / (2 * m))) * (1 - 1e-6)  # p <= q k / m, with room for rounding
        kept = z[z >= threshold]
        if kept.size == z.size:
            break
        z = kept
    return z


def _candidates(chunk: torch.Tensor, sigma: float, threshold: float) -> torch.Tensor:
    """The |z| = |r| / sigma >= `threshold` of one block: in one pass in C on CPU, elsewhere dividing only entries near or
    above it."""
    if _compiled(chunk):
        return kernels.z_candidates(chunk, sigma, threshold)
    magnitude = chunk.abs()
    z = magnitude[magnitude >= threshold * sigma * (1 - 1e-6)].div_(sigma)
    return z[z >= threshold]


def _compiled(t: torch.Tensor) -> bool:
    """Whether the compiled entry-wise kernels take `t` (a contiguous float32 CPU tensor)."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous() and kernels.available()


def _z_blocks(residual: torch.Tensor, sigma: float) -> Iterator[torch.Tensor]:
    """|residual| / sigma, a block of rows at a time."""
    for chunk in row_chunks(residual):
        yield chunk.abs().div_(sigma)


def reject(pvalues: np.ndarray, q: float, correction: str) -> np.ndarray:
    """Boolean rejections at level q under Benjamini-Hochberg (FDR) or Bonferroni (FWER)."""
    p = np.asarray(pvalues, dtype=np.float64).ravel()
    m = p.size
    if m == 0:
        return np.zeros(0, dtype=bool)
    if correction == "bonferroni":
        return p <= q / m
    order = np.argsort(p, kind="stable")
    below = p[order] <= q * np.arange(1, m + 1) / m
    out = np.zeros(m, dtype=bool)
    if below.any():
        out[order[: int(np.nonzero(below)[0].max()) + 1]] = True
    return out


def robust_sigma(values: torch.Tensor) -> float:
    """1.4826 x median absolute deviation from the median: the Gaussian sigma, robust to outliers (not floored:
    `assess_layer` floors it at `resolution`)."""
    flat = values.reshape(-1)
    if flat.numel() > 4_000_000:  # a fixed-stride subsample estimates the median to ~1e-3 relative (copied: read once)
        flat = flat[:: flat.numel() // 2_000_000].contiguous()
    k = (flat.numel() - 1) // 2  # the lower middle value for an even count, as `torch.median`
    if _compiled(flat):  # two histogram passes each, in C
        med = kernels.select_f32(flat, k)
        return float(np.float32(MAD_TO_SIGMA) * np.float32(kernels.select_f32(flat, k, center=med)))
    med = _median(flat, k)
    return float(MAD_TO_SIGMA * _median((flat - med).abs(), k))


def energy(delta: torch.Tensor) -> float:
    """The sum of squares of `delta`: float32 pairwise sums (~1e-7 relative) of row blocks, added in float64."""
    return sum(float(c.square().sum()) for c in row_chunks(delta))


def resolution(total: float, numel: int) -> float:
    """The smallest noise scale the tests resolve in a delta of `numel` entries and energy `total` (`RESOLUTION`)."""
    return math.sqrt(RESOLUTION * total / numel) if numel else 0.0


def _median(values: torch.Tensor, k: int) -> torch.Tensor:
    """The `k`-th smallest of a 1-D tensor; on CPU by numpy's selection, twice as fast as `torch.kthvalue`."""
    if values.device.type != "cpu":
        return values.kthvalue(k + 1).values
    return torch.from_numpy(np.partition(values.numpy(), k)[k : k + 1]).reshape(())


def tracy_widom_sf(x: np.ndarray) -> np.ndarray:
    """P(TW1 > x) via Chiani's gamma approximation."""
    return special.gammaincc(_TW1_SHAPE, np.maximum(np.asarray(x, dtype=np.float64) + _TW1_SHIFT, 0) / _TW1_SCALE)  # gamma.sf


def spectral_pvalues(singular: np.ndarray, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """p-value of the k-th singular value being noise, after deflating the k-1 before it."""
    m, n = min(shape), max(shape)
    out = np.ones(len(singular))
    statistics = []
    for k, s in enumerate(singular):
        nk, pk = n - k - 1, m - k
        if nk < 2 or pk < 2 or sigma <= 0:
            break
        a, b = math.sqrt(nk), math.sqrt(pk)
        mu, scale = (a + b) ** 2, (a + b) * (1 / a + 1 / b) ** (1 / 3)
        statistics.append(((s / sigma) ** 2 - mu) / scale)
    out[: len(statistics)] = tracy_widom_sf(np.array(statistics, dtype=np.float64))
    return out


def randomized_svd(a: torch.Tensor, k: int, niter: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u, s, vh) of the leading `k` singular triplets of `a` (Halko, Martinsson & Tropp 2011, with
    `niter` power iterations); of each matrix of a stack ``(b, m, n)`` at once, each the same as alone (batched
    products: small matrices, a mixture's experts, pay their per-call costs once). The random test matrix is drawn on
    CPU from `seed` (the global RNG is untouched) and moved to `a`'s device, so CPU and CUDA start from the same subspace.

    The power iterations only find the subspace: where the device multiplies bfloat16 natively (`subspace_dtype`)
    all but the last product multiply a bfloat16 copy of `a` (its rounding, 2^-9 of each entry, is noise far below a
    delta's own); the last product and the triplets, from `a` projected on that subspace (Rayleigh-Ritz, `_small_svd`),
    take `a` itself in its precision."""
    omega = torch.randn(a.shape[-1], k, generator=torch.Generator().manual_seed(seed)).to(a.device)
    low = a.to(subspace_dtype(a.device))

    def times(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return (m @ x.to(m.dtype)).to(a.dtype)

    q = omega
    for _ in range(niter):
        q = orthonormal_basis(times(low, q), exact=False)
        q = orthonormal_basis(times(low.mT, q), exact=False)
    del low
    q = orthonormal_basis(a @ q)  # the last product in `a`'s precision: the rounding's tilt of the leading directions is contracted away
    ub, s, vh = _small_svd(q.mT @ a)
    return q @ ub, s, vh


def _small_svd(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD of a wide `b` (k, n), k <= n, from the eigendecomposition of its Gram ``b b^T`` (k x k) in float64:
    ``vh = diag(1 / s) u^T b`` (a direction of zero singular value gets a zero row). The leading triplets match LAPACK's
    SVD to ~1e-12 relative, a direction of singular value s to ~eps64 (s_1 / s)^2; 5-7x faster for k = 72. The k x k
    eigendecomposition runs on the CPU (`_on_host`)."""
    b64 = b.double()
    values, u = (t.to(b.device) for t in torch.linalg.eigh(_on_host(b64 @ b64.mT)))
    s, u = values.flip(-1).clamp_(min=0).sqrt_(), u.flip(-1)
    vh = (u.mT @ b64).mul_(torch.where(s > 0, 1 / s, 0)[..., None])
    return u.to(b.dtype), s.to(b.dtype), vh.to(b.dtype)


def _on_host(small: torch.Tensor) -> torch.Tensor:
    """A small (k x k) matrix on the CPU for its factorization: on CUDA `torch.linalg`'s eigendecomposition and Cholesky
    of one 72 x 72 matrix launch cuSOLVER for milliseconds and wait for it (pytorch#121603, #183806), LAPACK on the
    host takes tens of microseconds. A matrix already on the CPU is returned as it is."""
    return small.cpu()


def subspace_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 where matrix products in it are fast: CUDA; a CPU with AMX tiles (the randomized SVD's products 3.7-5.5x
    float32's on this project's 2 core Xeon) or AVX-512 BF16 instructions (1.6-2x on a 2 core AMD EPYC); else float32."""
    if device.type == "cuda" or (device.type == "cpu" and _cpu_bf16()):
        return torch.bfloat16
    return torch.float32


def _cpu_bf16() -> bool:
    probes = (getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))  # private, hence looked up
    return any(bool(probe and probe()) for probe in probes)


# the largest condition number of a block that `orthonormal_basis` orthonormalizes by Cholesky QR: its basis is then
# orthonormal to about eps64 x cond^2 ~ 1e-8, below float32's rounding; a power iteration's (float32) to eps32 x cond^2
# ~ 0.06, a basis within 1.1 of orthonormal that spans the block's columns to float32's rounding
CHOLESKY_QR_CONDITION = {True: 1e4, False: 1e3}


def orthonormal_basis(y: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """An orthonormal basis of the columns of a tall `y` (its QR's Q, up to the signs of the columns): Cholesky QR in
    float64 (the Gram ``y^T y``, its Cholesky factor L, ``y L^-T`` with L's inverse: matrix products, 2-3x faster than
    Householder QR on a 2 core CPU for 72 columns); Householder QR where the Gram is singular or `y` (whose condition
    number is L's) may be conditioned worse than `CHOLESKY_QR_CONDITION` (``||L||_F ||L^-1||_F``, a bound of it, above).

    Not `exact`: a power iteration's basis, whose next product only needs its span; Cholesky QR in `y`'s own
    precision (float32: twice float64's speed, and no copy), orthonormal to a few percent.

    A stack of blocks ``(b, m, k)``: each block's basis as alone (Householder QR for those that need it)."""
    work = y.double() if exact else y
    chol, info = torch.linalg.cholesky_ex(_on_host(work.mT @ work))  # the small factorization on the CPU (`_on_host`)
    if y.dim() == 2 and int(info):
        return torch.linalg.qr(y).Q
    eye = torch.eye(chol.shape[-1], dtype=chol.dtype)
    inverse = torch.linalg.solve_triangular(chol, eye.expand_as(chol), upper=False)
    bound = torch.linalg.matrix_norm(chol).double() * torch.linalg.matrix_norm(inverse).double()
    cholesky = (info == 0) & (bound <= CHOLESKY_QR_CONDITION[exact])
    q = (work @ inverse.mT.contiguous().to(y.device)).to(y.dtype)
    if y.dim() == 2:
        return q if bool(cholesky) else torch.linalg.qr(y).Q
    for i in (~cholesky).nonzero().flatten().tolist():
        q[i] = torch.linalg.qr(y[i]).Q
    return q


@dataclass
class SpectralResult:
    """Supported singular directions of one matrix delta."""

    sigma: float
    edge: float
    floor: float  # `resolution` of the delta: its noise scale is at least this
    rank: int
    singular_values: np.ndarray
    pvalues: np.ndarray
    energy_fraction: float
    u: torch.Tensor  # (out, rank), singular values folded in
    v: torch.Tensor  # (rank, in)


def sketch_rank(shape: tuple[int, ...], config: DecomposedConfig) -> int | None:
    """How many leading triplets the spectral test computes by `randomized_svd` for a matrix of `shape` (`max_rank`
    tested, 8 more to oversample); None where that is half its smaller side or more (a full SVD then)."""
    k = min(config.max_rank + 8, min(shape))
    return k if k < min(shape) // 2 else None


def spectral_test(delta: torch.Tensor, config: DecomposedConfig, sigma: float | None = None,
                  triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> SpectralResult:
    """Keep the leading singular directions whose values reject the noise null at level q.

    With `sigma` given (the ``init`` null) the scale is known; otherwise it is estimated from the
    energy outside the spikes found so far, until the spike count stops changing. `triplets`: the delta's leading
    ones, computed already (`batched_triplets`).
    """
    m, n = min(delta.shape), max(delta.shape)
    if triplets is not None:
        u, s, vh = triplets
    elif (k := sketch_rank(delta.shape, config)) is not None:
        u, s, vh = randomized_svd(delta, k, niter=3, seed=config.seed)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    s_np = s.double().cpu().numpy()
    total = energy(delta)
    tested = min(config.max_rank, len(s_np))
    rank, known = 0, sigma is not None
    for _ in range(10):
        if not known:
            # floored at `RESOLUTION`: an exactly low-rank delta (merged LoRA) leaves ~0, not a zero scale
            noise = max(total - float((s_np[:rank] ** 2).sum()), RESOLUTION * total)
            sigma = math.sqrt(noise / ((m - rank) * (n - rank))) if noise > 0 else 0.0
        pvalues = spectral_pvalues(s_np[:tested], delta.shape, sigma)
        rejected = reject(pvalues, config.q, config.correction)
        new_rank = int(np.argmin(rejected)) if not rejected.all() else tested  # leading run of rejections
        if new_rank == rank or known:
            rank = new_rank
            break
        rank = new_rank
    return SpectralResult(
        sigma=sigma,
        edge=sigma * (math.sqrt(m) + math.sqrt(n)),
        floor=resolution(total, m * n),
        rank=rank,
        singular_values=s_np[:tested],
        pvalues=pvalues,
        energy_fraction=float((s_np[:rank] ** 2).sum() / total) if total > 0 else 0.0,
        u=(u[:, :rank] * s[:rank]).contiguous(),
        v=vh[:rank].contiguous(),
    )


@dataclass
class TensorTest:
    """The criterion's verdict on one tensor (canonical (out, in) layout for matrices)."""

    info: ParamInfo
    residual: torch.Tensor  # delta minus its spectral part: the values an entry mask keeps
    sigma: float
    mask: torch.Tensor  # supported entries of the residual
    spectral: SpectralResult | None = None
    stats: dict = field(default_factory=dict)
    group_pvalues: np.ndarray | None = None  # per unit along the group axis (one value for a vector)


def assess_layer(
    tensors: dict[str, tuple[ParamInfo, torch.Tensor]],
    config: DecomposedConfig,
    geometry: Geometry | None,
    init_sigma: float | None = None,
    in_place: bool = False,
) -> dict[str, TensorTest]:
    """Run entry, group and spectral tests on one layer's deltas (canonical layout).

    `tensors` maps a name to (info, delta); under ``null="init"`` the delta is the weight itself and
    `init_sigma` the known scale of the initialization distribution. With `in_place`, each delta is
    overwritten by its residual (no second copy of the largest matrix). An estimated nonzero scale is floored at
    the delta's `resolution`.
    """
    results: dict[str, TensorTest] = {}
    matrix_sigmas = []
    triplets = batched_triplets({n: d for n, (_, d) in tensors.items()}, config) if config.spectral_test else {}
    for name, (info, delta) in tensors.items():
        if delta.dim() != 2:
            continue
        spectral = None
        residual = delta
        if config.spectral_test and min(delta.shape) > 1:
            spectral = spectral_test(delta, config, sigma=init_sigma, triplets=triplets.pop(name, None))
            if len(row_chunks(delta)) > 1:
                release_free_memory()  # the randomized SVD's temporaries of a large matrix
            floor = spectral.floor
            if spectral.rank:  # delta - u v as one product added in: one pass, no temporary beside the residual
                residual = (delta.addmm_ if in_place else delta.addmm)(spectral.u, spectral.v, alpha=-1)
        else:
            floor = resolution(energy(delta), delta.numel()) if init_sigma is None else 0.0
        sigma = init_sigma if init_sigma is not None else _floored(robust_sigma(residual), floor)
        matrix_sigmas.append(sigma)
        results[name] = TensorTest(info, residual, sigma, torch.zeros_like(residual, dtype=torch.bool), spectral)
    # Vectors (norms, biases) are too short to estimate their own noise: use the layer's matrices.
    layer_sigma = init_sigma if init_sigma is not None else (float(np.median(matrix_sigmas)) if matrix_sigmas else None)
    for name, (info, delta) in tensors.items():
        if delta.dim() == 2:
            continue
        sigma = layer_sigma if layer_sigma is not None else _floored(robust_sigma(delta), resolution(energy(delta), delta.numel()))
        results[name] = TensorTest(info, delta, sigma, torch.zeros_like(delta, dtype=torch.bool))

    if config.entry_test:
        for result in results.values():
            result.mask |= entry_support(result.residual, result.sigma, config)
            if len(row_chunks(result.residual)) > 1:
                release_free_memory()
    if config.group_test:
        _group_tests(results, config, geometry)
    for result in results.values():
        result.stats |= {
            "entries": result.mask.numel(),
            "supported_entries": int(result.mask.count_nonzero()),
            "sigma": result.sigma,
            "spectral_rank": result.spectral.rank if result.spectral else 0,
            "spectral_energy": result.spectral.energy_fraction if result.spectral else 0.0,
        }
        if result.sigma > 0:
            result.stats["z_hist"] = z_histogram(result.residual, result.sigma).tolist()
    return results


def batched_triplets(deltas: dict[str, torch.Tensor], config: DecomposedConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The spectral test's triplets of like small matrices (`BATCH_MIN` or more of one shape, each at most
    `BATCH_MATRIX_BYTES`: a mixture's experts), by stacks of at most `BATCH_BYTES` through `randomized_svd`: each the
    same as alone, for less time (64 experts of 256 x 1024 on 2 cores: 3.2 ms a matrix against 4.6 alone)."""
    like: dict[tuple, list[str]] = {}
    for name, delta in deltas.items():
        if delta.dim() == 2 and sketch_rank(delta.shape, config) is not None and delta.numel() * delta.element_size() <= BATCH_MATRIX_BYTES:
            like.setdefault((tuple(delta.shape), delta.dtype, delta.device), []).append(name)
    out = {}
    for (shape, dtype, _), names in like.items():
        step = max(1, BATCH_BYTES // (math.prod(shape) * dtype.itemsize))
        for start in range(0, len(names), step) if len(names) >= BATCH_MIN else ():
            chunk = names[start : start + step]
            u, s, vh = randomized_svd(torch.stack([deltas[n] for n in chunk]), sketch_rank(shape, config), niter=3, seed=config.seed)
            out.update({n: (u[i], s[i], vh[i]) for i, n in enumerate(chunk)})
    return out


def _floored(sigma: float, floor: float) -> float:
    """A robust scale at least `floor`; 0 stays 0 (most entries unchanged: a sparse delta keeps every changed entry)."""
    return max(sigma, floor) if sigma > 0 else sigma


def z_histogram(residual: torch.Tensor, sigma: float) -> torch.Tensor:
    """Counts of z = r / sigma over `Z_HIST_BINS` equal bins of [-`Z_HIST_RANGE`, `Z_HIST_RANGE`], values beyond it in the
    end bins: computed as ``r * float32(1 / sigma)`` in float32, by the compiled kernel on CPU (`kernels.z_histogram`; a
    single pass: ``torch.histc`` took a fifth of the criterion's time), else by PyTorch a block of rows at a time, the
    same counts."""
    inv = 1 / sigma
    if _compiled(residual):
        return kernels.z_histogram(residual, inv, Z_HIST_RANGE, Z_HIST_BINS)
    counts = torch.zeros(Z_HIST_BINS, dtype=torch.int64, device=residual.device)
    scale = Z_HIST_BINS / (2 * Z_HIST_RANGE)
    for chunk in row_chunks(residual):
        z = chunk.float().mul(inv).clamp_(-Z_HIST_RANGE, Z_HIST_RANGE)
        z = z[~z.isnan()]
        counts += torch.bincount(z.add_(Z_HIST_RANGE).mul_(scale).floor_().long().clamp_(max=Z_HIST_BINS - 1), minlength=Z_HIST_BINS)
    return counts.cpu()


def _z2(values: torch.Tensor, sigma: float) -> torch.Tensor:
    """(values / sigma)^2 in float32 (sums of them are pairwise: ~1e-7 relative, far below a chi-square's spread)."""
    return values.div(sigma).square_()


def _group_tests(results: dict[str, TensorTest], config: DecomposedConfig, geometry: Geometry | None) -> None:
    """Chi-square per dependency group, pooled across the tensors a group spans, BH per kind."""
    members = []  # (name, pool key, group id of each unit, the unit's sum of z^2, its entries)
    for name, result in results.items():
        info = result.info
        if result.sigma <= 0:
            continue
        if info.group_axis is None:
            z2 = _z2(result.residual, result.sigma)
            members.append((name, f"vector:{name}", np.zeros(1, dtype=np.int64), z2.sum().double().reshape(1).cpu().numpy(), np.array([z2.numel()])))
            continue
        if geometry is None and info.group_kind in ("head", "kv_head"):
            continue
        other = 1 - info.group_axis
        # row sums of row blocks are the row sums of the whole; column sums are summed whole
        chunks = row_chunks(result.residual) if other == 1 else (result.residual,)
        per_unit = torch.cat([_z2(c, result.sigma).sum(dim=other) for c in chunks]).double().cpu().numpy()
        # a kind the groups know pools across the layer's tensors; an unrecognised matrix is its own group
        key = f"{info.layer}:{info.group_kind}" if info.role != "matrix" else f"{info.layer}:{info.group_kind}:{name}"
        members.append((name, key, group_ids(info, tuple(result.residual.shape), geometry), per_unit, np.full(per_unit.size, result.residual.shape[other])))
    sizes: dict[str, int] = {}
    for _, key, ids, _, _ in members:  # a pool spans its members' ids (a fused q/k/v matrix's kv heads follow the query heads)
        sizes[key] = max(sizes.get(key, 0), int(ids.max()) + 1)
    sums = {key: np.zeros(size) for key, size in sizes.items()}
    dofs = {key: np.zeros(size) for key, size in sizes.items()}
    for _, key, ids, per_unit, count in members:
        np.add.at(sums[key], ids, per_unit)
        np.add.at(dofs[key], ids, count)
    supported, pvalues = {}, {}
    for key in sums:
        pvalues[key] = special.chdtrc(np.maximum(dofs[key], 1), sums[key])  # chi2.sf
        supported[key] = reject(pvalues[key], config.q, config.correction)
    for name, key, ids, _, _ in members:
        result = results[name]
        result.group_pvalues = pvalues[key][ids]
        hit = torch.from_numpy(supported[key][ids]).to(result.mask.device)
        if result.info.group_axis is None:
            result.mask |= bool(hit[0])
        elif result.info.group_axis == 0:
            result.mask |= hit[:, None]
        else:
            result.mask |= hit[None, :]
        result.stats["supported_groups"] = int(hit.sum())
