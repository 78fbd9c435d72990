"""CPU benchmark of model.py (fp32, no grad):

1. our forward vs diffusers' WanTransformer3DModel at the same config and the same weights;
2. KV-cache decode time per frame as the video grows, full cache vs rolling window;
3. first-frame latency, frame-wise (frame 0: 4 steps of one frame) vs chunk-wise (4 steps of a 3-frame
   block), as the frames grow: the paper's latency claim is about compute-bound forwards.

    python bench_model.py [--quick] [--threads 2]

CPU timings on a shared machine are noisy, so whatever is compared is timed side by side in one run,
interleaved (A, B, A, B, ...), and medians are reported; a ratio is the median of the paired ratios,
so a load spike that hits one pair moves neither number much.
"""
import argparse
import os
import statistics
import time
from dataclasses import replace

# Busy-waiting OpenMP threads are pathological on shared cores: when another job holds one core, each of the
# thousand parallel regions of a forward waits out a scheduler slice (seen here: 2 s instead of 45 ms).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read once, when torch loads libgomp
import torch  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import rollout  # noqa: E402

# A small Wan-shaped model, and the toy preset (which diffusers can express too: 4x4 patches, 3 channels).
SMALL = M.Config(dim=256, ffn_dim=1024, num_heads=4, num_layers=4, text_dim=64, text_len=16)
TOY = M.get_config("toy")
PARITY_CASES = [("small", SMALL, (1, 16, 6, 16, 16)), ("small", SMALL, (2, 16, 12, 16, 16)),
                ("toy", TOY, (1, 3, 12, 32, 32)), ("toy", TOY, (8, 3, 12, 32, 32))]
DECODE_FRAMES, WINDOW, SINK = 48, 12, 1
SHOW_FRAMES = [1, 2, 4, 8, 12, 24, 36, 48]
LATENCY_SIDES = (32, 64, 128)  # toy frames of 64, 256 and 1,024 tokens (a Wan-1.3B latent frame has 1,560)


def ms(fn):
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def interleaved(fns, reps):
    """Per-fn lists of ms, timed round-robin so that changes in the machine's load hit all alike."""
    for fn in fns:  # warm-up: allocator, oneDNN primitive cache
        fn()
    times = [[] for _ in fns]
    for _ in range(reps):
        for ts, fn in zip(times, fns):
            ts.append(ms(fn))
    return times


def paired_ratio(a, b):
    return statistics.median(x / y for x, y in zip(a, b))


def twins(cfg, seed=0):
    """Ours and diffusers' WanTransformer3DModel holding the same random weights."""
    from diffusers import WanTransformer3DModel
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps).eval()
    with torch.no_grad():  # diffusers zero-inits the output head: randomise all, so the diff check means something
        for p in ref.parameters():
            p.normal_(0, 0.05)
    # the toy's token embedding has no twin (and forward skips it); its x0 head is read as v, as Wan's is
    ours = M.build(replace(cfg, vocab_size=0, prediction="v")).eval()
    M.load_wan_weights(ours, ref.state_dict())
    return ours, ref


def bench_vs_diffusers(reps):
    print(f"1. forward, ours vs diffusers WanTransformer3DModel (median of {reps}, interleaved)")
    print(f"   {'model':6s} {'latents':18s} {'tokens':>6s} {'max|diff|':>9s} {'ours ms':>9s} {'diff. ms':>9s} "
          f"{'ours/diff.':>10s}")
    built = {}
    for name, cfg, shape in PARITY_CASES:
        if name not in built:
            built[name] = twins(cfg)
        ours, ref = built[name]
        g = torch.Generator().manual_seed(0)
        B = shape[0]
        x = torch.randn(shape, generator=g)
        t = torch.linspace(999, 1, B)
        ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)  # exactly text_len: no padding on our side
        run_ours = lambda: ours(x, t, ctx)
        run_ref = lambda: ref(x, t, ctx, return_dict=False)[0]
        diff = (run_ours() - run_ref()).abs().max().item()
        a, b = interleaved([run_ours, run_ref], reps)
        tokens = B * shape[2] * shape[3] * shape[4] // (cfg.patch_size[1] * cfg.patch_size[2])
        print(f"   {name:6s} {str(list(shape)):18s} {tokens:6d} {diff:9.1e} {statistics.median(a):9.1f} "
              f"{statistics.median(b):9.1f} {paired_ratio(a, b):9.2f}x")


def decode_times(m, batch, reps):
    """ms to decode frame n (the noisy t=1000 pass reading the cache + the t=0 pass committing the frame),
    full cache vs rolling window, for every shown n; all of them timed round-robin, like part 1."""
    cfg = m.cfg
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_dim, 1, cfg.height, cfg.width, generator=g)
    ctx = torch.randn(batch, cfg.text_len, cfg.text_dim, generator=g)
    noisy, clean = torch.full((batch,), 1000.0), torch.zeros(batch)

    def frame(cache):
        m(x, noisy, ctx, kv_cache=cache)
        m(x, clean, ctx, kv_cache=cache, cache_write=True)

    def decode_frame(new_cache, n):
        """Decode frame n into a cache that holds frames 1..n-1, then rewind the cache's counters: the work
        of a step depends on them only, not on the values in the buffers. n = 0: the first frame of a
        fresh cache, which also allocates the buffers and projects the text K/V (once per video)."""
        if n == 0:
            return lambda: frame(new_cache())
        cache = new_cache()
        for _ in range(n - 1):
            frame(cache)
        state = cache.length, cache.next_frame

        def run():
            frame(cache)
            cache.length, cache.next_frame = state
        return run

    kinds = {"full": lambda: m.new_cache(max_frames=DECODE_FRAMES),
             "window": lambda: m.new_cache(max_frames=DECODE_FRAMES, window=WINDOW, sink=SINK)}
    cases = [(k, n) for n in [0] + SHOW_FRAMES for k in kinds]
    times = dict(zip(cases, interleaved([decode_frame(kinds[k], n) for k, n in cases], reps)))
    return {(k, n): (statistics.median(ts), paired_ratio(ts, times[k, 1])) for (k, n), ts in times.items()}


def bench_decode(reps, batches=(1, 8)):
    print(f"\n2. KV-cache decode, toy preset, 1-frame blocks: ms to decode frame n (t=1000 pass reading the cache +"
          f" t=0 pass\n   committing it; median of {reps}, interleaved); full = new_cache(max_frames={DECODE_FRAMES}),"
          f" window = same + window={WINDOW}, sink={SINK}")
    torch.manual_seed(0)
    m = M.build("toy").eval()
    results = {B: decode_times(m, B, reps) for B in batches}
    print("     n" + "".join(f" | B={B} full       B={B} window    " for B in batches))
    for n in SHOW_FRAMES:
        cells = [f"{results[B][k, n][0]:6.2f} ({results[B][k, n][1]:4.2f}x)"
                 for B in batches for k in ("full", "window")]
        print(f"   {n:3d}" + "".join((" | " if i % 2 == 0 else "   ") + c for i, c in enumerate(cells)))
    fresh = ", ".join(f"B={B} {k} {results[B][k, 0][0]:.2f} ms" for B in batches for k in ("full", "window"))
    print(f"   (x) = ratio to frame 1. Frame 1 of a fresh cache (allocates the buffers, projects the text K/V once):"
          f"\n   {fresh}")


def bench_latency(reps):
    print(f"\n3. first-frame latency, toy model (random weights) on larger frames: the first block of a fresh "
          f"stream\n   (text encoding + 4 warped steps; what sample.py --bench times), frame-wise 1 frame vs "
          f"chunk-wise 3 frames\n   (median of {reps}, interleaved)")
    print(f"   {'frame':7s} {'tokens/frame':>12s} {'1 frame ms':>10s} {'3 frames ms':>11s} {'ratio':>6s}")
    for side in LATENCY_SIDES:
        cfg = replace(M.get_config("toy"), height=side, width=side)
        torch.manual_seed(0)
        m = M.build(cfg).eval()
        tokens, steps = data.tokenize(["red circle"]), M.timesteps(4, cfg.shift).tolist()

        def first_block(frames):
            noise = torch.randn(1, cfg.in_dim, frames, side, side)  # one block: stream yields it, commits nothing
            return lambda: next(rollout.stream(m, tokens, noise, frames, steps, generator=torch.Generator()))
        a, b = interleaved([first_block(1), first_block(3)], reps)
        per_frame = side * side // (cfg.patch_size[1] * cfg.patch_size[2])
        print(f"   {side:3d}x{side:<3d} {per_frame:12d} {statistics.median(a):10.1f} {statistics.median(b):11.1f} "
              f"{paired_ratio(a, b):6.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier)")
    parser.add_argument("--threads", type=int, default=2,
                        help="intra-op threads (1 is steadier when another job holds a core)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = lambda: "/".join(f"{v:.1f}" for v in os.getloadavg())  # the noise to expect: > cores means contention
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads of {os.cpu_count()} cores, fp32; "
          f"load average {load()}\n")
    with torch.no_grad():
        bench_vs_diffusers(reps=4 if args.quick else 15)
        bench_decode(reps=3 if args.quick else 15)
        bench_latency(reps=3 if args.quick else 10)
    print(f"\nload average {load()}")


if __name__ == "__main__":
    main()
