"""Dense bit packing of codebook indices, shared by the ONNX and safetensors exporters.

Packing order ("lsb0", little-endian bits): the indices form one bit stream, element `i` taking bits
`i*bits .. i*bits + bits - 1` with its least significant bit first, and stream bit `j` is bit
`j % 8` (counting from the least significant) of byte `j // 8`. An element may straddle two bytes
when `bits` does not divide 8. For 2 and 4 bits this is exactly ONNX's UINT2/UINT4 layout (element 0
in the low bits of byte 0), so the same bytes serve as those tensors' raw data.

    >>> pack_bits(np.array([1, 2, 3, 0]), 2).tolist()     # 0b00_11_10_01
    [57]
"""

from __future__ import annotations

import math

import numpy as np

PACKING = "lsb0"


def packed_size(n: int, bits: int) -> int:
    """Bytes `n` indices of `bits` bits take when packed densely."""
    return math.ceil(n * bits / 8)


def pack_bits(indices: np.ndarray, bits: int) -> np.ndarray:
    """Pack non-negative integers below 2**bits into a uint8 array of `packed_size(n, bits)` bytes."""
    flat = np.ascontiguousarray(indices).reshape(-1).astype(np.int64, copy=False)
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if flat.size and (flat.min() < 0 or flat.max() >= 1 << bits):
        raise ValueError(f"indices must lie in 0..{(1 << bits) - 1} to pack into {bits} bits")
    if bits == 8:
        return flat.astype(np.uint8)
    planes = (flat[:, None] >> np.arange(bits)) & 1
    return np.packbits(planes.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_bits(packed: np.ndarray, bits: int, n: int) -> np.ndarray:
    """Inverse of `pack_bits`: the first `n` indices as int64."""
    data = np.asarray(packed, dtype=np.uint8).reshape(-1)
    if data.size < packed_size(n, bits):
        raise ValueError(f"{data.size} packed bytes cannot hold {n} indices of {bits} bits")
    if bits == 8:
        return data[:n].astype(np.int64)
    planes = np.unpackbits(data, bitorder="little")[: n * bits].reshape(n, bits).astype(np.int64)
    return planes @ (np.int64(1) << np.arange(bits, dtype=np.int64))
