"""Checkpoints: reading every published format, Hugging Face Hub resolution, and the conversion cache.

Formats: `model.safetensors`, sharded safetensors (`model.safetensors.index.json`), `pytorch_model.bin`
and sharded `.bin` (`pytorch_model.bin.index.json`), read without torch (see musicgen/torch_pickle.py).
See docs/weights.md for the cache layout and the environment variables.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx

from musicgen.torch_pickle import WeightsError, iter_torch_file

__all__ = [
    "WeightsError",
    "cache_entries",
    "cache_leftovers",
    "cache_root",
    "clear_cache",
    "iter_tensors",
    "load_config",
    "load_converted",
    "load_state_dict",
    "resolve_model_path",
    "weight_files",
]

logger = logging.getLogger(__name__)

COMPONENTS = ("text_encoder", "audio_encoder", "decoder")
SUPPORTED_MODEL_TYPES = ("musicgen", "musicgen_melody")
SUB_MODEL_TYPES = {"text_encoder": "t5", "audio_encoder": "encodec", "decoder": "musicgen_decoder"}
#: the decoder sub-config's model type for each supported composite model type
DECODER_MODEL_TYPES = {"musicgen": "musicgen_decoder", "musicgen_melody": "musicgen_melody_decoder"}
# preprocessor_config.json: MusicGen-Melody's chroma settings (transformers' feature extractor)
CONFIG_FILES = ("config.json", "generation_config.json", "preprocessor_config.json")
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
CACHE_FORMAT = 1
ENTRY_NAME = re.compile(r".+--[0-9a-f]{16}")  # _entry_name(): <slug>--<first 16 hex of the key>
# folders of conversions in progress (or killed) and of removals in progress
LEFTOVER_PREFIXES = (".tmp-", ".trash-")
STALE_LEFTOVER_S = 3600  # a leftover whose process is gone and untouched this long is removed
OFFLINE_HINT = "connect once to download it, or pass --model PATH to a local folder"
WEIGHT_NORM_SUFFIXES = ("weight_g", "weight_v", "original0", "original1")


# ---------------------------------------------------------------------------------------------- reading


def check_companions(folder: str | Path) -> None:
    """WeightsError unless a MusicGen folder has its T5 tokenizer (spiece.model) and, when present,
    a readable generation_config.json."""
    folder = Path(folder)
    if not (folder / "spiece.model").is_file():
        raise WeightsError(f"{folder} has no spiece.model (the T5 tokenizer's vocabulary)")
    generation = folder / "generation_config.json"
    if generation.exists():
        try:
            if not isinstance(json.loads(generation.read_text()), dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise WeightsError(f"corrupt {generation} ({type(e).__name__}: {e})") from None


def weight_files(folder: str | Path) -> tuple[str, list[Path]]:
    """("safetensors" | "bin", the weight files to read in order) of a checkpoint folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"no such checkpoint folder: {folder}")
    for fmt, single, index in (
        ("safetensors", "model.safetensors", "model.safetensors.index.json"),
        ("bin", "pytorch_model.bin", "pytorch_model.bin.index.json"),
    ):
        if (folder / index).exists():
            files = [folder / name for name in sorted(set(_weight_map(folder / index).values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise WeightsError(f"{folder}: shards listed in {index} are missing: {missing}")
            return fmt, files
        if (folder / single).exists():
            return fmt, [folder / single]
    raise WeightsError(
        f"no weights in {folder} (looked for model.safetensors[.index.json] and "
        "pytorch_model.bin[.index.json])"
    )


def _weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightsError(f"{index}: corrupt index ({type(e).__name__}: {e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightsError(f"{index}: corrupt index (weight_map is not a name -> file map)")
    if any("/" in v or "\\" in v or v.startswith(".") for v in weight_map.values()):
        raise WeightsError(f"{index}: shard names must be plain file names")
    return weight_map


def _iter_safetensors(path: Path) -> Iterator[tuple[str, mx.array]]:
    try:
        shard = mx.load(str(path))
    except (RuntimeError, ValueError, OSError) as e:
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    for name in list(shard):
        yield name, shard.pop(name)  # the caller holds the only reference: freed once it is done


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, mx.array]]:
    """Yield (Hugging Face name, array) for every tensor of a checkpoint folder, shard by shard.

    Only one source shard is open at a time; safetensors arrays are lazy (read when evaluated),
    `.bin` tensors are copied out of the memory-mapped shard one by one.
    """
    fmt, files = weight_files(folder)
    folder = Path(folder)
    index = folder / (
        "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    )
    expected = set(_weight_map(index)) if index.exists() else set()
    seen: set[str] = set()
    for path in files:
        reader = _iter_safetensors if fmt == "safetensors" else iter_torch_file
        for name, array in reader(path):
            seen.add(name)
            yield name, array
    missing = sorted(expected - seen)
    if missing:
        raise WeightsError(f"{index}: tensors listed but not found in the shards: {missing[:5]}")


def load_state_dict(folder: str | Path) -> dict[str, mx.array]:
    """All tensors of a checkpoint folder, with their Hugging Face names."""
    return dict(iter_tensors(folder))


def load_config(folder: str | Path, model_types: tuple[str, ...] = SUPPORTED_MODEL_TYPES) -> dict:
    """The config.json of a checkpoint folder (transformers 4.3x or 5.x), checked and normalised.

    `torch_dtype` (4.3x) is mirrored to `dtype` (5.x) at the top level and in the sub-configs.
    """
    path = Path(folder)
    path = path / "config.json" if path.is_dir() else path
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise WeightsError(f"no config.json in {path.parent}") from None
    except (OSError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt config ({e})") from None
    if not isinstance(config, dict):
        raise WeightsError(f"{path}: corrupt config (not a JSON object)")
    model_type = config.get("model_type")
    if model_type not in model_types:
        raise WeightsError(
            f"model type '{model_type}' is not supported yet (supported: {', '.join(model_types)})"
        )
    subs = []
    if model_type in DECODER_MODEL_TYPES:
        expected_types = {**SUB_MODEL_TYPES, "decoder": DECODER_MODEL_TYPES[model_type]}
        for key, expected in expected_types.items():
            sub = config.get(key)
            if not isinstance(sub, dict):
                raise WeightsError(f"{path}: the {model_type} config has no '{key}' sub-config")
            if sub.get("model_type", expected) != expected:
                raise WeightsError(
                    f"{key} model type '{sub['model_type']}' is not supported (expected '{expected}')"
                )
            subs.append(sub)
    for cfg in (config, *subs):
        if "torch_dtype" in cfg and "dtype" not in cfg:
            cfg["dtype"] = cfg["torch_dtype"]
    return config


# ------------------------------------------------------------------------------------------- resolution


def _looks_like_path(model: str) -> bool:
    return (
        model.startswith(("/", ".", "~"))
        or model.count("/") > 1
        or (os.sep != "/" and os.sep in model)
    )


def _hub_offline() -> bool:
    import huggingface_hub

    check = getattr(huggingface_hub, "is_offline_mode", None)
    return bool(check()) if check else bool(huggingface_hub.constants.HF_HUB_OFFLINE)


def _not_cached(model: str, reason: str) -> WeightsError:
    from huggingface_hub import constants

    return WeightsError(
        f"'{model}' is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and {reason}: "
        f"{OFFLINE_HINT}"
    )


def allow_patterns(repo_files: list[str]) -> list[str]:
    """The files of a MusicGen repo to download: configs, tokenizer, and one weight format."""
    patterns = [*CONFIG_FILES, *TOKENIZER_FILES]
    files = set(repo_files)
    for weights in (
        "model.safetensors.index.json",
        "model.safetensors",
        "pytorch_model.bin.index.json",
        "pytorch_model.bin",
    ):
        if weights in files:
            return [*patterns, weights]
    raise WeightsError("the repo has no model.safetensors or pytorch_model.bin weights")


def _not_a_repo(model: str) -> WeightsError:
    return WeightsError(f"'{model}' is neither a local folder nor a Hugging Face repo id")


class _HubUnreachable(Exception):
    """The Hub could not be asked (no network, hub down): the local cache decides."""


def _repo_files(model: str, revision: str | None, token: str | bool | None) -> list[str]:
    """The repo's file list; _HubUnreachable when the hub cannot be reached."""
    from huggingface_hub import HfApi, errors

    try:
        info = HfApi(token=token).model_info(model, revision=revision)
    except errors.RevisionNotFoundError:
        raise WeightsError(f"revision '{revision}' not found in '{model}'") from None
    except (errors.RepositoryNotFoundError, errors.GatedRepoError) as e:
        raise WeightsError(
            f"'{model}' is not a local folder, and the Hugging Face Hub says: {type(e).__name__} "
            "(check the name; for a gated or private repo log in with `hf auth login` or pass a token)"
        ) from None
    except errors.HFValidationError:
        raise _not_a_repo(model) from None
    except Exception as e:  # connection errors, hub down: the cache decides
        raise _HubUnreachable(f"{type(e).__name__}: {e}") from None
    return [s.rfilename for s in info.siblings or []]


def _snapshot(model: str, revision, token, patterns: list[str], local: bool) -> Path:
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            model, revision=revision, token=token, allow_patterns=patterns, local_files_only=local
        )
    )


def resolve_model_path(
    model: str | Path,
    revision: str | None = None,
    token: str | bool | None = None,
    progress: bool = True,
) -> Path:
    """A local checkpoint folder, or a Hub repo id downloaded (only the needed files) into the HF cache.

    Honours the HF cache (`HF_HOME`, `HF_HUB_CACHE`), `HF_HUB_OFFLINE`, revisions and tokens (the usual
    huggingface_hub places when `token` is None).
    """
    model = str(model)
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if _looks_like_path(model):
        raise WeightsError(f"no such folder: {model}")
    from huggingface_hub import utils

    quiet = not progress and not utils.are_progress_bars_disabled()
    if quiet:
        utils.disable_progress_bars()
    try:
        return _resolve_repo(model, revision, token)
    finally:
        if quiet:
            utils.enable_progress_bars()


def _resolve_repo(model: str, revision: str | None, token) -> Path:
    from huggingface_hub import errors
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(model)  # offline too: the cache lookup would raise it unexplained
    except errors.HFValidationError:
        raise _not_a_repo(model) from None

    offline, unreachable = _hub_offline(), None
    if not offline:
        try:
            files = _repo_files(model, revision, token)
        except _HubUnreachable as e:
            unreachable = e
    if offline or unreachable:
        reason = "the Hub cannot be reached" if unreachable else "HF_HUB_OFFLINE is set"
        try:
            folder = _snapshot(model, revision, token, ["config.json"], local=True)
        except (errors.LocalEntryNotFoundError, errors.IncompleteSnapshotError, OSError):
            raise _not_cached(model, reason) from None
        try:
            weight_files(folder)
        except WeightsError as e:
            raise _not_cached(model, f"its cached snapshot is incomplete ({e}); {reason}") from None
        if unreachable:  # said only when the cached copy is used: the error says it otherwise
            logger.warning("Hugging Face Hub unreachable (%s); using the local cache", unreachable)
        return folder
    patterns = allow_patterns(files)
    if patterns[-1].endswith(".index.json"):  # download the index first, then exactly its shards
        folder = _snapshot(model, revision, token, patterns, local=False)
        patterns += sorted(set(_weight_map(folder / patterns[-1]).values()))
    return _snapshot(model, revision, token, patterns, local=False)


# ------------------------------------------------------------------------------------- conversion cache


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The conversion cache folder: `cache_dir`, `$MUSICGEN_MLX_CACHE` or ~/.cache/musicgen-mlx."""
    root = cache_dir or os.environ.get("MUSICGEN_MLX_CACHE") or "~/.cache/musicgen-mlx"
    return Path(root).expanduser()


def _dtype_name(dtype: str | mx.Dtype) -> str:
    for name, value in DTYPES.items():
        if dtype in (name, value):
            return name
    raise ValueError(f"unsupported dtype {dtype!r} (choose from {', '.join(DTYPES)})")


def _code_id(fn: Callable | None) -> str | None:
    """Names a function and hashes its source file, so that a code change invalidates old entries."""
    if fn is None:
        return None
    fn = getattr(fn, "__func__", fn)
    name = f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}"
    try:
        source = Path(inspect.getsourcefile(fn) or "").read_bytes()
    except (TypeError, OSError):
        return name
    return f"{name}@{hashlib.sha256(source).hexdigest()[:16]}"


def _folder_files(folder: Path) -> list[Path]:
    _fmt, weights = weight_files(folder)
    extra = [
        folder / name
        for name in (
            *CONFIG_FILES,
            *TOKENIZER_FILES,
            "model.safetensors.index.json",
            "pytorch_model.bin.index.json",
        )
        if (folder / name).exists()
    ]
    return sorted(set(extra + weights))


def _folder_identity(folder: Path) -> dict:
    files = []
    for f in _folder_files(folder):
        st = f.stat()
        files.append([f.name, st.st_size, st.st_mtime_ns])
    return {"folder": str(folder), "files": files}


def _cached_commit(model: str, revision: str | None, root: Path) -> str | None:
    """The commit a revision points to offline: the HF cache refs, else our newest manifest."""
    from huggingface_hub import constants

    ref_name = revision or constants.DEFAULT_REVISION
    if re.fullmatch(r"[0-9a-f]{40}", ref_name):
        return ref_name
    ref = Path(constants.HF_HUB_CACHE) / f"models--{model.replace('/', '--')}" / "refs" / ref_name
    if ref.is_file():
        return ref.read_text().strip()
    ours = [
        e
        for e in cache_entries(root)
        if e.get("ok") and e["source"].get("repo") == model and e.get("revision") == revision
    ]
    return max(ours, key=lambda e: e["created"])["source"]["commit"] if ours else None


def _repo_commit(model: str, revision: str | None, token, root: Path) -> str | None:
    """The commit of `revision` in a Hub repo (hub when online, else the caches); None if unknown."""
    if not _hub_offline():
        from huggingface_hub import HfApi

        try:
            return HfApi(token=token).model_info(model, revision=revision).sha
        except Exception as e:  # resolved again (with a clear error) by resolve_model_path
            logger.debug("model_info(%s) failed: %s", model, e)
    return _cached_commit(model, revision, root)


def _is_entry(path: Path) -> bool:
    """A conversion in the cache root (not the kernels, the bench's checkpoints, or anything else)."""
    if path.name.startswith(".") or not path.is_dir():
        return False
    return bool(ENTRY_NAME.fullmatch(path.name)) or (path / "manifest.json").is_file()


def cache_leftovers(cache_dir: str | Path | None = None) -> list[dict]:
    """Folders left by interrupted conversions or removals: `path` and `size` (bytes)."""
    return [
        {"path": str(p), "size": _folder_size(p)} for p in _leftover_folders(cache_root(cache_dir))
    ]


def _leftover_folders(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(LEFTOVER_PREFIXES))


def _folder_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # alive, someone else's
        return True
    return True


def _remove_stale_leftovers(root: Path) -> None:
    """Remove what killed conversions (SIGKILL, a power cut) left: gone processes, old folders."""
    for path in _leftover_folders(root):
        pid = (
            re.search(r"-(\d+)-[0-9a-f]{8}$", path.name) if path.name.startswith(".tmp-") else None
        )
        try:
            old = time.time() - path.stat().st_mtime > STALE_LEFTOVER_S
        except OSError:
            continue
        if old and (pid is None or not _pid_alive(int(pid.group(1)))):
            logger.info("removing %s, left by an interrupted conversion", path)
            shutil.rmtree(path, ignore_errors=True)


def _entry_name(model: str, key: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", model.strip("/").replace("/", "--"))[-60:].strip("-.")
    return f"{slug or 'model'}--{key[:16]}"


def _cache_key(identity: dict, options: dict) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "source": identity, **options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _remove(path: Path) -> None:
    """Remove a folder: renamed away first, so a half-removed entry is never seen as an entry."""
    trash = path.parent / f".trash-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        path.rename(trash)
    except FileNotFoundError:
        return
    shutil.rmtree(trash, ignore_errors=True)


VERIFIED_STAMP = "verified.json"


def _file_states(entry: Path, files: dict) -> dict[str, list[int]]:
    """[size, mtime_ns] of each of an entry's files (what a verified stamp records)."""
    return {name: [(st := (entry / name).stat()).st_size, st.st_mtime_ns] for name in files}


def _stamp_valid(entry: Path, files: dict) -> bool:
    """Whether the entry's files were hashed since they were last written (same sizes and mtimes)."""
    try:
        stamp = json.loads((entry / VERIFIED_STAMP).read_text())
        return stamp["files"] == _file_states(entry, files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_stamp(entry: Path, files: dict) -> None:
    """Record that every file of the entry matched its sha256 (atomically; best effort)."""
    stamp = {"verified": time.time(), "files": _file_states(entry, files)}
    tmp = entry / f".{VERIFIED_STAMP}.{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.write_text(json.dumps(stamp, indent=2))
        tmp.replace(entry / VERIFIED_STAMP)
    except OSError as e:  # a read-only cache: verified again next time
        logger.debug("cannot stamp %s as verified: %s", entry, e)
        tmp.unlink(missing_ok=True)


def _check_entry(entry: Path, verify: bool | None) -> dict:
    """The entry's manifest, after checking every file's size and, by `verify`, its sha256.

    verify=True: hash every file; None: hash unless a verified stamp matches the files' current sizes
    and mtimes (i.e. once per entry), then stamp it; False: sizes only.
    """
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        files = manifest["files"]
        for name, meta in files.items():  # the shape a manifest must have, checked before any use
            if Path(name).name != name or not isinstance(meta["size"], int):
                raise ValueError(f"bad file entry {name!r}")
            if not isinstance(meta["sha256"], str):
                raise ValueError(f"bad sha256 of {name!r}")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise WeightsError(f"{entry}: unreadable manifest ({type(e).__name__}: {e})") from None
    if manifest.get("format") != CACHE_FORMAT:
        raise WeightsError(f"{entry}: cache format {manifest.get('format')} != {CACHE_FORMAT}")
    for name, meta in files.items():
        path = entry / name
        if not path.is_file() or path.stat().st_size != meta["size"]:
            raise WeightsError(f"{entry}: {name} is missing or truncated")
    stamped = verify is not True and _stamp_valid(entry, files)
    if verify or (verify is None and not stamped):
        for name, meta in files.items():
            if _sha256(entry / name) != meta["sha256"]:
                # a stamp would let the next load skip hashing (the file kept its size and mtime)
                (entry / VERIFIED_STAMP).unlink(missing_ok=True)
                raise WeightsError(f"{entry}: {name} fails its sha256 check")
        _write_stamp(entry, files)
        stamped = True
    manifest["verified"] = stamped
    return manifest


def _load_entry(entry: Path, verify: bool | None) -> tuple[dict, dict[str, dict[str, mx.array]]]:
    manifest = _check_entry(entry, verify)
    weights = {}
    for component in COMPONENTS:
        path = entry / f"{component}.safetensors"
        try:
            weights[component] = mx.load(str(path))
        except (RuntimeError, ValueError, OSError) as e:
            raise WeightsError(f"{path}: corrupt ({e})") from None
    config = load_config(entry)
    config["_converted_path"] = str(entry)
    if manifest.get("quantize") is not None:
        config["quantization"] = manifest["quantize"]
    return config, weights


def _split(name: str) -> tuple[str | None, str]:
    """Hugging Face composite name -> (component, name inside it)."""
    if name.startswith(("enc_to_dec_proj.", "audio_enc_to_dec_proj.")):
        return "decoder", name
    head, _, rest = name.partition(".")
    return (head, rest) if head in COMPONENTS else (None, name)


def _cast(w: mx.array, dtype: mx.Dtype) -> mx.array:
    return w.astype(dtype) if mx.issubdtype(w.dtype, mx.floating) else w


def _convert(
    folder: Path,
    out: Path,
    dtypes: dict[str, mx.Dtype],
    sanitizers: dict[str, Callable],
    quantizer: Callable | None,
    progress: bool,
) -> None:
    """Stream the source shards, split by component, sanitize, cast, and write one file per component."""
    from tqdm import tqdm

    parts: dict[str, dict[str, mx.array]] = {c: {} for c in COMPONENTS}
    skipped = []
    with tqdm(desc=f"Converting {folder.name}", unit=" tensors", disable=not progress) as bar:
        for name, w in iter_tensors(folder):
            component, sub = _split(name)
            if component is None:
                skipped.append(name)
                continue
            # weight-norm parts (tiny) go to float32 so that sanitize fuses them at full precision
            fused = sub.endswith(WEIGHT_NORM_SUFFIXES)
            w = _cast(w, mx.float32 if fused else dtypes[component])
            mx.eval(w)  # reads it now, so the source shard's data is not held
            parts[component][sub] = w
            bar.update()
    if skipped:
        warnings.warn(
            f"{folder}: ignoring tensors outside the MusicGen components: {skipped[:5]}",
            stacklevel=3,
        )
    for component in COMPONENTS:
        weights = parts.pop(component)
        if not weights:
            raise WeightsError(f"{folder}: the checkpoint has no {component}.* tensors")
        if component in sanitizers:
            weights = sanitizers[component](weights)
        weights = {k: _cast(v, dtypes[component]) for k, v in weights.items()}
        if component == "decoder" and quantizer is not None:
            weights = quantizer(weights)
        mx.eval(weights)
        mx.save_safetensors(
            str(out / f"{component}.safetensors"), weights, metadata={"format": "mlx"}
        )
        del weights


def load_converted(
    model: str | Path,
    *,
    revision: str | None = None,
    dtype: str | mx.Dtype = "float32",
    quantize: object = None,
    cache_dir: str | Path | None = None,
    sanitizers: dict[str, Callable[[dict], dict]] | None = None,
    quantizer: Callable[[dict], dict] | None = None,
    cast_encoders: bool = False,
    token: str | bool | None = None,
    verify: bool = False,
    progress: bool = True,
) -> tuple[dict, dict[str, dict[str, mx.array]]]:
    """(config, {component: weights}) of a MusicGen checkpoint, converted once and cached.

    Components are "text_encoder", "audio_encoder" and "decoder" (which also gets the top-level
    `enc_to_dec_proj.*`), each with the composite prefix stripped and passed through
    `sanitizers[component]`. The decoder is cast to `dtype` (then `quantizer` is applied when
    `quantize` is set); the encoders stay float32 unless `cast_encoders`. The returned config has
    `_converted_path` (the cache entry folder: config, tokenizer files and weights) and, when
    quantized, `quantization` = `quantize`. Sizes are always checked; the sha256 of every cached file
    is checked on the first load of an entry (then a verified stamp is kept, invalidated when a file's
    size or mtime changes), and on every load with `verify=True`. A truncated or corrupt entry is
    rebuilt; an entry for an older source is never used.
    """
    dtype_name = _dtype_name(dtype)
    if quantize is not None and quantizer is None:
        raise ValueError("quantize is set but no quantizer function was given")
    if quantize is None:
        quantizer = None  # only used (and part of the key) when quantize is set
    sanitizers = sanitizers or {}
    unknown = set(sanitizers) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components in sanitizers: {sorted(unknown)}")
    options = {
        "dtype": dtype_name,
        "cast_encoders": cast_encoders,
        "quantize": quantize,
        "code": {c: _code_id(fn) for c, fn in sorted(sanitizers.items())}
        | {"quantizer": _code_id(quantizer), "convert": _code_id(_convert)}
        # MLX's quantized layout (packing, scales) is its own: another MLX converts again
        | ({"mlx": mx.__version__} if quantize is not None else {}),
    }
    json.dumps(options)  # quantize must be JSON (it is part of the key)
    root = cache_root(cache_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise WeightsError(
            f"the conversion cache {root} is not a folder (set MUSICGEN_MLX_CACHE to one)"
        ) from None

    model = str(model)
    path = Path(model).expanduser()
    folder = path.resolve() if path.is_dir() else None
    name = str(folder) if folder else model
    if folder:
        identity = _folder_identity(folder)
    else:
        commit = None if _looks_like_path(model) else _repo_commit(model, revision, token, root)
        identity = {"repo": model, "commit": commit}
    if identity.get("commit", True):  # a hub repo whose commit is unknown can't be looked up
        entry = root / _entry_name(name, _cache_key(identity, options))
        hit = _try_entry(entry, verify or None)
        if hit:
            return hit

    if folder is None:
        folder = resolve_model_path(model, revision=revision, token=token, progress=progress)
        identity = {"repo": model, "commit": folder.name}
    entry = root / _entry_name(name, _cache_key(identity, options))
    hit = _try_entry(entry, verify or None)
    if hit:
        return hit

    config = load_config(folder)  # refuses unsupported model types before any work
    check_companions(folder)
    logger.info("converting %s to %s (once; cached in %s)", name, dtype_name, entry)
    dtypes = {
        c: DTYPES[dtype_name] if c == "decoder" or cast_encoders else mx.float32 for c in COMPONENTS
    }
    _remove_stale_leftovers(root)
    tmp = root / f".tmp-{entry.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
    except PermissionError:
        raise WeightsError(
            f"cannot convert {name}: the conversion cache {root} is not writable "
            "(set MUSICGEN_MLX_CACHE to a writable folder)"
        ) from None
    try:
        _convert(folder, tmp, dtypes, sanitizers, quantizer, progress)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        for aux in (*CONFIG_FILES[1:], *TOKENIZER_FILES):
            if (folder / aux).exists():
                shutil.copyfile(folder / aux, tmp / aux)
        files = {
            f.name: {"size": f.stat().st_size, "sha256": _sha256(f)} for f in sorted(tmp.iterdir())
        }
        manifest = {
            "format": CACHE_FORMAT,
            "model": name,
            "revision": revision,
            "source": identity,
            "key": _cache_key(identity, options),
            **options,
            "created": time.time(),
            "files": files,
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        try:
            tmp.rename(entry)
        except OSError:  # another process wrote the same entry first: use theirs
            if not (entry / "manifest.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    _remove_superseded(root, entry, manifest)
    return _load_entry(entry, verify=False)


def _try_entry(entry: Path, verify: bool | None):
    if not entry.exists():
        return None
    try:
        return _load_entry(entry, verify)
    except WeightsError as e:
        logger.warning("rebuilding the conversion cache entry %s: %s", entry.name, e)
        # a read-only cache keeps it: converting fails next, with a message that says so
        with contextlib.suppress(OSError):
            _remove(entry)
        return None


def _remove_superseded(root: Path, entry: Path, manifest: dict) -> None:
    """Drop older entries for the same model, revision and options (their source or code changed)."""
    same = ("model", "revision", "dtype", "cast_encoders", "quantize")
    for other in cache_entries(root):
        if Path(other["path"]) != entry and all(other.get(k) == manifest[k] for k in same):
            logger.info("removing superseded conversion %s", other["path"])
            _remove(Path(other["path"]))


def _manifest_names(entry: Path) -> dict:
    """The model and revision a broken entry's manifest names, if it can still be read (for clear_cache)."""
    try:
        manifest = json.loads((entry / "manifest.json").read_text())
        return {k: manifest[k] for k in ("model", "revision") if isinstance(manifest.get(k), str)}
    except (OSError, ValueError, AttributeError):
        return {}


def cache_entries(cache_dir: str | Path | None = None, verify: bool = False) -> list[dict]:
    """The conversion cache's entries: each manifest plus `path`, `size` (bytes), `ok`, `error` and
    `verified` (hashed since last written). `verify` hashes every entry's files (and stamps them)."""
    root = cache_root(cache_dir)
    entries = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        if not _is_entry(entry):
            continue
        try:
            info = _check_entry(entry, verify)
            info.update(ok=True, error=None)
        except WeightsError as e:
            info = {**_manifest_names(entry), "ok": False, "error": str(e), "verified": False}
        size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
        entries.append({**info, "path": str(entry), "size": size})
    return entries


def clear_cache(cache_dir: str | Path | None = None, model: str | Path | None = None) -> int:
    """Remove the entries of `model` (a repo id or folder), or all entries and leftovers of interrupted
    conversions (nothing else: not the compiled kernels, nor the bench's checkpoints); returns how many
    entries."""
    root = cache_root(cache_dir)
    if not root.is_dir():
        return 0
    if model is not None:
        path = Path(str(model)).expanduser()
        name = str(path.resolve()) if path.is_dir() else str(model)
        doomed = [Path(e["path"]) for e in cache_entries(root) if e.get("model") == name]
    else:
        doomed = [p for p in root.iterdir() if _is_entry(p)]
        for path in _leftover_folders(root):
            shutil.rmtree(path, ignore_errors=True)
    for path in doomed:
        _remove(path)
    return len(doomed)
