"""Times the Triton kernel against torch's SDPA backends at the toy and Wan2.1-1.3B shapes, then the full
model's KV-cached streaming. CUDA only; elsewhere it says so and exits 0.

    python causal_flash/bench.py [--quick]
"""
import argparse
import os
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from causal_flash.mask import block_mask  # noqa: E402

WAN_S = 1560  # tokens per latent frame at 480x832: 30 x 52 patches


def cases(quick):
    """(group, name, B, H, Lq, Lk, D, tokens_per_block, clean_len, backward). All bf16."""
    toy, S = 12 * 64, 64  # 12 frames of 64 tokens
    out = [("toy", f"bidirectional d{D}", 8, H, toy, toy, D, None, 0, True) for D, H in ((32, 4), (64, 2))]
    out += [("toy", f"block-causal frame d{D}", 8, H, toy, toy, D, S, 0, True) for D, H in ((32, 4), (64, 2))]
    out += [("toy", "teacher forcing 2x12 d32", 8, 4, 2 * toy, 2 * toy, 32, S, toy, True),
            ("toy", "decode frame, 11+1 key frames d32", 8, 4, S, toy, 32, None, 0, False)]
    for label, fpb in (("frame", 1), ("chunk", 3)):
        for n in ((fpb, 21) if quick else sorted({fpb, 3, 6, 12, 21})):  # key frames = cache + the block
            out.append(("wan", f"decode {label}, {n - fpb}+{fpb} key frames", 1, 12, fpb * WAN_S, n * WAN_S, 128,
                        None, 0, False))
    for label, fpb in (("frame", 1), ("chunk", 3)):
        L = 21 * WAN_S
        out.append(("wan", f"block-causal {label}, 21 frames", 1, 12, L, L, 128, fpb * WAN_S, 0, True))
        out.append(("wan", f"teacher forcing {label}, 2x21 frames", 1, 12, 2 * L, 2 * L, 128, fpb * WAN_S, L, True))
    return out


def cuda_ms(fn, reps):
    """Median milliseconds of fn() over reps runs, timed with CUDA events after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def try_ms(fn, reps):
    """Time fn, or a short reason why it cannot run (unsupported by that backend, out of memory)."""
    try:
        return cuda_ms(fn, reps)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return "oom"
    except RuntimeError as e:  # "No available kernel" and friends
        torch.cuda.empty_cache()
        return "n/a" if "kernel" in str(e).lower() else "err"


def bench_kernel(quick):
    from causal_flash.flash_attention import flash_attention
    from torch.nn.attention import SDPBackend, sdpa_kernel

    warnings.simplefilter("ignore", UserWarning)  # SDPA explains every backend it cannot use
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    reps = 3 if quick else 10
    cols = ["case", "pass", "Lq", "Lk", "vis%", "triton ms", "TFLOP/s", "GB/s", "err"] + [f"{b} ms" for b in backends]
    cols.insert(cols.index("efficient ms"), "flash/triton")
    rows = []
    for group, name, B, H, Lq, Lk, D, tpb, C, backward in cases(quick):
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.bfloat16, generator=g) for L in (Lq, Lk, Lk))
        do = torch.randn_like(q)
        mask = None if tpb is None else block_mask(Lq, tpb, C, device="cuda")
        visible = Lq * Lk if mask is None else int(mask.sum())
        o = flash_attention(q, k, v, tpb, C)
        err = "-"
        if Lq * Lk * B * H <= 2 ** 31:  # a reference that fits comfortably
            with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]):
                err = f"{(o.float() - F.scaled_dot_product_attention(q, k, v, attn_mask=mask).float()).abs().max():.0e}"
        for passes in (("fwd", "fwd+bwd") if backward else ("fwd",)):
            grad = passes == "fwd+bwd"
            qkv = [t.detach().requires_grad_(grad) for t in (q, k, v)]

            def run(attn):
                with torch.set_grad_enabled(grad):
                    out = attn(*qkv)
                    if grad:
                        torch.autograd.grad(out, qkv, do)

            ms = cuda_ms(lambda: run(lambda q, k, v: flash_attention(q, k, v, tpb, C)), reps)
            flops = 4 * B * H * visible * D * (3.5 if grad else 1)  # 2 matmuls forward, 5 more backward
            nbytes = 2 * 2 * (q.numel() + k.numel()) * (3 if grad else 1)  # bf16 q,k,v,o (bwd: those, do, grads)
            row = {"case": f"{group}: {name}", "pass": passes, "Lq": Lq, "Lk": Lk,
                   "vis%": f"{100 * visible / Lq / Lk:.0f}", "triton ms": f"{ms:.3f}",
                   "TFLOP/s": f"{flops / ms / 1e9:.0f}", "GB/s": f"{nbytes / ms / 1e6:.0f}", "err": "" if grad else err}
            for b, backend in backends.items():
                m = None if b == "flash" else mask  # SDPA-flash takes no mask: it runs dense attention (*)
                if b == "math" and B * H * Lq * Lk > 2 ** 31:  # materialises the scores; pointless at this size
                    t = "skip"
                else:
                    with sdpa_kernel(backend):
                        t = try_ms(lambda: run(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=m)),
                                   reps)
                dense = m is None and mask is not None
                row[f"{b} ms"] = t if isinstance(t, str) else f"{t:.3f}" + ("*" if dense else "")
                if b == "flash" and not isinstance(t, str):
                    row["flash/triton"] = f"{t / ms:.2f}"
            rows.append(row)
            print(".", end="", flush=True)
        del q, k, v, do, o, mask
        torch.cuda.empty_cache()
    print()
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-|-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))
    print("bf16; toy rows B=8, Wan rows B=1 with 12 heads x 128; ms = median of CUDA-event timings.\n"
          "TFLOP/s counts only the visible score entries (vis% of Lq*Lk): 4*B*H*vis*D per forward and 3.5x that\n"
          "for fwd+bwd (the FlashAttention convention, recompute included). GB/s = minimum HBM traffic: q, k, v, o\n"
          "once (3x for fwd+bwd). * SDPA-flash takes no mask, so masked rows time it on dense attention (more work\n"
          "than the kernel does). err = max |triton - SDPA with the mask| of the forward output; - = not computed.")


@torch.no_grad()
def bench_model_stream(quick):
    """The whole Wan2.1-1.3B (random weights, random 512x4096 text context) streaming 480x832 video with the
    KV cache, as rollout.stream does it: `steps` model calls per block, then one t=0 call that writes the cache.
    Frame-wise 2-step (frame 0 with 4 steps, as the shipped frame-wise students sample it, and with 2) against
    chunk-wise 4-step. cuDNN builds a plan for each new key length, so the first video of a process ("cold")
    pays for it and every later one ("warm") does not; both are timed."""
    try:
        import model as M
        net = M.build("wan2.1-1.3b", device="cuda", dtype=torch.bfloat16).eval()
    except Exception as e:  # model.py is optional for the kernel table
        print(f"\nmodel section skipped ({type(e).__name__}: {e})")
        return
    torch.nn.init.normal_(net.head.head.weight, std=0.02)  # the zero-initialised head would output only zeros
    cfg, frames = net.cfg, 6 if quick else 21
    ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
    noise = torch.randn(1, cfg.in_dim, frames, cfg.height, cfg.width, device="cuda", dtype=torch.bfloat16)

    def stream(fpb, steps, first_steps, n_frames):
        """(seconds from the start until each block is done, every denoising call's output)."""
        cache, done, outs, t0 = net.new_cache(max_frames=n_frames), [], [], time.perf_counter()
        for start in range(0, n_frames, fpb):
            x = noise[:, :, start:start + fpb]
            with torch.autocast("cuda", dtype=torch.bfloat16):
                for t in (first_steps if start == 0 else steps):  # the update is a stand-in: only the timing counts
                    outs.append(net(x, torch.full((1, fpb), t, device="cuda"), ctx, kv_cache=cache))
                    x = (x - outs[-1] * t / 1000).to(x.dtype)
                net(x, torch.zeros(1, fpb, device="cuda"), ctx, kv_cache=cache, cache_write=True)
            torch.cuda.synchronize()
            done.append(time.perf_counter() - t0)
        return done, outs

    four, two = (1000, 938, 833, 625), (1000, 833)
    samplers = (("frame-wise 2-step, frame 0: 4", 1, two, four), ("frame-wise 2-step, frame 0: 2", 1, two, two),
                ("chunk-wise 4-step", 3, four, four))
    outs = {}
    for backend in ("sdpa", "triton"):
        net.attn_backend = backend
        outs[backend] = stream(1, two, two, 4)[1]
    err = max(float((a.float() - b.float()).norm() / a.float().norm()) for a, b in zip(outs["sdpa"], outs["triton"]))
    print(f"\nfull model: Wan2.1-1.3B bf16, {frames} latent frames of {WAN_S} tokens, KV cache, batch 1; "
          f"largest relative difference of a call's output, triton vs sdpa attention: {err:.1e}")
    print(f"{'sampler':30s} | {'attention':9s} | cold: first block ms | total s | warm: first block ms | total s | "
          f"latent frames/s")
    first_ms = {}
    for label, fpb, steps, first in samplers:
        for backend in ("sdpa", "triton"):
            net.attn_backend = backend
            try:
                cold = stream(fpb, steps, first, frames)[0]
                warm = stream(fpb, steps, first, frames)[0]
            except Exception as e:
                print(f"{label:30s} | {backend:9s} | failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            first_ms[label, backend] = 1e3 * warm[0]
            print(f"{label:30s} | {backend:9s} | {1e3 * cold[0]:20.1f} | {cold[-1]:7.2f} | {1e3 * warm[0]:20.1f} | "
                  f"{warm[-1]:7.2f} | {frames / warm[-1]:.2f}")
    for backend in ("sdpa", "triton"):
        chunk = first_ms.get(("chunk-wise 4-step", backend))
        ratios = [f"{first_ms[label, backend] / chunk:.2f}" for label, *_ in samplers[:2]
                  if chunk and (label, backend) in first_ms]
        print(f"first-block latency ratio, frame-wise / chunk-wise ({backend}, warm; frame 0 with 4 and 2 steps): "
              f"{' / '.join(ratios)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("causal_flash/bench.py: no CUDA device, nothing to time (the tests run the kernel in Triton's interpreter).")
        return
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    bench_kernel(args.quick)
    bench_model_stream(args.quick)


if __name__ == "__main__":
    main()
