"""IVF-PQ vs exact top-k retrieval on synthetic embeddings: recall@k and speed-up.

Data: a mixture of Gaussians on the unit sphere, shaped like image embeddings: ``--clusters``
random unit centres in ``--dim`` dimensions; every vector is a centre plus Gaussian noise,
L2-normalised. The noise has total variance dim·spread² spread over a random orthonormal basis
with variances proportional to i^-alpha (i = 1..dim), a power-law spectrum like that of
learned embeddings. Measured for the defaults (spread 0.1, alpha 1): within-component
participation ratio (Σλ)²/Σλ² = 21 and rms within-component noise / rms distance between
component means = 0.77 (heavily overlapping components); the vit_nano Fashion-MNIST teacher's
CLS embeddings (D=128) give 15 within its classes, so the synthetic spectrum is the flatter,
harder one for PQ. Queries are fresh draws from the same mixture.

Exact search (:func:`dinoforge.curation.search.exact_knn`) and IVF-PQ search run in this
process on the same queries; times are the best of ``--repeats`` runs. Not a test: run it
by hand, e.g.

    python benchmarks/retrieval_ivfpq.py                 # 100k vectors, 1000 queries
    python benchmarks/retrieval_ivfpq.py --n 20000 --check

Prints a recall/time table over nprobe, then one JSON line (the chosen ``--nprobe``).
``--check`` exits with status 1 when that recall is below 0.9. The default run took 102 s
wall (55 s CPU) on 2 cores shared with other jobs, most of it building the index.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import faiss
import numpy as np

from dinoforge.curation.search import build_ivfpq, exact_knn, recall_at_k, search, suggest_ivfpq_params

RECALL_TARGET = 0.9


def mixture(n: int, centres: np.ndarray, noise: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``n`` L2-normalised draws of a centre (uniform over ``centres``) plus z @ ``noise``,
    z standard normal."""
    labels = rng.integers(0, len(centres), n)
    points = centres[labels] + rng.standard_normal((n, centres.shape[1]), dtype=np.float32) @ noise
    return points / np.linalg.norm(points, axis=1, keepdims=True)


def mixture_parameters(clusters: int, dim: int, spread: float, alpha: float,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Unit centres (clusters, dim) and the noise map (dim, dim): a random orthonormal basis
    whose i-th row is scaled so that variance along it is proportional to i^-alpha and the
    variances sum to dim·spread²."""
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    variances = np.arange(1, dim + 1, dtype=np.float64) ** -alpha
    variances *= dim * spread**2 / variances.sum()
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    return centres, (np.sqrt(variances)[:, None] * basis.T).astype(np.float32)


def best_time(fn, repeats: int):
    """(result of the last call, fastest wall time of ``repeats`` calls)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return result, min(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="database vectors")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--clusters", type=int, default=1000, help="mixture components")
    parser.add_argument("--spread", type=float, default=0.1, help="rms noise per coordinate")
    parser.add_argument("--alpha", type=float, default=1.0, help="noise spectrum exponent")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--nlist", type=int, default=None, help="default: suggest_ivfpq_params")
    parser.add_argument("--m", type=int, default=None, help="PQ sub-quantizers; default: suggest_ivfpq_params")
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check", action="store_true", help=f"exit 1 when recall@k < {RECALL_TARGET}")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    centres, noise = mixture_parameters(args.clusters, args.dim, args.spread, args.alpha, rng)
    database = mixture(args.n, centres, noise, rng)
    queries = mixture(args.queries, centres, noise, rng)
    nlist, m = suggest_ivfpq_params(args.n, args.dim)
    nlist, m = args.nlist or nlist, args.m or m

    start = time.perf_counter()
    index = build_ivfpq(database, nlist=nlist, m=m, metric="cosine", seed=args.seed)
    build_s = time.perf_counter() - start
    (_, exact), exact_s = best_time(lambda: exact_knn(queries, database, args.k), args.repeats)

    print(f"{'nprobe':>6} {'recall@' + str(args.k):>9} {'search s':>9} {'speed-up':>9}")
    sweep = sorted({p for p in (1, 2, 4, 8, 16, 32, 64) if p <= nlist} | {args.nprobe})
    for nprobe in sweep:
        (_, approx), ivfpq_s = best_time(lambda: search(index, queries, args.k, nprobe), args.repeats)
        recall = recall_at_k(approx, exact, args.k)
        print(f"{nprobe:>6} {recall:>9.4f} {ivfpq_s:>9.4f} {exact_s / ivfpq_s:>9.1f}")
        if nprobe == args.nprobe:
            result = {"n": args.n, "queries": args.queries, "dim": args.dim, "k": args.k, "nlist": nlist, "m": m,
                      "nbits": 8, "nprobe": nprobe, f"recall_at_{args.k}": recall, "build_s": build_s,
                      "exact_s": exact_s, "ivfpq_s": ivfpq_s, "speedup": exact_s / ivfpq_s,
                      "faiss_threads": faiss.omp_get_max_threads()}
    print(json.dumps(result))
    return 1 if args.check and result[f"recall_at_{args.k}"] < RECALL_TARGET else 0


if __name__ == "__main__":
    sys.exit(main())
