"""T5 text encoder and tokenizer: parity with transformers' T5EncoderModel and T5Tokenizer."""

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from t5 import T5Config, T5Encoder, T5Tokenizer, relative_position_bucket

FIXTURES = Path(__file__).parent / "fixtures"
EXPECTED = FIXTURES / "expected"
FOLDERS = ["tiny-musicgen", "tiny-t5"]
PROMPTS = json.loads((EXPECTED / "prompts.json").read_text())

# transformers 5.23 T5Tokenizer on tests/fixtures/tiny-t5: whitespace, special tokens in the text, the
# nmt_nfkc character map applied per grapheme, fused unknown characters.
TOKENIZER_CASES = [
    ("", [1]),
    ("   ", [1]),
    ("  happy\t\trock \n", [21, 55, 11, 7, 3, 56, 14, 17, 1]),
    ("happy\xa0rock\u3000drums\u2003x", [21, 55, 11, 7, 3, 56, 14, 17, 31, 3, 2, 1]),
    ("happy\r\nrock", [21, 55, 11, 7, 3, 56, 14, 17, 1]),
    ("rock</s>pop<pad>", [3, 56, 14, 17, 1, 66, 11, 0, 1]),
    (
        "drums <extra_id_0> bass<extra_id_99><extra_id_100>",
        [31, 199, 20, 100, 3, 2, 13, 2, 24, 90, 16, 2, 5, 4, 2, 85, 84, 84, 2, 1],
    ),
    ("ＨＡＰＰＹ ｒｏｃｋ １２８", [3, 2, 3, 56, 14, 17, 3, 85, 86, 44, 1]),
    ("Ｂ\u0301ass ﬁ\u0301", [3, 2, 89, 60, 5, 1]),
    ("a\u200b\u0301b", [9, 3, 2, 41, 1]),
    ("♫♫♫ ☃ rock", [3, 2, 3, 2, 3, 56, 14, 17, 1]),
    ("▁rock▁▁pop", [3, 56, 14, 17, 66, 11, 1]),
    ("café cafe\u0301", [40, 16, 38, 2, 40, 16, 38, 2, 1]),
]


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def expected():
    return dict(np.load(EXPECTED / "t5.npz"))


@pytest.fixture(scope="module", params=FOLDERS)
def encoder(request) -> T5Encoder:
    return T5Encoder.from_pretrained(FIXTURES / request.param)


@pytest.mark.parametrize("folder", FOLDERS)
def test_tokenizer_batch_matches_reference(folder, expected):
    tokenizer = T5Tokenizer.from_pretrained(FIXTURES / folder)
    ids, mask = tokenizer.encode(PROMPTS)
    assert ids.dtype == mx.int32 and mask.dtype == mx.int32
    np.testing.assert_array_equal(np.array(ids), expected["input_ids"])
    np.testing.assert_array_equal(np.array(mask), expected["attention_mask"])


def test_tokenizer_single_prompts(expected):
    tokenizer = T5Tokenizer.from_pretrained(FIXTURES / "tiny-t5")
    for i, prompt in enumerate(PROMPTS):
        ids, mask = tokenizer.encode(prompt)
        np.testing.assert_array_equal(np.array(ids), expected[f"ids_{i}"])
        assert np.array(mask).tolist() == [[1] * expected[f"ids_{i}"].shape[1]]


@pytest.mark.parametrize(("text", "ids"), TOKENIZER_CASES)
def test_tokenizer_edge_cases(text, ids):
    tokenizer = T5Tokenizer.from_pretrained(FIXTURES / "tiny-t5")
    assert tokenizer.tokenize(text) == ids


def test_tokenizer_special_ids_and_padding():
    tokenizer = T5Tokenizer.from_pretrained(FIXTURES / "tiny-musicgen")
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 1, 200)
    ids, mask = tokenizer.encode(["", "happy rock"])
    assert np.array(ids).tolist() == [[1] + [0] * 8, [21, 55, 11, 7, 3, 56, 14, 17, 1]]
    assert np.array(mask).tolist() == [[1] + [0] * 8, [1] * 9]
    with pytest.raises(ValueError, match="at least one prompt"):
        tokenizer.encode([])


def test_relative_position_bucket_hand_values():
    # bidirectional, 32 buckets, max distance 128: 16 per direction, exact below 8, then
    # 8 + floor(8 * log(n / 8) / log(16)) capped at 15; positive offsets (keys after the query) add 16.
    offsets = [0, -1, 1, -7, 7, -8, 8, -11, -12, -16, 16, -32, -64, -127, -128, 127, 1000, -1000]
    buckets = [0, 1, 17, 7, 23, 8, 24, 8, 9, 10, 26, 12, 14, 15, 15, 31, 31, 15]
    got = relative_position_bucket(mx.array(offsets), num_buckets=32, max_distance=128)
    assert got.tolist() == buckets


def test_encoder_single_prompts(encoder, expected):
    for i in range(len(PROMPTS)):
        hidden = encoder(mx.array(expected[f"ids_{i}"]))
        assert hidden.shape == expected[f"hidden_{i}"].shape
        assert hidden.dtype == mx.float32
        assert rel_err(hidden, expected[f"hidden_{i}"]) <= 1e-4


def test_encoder_padded_batch(encoder, expected):
    mask = expected["attention_mask"]
    hidden = np.array(encoder(mx.array(expected["input_ids"]), mx.array(mask)))
    assert hidden.shape == expected["hidden"].shape
    assert np.isfinite(hidden).all()
    valid = mask.astype(bool)
    assert rel_err(hidden[valid], expected["hidden"][valid]) <= 1e-4
    for i in range(len(PROMPTS)):  # each row equals the prompt encoded alone
        n = int(mask[i].sum())
        assert rel_err(hidden[i, :n], expected[f"hidden_{i}"][0]) <= 1e-4


def test_composite_and_standalone_folders_agree(expected):
    ids, mask = mx.array(expected["input_ids"]), mx.array(expected["attention_mask"])
    composite = T5Encoder.from_pretrained(FIXTURES / "tiny-musicgen")
    standalone = T5Encoder.from_pretrained(FIXTURES / "tiny-t5")
    a, b = dict(tree_flatten(composite.parameters())), dict(tree_flatten(standalone.parameters()))
    assert a.keys() == b.keys()
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    np.testing.assert_array_equal(np.array(composite(ids, mask)), np.array(standalone(ids, mask)))


def test_half_precision(expected):
    encoder = T5Encoder.from_pretrained(FIXTURES / "tiny-t5", dtype=mx.float16)
    hidden = encoder(mx.array(expected["ids_1"]))
    assert hidden.dtype == mx.float16
    assert rel_err(hidden.astype(mx.float32), expected["hidden_1"]) <= 2e-2


def test_config_from_dict():
    params = json.loads((FIXTURES / "tiny-musicgen" / "config.json").read_text())["text_encoder"]
    config = T5Config.from_dict({**params, "some_future_key": 1})
    assert (config.d_model, config.d_kv, config.num_heads, config.num_layers) == (32, 8, 4, 2)
    assert (config.vocab_size, config.feed_forward_proj, config.activation) == (208, "relu", "relu")
    gated = T5Config.from_dict({"feed_forward_proj": "gated-gelu"})
    assert gated.is_gated and gated.activation == "gelu_new"
    with pytest.raises(ValueError, match="feed_forward_proj"):
        T5Encoder(T5Config(feed_forward_proj="gated-nope", num_layers=1))


def test_sanitize_maps_hf_names():
    config = T5Config(
        d_model=8, d_kv=2, num_heads=2, d_ff=16, num_layers=2, vocab_size=10,
        feed_forward_proj="gated-gelu",
    )  # fmt: skip
    model = T5Encoder(config)
    ours = dict(tree_flatten(model.parameters()))
    hf = {"shared.weight": mx.zeros((10, 8)), "encoder.final_layer_norm.weight": mx.ones((8,))}
    hf["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = mx.zeros((32, 2))
    for i in range(2):
        p = f"encoder.block.{i}.layer."
        for n in "qkvo":
            hf[p + f"0.SelfAttention.{n}.weight"] = mx.zeros((4, 8) if n != "o" else (8, 4))
        hf[p + "0.layer_norm.weight"] = hf[p + "1.layer_norm.weight"] = mx.ones((8,))
        hf[p + "1.DenseReluDense.wi_0.weight"] = hf[p + "1.DenseReluDense.wi_1.weight"] = mx.zeros(
            (16, 8)
        )
        hf[p + "1.DenseReluDense.wo.weight"] = mx.zeros((8, 16))
    extra = {
        "decoder.block.0.layer.0.SelfAttention.q.weight": mx.zeros((4, 8)),
        "decoder.final_layer_norm.weight": mx.ones((8,)),
        "lm_head.weight": mx.zeros((10, 8)),
    }
    weights = T5Encoder.sanitize({**hf, **extra})
    assert weights.keys() == ours.keys()
    assert all(weights[k].shape == ours[k].shape for k in ours)
    model.load_weights(list(weights.items()), strict=True)
    # an untied checkpoint's own encoder embedding wins over `shared`
    own = {"encoder.embed_tokens.weight": mx.ones((10, 8))}
    for untied in ({**hf, **own}, {**own, **hf}):
        assert T5Encoder.sanitize(untied)["embed_tokens.weight"].sum().item() == 80


def test_2023_checkpoint_with_only_shared_embedding(expected):
    """Sharded fp16 .bin files, 2023 config, the embedding stored once as text_encoder.shared.weight."""
    folder = FIXTURES / "tiny-musicgen-2023"
    assert len(list(folder.glob("pytorch_model-*.bin"))) == 2  # sharded .bin, no safetensors
    assert not list(folder.glob("*.safetensors"))
    encoder = T5Encoder.from_pretrained(folder)
    hidden = encoder(mx.array(expected["input_ids"]), mx.array(expected["attention_mask"]))
    valid = expected["attention_mask"].astype(bool)
    assert rel_err(np.array(hidden)[valid], expected["hidden"][valid]) <= 1e-4
