"""The cache file: bit-exact round trip, and every kind of bad file is refused with a message naming why.

Every check runs through both entry points of the restore pipeline: kvfile.load on the file and
kvfile.load_bytes on its bytes (what the Redis tier calls).
"""

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file


from cag.cache import kvfile
from cag.engines import kvquant
from cag.errors import CacheFileError, CacheMismatchError
from cag.cache.kvfile import Expect
from cacheutil import IDENTITY, cache, resave, saved  # noqa: F401 - cache, saved: fixtures

GOOD = Expect(model="m" * 64, tokenizer="t" * 64, template="p" * 64, knowledge="k" * 64, dtype="float32")


@pytest.fixture(params=["file", "bytes"])
def load(request):
    """kvfile.load on a path, or kvfile.load_bytes on the same file's bytes."""
    if request.param == "file":
        return lambda path, expect=Expect(), **kw: kvfile.load(path, expect, **kw)
    return lambda path, expect=Expect(), **kw: kvfile.load_bytes(Path(path).read_bytes(), expect, where=str(path), **kw)


def test_round_trip_is_bit_exact(saved, cache, load):
    loaded = load(saved, GOOD)
    assert loaded.prefix_ids == cache[1]
    for (k, v), (k2, v2) in zip(cache[0], loaded.layers):
        assert k.dtype == k2.dtype and torch.equal(k, k2) and torch.equal(v, v2)
    m = loaded.manifest
    assert m["tokens"] == 100 and m["dtype"] == "float32" and m["layers"] == 2
    assert m["format_version"] == kvfile.FORMAT_VERSION and m["cag_version"] and m["created"]


def test_bfloat16_round_trip_is_bit_exact(tmp_path, cache, load):
    layers = [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in cache[0]]
    kvfile.save(tmp_path / "b.safetensors", layers, cache[1], IDENTITY)
    loaded = load(tmp_path / "b.safetensors", Expect(dtype="bfloat16"))
    assert all(torch.equal(k, k2) for (k, _), (k2, _) in zip(layers, loaded.layers))


def test_flipped_tensor_byte_is_refused(saved, load):
    data = bytearray(saved.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 1000] ^= 0x01
    saved.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        load(saved, GOOD)


@pytest.mark.parametrize("keep", [0.5, 0.99, 0.001])
def test_truncated_file_is_refused(saved, keep, load):
    data = saved.read_bytes()
    saved.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CacheFileError, match="corrupt or truncated"):
        load(saved, GOOD)


def test_garbage_and_foreign_files_are_refused(tmp_path, load):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(CacheFileError, match="corrupt"):
        load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(3)}, str(foreign))
    with pytest.raises(CacheFileError, match="not a cag cache"):
        load(foreign)
    with pytest.raises(CacheFileError, match="not found"):
        kvfile.load(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("field,expect", [
    ("model", Expect(model="x" * 64)),
    ("tokenizer", Expect(tokenizer="x" * 64)),
    ("prompt template", Expect(template="x" * 64)),
    ("knowledge", Expect(knowledge="x" * 64)),
    ("dtype", Expect(dtype="bfloat16")),
])
def test_file_made_for_something_else_is_refused_naming_it(saved, field, expect, load):
    with pytest.raises(CacheMismatchError) as info:
        load(saved, expect)
    assert info.value.field == field
    assert f"different {field}" in str(info.value)


def test_format_version_is_checked(saved, load):
    resave(saved, edit_manifest=lambda m: m.update(format_version=99))
    with pytest.raises(CacheMismatchError, match="format version"):
        load(saved)


def test_manifest_that_lies_about_tokens_or_shapes_is_refused(saved, load):
    def edit(m):
        m["tokens"] = 99
    resave(saved, edit_manifest=edit)
    with pytest.raises(CacheFileError, match="failed its checksum"):  # the checksum covers the manifest
        load(saved)
    resave(saved, recompute=True)
    with pytest.raises(CacheFileError, match="number of tokens"):
        load(saved)


def test_tensor_swapped_with_recomputed_checksum_passes_only_without_a_key(saved, monkeypatch, load):
    """Without a signing key the checksum only guards against corruption; with a key, tampering is caught."""
    monkeypatch.setenv("CAG_SIGNING_KEY", "s3cret")
    os.remove(saved)
    # a signed file, then an attacker edits a tensor and recomputes the checksum
    layers = [(torch.ones(1, 2, 4, 8), torch.ones(1, 2, 4, 8))]
    kvfile.save(saved, layers, [1, 2, 3, 4], IDENTITY)
    assert load(saved).manifest["signature"]

    def poison(t):
        t["k.0"] = torch.full_like(t["k.0"], 7.0)

    def fix_checksum(m):
        with safe_open(str(saved), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        poison(tensors)
        m["tensors_sha256"] = kvfile._checksum(tensors, m["checksum"], m)

    resave(saved, edit_manifest=fix_checksum, edit_tensors=poison)
    with pytest.raises(CacheFileError, match="bad signature"):
        load(saved)
    monkeypatch.setenv("CAG_SIGNING_KEY", "another-key")
    with pytest.raises(CacheFileError, match="bad signature"):
        load(saved)


def test_unsigned_file_is_refused_when_a_key_is_set(saved, monkeypatch, load):
    monkeypatch.setenv("CAG_SIGNING_KEY", "s3cret")
    with pytest.raises(CacheFileError, match="not signed"):
        load(saved, GOOD)


def test_signed_file_loads_with_the_right_key(tmp_path, cache, monkeypatch, load):
    monkeypatch.setenv("CAG_SIGNING_KEY", "s3cret")
    kvfile.save(tmp_path / "s.safetensors", cache[0], cache[1], IDENTITY)
    assert load(tmp_path / "s.safetensors", GOOD).prefix_ids == cache[1]


def test_failed_save_leaves_previous_file_intact_and_no_temp(saved, cache, monkeypatch):
    before = saved.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(kvfile, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        kvfile.save(saved, cache[0], cache[1], IDENTITY)
    assert saved.read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_killed_writer_never_leaves_a_half_file(tmp_path):
    """SIGKILL a process that keeps rewriting a cache; whatever is on disk afterwards must load."""
    path = tmp_path / "k.safetensors"
    script = textwrap.dedent(f"""
        import torch, sys
        from cag.cache import kvfile
        ident = {IDENTITY!r}
        i = 0
        while True:
            layers = [(torch.full((1, 4, 2000, 64), float(i)), torch.full((1, 4, 2000, 64), float(i))) for _ in range(4)]
            kvfile.save({str(path)!r}, layers, list(range(2000)), ident)
            i += 1
            print(i, flush=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for _ in range(3):  # wait for a few complete writes, then kill mid-stream
        proc.stdout.readline()
    proc.kill()
    proc.wait()
    loaded = kvfile.load(path)
    value = loaded.layers[0][0].flatten()[0].item()
    assert all(torch.all(k == value) for k, _ in loaded.layers)


def test_loading_never_unpickles(saved, monkeypatch, load):
    import pickle

    def refuse(*a, **k):
        raise AssertionError("unpickling attempted")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert load(saved, GOOD).prefix_ids


def test_no_module_can_unpickle():
    import re

    banned = re.compile(r"^\s*(import|from)\s+(pickle|dill|joblib|cloudpickle)\b|pickle\.|torch\.load\(|numpy\.load\(|np\.load\(",
                        re.MULTILINE)
    for f in Path(kvfile.__file__).parent.rglob("*.py"):
        assert not banned.search(f.read_text()), f"{f.name} can unpickle"


def test_int8_kv_file_is_smaller_restores_dtype_and_stays_close(tmp_path, load):
    torch.manual_seed(0)
    layers = [(torch.randn(1, 4, 512, 64).to(torch.bfloat16), torch.randn(1, 4, 512, 64).to(torch.bfloat16))
              for _ in range(3)]
    ids = list(range(512))
    plain, quant = tmp_path / "plain.safetensors", tmp_path / "q.safetensors"
    kvfile.save(plain, layers, ids, IDENTITY)
    manifest = kvfile.save(quant, layers, ids, IDENTITY, kv_quant="int8")
    assert manifest["kv_quant"] == "int8" and manifest["dtype"] == "bfloat16"
    assert quant.stat().st_size < 0.6 * plain.stat().st_size
    loaded = load(quant, Expect(dtype="bfloat16"))
    for (k, v), (k2, v2) in zip(layers, loaded.layers):
        assert k2.dtype == torch.bfloat16 and k2.shape == k.shape
        err = (k2.float() - k.float()).abs().max() / k.float().abs().max()
        assert err < 0.02
    data = bytearray(quant.read_bytes())
    data[-50] ^= 0x10
    quant.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        load(quant)


def test_unknown_quantization_is_refused(tmp_path, cache):
    with pytest.raises(CacheFileError, match="unknown KV quantization"):
        kvfile.save(tmp_path / "x.safetensors", cache[0], cache[1], IDENTITY, kv_quant="int3")


def test_piecewise_checksum_covers_every_piece_of_a_large_tensor(tmp_path, monkeypatch, load):
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    path = tmp_path / "big.safetensors"
    big = torch.randn(1, 2, 3000, 512)  # 12 MiB per tensor: two 8 MiB pieces each
    kvfile.save(path, [(big, big.clone())], list(range(3000)), IDENTITY)
    manifest = load(path).manifest
    assert manifest["checksum"] == kvfile.CHECKSUM
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    assert kvfile._checksum(tensors, kvfile.CHECKSUM, manifest) == manifest["tensors_sha256"] \
        != kvfile._checksum(tensors, None)

    def flip_in_second_piece(t):
        t["v.0"].view(-1)[(kvfile.PIECE // 4) + 10] += 1.0
    resave(path, edit_tensors=flip_in_second_piece)
    with pytest.raises(CacheFileError, match="checksum"):
        load(path)


def test_files_with_the_original_sequential_checksum_still_load(saved, load):
    def legacy(m):
        with safe_open(str(saved), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        del m["checksum"]
        m["tensors_sha256"] = kvfile._checksum(tensors, None)

    resave(saved, edit_manifest=legacy)
    assert "checksum" not in load(saved, GOOD).manifest
    resave(saved, edit_tensors=lambda t: t["k.0"].view(-1)[0].add_(1.0))
    with pytest.raises(CacheFileError, match="checksum"):
        load(saved)


def test_files_with_the_tensor_only_piecewise_checksum_still_load(saved, load):
    """Files written before the checksum covered the manifest: tensor pieces only."""
    def earlier(m):
        with safe_open(str(saved), "pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        m["checksum"] = kvfile.PIECES
        m["tensors_sha256"] = kvfile._checksum(tensors, kvfile.PIECES)

    resave(saved, edit_manifest=earlier)
    assert load(saved, GOOD).manifest["checksum"] == kvfile.PIECES
    resave(saved, edit_tensors=lambda t: t["k.0"].view(-1)[0].add_(1.0))
    with pytest.raises(CacheFileError, match="checksum"):
        load(saved)


@pytest.mark.parametrize("field", ["created", "cag_version", "model"])
def test_informational_manifest_fields_are_covered_by_the_checksum(saved, field, load):
    edits = {"created": "1999-01-01T00:00:00Z", "cag_version": "9.9.9", "model": {**IDENTITY["model"], "path": "/x"}}
    resave(saved, edit_manifest=lambda m: m.update({field: edits[field]}))
    with pytest.raises(CacheFileError, match="failed its checksum"):
        load(saved)


@pytest.mark.parametrize("raw, field", [
    ("[1, 2, 3]", "not a JSON object"), ('"text"', "not a JSON object"),
])
def test_a_manifest_that_is_not_an_object_is_refused_by_name(tmp_path, raw, field, load):
    path = tmp_path / "hand.safetensors"
    save_file({"prefix_ids": torch.tensor([1])}, str(path), metadata={kvfile.MANIFEST_KEY: raw})
    with pytest.raises(CacheFileError, match=field):
        load(path)


@pytest.mark.parametrize("field, value", [
    ("signature", 12345), ("signature", ["a"]), ("tokens", "100"), ("layers", None), ("tensors_sha256", 5),
    ("shapes", [1]), ("model", "m"), ("kv_quant", 8), ("tokens", True),
])
def test_manifest_fields_of_the_wrong_type_are_refused_by_name(saved, monkeypatch, field, value, load):
    monkeypatch.setenv("CAG_SIGNING_KEY", "s3cret")  # a signature check must not crash on a non-string
    resave(saved, edit_manifest=lambda m: m.update({field: value}))
    with pytest.raises(CacheFileError, match=f"field '{field}'"):
        load(saved)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["shapes"]["k"][0].__setitem__(0, True), "shapes"), (lambda m: m["shapes"].update(k="x"), "shapes"),
    (lambda m: m["shapes"].update(extra=[1]), "shapes"), (lambda m: m["knowledge"].update(documents=True), "knowledge"),
    (lambda m: m["model"].update(fingerprint=None), "model"), (lambda m: m["template"].update(f=1.5), "template"),
    (lambda m: m.update(prefill_bounds=[True, m["tokens"]]), "prefill_bounds"),
])
def test_values_inside_manifest_fields_of_the_wrong_type_are_refused_by_name(saved, edit, field, load):
    """A hand-made manifest (digest recomputed, no key set) with true where a whole number belongs, or text
    where a list does, is refused naming the field, not read as 1 or failing later."""
    resave(saved, edit_manifest=edit, recompute=True)
    with pytest.raises(CacheFileError, match=f"field '{field}'"):
        load(saved)


def test_an_int8_cache_is_refused_where_a_float32_one_is_expected(tmp_path, cache, load):
    quant, plain = tmp_path / "q.safetensors", tmp_path / "p.safetensors"
    kvfile.save(quant, cache[0], cache[1], IDENTITY, kv_quant="int8")
    kvfile.save(plain, cache[0], cache[1], IDENTITY)
    with pytest.raises(CacheMismatchError, match="KV storage type.*file has int8, expected float32"):
        load(quant, Expect(kv="float32"))
    with pytest.raises(CacheMismatchError, match="KV storage type.*file has float32, expected int8"):
        load(plain, Expect(kv="int8"))
    assert load(quant, Expect(kv="int8")).manifest["kv_quant"] == "int8"


def test_an_unknown_checksum_method_is_refused(saved, load):
    resave(saved, edit_manifest=lambda m: m.update(checksum="crc32"))
    with pytest.raises(CacheFileError, match="checksum"):
        load(saved)


def test_bytes_in_memory_get_the_same_checks_as_files(saved, cache):
    data = saved.read_bytes()
    loaded = kvfile.load_bytes(data, GOOD, where="redis cache 'x'")
    assert loaded.prefix_ids == cache[1] and all(torch.equal(a[0], b[0]) for a, b in zip(cache[0], loaded.layers))
    with pytest.raises(CacheFileError, match="redis cache 'x'.*(corrupt|truncated)"):
        kvfile.load_bytes(data[: len(data) // 2], where="redis cache 'x'")
    flipped = bytearray(data)
    flipped[-100] ^= 0xFF
    with pytest.raises(CacheFileError, match="checksum"):
        kvfile.load_bytes(bytes(flipped))
    with pytest.raises(CacheFileError, match="corrupt or truncated"):
        kvfile.load_bytes(b"\xff" * 64)
    with pytest.raises(CacheMismatchError, match="model"):
        kvfile.load_bytes(data, kvfile.Expect(model="another"))


def test_int8_round_trip_is_bit_exact_to_what_was_stored(tmp_path, load):
    """An int8 file restores exactly the dequantized values of what it holds (the answer-time KV)."""
    torch.manual_seed(1)
    layers = [(torch.randn(1, 2, 64, 32).to(torch.bfloat16), torch.randn(1, 2, 64, 32).to(torch.bfloat16))
              for _ in range(2)]
    kvfile.save(tmp_path / "q.safetensors", layers, list(range(64)), IDENTITY, kv_quant="int8")
    loaded = load(tmp_path / "q.safetensors", Expect(kv="int8"))
    for (k, v), (k2, v2) in zip(layers, loaded.layers):
        assert torch.equal(kvquant.roundtrip(k), k2) and torch.equal(kvquant.roundtrip(v), v2)


@pytest.mark.parametrize("method", [kvfile.BLAKE3, kvfile.SHA256])
def test_blake3_and_sha256_files_both_verify_and_catch_a_flipped_bit(tmp_path, cache, method, load):
    path = tmp_path / "m.safetensors"
    manifest = kvfile.save(path, cache[0], cache[1], IDENTITY, method=method)
    assert manifest["checksum"] == method
    assert load(path, GOOD).prefix_ids == cache[1]
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="failed its checksum"):
        load(path, GOOD)


def test_new_files_use_blake3_and_fall_back_to_sha256_without_it(tmp_path, cache, monkeypatch, load):
    from cag.cache import checksum

    assert kvfile.CHECKSUM == kvfile.BLAKE3  # blake3 is a dependency: new files get it
    kvfile.save(tmp_path / "b3.safetensors", cache[0], cache[1], IDENTITY)
    monkeypatch.setattr(checksum, "_blake3", None)
    assert checksum.default_method() == kvfile.SHA256
    with pytest.raises(CacheFileError, match="blake3 package is not installed"):
        load(tmp_path / "b3.safetensors", GOOD)
    kvfile.save(tmp_path / "sha.safetensors", cache[0], cache[1], IDENTITY, method=checksum.default_method())
    assert load(tmp_path / "sha.safetensors", GOOD).manifest["checksum"] == kvfile.SHA256


def test_the_digest_does_not_depend_on_the_thread_count(tmp_path, monkeypatch, load):
    from cag.cache import checksum

    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    big = torch.randn(1, 2, 5000, 512)  # 20 MiB per tensor: three pieces each, the last one short
    path = tmp_path / "big.safetensors"
    kvfile.save(path, [(big, big * 2)], list(range(5000)), IDENTITY)
    items = [(b"x|", memoryview(bytes(range(256)) * 100_000)), (b"y|", memoryview(b""))]
    for method in (kvfile.BLAKE3, kvfile.SHA256):
        assert len({checksum.of_buffers(method, {"a": 1}, items, threads=n) for n in (1, 2, 3, 7)}) == 1
    for threads in (1, 2, 5):
        k, v = load(path, threads=threads).layers[0]
        assert torch.equal(k, big) and torch.equal(v, big * 2)


def test_a_file_is_read_once(saved, monkeypatch):
    """The pipeline reads every byte of the file one time (no parse-then-hash second pass)."""
    from cag.cache import restore

    read = []
    real = os.preadv

    def counting(fd, buffers, offset):
        n = real(fd, buffers, offset)
        read.append(n)
        return n

    monkeypatch.setattr(restore.os, "preadv", counting)
    kvfile.load(saved, GOOD)
    assert sum(read) == saved.stat().st_size


def _edit_header(path: Path, edit) -> None:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    raw = edit(head) if edit else None
    raw = raw if isinstance(raw, bytes) else json.dumps(head).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _shift(head, name, by):
    head[name]["data_offsets"] = [o + by for o in head[name]["data_offsets"]]


@pytest.mark.parametrize("edit", [
    lambda h: h["k.0"].update(dtype="F8_E9"),
    lambda h: h["k.0"].update(shape=[1, 2, 3]),
    lambda h: h["k.0"].update(shape=[-1] + h["k.0"]["shape"][1:]),
    lambda h: h["k.0"].update(data_offsets=[0]),
    lambda h: _shift(h, "k.0", 4),
    lambda h: _shift(h, "prefix_ids", -4),
    lambda h: h.update({"extra": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}),
    lambda h: h.update({"__metadata__": {"cag_manifest": 5}}),
    lambda h: (json.dumps(h)[:-1] + ', "k.0": ' + json.dumps(h["k.0"]) + "}").encode(),  # a key twice
    lambda h: b"[1, 2]",
], ids=["dtype", "shape-size", "negative-dim", "offsets", "gap", "overlap", "extra-tensor", "metadata-type",
        "duplicate-key", "not-an-object"])
def test_a_header_that_safetensors_would_refuse_is_refused(saved, edit, load):
    _edit_header(saved, edit)
    with pytest.raises(CacheFileError, match="corrupt or truncated"):
        load(saved)


def test_prefill_bounds_travel_in_the_manifest_and_are_checked(tmp_path, cache, load):
    path = tmp_path / "b.safetensors"
    kvfile.save(path, cache[0], cache[1], {**IDENTITY, "prefill_bounds": [64, 100]})
    assert load(path).manifest["prefill_bounds"] == [64, 100]
    for bad in ([64, 99], [64, 64, 100], [0, 100], ["64", 100], [True, 100], [], 100):
        resave(path, edit_manifest=lambda m: m.update(prefill_bounds=bad), recompute=True)
        with pytest.raises(CacheFileError, match="field 'prefill_bounds'"):
            load(path)
    with pytest.raises(ValueError, match="do not split"):
        kvfile.save(path, cache[0], cache[1], {**IDENTITY, "prefill_bounds": [50, 99]})
