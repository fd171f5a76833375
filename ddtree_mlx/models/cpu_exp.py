"""e ** x on MLX's CPU backend, built of its vectorized elementwise ops.

MLX's own CPU `exp` takes ~10 ns per element on this x86 machine, while an elementwise multiply or add over the same
array costs ~0.15 ns per element. At a long context a tree verify's attention is mostly
exponentials (every query row scores every cached token, per head, per layer), so there this polynomial makes a
tree node much cheaper. It is within about one float32 ulp of the float64 exp (MLX's CPU exp: a few ulp), so
verify stays exact in the sense the tests hold it to. On Metal MLX's exp is fast: this is not used there.

The method is the classic one: x = n ln 2 + r with |r| <= ln 2 / 2 (ln 2 split in two parts, so that n times the
first is exact in float32), e ** r from a degree-7 polynomial, 2 ** n written straight into the exponent bits.
The shift, the reduction, the polynomial and the exponent bits are one compiled elementwise kernel where MLX finds
a C++ compiler (its CPU `mx.compile`; without one MLX runs the same ops unfused, about twice as slow): at ~14 us an
operation, a one-token step's attention at 1K tokens has little else to spend.
"""

from __future__ import annotations

from functools import partial

import mlx.core as mx

LOG2_E = 1.4426950408889634
LN2_HIGH = 0.693359375  # few mantissa bits: n * LN2_HIGH is exact for every n this range gives
LN2_LOW = -2.12194440e-4  # ln 2 - LN2_HIGH
# e ** r ~ 1 + r + r^2 * (c0 r^5 + c1 r^4 + ... + c5) on |r| <= ln 2 / 2 (the Cephes expf coefficients)
COEFFICIENTS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
# Inputs are clamped here: n is then -127 at the lowest, whose exponent bits make 2 ** n exactly 0, so what would
# be a subnormal result (x below about -87.3) is 0, and so is -inf (a masked score).
LOWEST = -88.0
ROUND = 1.5 * 2**23  # adding and subtracting it rounds a float32 below 2 ** 22 to the nearest integer (floor is slow)


def exp(x: mx.array, shift: mx.array) -> mx.array:
    """e ** (x - shift) for float32 `x - shift` <= 88 (attention scores less their row's maximum: <= 0)."""
    p, bits = reduced(x, shift)
    return p * mx.view(bits, mx.float32)  # a view cannot be compiled shapeless


@partial(mx.compile, shapeless=True)  # one kernel for every shape: a verify's scores grow by a column per token
def reduced(x: mx.array, shift: mx.array) -> tuple[mx.array, mx.array]:
    """(e ** r, the bits of 2 ** n as float32) with x - shift = n ln 2 + r."""
    x = mx.maximum(x - shift, LOWEST)
    n = (x * LOG2_E + ROUND) - ROUND
    r = x - n * LN2_HIGH - n * LN2_LOW
    p = COEFFICIENTS[0] * r + COEFFICIENTS[1]
    for c in COEFFICIENTS[2:]:
        p = p * r + c
    return p * (r * r) + r + 1, (n.astype(mx.int32) + 127) << 23


def on_cpu() -> bool:
    return mx.default_device() == mx.cpu
