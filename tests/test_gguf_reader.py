"""The GGUF reader against gguf-py's own reader, and against corrupt files (fuzzed headers)."""

from __future__ import annotations

import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.errors import ModelLoadError
from nbllm.gguf import open_gguf


def write_small_gguf(path: Path, *, n_vocab: int = 50) -> Path:
    """A small but complete GGUF: every metadata value type, a vocab array, quantized and float tensors."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_context_length(128)
    w.add_float32("test.f32", 1.5)
    w.add_float64("test.f64", -2.25)
    w.add_int8("test.i8", -3)
    w.add_uint16("test.u16", 65535)
    w.add_int64("test.i64", -(2**40))
    w.add_bool("test.flag", True)
    w.add_string("test.text", "héllo ✓")
    w.add_array("test.ints", [1, 2, 3])
    w.add_array("test.nested", [[1, 2], [3]])
    w.add_token_list([f"tok{i}" if i % 7 else f"é{i}✓" for i in range(n_vocab)])
    w.add_token_scores([float(-i) for i in range(n_vocab)])
    w.add_tensor("a.weight", rng.standard_normal((4, 32), dtype=np.float32))
    q8 = gguf.quants.quantize(rng.standard_normal((8, 64), dtype=np.float32), gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("b.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    w.add_tensor("c.bias", rng.standard_normal(7).astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def plain(value):
    """Metadata as plain Python lists, to compare with gguf-py's `contents()`."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (str, bool, int, float)):
        return value
    return [plain(v) for v in value]


def assert_same_as_gguf_py(path: Path) -> None:
    ours = open_gguf(path)
    ref = gguf.GGUFReader(str(path))
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        info = ours.tensors[t.name]
        assert info.qtype == t.tensor_type
        assert info.shape == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(np.asarray(t.data).view(np.uint8).reshape(-1), ours.tensor_bytes(t.name))
    for key, field in ref.fields.items():
        if key.startswith("GGUF.") or key == "test.nested":  # gguf-py flattens nested arrays
            continue
        value = plain(ours.metadata[key])
        expected = field.contents()
        assert value == pytest.approx(expected) if isinstance(expected, float) else value == expected, key


def test_matches_gguf_py_reader(small_gguf: Path) -> None:
    assert_same_as_gguf_py(small_gguf)
    g = open_gguf(small_gguf)
    assert g.version == 3 and g.architecture == "llama"
    assert g.metadata["test.text"] == "héllo ✓"
    assert plain(g.metadata["test.nested"]) == [[1, 2], [3]]
    assert g.tensors["b.weight"].shape == (8, 64)
    assert g.tensor_bytes_torch("b.weight").numel() == g.tensors["b.weight"].nbytes == 8 * 2 * 34


def test_string_arrays_decode_lazily_and_hash_by_content(small_gguf: Path, tmp_path: Path) -> None:
    tokens = open_gguf(small_gguf).metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 50 and tokens[7] == "é7✓" and list(tokens)[:2] == ["é0✓", "tok1"]
    other = open_gguf(write_small_gguf(tmp_path / "other.gguf", n_vocab=51)).metadata["tokenizer.ggml.tokens"]
    assert tokens.content_key() == open_gguf(small_gguf).metadata["tokenizer.ggml.tokens"].content_key()
    assert tokens.content_key() != other.content_key()


@pytest.mark.slow
def test_default_model_matches_gguf_py_reader(default_model_path: Path) -> None:
    assert_same_as_gguf_py(default_model_path)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda b: b"GGML" + b[4:], "not a GGUF file"),
        (lambda b: b[:4] + struct.pack("<I", 9) + b[8:], "version 9"),
        (lambda b: b[:8] + struct.pack("<Q", 2**62) + b[16:], "tensor infos"),
        (lambda b: b[:16] + struct.pack("<Q", 2**40) + b[24:], "metadata entries"),
        (lambda b: b[:100], "ends"),
        (lambda b: b"", "cannot open"),
    ],
)
def test_corrupt_headers_name_the_file_and_reason(small_gguf: Path, tmp_path: Path, mutate, reason: str) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(mutate(small_gguf.read_bytes()))
    with pytest.raises(ModelLoadError, match=reason) as info:
        open_gguf(bad)
    assert str(bad) in str(info.value)


def test_truncated_tensor_data_is_detected(small_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "short.gguf"
    bad.write_bytes(small_gguf.read_bytes()[:-40])
    with pytest.raises(ModelLoadError, match="runs past the end"):
        open_gguf(bad)


def test_missing_file_and_missing_tensor(small_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="cannot open"):
        open_gguf(tmp_path / "nope.gguf")
    with pytest.raises(ModelLoadError, match="'nope.weight' is missing"):
        open_gguf(small_gguf).tensor_bytes("nope.weight")


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_headers_fail_cleanly(small_gguf: Path, tmp_path: Path, data: st.DataObject) -> None:
    """Random byte edits in the header: either a sound file or a ModelLoadError, never anything else."""
    blob = bytearray(small_gguf.read_bytes())
    header_end = min(open_gguf(small_gguf).tensors["a.weight"].offset, len(blob))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, header_end - 1))
        width = data.draw(st.sampled_from([1, 4, 8]))
        value = data.draw(st.sampled_from([0, 1, 0xFF, 0x7F, 2**31, 2**63, data.draw(st.integers(0, 2**64 - 1))]))
        chunk = (value % (1 << (8 * width))).to_bytes(width, "little")
        blob[pos : pos + width] = chunk[: len(blob) - pos]
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(blob))
    try:
        g = open_gguf(path)
    except ModelLoadError as exc:
        assert str(path) in str(exc)
        return
    for name, info in g.tensors.items():
        assert info.offset + info.nbytes <= len(blob)
        assert g.tensor_bytes(name).size == info.nbytes
    for value in g.metadata.values():
        if hasattr(value, "content_key"):
            list(value)
