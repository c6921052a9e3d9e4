"""Write a full-size random-weight MusicGen checkpoint in Hugging Face layout (numpy only, no torch).

    uv run python scripts/make_random_checkpoint.py --shape small --out DIR [--dtype float32|float16]
        [--format safetensors|bin] [--shard-size 5GB] [--seed 0]

Shapes: the published configs in musicgen/shapes/ (small, medium, large, melody, stereo-small, stereo-medium,
stereo-large). The implementation is apps/random_checkpoint.py (musicgen-bench uses it too).
"""

from apps.random_checkpoint import main

if __name__ == "__main__":
    main()
