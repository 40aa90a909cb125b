"""PyTorch route of the batched pool codec: the same operations as `triton/payload_rows.py`, in tensor ops.

Every function takes the same arguments as its kernel counterpart and produces the same payload bytes. The
difference is where payload bytes are touched: the kernels read and write them in the blob rows directly;
this route gathers the batch's blob rows into a staging tensor first (`Staging`: staging row i holds the
row at rows_cat[i], so job j's payload starts at staging byte rows_off[j] * row_bytes), works on it, and
(encode) writes the rows back. No function here reads a device tensor on the host: sizes come from the
host-side layouts, data-dependent choices are `torch.where`s (a row write whose buffer depends on the row
table is one `index_put_` per buffer, see `scatter_rows`).

Arithmetic is the reference codec's (`quantize.group_params` / `quantize_groups`, float32 coefficients),
so the bytes equal `KVTCCodec`'s payload bytes for the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtc_sglang.codec.batch_plan import DecodePlan, EncodePlan
from kvtc_sglang.codec.crc32 import crc32_rows_reference
from kvtc_sglang.codec.launches import LAUNCHES
from kvtc_sglang.codec.triton.pool_rows import PoolRows
from kvtc_sglang.codec.quantize import group_params, quantize_groups
from kvtc_sglang.codec.triton import reference as _ref
from kvtc_sglang.codec.triton.tables import BlockTables


# the shared feature-gather / projection / reconstruction references, counted as the kernels they stand for
def gather_features(*args) -> None:
    LAUNCHES.count("_gather_features_kernel")
    _ref.gather_features(*args)


def project(*args) -> None:
    LAUNCHES.count("_project_kernel")
    _ref.project(*args)


def reconstruct(*args) -> None:
    LAUNCHES.count("_reconstruct_kernel")
    _ref.reconstruct(*args)


def _resolve(pool: PoolRows, addr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row addresses -> (buffer index, row in that buffer); buffer 2L is the scratch area."""
    nb = pool.rows_per_slot
    in_pool = addr < pool.n_pool_rows
    buf = torch.where(in_pool, addr % nb, nb)
    row = torch.where(in_pool, addr // nb, addr - pool.n_pool_rows)
    return buf, row


def gather_rows(pool: PoolRows, addr: torch.Tensor) -> torch.Tensor:
    """The rows at `addr` ([R] int64): [R, row_bytes] uint8."""
    buf, row = _resolve(pool, addr)
    out = torch.zeros(addr.numel(), pool.row_bytes, dtype=torch.uint8, device=addr.device)
    for b, rows in enumerate(pool.rows_u8):
        sel = buf == b
        vals = rows[torch.where(sel, row, 0).clamp(0, rows.shape[0] - 1)]
        out = torch.where(sel[:, None], vals, out)
    return out


def scatter_rows(pool: PoolRows, addr: torch.Tensor, values: torch.Tensor) -> None:
    """Write values[i] ([R, row_bytes] uint8) to the row at addr[i] (distinct addresses).

    Per buffer b, entries of other buffers are redirected to the first entry of b and carry its value
    (or, when b gets no entry, rewrite row 0 of b with its own content), so one index_put_ per buffer
    writes exactly the selected rows, whatever the device-resident addresses are.
    """
    if addr.numel() == 0:
        return
    buf, row = _resolve(pool, addr)
    for b, rows in enumerate(pool.rows_u8):
        sel = buf == b
        k = torch.argmax(sel.to(torch.uint8))
        hit = sel[k]
        tgt = torch.where(sel, row, torch.where(hit, row[k], 0))
        fallback = torch.where(hit, values[k], rows[0])
        rows.index_put_((tgt,), torch.where(sel[:, None], values, fallback[None, :]))


@dataclass
class Staging:
    rows: torch.Tensor  # [R, row_bytes] uint8

    @property
    def flat(self) -> torch.Tensor:
        return self.rows.view(-1)


# ----------------------------------------------------------------------------------------------- encode
def begin_encode(pool: PoolRows, plan: EncodePlan) -> Staging:
    # current content first: bytes past the payload in a job's last row are left as they are
    return Staging(gather_rows(pool, plan.rows_cat))


def encode_exact(pool: PoolRows, plan: EncodePlan, st: Staging) -> None:
    """Exact tokens' pool rows (all layers, K and V) -> their blob rows."""
    if plan.n_exact == 0:
        return
    LAUNCHES.count("gather_exact_rows")
    for kl, rows in enumerate(pool.rows_u8[: pool.rows_per_slot]):
        st.rows[plan.ex_row + kl] = rows[plan.ex_slot]


def _section_positions(plan, field: int, bpt: int, row_bytes: int, c0: int, n: int) -> torch.Tensor:
    """Staging byte of plane j of coded rows c0 .. c0 + n - 1 of section `field`: [n, bpt] int64."""
    J = plan.n_jobs
    job = plan.row_job[c0 : c0 + n]
    tok = plan.row_tok[c0 : c0 + n]
    col = lambda f: plan.jt[f * J : (f + 1) * J][job]  # noqa: E731
    base = col(0) * row_bytes + col(field) + tok  # field 0 is ROWS in both tables
    m = col(2)  # field 2 is M in both tables
    planes = torch.arange(bpt, dtype=torch.int64, device=job.device)
    return base[:, None] + planes[None, :] * m[:, None]


def records(bt: BlockTables, d: torch.Tensor) -> torch.Tensor:
    """Coefficients d ([n, >= rank] float32) -> token records [n, bytes_per_token] uint8 (params, symbols)."""
    n = d.shape[0]
    d = d[:, : bt.rank].float()
    params = torch.zeros(n, bt.n_groups, 2, dtype=torch.float16, device=d.device)
    q = torch.zeros(n, max(bt.rank, 1), dtype=torch.uint8, device=d.device)
    for c in bt.coder.classes:
        xs = d[:, c.coords]
        shift, scale = group_params(xs, c.bits, c.clip, check=False)
        params[:, c.slots, 0] = shift
        params[:, c.slots, 1] = scale
        q[:, c.coords] = quantize_groups(xs, shift, scale, c.bits, check=False)
    coords = bt.byte_coord[: bt.sym_bytes].long()  # [sym_bytes, 4], -1 = no field
    shifts = torch.arange(4, device=d.device, dtype=torch.int64)[None, :] * bt.byte_bits[: bt.sym_bytes, None].long()
    fields = q[:, coords.clamp_min(0)].to(torch.int64) << shifts[None]
    sym = torch.where(coords[None] >= 0, fields, 0).sum(-1).to(torch.uint8)
    return torch.cat([params.view(n, -1).view(torch.uint8), sym], dim=1)


def quantize(pool: PoolRows, plan: EncodePlan, st: Staging, bt: BlockTables, section: int, coeffs: torch.Tensor,
             params: torch.Tensor, c0: int, n: int) -> None:
    """Params and symbols of coded rows c0 .. c0 + n - 1 (coefficients coeffs[:n]) -> section `section`."""
    if n == 0:
        return
    LAUNCHES.count("group_params_rows", len(bt.classes))
    LAUNCHES.count("pack_rows")
    pos = _section_positions(plan, plan.sec_field0 + section, bt.bytes_per_token, pool.row_bytes, c0, n)
    st.flat[pos] = records(bt, coeffs[:n])


def finish_encode(pool: PoolRows, plan: EncodePlan, st: Staging) -> None:
    scatter_rows(pool, plan.rows_cat, st.rows)


def crc(pool: PoolRows, plan: EncodePlan, st: Staging) -> torch.Tensor:
    """zlib CRC-32 of each job's payload: [J] int64."""
    LAUNCHES.count("crc32_rows")
    starts = plan.jt[: plan.n_jobs] * pool.row_bytes  # field ROWS
    return crc32_rows_reference(st.flat, starts, list(plan.nbytes))


# ----------------------------------------------------------------------------------------------- decode
def begin_decode(pool: PoolRows, plan: DecodePlan) -> Staging:
    return Staging(gather_rows(pool, plan.rows_cat))


def unpack(pool: PoolRows, plan: DecodePlan, st: Staging, bt: BlockTables, section: int, c0: int, n: int,
           out: torch.Tensor) -> None:
    """Dequantized coefficients of coded rows c0 .. c0 + n - 1 -> out[:n, :rank]; other entries of out 0."""
    LAUNCHES.count("unpack_rows")
    out.zero_()
    if n == 0:
        return
    pos = _section_positions(plan, plan.sec_field0 + section, bt.bytes_per_token, pool.row_bytes, c0, n)
    rec = st.flat[pos]
    pb = bt.param_bytes
    params = rec[:, :pb].contiguous().view(torch.float16).view(n, bt.n_groups, 2).float()
    r = bt.rank
    plane = bt.coord_plane[:r].long()
    bits = bt.coord_bits[:r].long()
    group = bt.coord_group[:r].long()
    q = (rec[:, plane].to(torch.int64) >> bt.coord_shift[:r].long()) & ((1 << bits) - 1)
    val = q.float() * params[:, group, 1] + params[:, group, 0]
    out[:n, :r] = torch.where(bits > 0, val, 0.0).to(out.dtype)


def decode_exact(pool: PoolRows, plan: DecodePlan, st: Staging, layers: tuple[int, int]) -> None:
    """Exact tokens' blob rows of layers [lo, hi) (K and V) -> their destination pool slots."""
    if plan.n_exact == 0:
        return
    LAUNCHES.count("scatter_exact_rows")
    L = pool.n_layers
    for kind in (0, 1):
        for layer in range(*layers):
            pool.rows_u8[kind * L + layer][plan.ex_slot] = st.rows[plan.ex_row + kind * L + layer]


def copy_rows(pool: PoolRows, src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy the rows at src ([R] int64 addresses) to the rows at dst ([R], distinct)."""
    LAUNCHES.count("copy_rows")
    scatter_rows(pool, dst, gather_rows(pool, src))


def rows_to_flat(pool: PoolRows, rows: torch.Tensor, out: torch.Tensor) -> None:
    LAUNCHES.count("rows_to_flat")
    out.copy_(gather_rows(pool, rows).view(-1)[: out.numel()])


def flat_to_rows(pool: PoolRows, flat: torch.Tensor, rows: torch.Tensor) -> None:
    LAUNCHES.count("flat_to_rows")
    cur = gather_rows(pool, rows)
    cur.view(-1)[: flat.numel()] = flat
    scatter_rows(pool, rows, cur)
