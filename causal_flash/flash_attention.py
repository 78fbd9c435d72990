"""Flash attention in Triton for every attention the model runs: bidirectional, block-causal, teacher forcing
and cached decode, with an FA2-style Triton backward.

Shapes are [B, H, L, D] with any batch/head/token strides. The block mask of causal_flash/mask.py is computed from
token indices inside the kernel, and key tiles that a query tile cannot see are never loaded. This matters most
for teacher forcing, where a noisy query sees about a quarter of the keys.

Conventions: softmax runs in base 2 (the scores are pre-multiplied by scale*log2(e)), accumulation is always
fp32, and the saved LSE is log2(sum(exp2(s))), which the backward uses to recompute the probabilities.
"""
import math

import torch
import triton
import triton.language as tl

# fp32 inputs: "tf32" uses tensor cores (error around 1e-3); "ieee" gives exact fp32. The interpreter is always exact.
FP32_PRECISION = "tf32"
NONE, BLOCK_CAUSAL, TEACHER = 0, 1, 2  # the MODE constexpr


@triton.jit
def _visible(qi, ki, C, T, MODE: tl.constexpr):
    """causal_flash/mask.py's rule for broadcastable query/key token indices (only used when MODE != NONE)."""
    if MODE == 1:
        vis = ki // T <= qi // T
    else:
        qn, kn = qi >= C, ki >= C
        qb = tl.where(qn, qi - C, qi) // T
        kb = tl.where(kn, ki - C, ki) // T
        # a clean key of block kb is visible to clean queries of blocks >= kb and to noisy queries of blocks > kb
        vis = tl.where(kn, qn & (kb == qb), kb + qn.to(tl.int32) <= qb)
    return vis  # one return per function: Triton would also compile code after a return inside a static `if`


@triton.jit
def _key_spans(m0, Lq, Lk, C, T, BLOCK_M: tl.constexpr, MODE: tl.constexpr):
    """Two key ranges [lo0, hi0) and [lo1, hi1) that hold every key the queries [m0, m0+BLOCK_M) can see."""
    m1 = tl.minimum(m0 + BLOCK_M, Lq) - 1  # the tile's last real query
    if MODE == 0:
        hi0, lo1, hi1 = Lk, 0, 0
    elif MODE == 1:
        hi0, lo1, hi1 = tl.minimum((m1 // T + 1) * T, Lk), 0, 0
    else:
        # teacher forcing. Clean keys: to the end of a clean query's own block, or to the start of a noisy query's.
        bq = (tl.maximum(m1, C) - C) // T  # noisy block of the last query (if the tile has noisy queries)
        hi0 = tl.where(m0 < C, tl.minimum((tl.minimum(m1, C - 1) // T + 1) * T, C), 0)
        hi0 = tl.where(m1 >= C, tl.maximum(hi0, bq * T), hi0)
        # noisy keys: only the noisy queries' own blocks
        lo1 = C + (tl.maximum(m0, C) - C) // T * T
        hi1 = tl.where(m1 >= C, tl.minimum(C + (bq + 1) * T, Lk), lo1)
    return 0, hi0, lo1, hi1


@triton.jit
def _query_spans(n0, Lq, Lk, C, T, BLOCK_N: tl.constexpr, MODE: tl.constexpr):
    """The transpose of _key_spans: two query ranges that hold every query that can see the keys [n0, n0+BLOCK_N)."""
    n1 = tl.minimum(n0 + BLOCK_N, Lk) - 1
    if MODE == 0:
        lo0, hi0, lo1 = 0, Lq, Lq
    elif MODE == 1:
        lo0, hi0, lo1 = n0 // T * T, Lq, Lq
    else:
        # teacher forcing. Clean key block b is seen by clean queries of blocks >= b and noisy queries of blocks > b;
        # noisy key block b only by noisy queries of block b. Span 0: the clean viewers, then (if the tile reaches
        # into the noisy half) the noisy viewers of its noisy keys; span 1: the noisy viewers of its clean keys.
        lo0 = tl.where(n0 < C, n0 // T * T, C + (tl.maximum(n0, C) - C) // T * T)
        hi0 = tl.where(n1 >= C, tl.minimum(C + ((tl.maximum(n1, C) - C) // T + 1) * T, Lq), C)
        lo1 = tl.minimum(tl.where(n0 < C, tl.maximum(C + (n0 // T + 1) * T, hi0), Lq), Lq)
    return lo0, hi0, lo1, Lq


@triton.jit
def _span_tile(i, n0_tiles, lo0, hi0, lo1, hi1, BLOCK: tl.constexpr):
    """Start and end of the i-th tile when the two spans are walked as one loop."""
    first = i < n0_tiles
    return tl.where(first, lo0 + i * BLOCK, lo1 + (i - n0_tiles) * BLOCK), tl.where(first, hi0, hi1)


@triton.jit
def _load(ptr, offs_l, offs_d, stride_l, hi, D, UPCAST: tl.constexpr):
    """A [len(offs_l), BLOCK_D] tile; rows >= hi and padded head dims read as 0 (never touched in memory)."""
    inside = (offs_l[:, None] < hi) & (offs_d[None, :] < D)
    x = tl.load(ptr + offs_l[:, None] * stride_l + offs_d[None, :], mask=inside, other=0.0)
    if UPCAST:  # the interpreter does bf16 arithmetic on raw bits, so it gets fp32 operands
        x = x.to(tl.float32)
    return x


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sob, soh, sol,
                H, Lq, Lk, D, C, T, qk_scale,
                MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)  # int64 so that large batches do not overflow
    m0 = pid_m * BLOCK_M
    offs_m, offs_d, offs_b = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    K, V = K + b * skb + h * skh, V + b * svb + h * svh
    q = _load(Q + b * sqb + h * sqh, offs_m, offs_d, sql, Lq, D, UPCAST)

    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite, so a row with no visible key in a tile stays NaN-free
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo0, hi0, lo1, hi1 = _key_spans(m0, Lq, Lk, C, T, BLOCK_M, MODE)
    n0_tiles = tl.cdiv(hi0 - lo0, BLOCK_N)
    for i in range(0, n0_tiles + tl.cdiv(hi1 - lo1, BLOCK_N)):
        start, hi = _span_tile(i, n0_tiles, lo0, hi0, lo1, hi1, BLOCK_N)
        offs_n = start + offs_b
        k = _load(K, offs_n, offs_d, skl, hi, D, UPCAST)
        v = _load(V, offs_n, offs_d, svl, hi, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        ok = offs_n[None, :] < hi
        if MODE != 0:
            ok &= _visible(offs_m[:, None], offs_n[None, :], C, T, MODE)
        s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new

    l_i = tl.where(l_i == 0, 1.0, l_i)  # only padded rows (never stored) can have l = 0
    o = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * sol + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))
    tl.store(LSE + bh * Lq + offs_m, m_i + tl.math.log2(l_i), mask=offs_m < Lq)


@triton.jit
def _delta_kernel(O, DO, DELTA, sob, soh, sol, sdb, sdh, sdl, H, Lq, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """delta = rowsum(dO * O), the softmax-backward correction term, one value per query."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    offs_m, offs_d = pid_m * BLOCK_M + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D)
    o = _load(O + b * sob + h * soh, offs_m, offs_d, sol, Lq, D, True)
    do = _load(DO + b * sdb + h * sdh, offs_m, offs_d, sdl, Lq, D, True)
    tl.store(DELTA + bh * Lq + offs_m, tl.sum(o * do, 1), mask=offs_m < Lq)


@triton.jit
def _dkdv_kernel(Q, K, V, DO, DK, DV, LSE, DELTA, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
                 sgb, sgh, sgl, H, Lq, Lk, D, C, T, qk_scale, scale,
                 MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One key tile per program, looping over the query tiles that can see it. Works transposed ([keys, queries])
    so that dK and dV come out of the dots without register transposes. DK/DV share one layout (strides sg*)."""
    pid_n, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    n0 = pid_n * BLOCK_N
    offs_n, offs_d, offs_b = n0 + tl.arange(0, BLOCK_N), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_M)
    Q, DO, LSE, DELTA = Q + b * sqb + h * sqh, DO + b * sdb + h * sdh, LSE + bh * Lq, DELTA + bh * Lq
    k = _load(K + b * skb + h * skh, offs_n, offs_d, skl, Lk, D, UPCAST)
    v = _load(V + b * svb + h * svh, offs_n, offs_d, svl, Lk, D, UPCAST)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo0, hi0, lo1, hi1 = _query_spans(n0, Lq, Lk, C, T, BLOCK_N, MODE)
    n0_tiles = tl.cdiv(hi0 - lo0, BLOCK_M)
    for i in range(0, n0_tiles + tl.cdiv(hi1 - lo1, BLOCK_M)):
        start, hi = _span_tile(i, n0_tiles, lo0, hi0, lo1, hi1, BLOCK_M)
        offs_m = start + offs_b
        q = _load(Q, offs_m, offs_d, sql, hi, D, UPCAST)
        do = _load(DO, offs_m, offs_d, sdl, hi, D, UPCAST)
        lse = tl.load(LSE + offs_m, mask=offs_m < hi, other=0.0)
        delta = tl.load(DELTA + offs_m, mask=offs_m < hi, other=0.0)
        ok = offs_m[None, :] < hi
        if MODE != 0:
            ok &= _visible(offs_m[None, :], offs_n[:, None], C, T, MODE)
        pT = tl.where(ok, tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale - lse[None, :]), 0.0)
        dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
        dsT = pT * (dpT - delta[None, :])
        dk += tl.dot(dsT.to(q.dtype), q, input_precision=PREC)

    out = b * sgb + h * sgh + offs_n[:, None] * sgl + offs_d[None, :]
    inside = (offs_n[:, None] < Lk) & (offs_d[None, :] < D)
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=inside)
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=inside)


@triton.jit
def _dq_kernel(Q, K, V, DO, DQ, LSE, DELTA, sqb, sqh, sql, skb, skh, skl, svb, svh, svl, sdb, sdh, sdl,
               sgb, sgh, sgl, H, Lq, Lk, D, C, T, qk_scale, scale,
               MODE: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """One query tile per program, looping over the same key spans as the forward."""
    pid_m, bh = tl.program_id(0), tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m, offs_d, offs_b = m0 + tl.arange(0, BLOCK_M), tl.arange(0, BLOCK_D), tl.arange(0, BLOCK_N)
    K, V = K + b * skb + h * skh, V + b * svb + h * svh
    q = _load(Q + b * sqb + h * sqh, offs_m, offs_d, sql, Lq, D, UPCAST)
    do = _load(DO + b * sdb + h * sdh, offs_m, offs_d, sdl, Lq, D, UPCAST)
    lse = tl.load(LSE + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)
    delta = tl.load(DELTA + bh * Lq + offs_m, mask=offs_m < Lq, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo0, hi0, lo1, hi1 = _key_spans(m0, Lq, Lk, C, T, BLOCK_M, MODE)
    n0_tiles = tl.cdiv(hi0 - lo0, BLOCK_N)
    for i in range(0, n0_tiles + tl.cdiv(hi1 - lo1, BLOCK_N)):
        start, hi = _span_tile(i, n0_tiles, lo0, hi0, lo1, hi1, BLOCK_N)
        offs_n = start + offs_b
        k = _load(K, offs_n, offs_d, skl, hi, D, UPCAST)
        v = _load(V, offs_n, offs_d, svl, hi, D, UPCAST)
        ok = offs_n[None, :] < hi
        if MODE != 0:
            ok &= _visible(offs_m[:, None], offs_n[None, :], C, T, MODE)
        p = tl.where(ok, tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        dq += tl.dot((p * (dp - delta[:, None])).to(k.dtype), k, input_precision=PREC)

    tl.store(DQ + b * sgb + h * sgh + offs_m[:, None] * sgl + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=(offs_m[:, None] < Lq) & (offs_d[None, :] < D))


def launch_config(head_dim, dtype, device, tiles=None):
    """{'fwd' | 'dkdv' | 'dq': (BLOCK_M, BLOCK_N, num_warps, num_stages), 'BLOCK_D': padded head dim}.
    Every tl.dot operand dimension is one of BLOCK_M, BLOCK_N, BLOCK_D: all powers of two and >= 16."""
    block_d = max(16, triton.next_power_of_2(head_dim))
    assert block_d <= 128, "head_dim up to 128"
    if tiles is not None:  # tests use small tiles to get many (and partial) tiles out of short sequences
        cfg = dict.fromkeys(("fwd", "dkdv", "dq"), (*tiles, 4, 1))
    elif torch.device(device).type != "cuda":  # interpreter: its cost is programs x loop iterations, so big tiles
        cfg = dict.fromkeys(("fwd", "dkdv", "dq"), (64, 64, 4, 1))
    elif dtype == torch.float32:  # 4-byte tiles: smaller, to fit registers and shared memory
        big = block_d >= 128
        cfg = {"fwd": (64, 32, 8, 2) if big else (64, 64, 4, 2), "dkdv": (32, 32, 4, 2) if big else (32, 64, 8, 2),
               "dq": (32, 32, 4, 2) if big else (64, 32, 4, 2)}
    else:  # fp16/bf16. All of these compile for sm_90 without register spills and in <= 100 KB of shared memory
        cfg = {"fwd": (128, 64, 8, 3), "dkdv": (32, 64, 8, 2), "dq": (64, 32, 4, 2)}
    for bm, bn, _, _ in cfg.values():
        assert all(t >= 16 and t & (t - 1) == 0 for t in (bm, bn)), "tiles must be powers of two >= 16"
    return {**cfg, "BLOCK_D": block_d}


def _mode(q, k, v, tokens_per_block, clean_len):
    assert q.dtype == k.dtype == v.dtype and q.shape[-1] == k.shape[-1] == v.shape[-1]
    if tokens_per_block is None:
        assert clean_len == 0, "teacher forcing needs tokens_per_block"
        return NONE, 0, 1
    assert q.shape[2] == k.shape[2], "a block mask needs Lq == Lk"
    return (TEACHER if clean_len > 0 else BLOCK_CAUSAL), clean_len, tokens_per_block


def _bhl(t):  # batch, head and token strides; the head dim must be contiguous (it is for every view we make)
    return t.stride(0), t.stride(1), t.stride(2)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, tokens_per_block, clean_len, scale, tiles):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        (B, H, Lq, D), Lk = q.shape, k.shape[2]
        mode, C, T = _mode(q, k, v, tokens_per_block, clean_len)
        cfg = launch_config(D, q.dtype, q.device, tiles)
        bm, bn, warps, stages = cfg["fwd"]
        upcast = q.device.type != "cuda"  # on GPU 16-bit operands go straight into the tensor cores
        prec = FP32_PRECISION if (q.dtype == torch.float32 or upcast) else None
        o = torch.empty(q.shape, device=q.device, dtype=q.dtype)
        lse = torch.empty((B, H, Lq), device=q.device, dtype=torch.float32)
        _fwd_kernel[(triton.cdiv(Lq, bm), B * H)](
            q, k, v, o, lse, *_bhl(q), *_bhl(k), *_bhl(v), *_bhl(o), H, Lq, Lk, D, C, T, scale * math.log2(math.e),
            MODE=mode, UPCAST=upcast, PREC=prec, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=cfg["BLOCK_D"],
            num_warps=warps, num_stages=stages)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.args = (mode, C, T, scale, cfg, upcast, prec)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        mode, C, T, scale, cfg, upcast, prec = ctx.args
        do = do if do.stride(-1) == 1 else do.contiguous()
        (B, H, Lq, D), Lk = q.shape, k.shape[2]
        delta = torch.empty_like(lse)
        bd = cfg["BLOCK_D"]
        _delta_kernel[(triton.cdiv(Lq, 64), B * H)](o, do, delta, *_bhl(o), *_bhl(do), H, Lq, D, BLOCK_M=64, BLOCK_D=bd)
        dq, dk, dv = (torch.empty(t.shape, device=t.device, dtype=t.dtype) for t in (q, k, v))
        args = (H, Lq, Lk, D, C, T, scale * math.log2(math.e), scale)
        strides = (*_bhl(q), *_bhl(k), *_bhl(v), *_bhl(do))
        bm, bn, warps, stages = cfg["dkdv"]
        _dkdv_kernel[(triton.cdiv(Lk, bn), B * H)](q, k, v, do, dk, dv, lse, delta, *strides, *_bhl(dk), *args,
                                                   MODE=mode, UPCAST=upcast, PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                                                   BLOCK_D=bd, num_warps=warps, num_stages=stages)
        bm, bn, warps, stages = cfg["dq"]
        _dq_kernel[(triton.cdiv(Lq, bm), B * H)](q, k, v, do, dq, lse, delta, *strides, *_bhl(dq), *args,
                                                 MODE=mode, UPCAST=upcast, PREC=prec, BLOCK_M=bm, BLOCK_N=bn,
                                                 BLOCK_D=bd, num_warps=warps, num_stages=stages)
        return dq, dk, dv, None, None, None, None


def flash_attention(q, k, v, tokens_per_block=None, clean_len=0, scale=None, *, tiles=None):
    """softmax(q k^T * scale + mask) v for q [B, H, Lq, D] and k, v [B, H, Lk, D]; differentiable.

    tokens_per_block=None: no mask (bidirectional, or decode against a KV cache where Lq != Lk).
    Otherwise the block mask of causal_flash/mask.py (Lq == Lk), with clean_len > 0 for teacher forcing.
    tiles=(BLOCK_M, BLOCK_N) overrides the launch tiles (tests use it to get many partial tiles).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _FlashAttention.apply(q, k, v, tokens_per_block, clean_len, scale, tiles)
