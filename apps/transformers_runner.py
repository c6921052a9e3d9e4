"""Time transformers' PyTorch MusicGen (run by `musicgen-bench --compare-transformers PYTHON`).

Runs in the interpreter given to the benchmark (a venv with torch and transformers), not in this project's:

    PYTHON apps/transformers_runner.py '{"model": DIR, "steps": 1503, "input_ids": [[...]], ...}'

Prints one line `RESULT {json}`: load time, T5 time, per-step timestamps, EnCodec decode time, end-to-end
times and the process's peak RSS. Batch 1, classifier-free guidance 3, top-k 250 sampling, float32,
`torch.set_flush_denormal(True)`, as many threads as cores. A MusicGen-Melody checkpoint runs as
MusicgenMelodyForConditionalGeneration on the text alone (its default "no melody" chroma).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time


def main() -> None:
    args = json.loads(sys.argv[1])
    import torch
    import transformers
    from transformers import (
        MusicgenForConditionalGeneration,
        MusicgenMelodyForConditionalGeneration,
        StoppingCriteria,
    )

    torch.set_flush_denormal(True)
    torch.set_num_threads(args.get("threads") or os.cpu_count())
    torch.manual_seed(args.get("seed", 0))
    t = time.perf_counter()
    with open(os.path.join(args["model"], "config.json")) as f:
        melody = json.load(f).get("model_type") == "musicgen_melody"
    kind = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
    model = kind.from_pretrained(args["model"], dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t
    ids = torch.tensor(args["input_ids"])
    mask = torch.ones_like(ids)

    class Clock(StoppingCriteria):
        """Called once per generated token: records when each step ended."""

        def __init__(self):
            self.stamps = []

        def __call__(self, input_ids, scores, **kwargs):
            self.stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.inference_mode():
        t5 = []
        for _ in range(5):
            t = time.perf_counter()
            model.text_encoder(input_ids=ids, attention_mask=mask)
            t5.append(time.perf_counter() - t)

    runs = []
    for steps in args["steps"]:
        clock = Clock()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=steps,
                do_sample=True,
                top_k=250,
                guidance_scale=3.0,
                stopping_criteria=[clock],
            )
        wall = time.perf_counter() - t0
        stamps = clock.stamps
        decode_s = t0 + wall - stamps[-1]  # generate() decodes the audio after the last step
        runs.append(
            {
                "steps": len(stamps),
                "samples": int(out.shape[-1]),
                "wall_s": wall,
                "step_ends": [s - t0 for s in stamps],
                "decode_s": decode_s,
            }
        )
    result = {
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "threads": torch.get_num_threads(),
        "load_s": load_s,
        "t5_s": statistics.median(t5),
        "runs": runs,
        "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
