"""A small, dependency-free reader of a GGUF file's header: metadata and tensor directory.

Why it exists: the adapter must name the model in its manifest (architecture, quant, layers,
vocabulary) on both of its paths, and the `llama-server` path is meant for users who have
only llama.cpp's binaries, not its Python package or gguf-py. It also lets the adapter turn
a malformed file into a one-line error naming the file before llama.cpp sees it.
build_gguf.py uses the tree's own gguf-py (GGUFReader) instead, for the full inspection.

GGUF (v2/v3, little-endian): magic `GGUF`, u32 version, u64 n_tensors, u64 n_kv, then n_kv
(key, type, value) entries, then n_tensors (name, n_dims, dims[n_dims], type, offset)
entries, then the aligned data section.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field

# general.file_type (llama_ftype) -> the name llama-quantize and file names use.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1",
    10: "Q2_K", 11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M",
    16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S",
    22: "IQ3_XS", 23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M",
    28: "IQ2_S", 29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0",
    37: "TQ2_0", 38: "MXFP4_MOE", 39: "NVFP4", 40: "Q1_0", 41: "Q2_0",
}

# ggml_type -> (name, elements per block, bytes per block)
TENSOR_TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20),
    6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 36),
    10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144),
    13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
    19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110),
    22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2),
    26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56),
    30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18), 42: ("Q2_0", 64, 18),
}

# GGUF value types: id -> struct format (scalars); 8 string, 9 array.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
# Upper bounds that no real file reaches; past them the header is garbage, not a model.
_MAX_COUNT = 1 << 24
_MAX_STRING = 1 << 26


class GgufError(Exception):
    """A file that is not a readable GGUF; the message names the file and what is wrong."""


@dataclass
class ArrayInfo:
    """An array value: its element type and length; string arrays keep no items."""

    item_type: int  # a GGUF value type id (8: string)
    length: int
    items: list | None = None  # kept for short arrays only


@dataclass
class TensorInfo:
    name: str
    dims: list[int]  # GGML order: ne[0] (row length) first
    type_id: int
    offset: int  # relative to the data section

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def type_name(self) -> str:
        return TENSOR_TYPES.get(self.type_id, (f"type{self.type_id}", 0, 0))[0]


@dataclass
class GgufHeader:
    path: str
    version: int
    kv: dict = field(default_factory=dict)
    tensors: list[TensorInfo] = field(default_factory=list)
    data_offset: int = 0
    file_size: int = 0

    def get(self, key: str, default=None):
        return self.kv.get(key, default)

    @property
    def architecture(self) -> str | None:
        return self.kv.get("general.architecture")

    def arch_key(self, suffix: str, default=None):
        """`{architecture}.{suffix}`, e.g. `block_count`, `attention.head_count`."""
        return self.kv.get(f"{self.architecture}.{suffix}", default)

    @property
    def quant(self) -> str:
        ft = self.kv.get("general.file_type")
        if ft is None:
            return "unknown"
        return FILE_TYPES.get(int(ft), f"file_type{ft}")

    @property
    def n_vocab(self) -> int | None:
        """Rows of the token embedding (what llama.cpp reports as n_vocab)."""
        for t in self.tensors:
            if t.name == "token_embd.weight" and len(t.dims) >= 2:
                return t.dims[1]
        toks = self.kv.get("tokenizer.ggml.tokens")
        return toks.length if isinstance(toks, ArrayInfo) else None


class _Cursor:
    """Reads from a memory map at a moving offset; reading past the end is a GgufError."""

    def __init__(self, buf, path: str, size: int):
        self.buf, self.path, self.size, self.pos = buf, path, size, 0

    def read(self, n: int) -> bytes:
        if self.pos + n > self.size:
            raise GgufError(f"{self.path}: truncated GGUF header (wanted {n} bytes at offset {self.pos}, file has {self.size})")
        b = self.buf[self.pos:self.pos + n]
        self.pos += n
        return b

    def skip_string(self, what: str) -> None:
        n = self.scalar("<Q")
        if n > _MAX_STRING or self.pos + n > self.size:
            raise GgufError(f"{self.path}: {what} claims a string of {n} bytes at offset {self.pos}; not a valid GGUF")
        self.pos += n

    def scalar(self, fmt: str):
        return struct.unpack(fmt, self.read(struct.calcsize(fmt)))[0]

    def string(self, what: str) -> str:
        n = self.scalar("<Q")
        if n > _MAX_STRING:
            raise GgufError(f"{self.path}: {what} claims a string of {n} bytes; not a valid GGUF")
        return self.read(n).decode("utf-8", errors="replace")

    def value(self, vtype: int, key: str, keep_items: bool):
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string(f"key {key!r}")
        if vtype == _ARRAY:
            item_type = self.scalar("<I")
            n = self.scalar("<Q")
            if n > _MAX_COUNT * 4:
                raise GgufError(f"{self.path}: key {key!r} claims an array of {n} items; not a valid GGUF")
            if item_type in _SCALARS:
                fmt = _SCALARS[item_type]
                raw = self.read(struct.calcsize(fmt) * n)
                items = list(struct.unpack("<" + fmt[1:] * n, raw)) if keep_items and n <= 4096 else None
                return ArrayInfo(item_type, n, items)
            if item_type == _STRING:
                if keep_items and n <= 16:
                    return ArrayInfo(item_type, n, [self.string(f"key {key!r}") for _ in range(n)])
                for _ in range(n):
                    self.skip_string(f"key {key!r}")
                return ArrayInfo(item_type, n, None)
            raise GgufError(f"{self.path}: key {key!r} has an array of unknown type {item_type}")
        raise GgufError(f"{self.path}: key {key!r} has unknown value type {vtype}")


def read_header(path: str) -> GgufHeader:
    """Reads and checks a GGUF header; raises GgufError naming the file on any defect,
    including tensor data that would lie past the end of the file (a truncated download)."""
    try:
        size = os.path.getsize(path)
        f = open(path, "rb")
    except OSError as e:
        raise GgufError(f"{path}: cannot open: {e.strerror}")
    with f:
        if size < 24:
            raise GgufError(f"{path}: {size} bytes is too short for a GGUF header")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            h = _parse(_Cursor(buf, path, size))
    _check_data_fits(h)
    return h


def _parse(c: _Cursor) -> GgufHeader:
    path = c.path
    magic = c.read(4)
    if magic != b"GGUF":
        raise GgufError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = c.scalar("<I")
    if version not in (2, 3):
        raise GgufError(f"{path}: GGUF version {version} is not supported (2 or 3)")
    n_tensors, n_kv = c.scalar("<Q"), c.scalar("<Q")
    if n_tensors > _MAX_COUNT or n_kv > _MAX_COUNT:
        raise GgufError(f"{path}: header claims {n_tensors} tensors and {n_kv} keys; not a valid GGUF")
    h = GgufHeader(path=path, version=version, file_size=c.size)
    for _ in range(n_kv):
        key = c.string("a metadata key")
        vtype = c.scalar("<I")
        h.kv[key] = c.value(vtype, key, keep_items=True)
    for _ in range(n_tensors):
        name = c.string("a tensor name")
        n_dims = c.scalar("<I")
        if n_dims > 4:
            raise GgufError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most 4)")
        dims = [c.scalar("<Q") for _ in range(n_dims)]
        type_id = c.scalar("<I")
        offset = c.scalar("<Q")
        h.tensors.append(TensorInfo(name, dims, type_id, offset))
    align = int(h.kv.get("general.alignment", 32))
    if align <= 0 or align & (align - 1):
        raise GgufError(f"{path}: general.alignment {align} is not a power of two")
    h.data_offset = c.pos + (-c.pos % align)
    return h


def _check_data_fits(h: GgufHeader) -> None:
    for t in h.tensors:
        info = TENSOR_TYPES.get(t.type_id)
        if info is None:
            continue  # a type this reader does not know; llama.cpp will judge it
        _, block, nbytes = info
        if t.dims and t.dims[0] % block != 0:
            raise GgufError(f"{h.path}: tensor {t.name!r} of type {info[0]} has row length {t.dims[0]}, not a multiple of its block size {block}")
        end = h.data_offset + t.offset + t.n_elements // block * nbytes
        if end > h.file_size:
            raise GgufError(f"{h.path}: tensor {t.name!r} ends at byte {end} but the file has {h.file_size} bytes (truncated?)")


# What llama.cpp's graph does when a GGUF carries no key for a checkpoint hyper-parameter:
# architecture -> {config key: (GGUF key suffix that would carry it or None, assumed value, why)}.
# Read from the tree's src/models/*.cpp (qwen3moe: `LLM_FFN_SILU, true` = norm_w, and every
# layer built with an MoE block).
ASSUMED = {
    "qwen3moe": {
        "norm_topk_prob": ("expert_weights_norm", True,
                           "llama.cpp's qwen3moe graph always renormalises the top-k router weights"),
        "decoder_sparse_step": (None, 1, "llama.cpp's qwen3moe graph makes every layer sparse"),
        "mlp_only_layers": (None, [], "llama.cpp's qwen3moe graph makes every layer sparse"),
    },
}
