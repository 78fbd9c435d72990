"""The Triton flash-attention kernel equals SDPA under causal_flash/mask.py's mask, forward and backward, and never
loads a tile the mask hides. On CPU it runs in Triton's interpreter (conftest.py), on CUDA natively."""
import itertools
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")
from causal_flash.flash_attention import flash_attention, launch_config  # noqa: E402
from causal_flash.mask import block_mask  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
# small tiles give many (and partial) tiles out of short sequences; on CUDA the default launch tiles run too
TILES = [(32, 16)] + ([None] if DEVICE == "cuda" else [])
# (atol, rtol) of the output per input dtype; tf32 on GPU is far coarser than the interpreter's exact fp32
TOL = {torch.float32: (1e-2, 1e-2) if DEVICE == "cuda" else (2e-5, 2e-5), torch.float16: (3e-3, 3e-3),
       torch.bfloat16: (2e-2, 2e-2)}

# name: (B, H, Lq, Lk, head_dim, tokens_per_block, clean_len). Lengths are no multiple of the tiles, and the
# frame/block boundaries fall inside tiles.
CASES = {
    "frame": (2, 2, 120, 120, 24, 24, 0),  # frame-wise block-causal, 24 tokens per frame
    "chunk": (1, 2, 144, 144, 32, 48, 0),  # chunk-wise: 3 frames of 16 tokens
    "teacher": (1, 2, 120, 120, 48, 20, 60),  # [clean 60 | noisy 60], blocks of 20: the tile [32, 64) straddles
    "bidir": (1, 2, 100, 100, 64, None, 0),
    "decode": (2, 2, 40, 200, 32, None, 0),  # one 40-token block against 4 cached frames + itself
}


def make_qkv(B, H, Lq, Lk, D, dtype, seed=0):
    """q, k, v as the model makes them: non-contiguous views of Linear outputs (and a transposed head dim once)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, Lq, 3 * H * D, generator=g)
    if Lq == Lk:
        q, k, v = (t.view(B, Lq, H, D).transpose(1, 2) for t in x.to(DEVICE, dtype).chunk(3, -1))
    else:  # decode: queries come from the block, keys/values from the cache
        q = x[..., :H * D].to(DEVICE, dtype).view(B, Lq, H, D).transpose(1, 2)
        kv = torch.randn(B, Lk, 2 * H * D, generator=g).to(DEVICE, dtype)
        k, v = (t.view(B, Lk, H, D).transpose(1, 2) for t in kv.chunk(2, -1))
    if D == 64:  # head dim not unit-stride: the wrapper must make it contiguous
        q = q.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    return q, k, v


def reference(q, k, v, tpb, clean_len):
    """SDPA in fp32 with the boolean mask of causal_flash/mask.py (None: no mask)."""
    mask = None if tpb is None else block_mask(q.shape[2], tpb, clean_len, device=q.device)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", [DEVICE])
def test_forward_matches_sdpa(device, case, dtype, tiles):
    B, H, Lq, Lk, D, tpb, C = CASES[case]
    q, k, v = make_qkv(B, H, Lq, Lk, D, dtype)
    o = flash_attention(q, k, v, tpb, C, tiles=tiles)
    assert o.dtype == dtype and o.shape == (B, H, Lq, D)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(o.float(), reference(q, k, v, tpb, C), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tiles", TILES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("device", [DEVICE])
def test_backward_matches_sdpa(device, case, tiles):
    B, H, Lq, Lk, D, tpb, C = CASES[case]
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(B, H, Lq, Lk, D, torch.float32))
    do = torch.randn(B, H, Lq, D, device=DEVICE)
    got = torch.autograd.grad(flash_attention(q, k, v, tpb, C, tiles=tiles), (q, k, v), do)
    want = torch.autograd.grad(reference(q, k, v, tpb, C), (q, k, v), do)
    tol = 3e-2 if DEVICE == "cuda" else 5e-5
    for name, a, b in zip("qkv", got, want):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol, msg=lambda m: f"d{name}: {m}")


@pytest.mark.filterwarnings("ignore:All-NaN slice")  # rows of NaN queries are NaN, as they should be
@pytest.mark.parametrize("case", ["frame", "chunk", "teacher"])
@pytest.mark.parametrize("device", [DEVICE])
def test_hidden_tiles_are_never_loaded(device, case):
    """NaN everywhere a tile cannot see: one loaded NaN would poison the tile's output through p @ v (0 * NaN).
    Forward and dQ: per query tile, keys outside the union of its rows' visible keys are NaN.
    dK/dV: per key tile, queries (and their dO) outside the union of its columns' viewers are NaN."""
    B, H, L, _, D, tpb, C = CASES[case]
    bm, bn = tiles = (32, 16)
    mask = block_mask(L, tpb, C, device=DEVICE)
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, 1, L, L, D, torch.float32))
    do = torch.randn(1, 1, L, D, device=DEVICE)
    want_o = reference(q, k, v, tpb, C)
    want = (want_o, *torch.autograd.grad(want_o, (q, k, v), do))
    tol = 3e-2 if DEVICE == "cuda" else 5e-5

    def check(q, k, v, do, which, idx):
        q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
        o = flash_attention(q, k, v, tpb, C, tiles=tiles)
        got = (o, *torch.autograd.grad(o, (q, k, v), do))
        for i in which:
            torch.testing.assert_close(got[i][..., idx, :], want[i][..., idx, :], atol=tol, rtol=tol)

    poisoned = 0
    for m0 in range(0, L, bm):  # query tiles: check o and dq
        hidden = ~mask[m0:m0 + bm].any(0)
        poisoned += hidden.any().item()
        k_nan, v_nan = (t.masked_fill(hidden[:, None], float("nan")) for t in (k, v))
        check(q, k_nan, v_nan, do, (0, 1), slice(m0, m0 + bm))
    for n0 in range(0, L, bn):  # key tiles: check dk and dv
        hidden = ~mask[:, n0:n0 + bn].any(1)
        poisoned += hidden.any().item()
        q_nan, do_nan = (t.masked_fill(hidden[:, None], float("nan")) for t in (q, do))
        check(q_nan, k, v, do_nan, (2, 3), slice(n0, n0 + bn))
    assert poisoned >= (L // bm + L // bn) // 2  # the test has teeth: most tiles had something to skip


@pytest.mark.parametrize("head_dim", [24, 32, 48, 64, 128])
def test_launch_tiles_fit_tl_dot(head_dim):
    """Every tl.dot operand dimension is BLOCK_M, BLOCK_N or BLOCK_D: each must be a power of two >= 16
    (the interpreter would accept smaller dots that then fail to compile on a GPU)."""
    for device, dtype in itertools.product(("cuda", "cpu"), (torch.float32, torch.bfloat16)):
        cfg = launch_config(head_dim, dtype, device)
        dims = [cfg["BLOCK_D"]] + [t for k in ("fwd", "dkdv", "dq") for t in cfg[k][:2]]
        assert all(d >= 16 and d & (d - 1) == 0 for d in dims), (device, dtype, cfg)
        assert cfg["BLOCK_D"] >= head_dim
    with pytest.raises(AssertionError):
        launch_config(head_dim, torch.float32, "cpu", tiles=(8, 16))


AOT = """
import sys, torch, triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
import causal_flash.flash_attention as fa

def build(kernel, dtype, D, launch=(64, 64, 4, 2), **constexprs):
    bm, bn, warps, stages = launch
    constexprs.update(BLOCK_M=bm, BLOCK_D=max(16, triton.next_power_of_2(D)))
    if kernel is not fa._delta_kernel:
        constexprs["BLOCK_N"] = bn
    ty = lambda a: ("constexpr" if a in constexprs else "*fp32" if a in ("LSE", "DELTA") else "fp32" if "scale" in a
                    else "*" + dtype if a in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV") else "i32")
    src = ASTSource(kernel, {a: ty(a) for a in kernel.arg_names},
                    constexprs={(kernel.arg_names.index(a),): v for a, v in constexprs.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    assert k.metadata.shared <= 100 * 1024, (kernel, dtype, D, k.metadata.shared)

for dtype, D, prec in (("bf16", 128, None), ("fp32", 64, "tf32")):
    cfg = fa.launch_config(D, getattr(torch, {"bf16": "bfloat16", "fp32": "float32"}[dtype]), "cuda")
    build(fa._delta_kernel, dtype, D)
    for mode in ((0, 1, 2) if dtype == "bf16" else (2,)):
        for kernel, name in ((fa._fwd_kernel, "fwd"), (fa._dkdv_kernel, "dkdv"), (fa._dq_kernel, "dq")):
            build(kernel, dtype, D, cfg[name], MODE=mode, UPCAST=False, PREC=prec)
"""


@pytest.mark.slow
def test_compiles_for_h100():
    """The interpreter never compiles anything, so build every kernel for sm_90 here (Triton ships ptxas): errors
    that only a GPU compile shows (dot shapes, types, shared memory over budget) surface on a CPU box too."""
    pytest.importorskip("triton.compiler", reason="ASTSource/GPUTarget are Triton internals")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", AOT], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
