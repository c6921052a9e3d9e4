"""Write a full-size random-weight MusicGen checkpoint in Hugging Face layout (numpy only, no torch).

Used by `musicgen-bench` and by scripts/make_random_checkpoint.py (the command line):

    uv run python scripts/make_random_checkpoint.py --shape small --out /tmp/musicgen-small-random
    uv run python scripts/make_random_checkpoint.py --shape large --out DIR --format bin --dtype float16

The folder holds what `save_pretrained` writes with transformers 5: config.json (the published config of the
shape, from musicgen/shapes/), generation_config.json, `model.safetensors` or `model-0000N-of-0000M.safetensors`
+ `model.safetensors.index.json` (`--format bin`: `pytorch_model*.bin` torch zip files + index, as the 2023
checkpoints), with transformers-5 names (`parametrizations.weight.original0/1`, the tied T5 embedding stored
once as `text_encoder.shared.weight`, EnCodec quantizer buffers), plus a small spiece.model (the test
test fixture's, shipped in musicgen/shapes/; its ids are inside T5's 32128 vocabulary).

Weights are streamed to disk one tensor at a time (memory stays at the largest tensor). Values keep activations
finite and sampling non-trivial: linear weights N(0, 1/fan_in), norms ~1, small biases, LM heads scaled so that
logits have a standard deviation of about 2, weight-norm gains equal to ||v|| times U(0.8, 1.2).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

SHAPES = Path(__file__).resolve().parent.parent / "musicgen" / "shapes"
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16"}
TORCH_STORAGES = {"float32": "FloatStorage", "float16": "HalfStorage"}

# A tensor to write: (name, shape, kind, scale). Kinds: normal, ones, zeros, norm_gain, embed_avg.
Spec = tuple[str, tuple[int, ...], str, float]


def shapes() -> list[str]:
    """The shapes whose published configs ship in musicgen/shapes/."""
    return sorted(p.stem for p in SHAPES.glob("*.json") if p.stem != "generation_config")


def shape_config(shape: str) -> dict:
    """The published composite config of a shape (small, medium, large, stereo-small, ...)."""
    path = SHAPES / f"{shape}.json"
    if not path.exists():
        raise ValueError(f"unknown shape {shape!r} (choose from {', '.join(shapes())})")
    return json.loads(path.read_text())


def linear(name: str, out_dim: int, in_dim: int, gain: float = 1.0) -> Spec:
    return (name, (out_dim, in_dim), "normal", gain / math.sqrt(in_dim))


def layer_norm(prefix: str, dim: int) -> list[Spec]:
    return [(f"{prefix}.weight", (dim,), "ones", 0.05), (f"{prefix}.bias", (dim,), "normal", 0.02)]


def t5_specs(c: dict) -> list[Spec]:
    """T5 encoder tensors (`text_encoder.` prefix); the input embedding is tied to `shared`."""
    d, kv, heads, ff = c["d_model"], c["d_kv"], c["num_heads"], c["d_ff"]
    inner = kv * heads
    specs = [("text_encoder.shared.weight", (c["vocab_size"], d), "normal", 1.0)]
    gated = c.get("feed_forward_proj", "relu").startswith("gated")
    for i in range(c["num_layers"]):
        p = f"text_encoder.encoder.block.{i}.layer"
        specs += [
            linear(
                f"{p}.0.SelfAttention.q", inner, d, 1 / math.sqrt(kv)
            ),  # T5 does not scale scores
            linear(f"{p}.0.SelfAttention.k", inner, d),
            linear(f"{p}.0.SelfAttention.v", inner, d),
            linear(f"{p}.0.SelfAttention.o", d, inner),
        ]
        if i == 0:
            buckets = c["relative_attention_num_buckets"]
            specs.append(
                (
                    f"{p}.0.SelfAttention.relative_attention_bias.weight",
                    (buckets, heads),
                    "normal",
                    0.1,
                )
            )
        specs.append((f"{p}.0.layer_norm.weight", (d,), "ones", 0.05))
        wi = (
            [f"{p}.1.DenseReluDense.wi_0", f"{p}.1.DenseReluDense.wi_1"]
            if gated
            else [f"{p}.1.DenseReluDense.wi"]
        )
        specs += [linear(w, ff, d) for w in wi]
        specs += [
            linear(f"{p}.1.DenseReluDense.wo", d, ff),
            (f"{p}.1.layer_norm.weight", (d,), "ones", 0.05),
        ]
    specs.append(("text_encoder.encoder.final_layer_norm.weight", (d,), "ones", 0.05))
    return [
        (n if n.endswith(("weight", "bias")) else f"{n}.weight", s, k, g) for n, s, k, g in specs
    ]


def conv(prefix: str, out_ch: int, in_ch: int, kernel: int, transposed: bool = False) -> list[Spec]:
    """A weight-normed (transposed) convolution: bias, gain g (original0) and direction v (original1)."""
    shape = (in_ch, out_ch, kernel) if transposed else (out_ch, in_ch, kernel)
    fan_in = in_ch * kernel
    p = f"{prefix}.conv.parametrizations.weight"
    return [
        (f"{prefix}.conv.bias", (out_ch,), "normal", 0.01),
        (f"{p}.original0", (shape[0], 1, 1), "norm_gain", 1.0),
        (f"{p}.original1", shape, "normal", 1 / math.sqrt(fan_in)),
    ]


def lstm(prefix: str, dim: int, layers: int) -> list[Spec]:
    specs = []
    for i in range(layers):
        specs += [
            (f"{prefix}.lstm.weight_ih_l{i}", (4 * dim, dim), "normal", 1 / math.sqrt(dim)),
            (f"{prefix}.lstm.weight_hh_l{i}", (4 * dim, dim), "normal", 1 / math.sqrt(dim)),
            (f"{prefix}.lstm.bias_ih_l{i}", (4 * dim,), "normal", 0.01),
            (f"{prefix}.lstm.bias_hh_l{i}", (4 * dim,), "normal", 0.01),
        ]
    return specs


def resnet_block(prefix: str, c: dict, dim: int) -> list[Spec]:
    hidden = dim // c["compress"]
    specs = conv(f"{prefix}.block.1", hidden, dim, c["residual_kernel_size"])
    specs += conv(f"{prefix}.block.3", dim, hidden, 1)
    if c.get("use_conv_shortcut"):
        specs += conv(f"{prefix}.shortcut", dim, dim, 1)
    return specs


def encodec_specs(c: dict) -> list[Spec]:
    """EnCodec tensors (`audio_encoder.` prefix) in transformers' module order (ELUs take an index too)."""
    nf, ratios, res = c["num_filters"], c["upsampling_ratios"], c["num_residual_layers"]
    specs, i, scale = [], 0, 1
    pre = "audio_encoder.encoder.layers"
    specs += conv(f"{pre}.{i}", nf, c["audio_channels"], c["kernel_size"])
    i += 1
    for ratio in reversed(ratios):
        for _ in range(res):
            specs += resnet_block(f"{pre}.{i}", c, scale * nf)
            i += 1
        specs += conv(f"{pre}.{i + 1}", 2 * scale * nf, scale * nf, 2 * ratio)  # after an ELU
        i += 2
        scale *= 2
    specs += lstm(f"{pre}.{i}", scale * nf, c["num_lstm_layers"])
    specs += conv(f"{pre}.{i + 2}", c["hidden_size"], scale * nf, c["last_kernel_size"])

    pre, i = "audio_encoder.decoder.layers", 0
    specs += conv(f"{pre}.{i}", scale * nf, c["hidden_size"], c["kernel_size"])
    specs += lstm(f"{pre}.{i + 1}", scale * nf, c["num_lstm_layers"])
    i += 2
    for ratio in ratios:
        specs += conv(f"{pre}.{i + 1}", scale * nf // 2, scale * nf, 2 * ratio, transposed=True)
        i += 2
        for _ in range(res):
            specs += resnet_block(f"{pre}.{i}", c, scale * nf // 2)
            i += 1
        scale //= 2
    specs += conv(f"{pre}.{i + 1}", c["audio_channels"], nf, c["last_kernel_size"])

    frame_rate = math.ceil(c["sampling_rate"] / np.prod(ratios))
    quantizers = int(1000 * c["target_bandwidths"][-1] // (frame_rate * 10))
    size, dim = c["codebook_size"], c.get("codebook_dim") or c["hidden_size"]
    for q in range(quantizers):
        p = f"audio_encoder.quantizer.layers.{q}.codebook"
        specs += [
            (f"{p}.inited", (1,), "ones", 0.0),
            (f"{p}.cluster_size", (size,), "ones", 0.0),
            (f"{p}.embed", (size, dim), "normal", 1.0),
            (f"{p}.embed_avg", (size, dim), "embed_avg", 1.0),
        ]
    return specs


def decoder_specs(c: dict, text_dim: int, num_chroma: int | None = None) -> list[Spec]:
    """MusicGen decoder tensors (`decoder.` prefix) and the top-level `enc_to_dec_proj`; with
    `num_chroma`, MusicGen-Melody's (no cross-attention, and `audio_enc_to_dec_proj`)."""
    d, ff, k, vocab = c["hidden_size"], c["ffn_dim"], c["num_codebooks"], c["vocab_size"]
    pre = "decoder.model.decoder"
    specs = [(f"{pre}.embed_tokens.{q}.weight", (vocab + 1, d), "normal", 0.5) for q in range(k)]
    attentions = ("self_attn",) if num_chroma else ("self_attn", "encoder_attn")
    for i in range(c["num_hidden_layers"]):
        p = f"{pre}.layers.{i}"
        for attn in attentions:
            specs += [linear(f"{p}.{attn}.{x}_proj.weight", d, d) for x in ("k", "v", "q", "out")]
            specs += layer_norm(f"{p}.{attn}_layer_norm", d)
        specs += [linear(f"{p}.fc1.weight", ff, d), linear(f"{p}.fc2.weight", d, ff)]
        specs += layer_norm(f"{p}.final_layer_norm", d)
    specs += layer_norm(f"{pre}.layer_norm", d)
    specs += [linear(f"decoder.lm_heads.{q}.weight", vocab, d, 2.0) for q in range(k)]
    if text_dim != d and c.get("cross_attention_hidden_size") is None:
        specs += [
            linear("enc_to_dec_proj.weight", d, text_dim),
            ("enc_to_dec_proj.bias", (d,), "normal", 0.02),
        ]
    if num_chroma and num_chroma != d:
        specs += [
            linear("audio_enc_to_dec_proj.weight", d, num_chroma),
            ("audio_enc_to_dec_proj.bias", (d,), "normal", 0.02),
        ]
    return specs


def tensor_specs(config: dict) -> list[Spec]:
    """Every tensor of the checkpoint, in transformers' state-dict order."""
    return (
        t5_specs(config["text_encoder"])
        + encodec_specs(config["audio_encoder"])
        + decoder_specs(
            config["decoder"],
            config["text_encoder"]["d_model"],
            config.get("num_chroma") if config.get("model_type") == "musicgen_melody" else None,
        )
    )


def draw(spec: Spec, rng: np.random.Generator) -> np.ndarray:
    """float32 values of a normal, ones or zeros tensor."""
    _name, shape, kind, scale = spec
    if kind == "normal":
        return rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    if kind == "ones":
        return 1 + rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return np.zeros(shape, np.float32)


def iter_tensors(specs: list[Spec], dtype: str, seed: int) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, array) in order, one at a time (a weight-norm gain is drawn with its direction)."""
    rng = np.random.default_rng(seed)
    pending: dict[str, np.ndarray] = {}
    for i, spec in enumerate(specs):
        name, shape, kind, _ = spec
        if name in pending:
            x = pending.pop(name)
        elif kind == "norm_gain":  # g = ||v|| * U(0.8, 1.2); v is the next spec
            v = draw(specs[i + 1], rng)
            pending[specs[i + 1][0]] = v
            norm = np.sqrt(np.square(v.reshape(v.shape[0], -1)).sum(axis=1)).reshape(shape)
            x = norm * rng.uniform(0.8, 1.2, shape).astype(np.float32)
        elif kind == "embed_avg":  # EMA sums; with cluster sizes of 1 they equal the codebook
            x = pending.pop("embed")
        else:
            x = draw(spec, rng)
        if name.endswith("codebook.embed"):
            pending["embed"] = x
        yield name, x.astype(dtype)


def nbytes(spec: Spec, dtype: str) -> int:
    return math.prod(spec[1]) * np.dtype(dtype).itemsize


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a number of bytes -> bytes."""
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "B": 1,
    }
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * factor)
    return int(t)


def plan_shards(specs: list[Spec], dtype: str, max_size: int) -> list[list[Spec]]:
    """huggingface_hub's split: in order, start a new shard when the next tensor would overflow."""
    shards, current, size = [], [], 0
    for spec in specs:
        n = nbytes(spec, dtype)
        if current and size + n > max_size:
            shards.append(current)
            current, size = [], 0
        current.append(spec)
        size += n
    return shards + [current] if current else shards


def write_safetensors(
    path: Path, tensors: Iterator[tuple[str, np.ndarray]], specs: list[Spec], dtype: str
) -> None:
    """A safetensors file written tensor by tensor (the header is known from the specs)."""
    header, offset = {}, 0
    for spec in specs:
        n = nbytes(spec, dtype)
        header[spec[0]] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(spec[1]),
            "data_offsets": [offset, offset + n],
        }
        offset += n
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for _ in specs:
            _name, x = next(tensors)
            f.write(np.ascontiguousarray(x).tobytes())


# --- torch zip (.bin) without torch: a protocol-2 pickle whose tensors name their storages by persistent id ---


def _pickle_str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b  # BINUNICODE


def _pickle_int(n: int) -> bytes:
    return b"J" + struct.pack("<i", n)  # BININT


def _pickle_tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def torch_pickle(specs: list[Spec], dtype: str) -> bytes:
    """`OrderedDict(name -> torch._utils._rebuild_tensor_v2(storage, 0, size, stride, False, OrderedDict()))`."""
    storage_cls = _global("torch", TORCH_STORAGES[dtype])
    ordered_dict = _global("collections", "OrderedDict") + b")R"  # OrderedDict()
    out = [b"\x80\x02", ordered_dict, b"("]  # PROTO 2, the dict, MARK for SETITEMS
    for key, spec in enumerate(specs):
        name, shape = spec[0], spec[1]
        stride = [math.prod(shape[i + 1 :]) for i in range(len(shape))]
        pid = _pickle_tuple(
            [
                _pickle_str("storage"),
                storage_cls,
                _pickle_str(str(key)),
                _pickle_str("cpu"),
                _pickle_int(math.prod(shape)),
            ]
        )
        args = _pickle_tuple(
            [
                pid + b"Q",
                _pickle_int(0),
                _pickle_tuple([_pickle_int(n) for n in shape]),
                _pickle_tuple([_pickle_int(s) for s in stride]),
                b"\x89",
                ordered_dict,
            ]
        )  # BINPERSID, NEWFALSE
        out += [_pickle_str(name), _global("torch._utils", "_rebuild_tensor_v2"), args, b"R"]
    out.append(b"u.")  # SETITEMS, STOP
    return b"".join(out)


def write_torch_zip(
    path: Path, tensors: Iterator[tuple[str, np.ndarray]], specs: list[Spec], dtype: str
) -> None:
    """A `torch.save` zip: archive/data.pkl, archive/data/<key> raw storages, byteorder and version."""
    prefix = path.stem.replace(".", "_")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        zf.writestr(f"{prefix}/data.pkl", torch_pickle(specs, dtype))
        zf.writestr(f"{prefix}/byteorder", "little")
        for key, _spec in enumerate(specs):
            _name, x = next(tensors)
            with zf.open(f"{prefix}/data/{key}", "w", force_zip64=True) as f:
                f.write(np.ascontiguousarray(x).tobytes())
        zf.writestr(f"{prefix}/version", "3\n")


def write_checkpoint(
    shape: str,
    out: Path,
    dtype: str = "float32",
    fmt: str = "safetensors",
    shard_size: str = "5GB",
    seed: int = 0,
    config: dict | None = None,
) -> list[Path]:
    """Write the checkpoint folder of a published shape (or of `config`); returns the weight files."""
    config = dict(config or shape_config(shape))
    out.mkdir(parents=True, exist_ok=True)
    config["torch_dtype"] = dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    shutil.copyfile(SHAPES / "generation_config.json", out / "generation_config.json")
    shutil.copyfile(SHAPES / "spiece.model", out / "spiece.model")

    specs = tensor_specs(config)
    shards = plan_shards(specs, dtype, parse_size(shard_size))
    stem, ext = ("model", "safetensors") if fmt == "safetensors" else ("pytorch_model", "bin")
    names = (
        [f"{stem}.{ext}"]
        if len(shards) == 1
        else [f"{stem}-{i + 1:05d}-of-{len(shards):05d}.{ext}" for i in range(len(shards))]
    )
    tensors = iter_tensors(specs, dtype, seed)
    write = write_safetensors if fmt == "safetensors" else write_torch_zip
    for name, shard in zip(names, shards, strict=True):
        write(out / name, tensors, shard, dtype)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(nbytes(s, dtype) for s in specs)},
            "weight_map": {
                spec[0]: name for name, shard in zip(names, shards, strict=True) for spec in shard
            },
        }
        if fmt == "safetensors":
            index["metadata"]["total_parameters"] = sum(math.prod(s[1]) for s in specs)
        (out / f"{stem}.{ext}.index.json").write_text(
            json.dumps(index, indent=2, sort_keys=True) + "\n"
        )
    return [out / n for n in names]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="small", choices=shapes())
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="float32", choices=list(SAFETENSORS_DTYPES))
    parser.add_argument("--format", default="safetensors", choices=["safetensors", "bin"])
    parser.add_argument("--shard-size", default="5GB", help="largest shard (HF style: 5GB, 500MB)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    files = write_checkpoint(
        args.shape, args.out, args.dtype, args.format, args.shard_size, args.seed
    )
    size = sum(f.stat().st_size for f in files)
    print(f"wrote {args.out} ({len(files)} weight file(s), {size / 1e9:.2f} GB)")


if __name__ == "__main__":
    main()
