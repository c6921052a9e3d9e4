"""Checkpoint reading (safetensors, sharded, .bin without torch), hub resolution and the conversion cache."""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from musicgen import weights as W
from musicgen.torch_pickle import load_torch_file

FIXTURES = Path(__file__).parent / "fixtures"
MONO, OLD, STEREO = (
    FIXTURES / "tiny-musicgen",
    FIXTURES / "tiny-musicgen-2023",
    FIXTURES / "tiny-musicgen-stereo",
)
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def as_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if mx.issubdtype(a.dtype, mx.floating) else a)


def assert_same(a: dict, b: dict, names=None) -> None:
    for name in names or a:
        assert a[name].shape == b[name].shape, name
        np.testing.assert_array_equal(as_np(a[name]), as_np(b[name]), err_msg=name)


# ----------------------------------------------------------------- writing torch files without torch


class Global:
    """Pickles as the global `module.name` (which this process never imports)."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __reduce_ex__(self, protocol):
        return self.name

    def __call__(self, *args):  # pickle wants a callable in a reduce; never called
        raise AssertionError


class Storage:
    def __init__(self, key: str, kind: str, data: np.ndarray):
        self.key, self.kind, self.data = key, kind, data


class Tensor:
    def __init__(self, storage: Storage, offset: int, shape: tuple, stride: tuple):
        self.args = (storage, offset, shape, stride, False, collections.OrderedDict())

    def __reduce_ex__(self, protocol):
        return Global("torch._utils", "_rebuild_tensor_v2"), self.args


class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


class TorchPickler(pickle._Pickler):
    """A pure-Python pickler that writes torch's globals and storage persistent ids."""

    def __init__(self, file, legacy: bool = False):
        super().__init__(file, protocol=2)
        self.legacy = legacy

    def save_global(self, obj, name=None):
        if isinstance(obj, Global):
            self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            pid = ("storage", Global("torch", obj.kind), obj.key, "cpu", obj.data.size)
            return (*pid, None) if self.legacy else pid
        return None


KINDS = {
    np.float32: "FloatStorage",
    np.float16: "HalfStorage",
    np.int64: "LongStorage",
    np.bool_: "BoolStorage",
}


def fake_state_dict(tensors: dict[str, np.ndarray]) -> tuple[dict, list[Storage]]:
    """Contiguous tensors, each in its own storage."""
    storages, state = [], {}
    for i, (name, a) in enumerate(tensors.items()):
        st = Storage(str(i), KINDS[a.dtype.type], a.reshape(-1))
        stride = tuple(s // a.itemsize for s in a.strides)
        storages.append(st)
        state[name] = Tensor(st, 0, a.shape, stride)
    return state, storages


def write_torch_zip(path: Path, state, storages, byteorder="little", compress=zipfile.ZIP_STORED):
    """A `torch.save` zip: archive/data.pkl, archive/data/<key>, archive/byteorder."""
    buf = io.BytesIO()
    TorchPickler(buf).dump(state)
    order = "<" if byteorder == "little" else ">"
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/byteorder", byteorder)
        for st in storages:
            z.writestr(
                f"archive/data/{st.key}",
                st.data.astype(st.data.dtype.newbyteorder(order)).tobytes(),
            )
        z.writestr("archive/version", "3\n")


def write_torch_legacy(path: Path, state, storages):
    """The pre-1.6 `torch.save` stream: magic, protocol, sys info, data, keys, raw storages."""
    buf = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
        pickle.dump(header, buf, protocol=2)
    TorchPickler(buf, legacy=True).dump(state)
    pickle.dump([st.key for st in storages], buf, protocol=2)
    for st in storages:
        buf.write(struct.pack("<q", st.data.size) + st.data.tobytes())
    path.write_bytes(buf.getvalue())


# -------------------------------------------------------------------------------------- reading


def test_safetensors_sharded_and_bin_give_identical_tensors(tmp_path):
    mono = W.load_state_dict(MONO)
    names = sorted(mono)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    halves = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    for file, part in halves.items():
        mx.save_safetensors(str(sharded / file), {n: mono[n] for n in part})
    weight_map = {n: f for f, part in halves.items() for n in part}
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    again = W.load_state_dict(sharded)
    assert sorted(again) == names and all(again[n].dtype == mx.float32 for n in names)
    assert_same(mono, again)

    old = W.load_state_dict(OLD)  # sharded fp16 .bin, 2023 names: weight_g/weight_v
    assert W.weight_files(OLD)[0] == "bin" and len(W.weight_files(OLD)[1]) == 2
    assert {str(v.dtype) for v in old.values()} == {"mlx.core.float16"}
    common = set(mono) & set(old)
    assert len(common) > 100 and all(
        n.startswith(("text_", "audio_", "decoder", "enc_")) for n in common
    )
    assert_same(mono, old, common)  # the weights are fp16-exact
    assert not any("weight_g" in n for n in mono) and any(n.endswith("conv.weight_g") for n in old)


def test_stereo_fp16_bin_shares_the_text_encoder():
    stereo, mono = W.load_state_dict(STEREO), W.load_state_dict(MONO)
    assert W.weight_files(STEREO) == ("bin", [STEREO / "pytorch_model.bin"])
    assert {v.dtype for v in stereo.values()} == {mx.float16}
    text = [n for n in stereo if n.startswith("text_encoder.")]
    assert text
    assert_same(mono, stereo, text)
    heads = [n for n in stereo if n.startswith("decoder.lm_heads.")]
    assert len(heads) == 8


def test_bf16_fp16_strided_bin_fixture():
    got = load_torch_file(FIXTURES / "tensors-bf16.bin")
    expected = np.load(FIXTURES / "expected" / "tensors-bf16.npz")
    assert got["a"].dtype == mx.bfloat16 and got["b"].dtype == mx.float16
    for k in expected.files:
        np.testing.assert_array_equal(as_np(got[k]), expected[k], err_msg=k)


def test_bin_without_torch_every_layout(tmp_path):
    rng = np.random.default_rng(0)
    base = rng.standard_normal(24).astype(np.float32)
    st = Storage("0", "FloatStorage", base)
    half = rng.standard_normal(6).astype(np.float16)
    state = collections.OrderedDict(
        mat=Tensor(st, 0, (4, 6), (6, 1)),
        transposed=Tensor(st, 0, (6, 4), (1, 6)),  # shares the storage, strided
        row=Tensor(st, 12, (6,), (1,)),  # storage offset
        column=Tensor(st, 2, (4,), (6,)),
        scalar=Tensor(st, 5, (), ()),
        empty=Tensor(st, 0, (0, 3), (3, 1)),
        half=Tensor(Storage("1", "HalfStorage", half), 0, (2, 3), (3, 1)),
        ids=Tensor(Storage("2", "LongStorage", np.arange(5, dtype=np.int64)), 0, (5,), (1,)),
        mask=Tensor(Storage("3", "BoolStorage", np.array([True, False])), 0, (2,), (1,)),
    )
    storages = [st, state["half"].args[0], state["ids"].args[0], state["mask"].args[0]]
    mat = base.reshape(4, 6)
    expected = {
        "mat": mat, "transposed": mat.T, "row": base[12:18], "column": mat[:, 2], "scalar": base[5],
        "empty": np.zeros((0, 3), np.float32), "half": half.reshape(2, 3), "ids": np.arange(5),
        "mask": np.array([True, False]),
    }  # fmt: skip
    variants = {
        "zip.bin": lambda p: write_torch_zip(p, state, storages),
        "big-endian.bin": lambda p: write_torch_zip(p, state, storages, byteorder="big"),
        "deflated.bin": lambda p: write_torch_zip(
            p, state, storages, compress=zipfile.ZIP_DEFLATED
        ),
        "legacy.bin": lambda p: write_torch_legacy(p, state, storages),
    }
    for file, write in variants.items():
        write(tmp_path / file)
        got = load_torch_file(tmp_path / file)
        assert sorted(got) == sorted(expected), file
        for k, v in expected.items():
            assert got[k].shape == v.shape, (file, k)
            np.testing.assert_array_equal(np.array(got[k]), v, err_msg=f"{file} {k}")
        assert got["half"].dtype == mx.float16 and got["ids"].dtype == mx.int64
        assert got["mask"].dtype == mx.bool_


def test_bin_broadcast_view_larger_than_its_storage_is_refused(tmp_path):
    """A stride-0 view could ask for any size (3.6 TiB here): refused before any allocation."""
    st = Storage("0", "FloatStorage", np.arange(12, dtype=np.float32))
    ok = {"w": Tensor(st, 0, (3, 4), (0, 1))}  # a broadcast within the storage's size still reads
    write_torch_zip(tmp_path / "ok.bin", ok, [st])
    np.testing.assert_array_equal(
        np.array(load_torch_file(tmp_path / "ok.bin")["w"]), np.tile(np.arange(4), (3, 1))
    )
    huge = {"w": Tensor(st, 0, (10**12,), (0,))}
    write_torch_zip(tmp_path / "huge.bin", huge, [st])
    with pytest.raises(W.WeightsError, match=r"larger than its storage '0' \(12 elements\)"):
        load_torch_file(tmp_path / "huge.bin")


@pytest.mark.parametrize("legacy", [False, True])
@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_bin_is_refused_and_nothing_runs(tmp_path, legacy, payload):
    marker = tmp_path / "pwned"
    if payload == "system":
        evil, name = Evil(os.system, f"touch {marker}"), r"(posix|nt)\.system"
    else:
        evil, name = (
            Evil(eval, f"__import__('pathlib').Path({str(marker)!r}).touch()"),
            r"(__builtin__|builtins)\.eval",
        )
    pickle.loads(pickle.dumps(evil))  # the payload is live: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    state, storages = fake_state_dict({"w": np.ones(3, np.float32)})
    state["x"] = evil
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "pytorch_model.bin"
    (write_torch_legacy if legacy else write_torch_zip)(path, state, storages)
    with pytest.raises(W.WeightsError, match=rf"refusing to unpickle the global '{name}'"):
        W.load_state_dict(folder)
    assert not marker.exists()


def test_corrupt_truncated_and_missing_files(tmp_path):
    def folder_with(name: str, data: bytes) -> Path:
        folder = tmp_path / f"case{len(list(tmp_path.iterdir()))}"
        folder.mkdir()
        (folder / name).write_bytes(data)
        return folder

    bin_bytes = (STEREO / "pytorch_model.bin").read_bytes()
    st_bytes = (MONO / "model.safetensors").read_bytes()
    for folder in (
        folder_with("pytorch_model.bin", bin_bytes[: len(bin_bytes) // 2]),
        folder_with("pytorch_model.bin", b"not a checkpoint at all"),
        folder_with("pytorch_model.bin", b""),
        folder_with("model.safetensors", st_bytes[: len(st_bytes) - 1000]),
        folder_with("model.safetensors", b"\x01\x02"),
        folder_with("config.json", b"{}"),  # no weights at all
        tmp_path / "does-not-exist",
    ):
        with pytest.raises(W.WeightsError):
            W.load_state_dict(folder)
    # an index naming a shard that is not there
    shutil.copytree(OLD, tmp_path / "old")
    (tmp_path / "old" / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(W.WeightsError, match="missing"):
        W.load_state_dict(tmp_path / "old")
    assert issubclass(W.WeightsError, ValueError)


def test_iter_tensors_streams_shard_by_shard():
    index = json.loads((OLD / "pytorch_model.bin.index.json").read_text())["weight_map"]
    files = [index[name] for name, _ in W.iter_tensors(OLD)]
    assert files == sorted(files)  # all of shard 1, then all of shard 2
    assert len(set(files)) == 2 and len(files) == len(index)


def test_load_config_old_and_new_and_unsupported(tmp_path):
    new, old = W.load_config(MONO), W.load_config(OLD)
    assert new["model_type"] == old["model_type"] == "musicgen"
    assert old["dtype"] == old["torch_dtype"] == "float16"
    assert old["decoder"]["num_codebooks"] == new["decoder"]["num_codebooks"] == 4
    bark = json.loads((MONO / "config.json").read_text()) | {"model_type": "bark"}
    (tmp_path / "config.json").write_text(json.dumps(bark))
    msg = "model type 'bark' is not supported yet (supported: musicgen, musicgen_melody)"
    with pytest.raises(W.WeightsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        W.load_config(tmp_path)
    # a melody composite must carry a melody decoder
    melody = json.loads((MONO / "config.json").read_text()) | {"model_type": "musicgen_melody"}
    (tmp_path / "config.json").write_text(json.dumps(melody))
    msg = "decoder model type 'musicgen_decoder' is not supported (expected 'musicgen_melody_decoder')"
    with pytest.raises(W.WeightsError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        W.load_config(tmp_path)


# ------------------------------------------------------------------------------------- resolution


def test_allow_patterns_pick_one_weight_format():
    common = [
        "config.json",
        "generation_config.json",
        "spiece.model",
        "tokenizer.json",
        "README.md",
    ]
    both = common + ["model.safetensors", "pytorch_model.bin"]
    assert W.allow_patterns(both)[-1] == "model.safetensors"
    assert "pytorch_model.bin" not in W.allow_patterns(both)
    sharded = common + ["model.safetensors.index.json", "pytorch_model.bin.index.json"]
    assert W.allow_patterns(sharded)[-1] == "model.safetensors.index.json"
    assert W.allow_patterns(common + ["pytorch_model.bin"])[-1] == "pytorch_model.bin"
    with pytest.raises(W.WeightsError):
        W.allow_patterns(common)


def test_online_resolution_downloads_one_format_and_exactly_the_index_shards(tmp_path, monkeypatch):
    listing = [
        "config.json",
        "spiece.model",
        "model.safetensors.index.json",
        "pytorch_model.bin.index.json",
    ]
    listing += ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "README.md"]
    index = {
        "weight_map": {
            "a": "model-00001-of-00002.safetensors",
            "b": "model-00002-of-00002.safetensors",
        }
    }
    snapshot = tmp_path / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors.index.json").write_text(json.dumps(index))
    calls = []

    def snapshot_download(model, revision, token, patterns, local):
        calls.append((model, revision, token, list(patterns), local))
        return snapshot

    monkeypatch.setattr(W, "_hub_offline", lambda: False)
    monkeypatch.setattr(W, "_repo_files", lambda model, revision, token: listing)
    monkeypatch.setattr(W, "_snapshot", snapshot_download)
    assert W.resolve_model_path("org/big", revision="v1", token="t", progress=False) == snapshot
    assert len(calls) == 2 and all(c[:3] == ("org/big", "v1", "t") and not c[4] for c in calls)
    assert not any(".bin" in p for p in calls[1][3])
    assert sorted(set(calls[1][3]) - set(calls[0][3])) == sorted(set(index["weight_map"].values()))
    with pytest.raises(W.WeightsError, match="no such folder"):
        W.resolve_model_path(str(tmp_path / "not-there"))


def make_hf_cache(root: Path, repo: str, source: Path) -> Path:
    """An HF hub cache holding `source` as repo@COMMIT, with refs/main pointing at it."""
    storage = root / f"models--{repo.replace('/', '--')}"
    snapshot = storage / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (storage / "refs").mkdir()
    (storage / "refs" / "main").write_text(COMMIT)
    return snapshot


def run_offline(hub: Path, cache: Path, code: str) -> dict:
    env = os.environ | {
        "HF_HUB_CACHE": str(hub),
        "HF_HUB_OFFLINE": "1",
        "MUSICGEN_MLX_CACHE": str(cache),
    }
    out = subprocess.run(
        [sys.executable, "-c", "import json, musicgen\nfrom musicgen import weights as W\n" + code],
        env=env, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_offline_resolution_from_the_hf_cache(tmp_path):
    hub, cache = tmp_path / "hub", tmp_path / "cache"
    snapshot = make_hf_cache(hub, "org/tiny-musicgen", OLD)
    code = (
        f"COMMIT = {COMMIT!r}\n"
        + """
res = {"main": str(W.resolve_model_path("org/tiny-musicgen", progress=False)),
       "commit": str(W.resolve_model_path("org/tiny-musicgen", revision=COMMIT))}
try:
    W.resolve_model_path("org/not-cached")
except W.WeightsError as e:
    res["error"] = str(e)
config, weights = W.load_converted("org/tiny-musicgen", dtype="float16", progress=False)
res["entry"] = config["_converted_path"]
res["source"] = W.cache_entries()[0]["source"]
res["decoder"] = str(weights["decoder"]["enc_to_dec_proj.weight"].dtype)
print(json.dumps(res))
"""
    )
    res = run_offline(hub, cache, code)
    assert res["main"] == res["commit"] == str(snapshot.resolve())
    assert "connect once to download it, or pass --model PATH to a local folder" in res["error"]
    assert "org/not-cached" in res["error"]
    assert res["source"] == {"repo": "org/tiny-musicgen", "commit": COMMIT}
    assert res["decoder"] == "mlx.core.float16"
    # the HF snapshot gone, the converted entry still serves offline (commit from our manifest)
    shutil.rmtree(hub)
    code = """
config, weights = W.load_converted("org/tiny-musicgen", dtype="float16", progress=False)
print(json.dumps({"entry": config["_converted_path"], "n": len(weights["decoder"])}))
"""
    again = run_offline(hub, cache, code)
    assert again["entry"] == res["entry"] and again["n"] > 0


# ------------------------------------------------------------------------------- conversion cache


class Spy:
    """A sanitizer that counts its calls and renames nothing."""

    def __init__(self):
        self.calls, self.seen = 0, {}

    def __call__(self, weights):
        self.calls += 1
        self.seen = {k: v.dtype for k, v in weights.items()}
        return dict(weights)


def test_conversion_cache_hit_split_and_dtypes(tmp_path):
    spies = {c: Spy() for c in W.COMPONENTS}
    config, parts = W.load_converted(
        OLD, dtype="float16", cache_dir=tmp_path, sanitizers=spies, progress=False
    )
    assert all(s.calls == 1 for s in spies.values())
    entry = Path(config["_converted_path"])
    assert entry.parent == tmp_path and config["model_type"] == "musicgen"
    source = W.load_state_dict(OLD)
    assert set(parts["decoder"]) == {
        k.removeprefix("decoder.") for k in source if k.startswith(("decoder.", "enc_to_dec_proj."))
    }
    assert "enc_to_dec_proj.weight" in parts["decoder"] and "lm_heads.0.weight" in parts["decoder"]
    assert {v.dtype for v in parts["decoder"].values()} == {mx.float16}
    assert {v.dtype for v in parts["text_encoder"].values()} == {mx.float32}
    assert {
        v.dtype for v in parts["audio_encoder"].values() if mx.issubdtype(v.dtype, mx.floating)
    } == {mx.float32}
    # weight-norm parts reach sanitize as float32, whatever the target
    g = next(k for k in spies["audio_encoder"].seen if k.endswith("weight_g"))
    assert spies["audio_encoder"].seen[g] == mx.float32
    assert_same({k[len("text_encoder.") :]: v for k, v in source.items() if k.startswith("text_encoder.")},
                parts["text_encoder"])  # fmt: skip
    for name in ("manifest.json", "config.json", "spiece.model", "decoder.safetensors"):
        assert (entry / name).is_file()
    assert not (entry / W.VERIFIED_STAMP).exists()  # written, never verified yet
    mtimes = {f.name: f.stat().st_mtime_ns for f in entry.iterdir()}

    config2, parts2 = W.load_converted(
        OLD, dtype="float16", cache_dir=tmp_path, sanitizers=spies, progress=False
    )
    assert all(s.calls == 1 for s in spies.values())  # a hit: nothing converted again
    assert config2["_converted_path"] == str(entry)
    assert (entry / W.VERIFIED_STAMP).is_file()  # the first hit checked the sha256s
    assert mtimes == {
        f.name: f.stat().st_mtime_ns for f in entry.iterdir() if f.name != W.VERIFIED_STAMP
    }
    assert_same(parts["decoder"], parts2["decoder"])

    _, cast = W.load_converted(
        OLD, dtype="bfloat16", cast_encoders=True, cache_dir=tmp_path, progress=False
    )
    assert {v.dtype for v in cast["text_encoder"].values()} == {mx.bfloat16}
    entries = W.cache_entries(tmp_path)
    assert len(entries) == 2 and all(e["ok"] and e["size"] > 0 for e in entries)
    assert {e["dtype"] for e in entries} == {"float16", "bfloat16"}


def test_conversion_cache_stale_and_corrupt_entries_are_rebuilt(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(MONO, src)
    cache = tmp_path / "cache"
    spy = Spy()

    def load(**kw):
        config, parts = W.load_converted(
            src, cache_dir=cache, sanitizers={"decoder": spy}, progress=False, **kw
        )
        return Path(config["_converted_path"]), parts

    first, parts = load()
    assert spy.calls == 1
    # a modified source (new mtime) gives a new entry; the superseded one is removed
    os.utime(src / "model.safetensors", ns=(1, 1))
    second, _ = load()
    assert spy.calls == 2 and second != first and not first.exists()
    assert [e["path"] for e in W.cache_entries(cache)] == [str(second)]
    # a truncated cached file is noticed (sizes are always checked) and the entry rebuilt
    decoder = second / "decoder.safetensors"
    decoder.write_bytes(decoder.read_bytes()[:-100])
    third, again = load()
    assert spy.calls == 3 and third == second
    assert_same(parts["decoder"], again["decoder"])
    # a flipped byte (same size) in a freshly written, never loaded entry: the first load checks the
    # sha256s, so it is caught and the entry rebuilt
    flip_last_byte(decoder)
    assert W.cache_entries(cache)[0]["ok"]  # sizes only: not seen
    fourth, again = load()
    assert spy.calls == 4 and fourth == second
    assert_same(parts["decoder"], again["decoder"])
    assert not W.cache_entries(cache)[0]["verified"]  # the rebuilt entry is not verified yet
    load()
    assert spy.calls == 4 and W.cache_entries(cache)[0]["verified"]
    # once verified, a load checks sizes and the stamp (sizes and mtimes), and hashes nothing; a file
    # rewritten since (its mtime changed) is hashed again, caught and rebuilt
    flip_last_byte(decoder)
    load()
    assert spy.calls == 5
    load()  # (verifies and stamps the rebuilt entry)
    # what is not caught without verify=True: a verified file changed in place with its mtime kept
    # (silent disk corruption)
    flip_last_byte(decoder, keep_mtime=True)
    load()
    assert spy.calls == 5
    assert W.cache_entries(cache)[0]["ok"]
    assert not W.cache_entries(cache, verify=True)[0]["ok"]
    # the failed check dropped the stamp: the next plain load hashes again, and rebuilds
    assert not W.cache_entries(cache)[0]["verified"]
    load()
    assert spy.calls == 6 and W.cache_entries(cache, verify=True)[0]["ok"]
    flip_last_byte(decoder, keep_mtime=True)
    load(verify=True)  # verify=True on a load: caught and rebuilt at once
    assert spy.calls == 7 and W.cache_entries(cache, verify=True)[0]["ok"]
    # a broken entry is still cleared by its model
    decoder.write_bytes(decoder.read_bytes()[:-100])
    assert not W.cache_entries(cache)[0]["ok"]
    assert W.clear_cache(cache, model=src) == 1 and W.cache_entries(cache) == []
    load()
    assert spy.calls == 8
    # a leftover temp folder from a crash is ignored, and cleared by clear_cache()
    (cache / ".tmp-crashed").mkdir()
    assert len(W.cache_entries(cache)) == 1
    assert W.clear_cache(cache, model="org/other") == 0
    assert W.clear_cache(cache, model=src) == 1
    load()
    assert W.clear_cache(cache) == 1 and not any(cache.iterdir())


@pytest.mark.parametrize(
    "breakage",
    [
        {"files": []},
        {"files": "decoder.safetensors"},
        {"files": {"decoder.safetensors": {"sha256": "0" * 64}}},
        {"files": {"../outside": {"size": 1, "sha256": "0" * 64}}},
    ],
    ids=["files a list", "files a string", "no size", "a path outside"],
)
def test_a_manifest_of_the_wrong_shape_is_a_broken_entry(tmp_path, breakage):
    """Valid JSON with the wrong structure: listed as broken, rebuilt on load, and other entries and
    commands unaffected (it crashed cache listing and conversion of any model before)."""
    cache = tmp_path / "cache"
    entry = Path(W.load_converted(MONO, cache_dir=cache, progress=False)[0]["_converted_path"])
    manifest = json.loads((entry / "manifest.json").read_text())
    (entry / "manifest.json").write_text(json.dumps(manifest | breakage))
    [listed] = W.cache_entries(cache)
    assert not listed["ok"] and "unreadable manifest" in listed["error"]
    assert listed["model"] == manifest["model"]  # so that clear_cache(model=...) finds it
    other = W.load_converted(STEREO, cache_dir=cache, progress=False)[0]["_converted_path"]
    assert W.load_converted(MONO, cache_dir=cache, progress=False)[0]["_converted_path"] == str(
        entry
    )
    assert [e["ok"] for e in W.cache_entries(cache, verify=True)] == [True, True]
    assert sorted(e["path"] for e in W.cache_entries(cache)) == sorted([str(entry), other])


def test_a_quantizer_without_quantize_is_not_used(tmp_path):
    cache = tmp_path / "cache"
    spy = Spy()
    plain = W.load_converted(MONO, cache_dir=cache, progress=False)[0]["_converted_path"]
    config, _ = W.load_converted(MONO, cache_dir=cache, quantizer=spy, progress=False)
    assert spy.calls == 0 and config["_converted_path"] == plain and "quantization" not in config
    assert [e["path"] for e in W.cache_entries(cache)] == [plain]


def flip_last_byte(path: Path, keep_mtime: bool = False) -> None:
    """Corrupt a file in place (same size); its mtime kept, or moved 1 s on (so it surely changes)."""
    stat = path.stat()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    mtime = stat.st_mtime_ns + (0 if keep_mtime else 10**9)
    os.utime(path, ns=(stat.st_atime_ns, mtime))


def test_first_load_verifies_once_then_loads_stay_fast(tmp_path, monkeypatch):
    hashed = []
    sha256 = W._sha256
    monkeypatch.setattr(W, "_sha256", lambda path: hashed.append(path.name) or sha256(path))
    config, _ = W.load_converted(MONO, cache_dir=tmp_path, progress=False)
    entry = Path(config["_converted_path"])
    files = json.loads((entry / "manifest.json").read_text())["files"]
    assert sorted(hashed) == sorted(files)  # at write time
    hashed.clear()
    W.load_converted(MONO, cache_dir=tmp_path, progress=False)
    assert sorted(hashed) == sorted(files)  # the first load: every file once
    stamp = json.loads((entry / W.VERIFIED_STAMP).read_text())
    assert sorted(stamp["files"]) == sorted(files)
    hashed.clear()
    for _ in range(2):
        W.load_converted(MONO, cache_dir=tmp_path, progress=False)
        assert W.cache_entries(tmp_path)[0]["verified"]
    assert hashed == []  # later loads (and listings) hash nothing
    W.load_converted(MONO, cache_dir=tmp_path, verify=True, progress=False)
    assert sorted(hashed) == sorted(files)
    # a touched file invalidates the stamp: hashed again on the next load (and found intact)
    hashed.clear()
    os.utime(entry / "config.json", ns=(1, 1))
    assert not W.cache_entries(tmp_path)[0]["verified"]
    W.load_converted(MONO, cache_dir=tmp_path, progress=False)
    assert sorted(hashed) == sorted(files) and W.cache_entries(tmp_path)[0]["verified"]
    # a read-only cache still loads (verified each time, since the stamp cannot be written)
    (entry / W.VERIFIED_STAMP).unlink()

    def read_only(*args, **kwargs):
        raise OSError("read-only file system")

    monkeypatch.setattr(Path, "write_text", read_only)
    _, weights = W.load_converted(MONO, cache_dir=tmp_path, progress=False)
    assert weights["decoder"] and not (entry / W.VERIFIED_STAMP).exists()
    assert not any(f.name.startswith(".") for f in entry.iterdir())


def test_quantizer_hook_is_part_of_the_key(tmp_path):
    calls = []

    def quantizer(weights):
        calls.append(len(weights))
        return {
            k: v.astype(mx.bfloat16) if k.endswith("fc1.weight") else v for k, v in weights.items()
        }

    plain_config, plain = W.load_converted(MONO, cache_dir=tmp_path, progress=False)
    config, quant = W.load_converted(
        MONO, cache_dir=tmp_path, quantize={"bits": 4}, quantizer=quantizer, progress=False
    )
    assert calls == [len(plain["decoder"])]
    assert config["quantization"] == {"bits": 4} and "quantization" not in plain_config
    assert config["_converted_path"] != plain_config["_converted_path"]
    fc1 = [k for k in quant["decoder"] if k.endswith("fc1.weight")]
    assert fc1 and all(quant["decoder"][k].dtype == mx.bfloat16 for k in fc1)
    W.load_converted(
        MONO, cache_dir=tmp_path, quantize={"bits": 4}, quantizer=quantizer, progress=False
    )
    assert len(calls) == 1
    # the key names the converter's code, and for a quantized entry MLX's version (its packing)
    plain_code = json.loads(Path(plain_config["_converted_path"], "manifest.json").read_text())[
        "code"
    ]
    code = json.loads(Path(config["_converted_path"], "manifest.json").read_text())["code"]
    assert (
        plain_code["convert"].startswith("musicgen.weights._convert@") and "mlx" not in plain_code
    )
    assert code["mlx"] == mx.__version__ and code["convert"] == plain_code["convert"]
    with pytest.raises(ValueError, match="quantizer"):
        W.load_converted(MONO, cache_dir=tmp_path, quantize={"bits": 8}, progress=False)


def test_converted_2023_bin_equals_converted_safetensors_with_the_real_sanitizers(tmp_path):
    from encodec.encodec import EncodecConfig, EncodecModel
    from musicgen.model import MusicgenDecoder
    from t5.t5 import T5Encoder

    config = W.load_config(MONO)
    sanitizers = {
        "text_encoder": T5Encoder.sanitize,
        "audio_encoder": EncodecModel(EncodecConfig.from_dict(config["audio_encoder"])).sanitize,
        "decoder": MusicgenDecoder.sanitize,
    }
    _, new = W.load_converted(MONO, cache_dir=tmp_path, sanitizers=sanitizers, progress=False)
    _, old = W.load_converted(OLD, cache_dir=tmp_path, sanitizers=sanitizers, progress=False)
    for component in W.COMPONENTS:
        assert sorted(new[component]) == sorted(old[component]), component
        assert_same(new[component], old[component])


# ---------------------------------------------------------------- every format: identical outputs

FORMATS = ("safetensors", "sharded-safetensors", "bin", "sharded-bin")


def write_checkpoint(folder: Path, source: Path, fmt: str) -> None:
    """`source`'s tensors (names and dtypes as they are) and its config/tokenizer files, in `fmt`."""
    folder.mkdir()
    for aux in (*W.CONFIG_FILES, *W.TOKENIZER_FILES):
        if (source / aux).exists():
            shutil.copyfile(source / aux, folder / aux)
    tensors = W.load_state_dict(source)
    names = sorted(tensors)
    parts = [names[::2], names[1::2]] if fmt.startswith("sharded") else [names]
    ext = "safetensors" if fmt.endswith("safetensors") else "bin"
    stem = "model" if ext == "safetensors" else "pytorch_model"
    files = (
        [f"{stem}-{i + 1:05d}-of-{len(parts):05d}.{ext}" for i in range(len(parts))]
        if len(parts) > 1
        else [f"{stem}.{ext}"]
    )
    for file, part in zip(files, parts, strict=True):
        if ext == "safetensors":
            mx.save_safetensors(str(folder / file), {n: tensors[n] for n in part})
        else:
            write_torch_zip(
                folder / file, *fake_state_dict({n: np.array(tensors[n]) for n in part})
            )
    if len(parts) > 1:
        index = {
            "metadata": {"total_size": sum(tensors[n].nbytes for n in names)},
            "weight_map": {n: f for f, part in zip(files, parts, strict=True) for n in part},
        }
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("names", ["2023", "transformers5"])
def test_every_format_gives_the_expected_greedy_tokens(tmp_path, fmt, names):
    """Single and sharded safetensors and .bin, with 2023 names (weight_g/v, fp16, transformers 4.31
    config) or transformers-5 names (fp32): MusicGen's greedy tokens equal transformers'."""
    from musicgen import MusicGen

    source = OLD if names == "2023" else MONO
    folder = tmp_path / "model"
    write_checkpoint(folder, source, fmt)
    fmt_found, files = W.weight_files(folder)
    assert fmt_found == ("safetensors" if fmt.endswith("safetensors") else "bin")
    assert len(files) == (2 if fmt.startswith("sharded") else 1)
    got = W.load_state_dict(folder)
    assert any(n.endswith(".weight_g") for n in got) == (names == "2023")
    assert_same(W.load_state_dict(source), got)

    prompts = json.loads((FIXTURES / "expected" / "prompts.json").read_text())
    expected = np.load(FIXTURES / "expected" / "generate.npz")["batch_tokens"]
    model = MusicGen.from_pretrained(folder, dtype=mx.float32, progress=False)
    tokens = model.generate_tokens(prompts[:2], max_steps=40, top_k=1, guidance_coef=3.0)
    np.testing.assert_array_equal(np.array(tokens), expected)


def test_a_killed_conversion_leaves_nothing_for_long(tmp_path):
    """A `.tmp-` folder of a process that is gone, untouched for an hour, goes with the next
    conversion; a recent one, or one whose process runs, stays (it may be converting)."""
    tmp_path.joinpath("cache").mkdir()
    stale = tmp_path / "cache" / ".tmp-x--0123456789abcdef-999999-0123abcd"
    recent = tmp_path / "cache" / ".tmp-y--0123456789abcdef-999999-0123abcd"
    running = tmp_path / "cache" / f".tmp-z--0123456789abcdef-{os.getpid()}-0123abcd"
    for folder in (stale, recent, running):
        folder.mkdir()
        (folder / "decoder.safetensors").write_bytes(b"partial")
    hour_ago = time.time() - W.STALE_LEFTOVER_S - 60
    os.utime(stale, (hour_ago, hour_ago))
    os.utime(running, (hour_ago, hour_ago))
    assert [left["size"] for left in W.cache_leftovers(tmp_path / "cache")] == [7, 7, 7]
    W.load_converted(MONO, cache_dir=tmp_path / "cache", progress=False)
    assert not stale.exists() and recent.exists() and running.exists()
    assert W.clear_cache(tmp_path / "cache") == 1  # the entry; the leftovers too
    assert list((tmp_path / "cache").iterdir()) == []
