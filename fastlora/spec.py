"""Definitions the fast kernels and their NumPy twins must agree on bit for bit.

Both sides import them from here, so neither depends on the other: the NF4 code table, its
decision thresholds and block layout (the format is described in fastlora.reference.nf4), and
the keep rule of LoRA's hashed dropout (fastlora.reference.lora).
"""
import math

import numpy as np

# bitsandbytes' NF4 table (csrc/kernels.cu, dDequantizeNF4): float32 values, index = 4-bit code.
NF4_CODE = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=np.float32)
NF4_CODE.setflags(write=False)

# Decision thresholds: the midpoints between neighbouring codes (bitsandbytes' dQuantizeNF4 uses
# the same ones). A normalised value v gets code #{k : v > NF4_THRESHOLDS[k]}: the nearest code,
# ties going to the lower one. Computed in float64, where the midpoint of two float32s is exact.
NF4_THRESHOLDS = (NF4_CODE[:-1].astype(np.float64) + NF4_CODE[1:].astype(np.float64)) / 2.0
NF4_THRESHOLDS.setflags(write=False)

ZERO_CODE = 7          # NF4_CODE[7] == 0.0: all-zero blocks and the padding nibble
DQ_BLOCK_SIZE = 256    # absmax values per double-quantization block
DQ_MAX_CODE = 127      # symmetric int8: codes in [-127, 127]; -128 is never written


def num_blocks(n, block_size):
    return -(-n // block_size)


def dropout_threshold(p):
    """Keep an element when its 32-bit hash is >= this (so P(keep) = 1 - p, p in steps of 2**-32)."""
    return min(int(math.ceil(p * 2.0 ** 32)), 2 ** 32 - 1)
