"""Small @triton.jit helpers shared by the codec kernels: value conversions, RoPE pair maps, the dot.

Conversions to 16-bit and fp8 storage round to nearest even. The fp8 conversions follow PyTorch's
(values beyond the fp8 range become NaN for e4m3fn and inf for e5m2), so kernels and references write
the same bytes. Under the CPU interpreter (INTERP) bf16 rounding and the dot are done in portable
arithmetic because the interpreter's own bf16 paths are not exact.
"""

import triton
import triton.language as tl


@triton.jit
def fp8_bits_to_f32(b, CODE: tl.constexpr):
    """uint8/int32 fp8 bit patterns (CODE 3 = e4m3fn, 4 = e5m2) -> float32 values (exact)."""
    b = b.to(tl.int32) & 0xFF
    sign = b >> 7
    if CODE == 3:
        e = (b >> 3) & 0xF
        m = b & 0x7
        normal = ((e + 120) << 23) | (m << 20)
        val = tl.where(e == 0, m.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
        val = tl.where((e == 15) & (m == 7), float("nan"), val)
    else:
        e = (b >> 2) & 0x1F
        m = b & 0x3
        normal = ((e + 112) << 23) | (m << 21)
        val = tl.where(e == 0, m.to(tl.float32) * 0.0000152587890625, normal.to(tl.float32, bitcast=True))
        val = tl.where(e == 31, tl.where(m == 0, float("inf"), float("nan")), val)
    return tl.where(sign == 1, -val, val)


@triton.jit
def f32_to_fp8_bits(x, CODE: tl.constexpr):
    """float32 -> fp8 bit patterns as uint8, round to nearest even, PyTorch's overflow rules."""
    u = x.to(tl.int32, bitcast=True)
    sign = (u >> 24) & 0x80
    a = u & 0x7FFFFFFF
    af = a.to(tl.float32, bitcast=True)
    if CODE == 3:
        sub = ((af + 16384.0).to(tl.int32, bitcast=True) - (141 << 23)) & 0xFF
        mant_odd = (a >> 20) & 1
        nrm = ((a + ((7 - 127) << 23) + 0x7FFFF + mant_odd) >> 20) & 0xFF
        res = tl.where(a < (121 << 23), sub, nrm)
        res = tl.where(a >= (1087 << 20), 0x7F, res)
    else:
        sub = ((af + 128.0).to(tl.int32, bitcast=True) - (134 << 23)) & 0xFF
        mant_odd = (a >> 21) & 1
        nrm = ((a + ((15 - 127) << 23) + 0xFFFFF + mant_odd) >> 21) & 0xFF
        res = tl.where(a < (113 << 23), sub, nrm)
        res = tl.where(a >= (143 << 23), tl.where(a > (255 << 23), 0x7F, 0x7C), res)
    return (res | sign).to(tl.uint8)


@triton.jit
def load_as_f32(ptrs, mask, CODE: tl.constexpr):
    """Load elements of a buffer holding CODE values (0 f32, 1 f16, 2 bf16, 3/4 fp8 bytes) as float32."""
    if CODE >= 3:
        return fp8_bits_to_f32(tl.load(ptrs, mask=mask, other=0), CODE)
    else:
        return tl.load(ptrs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def f32_to_store(x, CODE: tl.constexpr, INTERP: tl.constexpr):
    """float32 -> the storage element of CODE (round to nearest even)."""
    if CODE == 0:
        return x
    elif CODE == 1:
        return x.to(tl.float16)
    elif CODE == 2:
        if INTERP:
            u = x.to(tl.uint32, bitcast=True)
            r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
            r = tl.where(x != x, 0x7FC0, r)
            return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            return x.to(tl.bfloat16)
    else:
        return f32_to_fp8_bits(x, CODE)


@triton.jit
def mma(a, b, acc, INTERP: tl.constexpr):
    """acc + a @ b with float32 accumulation (tensor cores for 16-bit operands on the GPU)."""
    if INTERP:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        if a.dtype == tl.float32:
            return tl.dot(a, b, acc, input_precision="ieee")
        else:
            return tl.dot(a, b, acc)


@triton.jit
def rint(v):
    """Round float32 to the nearest integer value, ties to even (torch.round), for |v| < 2**22."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + tl.where((d > 0.5) | ((d == 0.5) & odd), 1.0, 0.0)


@triton.jit
def pair_of_dim(d, D: tl.constexpr, R: tl.constexpr, NEOX: tl.constexpr):
    """Head-local dim d -> (pair index in [0, D/2), is first of its pair, partner dim).

    Rotated pairs come first (pair < R/2); pass-through dims (>= R) are paired among themselves
    (their tables hold sin = 0), so every head is D/2 pairs.
    """
    HR: tl.constexpr = R // 2
    if NEOX:
        if R == D:
            first = d < HR
            pair = tl.where(first, d, d - HR)
            partner = tl.where(first, d + HR, d - HR)
        else:
            Q: tl.constexpr = (D - R) // 2
            e = d - R
            rot = d < R
            first = tl.where(rot, d < HR, e < Q)
            pair = tl.where(rot, tl.where(d < HR, d, d - HR), HR + tl.where(e < Q, e, e - Q))
            partner = tl.where(rot, tl.where(d < HR, d + HR, d - HR), d)
    else:
        first = (d % 2) == 0
        pair = d // 2
        partner = d ^ 1
    return pair, first, partner


@triton.jit
def dims_of_pair(pr, D: tl.constexpr, R: tl.constexpr, NEOX: tl.constexpr):
    """Inverse of pair_of_dim: pair index -> (first dim, second dim) inside a head."""
    HR: tl.constexpr = R // 2
    if NEOX:
        if R == D:
            return pr, pr + HR
        else:
            Q: tl.constexpr = (D - R) // 2
            e = pr - HR
            d1 = tl.where(pr < HR, pr, R + e)
            d2 = tl.where(pr < HR, pr + HR, R + Q + e)
            return d1, d2
    else:
        return 2 * pr, 2 * pr + 1


@triton.jit
def layer_base(base_ptr, off_ptr, index, ALIGNED: tl.constexpr):
    """base_ptr + off_ptr[index] (a layer buffer), declared 16-element aligned when ALIGNED."""
    off = tl.load(off_ptr + index)
    if ALIGNED:
        off = tl.multiple_of(off, 16)
    return base_ptr + off
