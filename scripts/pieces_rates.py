"""How fast the products run in small-matrix pieces, on one CPU stream and on two (docs/benchmarks.md).

    env -u OPENBLAS_CORETYPE uv run python scripts/pieces_rates.py
    env -u OPENBLAS_CORETYPE uv run python scripts/pieces_rates.py --repeats 2 --lstm-steps 300
    uv run python scripts/pieces_rates.py --layers 1 --matvec-size 512 --lstm-steps 4 --repeats 1  # smoke run

Random float32 weights of musicgen-small's decoder (24 layers: six 1024 x 1024 products, fc1 4096 x 1024, fc2
1024 x 4096) and of EnCodec's LSTM (4096 x 1024), each form timed back to back in this process, medians:
- the 24 layers' 2-row products x @ W^T, independent of each other, whole and in pieces;
- the same as a chain, each product taking the last one's output (as a step does);
- an 8192 x 8192 matrix with one and with two rows (the roofline's form);
- one EnCodec LSTM layer's recurrence (1500 steps of 1 x 4096 x 1024).
The pieces are those of `_blas.small_product_limit()` (OpenBLAS's AVX-512 kernels), cut once beforehand as
the decoder step cuts them (`in_pieces`); elsewhere the script uses the same 10^6 limit, to show what the
pieces cost with that BLAS.
"""

# ruff: noqa: I001  (the import order below is deliberate)
from __future__ import annotations

import argparse
import time
from statistics import median

import musicgen  # noqa: F401  (first: it loads the BLAS, which must happen before mlx is imported)
import mlx.core as mx

from encodec.encodec import cpu_streams, lstm_recurrence, product_in_pieces, row_pieces
from musicgen import _blas

LAYER_SHAPES = [(1024, 1024)] * 6 + [(4096, 1024), (1024, 4096)]


def timed(repeats: int, fn, *args) -> float:
    """Median seconds of `repeats` evaluations of fn(*args) after one warm-up."""
    mx.eval(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(fn(*args))
        times.append(time.perf_counter() - start)
    return median(times)


def positive(text: str) -> int:
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def product(x: mx.array, w: mx.array, pieces: list[mx.array], limit: int | None, side) -> mx.array:
    """x @ W^T whole (no limit) or from W's pieces, cut beforehand as the step cuts them."""
    return x @ w.T if limit is None else product_in_pieces(x, pieces, side)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive, default=9, help="timed runs a form (default 9)")
    parser.add_argument("--layers", type=positive, default=24, help="decoder layers (default 24)")
    parser.add_argument("--matvec-size", type=positive, default=8192, help="N x N (default 8192)")
    parser.add_argument(
        "--lstm-steps", type=positive, default=1500, help="LSTM steps (default 1500)"
    )
    args = parser.parse_args()
    limit = _blas.small_product_limit() or _blas.SMALL_PRODUCT
    side = cpu_streams()[0]
    print(f"{_blas.describe()}; pieces of <= {limit} multiply-adds")
    forms = {"whole": (None, None), "pieces": (limit, None), "pieces, two streams": (limit, side)}

    def report(label: str, form: str, nbytes: int, seconds: float) -> None:
        rate = f"{nbytes / seconds / 1e9:5.1f} GB/s" if nbytes else ""
        print(f"{label:>24} | {form:<20} {rate:>10} {seconds * 1e3:9.1f} ms")

    weights = [mx.random.normal(s) * s[1] ** -0.5 for _ in range(args.layers) for s in LAYER_SHAPES]
    inputs = {n: mx.random.normal((2, n)) for n in (1024, 4096)}
    pieces = [row_pieces(w, 2, limit) for w in weights]
    mx.eval(weights, inputs, pieces)
    nbytes = sum(w.nbytes for w in weights)

    def independent(limit, side):
        return [
            product(inputs[w.shape[1]], w, p, limit, side)
            for w, p in zip(weights, pieces, strict=True)
        ]

    def chain(limit, side):
        x = inputs[1024]
        for w, p in zip(weights, pieces, strict=True):
            x = product(x, w, p, limit, side)
        return x

    layers = f"{args.layers} layers"
    for label, run in ((f"{layers}, independent", independent), (f"{layers}, chain", chain)):
        for form, (lim, s) in forms.items():
            report(label, form, nbytes, timed(args.repeats, run, lim, s))

    n = args.matvec_size
    matrix = mx.random.normal((n, n))
    rows = {1: mx.random.normal((1, n)), 2: mx.random.normal((2, n))}
    mx.eval(matrix, rows)
    for count, x in rows.items():
        cut = row_pieces(matrix, count, limit)
        mx.eval(cut)
        for form, (lim, s) in forms.items():
            seconds = timed(args.repeats, product, x, matrix, cut, lim, s)
            report(f"{n}^2, {count} rows", form, matrix.nbytes, seconds)

    wh = mx.random.normal((4096, 1024)) * 0.03
    gx = mx.random.normal((1, args.lstm_steps, 4096))
    mx.eval(wh, gx)

    def lstm(limit, side):
        if limit is None:
            return lstm_recurrence(gx, lambda h: h @ wh.T)
        pieces = row_pieces(wh, 1, limit)
        return lstm_recurrence(gx, lambda h: product_in_pieces(h, pieces, side))

    for form, (lim, s) in forms.items():
        seconds = timed(max(1, args.repeats // 2), lstm, lim, s)
        report(f"LSTM, {args.lstm_steps} steps", form, 0, seconds)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
