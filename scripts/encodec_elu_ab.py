"""Time EnCodec's decode of 30 s with ELU on our CPU kernels against MLX's operations, alternated.

musicgen-small's EnCodec shapes (musicgen/shapes/small.json) with random weights, 1500 frames, one process:
a warm-up decode of each form, then 3 timed decodes of each, alternated; prints the times, their medians and
the largest difference between the two outputs. Run on a quiet machine:

    env -u OPENBLAS_CORETYPE uv run python scripts/encodec_elu_ab.py
"""

# ruff: noqa: I001  (the import order below is deliberate)
import json
import statistics
import time
from pathlib import Path

import musicgen  # noqa: F401  (the BLAS before mlx)
import mlx.core as mx
from mlx.utils import tree_map

import encodec.encodec as E
from encodec import EncodecConfig, EncodecModel

SHAPE = Path(__file__).resolve().parents[1] / "musicgen" / "shapes" / "small.json"


def main() -> None:
    config = json.loads(SHAPE.read_text())["audio_encoder"]
    model = EncodecModel(EncodecConfig.from_dict(config))
    model.update(tree_map(lambda p: 0.05 * mx.random.normal(p.shape), model.parameters()))
    codes = mx.random.randint(0, 2048, (1, 4, 1500)).astype(mx.int32)
    mx.eval(model.parameters(), codes)
    kernel = E._elu_kernel
    if kernel(codes.astype(mx.float32)) is None:
        raise SystemExit("the CPU kernels do not run here (x86-64 Linux with AVX-512 and g++ only)")
    times, outputs = {"kernels": [], "mlx": []}, {}
    for round_ in range(4):
        for form in times:
            E._elu_kernel = kernel if form == "kernels" else (lambda x: None)
            start = time.perf_counter()
            outputs[form] = model.decode(codes)
            mx.eval(outputs[form])
            if round_:  # the first round warms up
                times[form].append(time.perf_counter() - start)
    E._elu_kernel = kernel
    for form, values in times.items():
        print(
            f"{form}: median {statistics.median(values):.2f} s ({', '.join(f'{v:.2f}' for v in values)})"
        )
    diff = mx.abs(outputs["kernels"] - outputs["mlx"]).max().item()
    print(f"largest difference {diff:.2e} (peak {mx.abs(outputs['mlx']).max().item():.2f})")


if __name__ == "__main__":
    main()
