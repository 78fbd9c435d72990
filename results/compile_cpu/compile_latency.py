"""Does torch.compile change the first-frame latency ratio of the toy students? Run from the repo root:
python results/compile_cpu/compile_latency.py. Both students eager and compiled (inductor, dynamic shapes),
each pair timed by sample.bench (5 alternating videos, medians; the ratio is frame-wise / chunk-wise),
twice in turn, so that a drift of the machine shows as a difference between the two rounds."""
import copy, sys, time

import torch

sys.path.insert(0, ".")
import data
import sample

torch._dynamo.config.recompile_limit = 64  # one graph per cache length; the default 8 falls back to eager
dev = torch.device("cpu")
args = sample.parse_args([])
tokens = data.tokenize([data.PROMPTS[0]])
eager, compiled = [], []
for stem in ["checkpoints/cfpp_framewise_2step", "checkpoints/cf_chunkwise_4step"]:
    net, meta = sample.load(stem, dev)
    plan = sample.plan(meta, args, net.cfg)
    ref = sample.run(net, tokens, plan, 0, dev)
    fast = copy.deepcopy(net)
    fast.forward = torch.compile(fast.forward, dynamic=True)
    t0 = time.perf_counter()
    with torch.no_grad():
        for seed in (1, 0):  # the cache lengths of a whole video, twice: every graph is compiled
            out = sample.run(fast, tokens, plan, seed, dev)  # the last: seed 0, as `ref`
    print(f"{stem}: compiling {time.perf_counter() - t0:.0f} s, max |compiled - eager| "
          f"{(out - ref).abs().max().item():.1e}", flush=True)
    eager.append((net, tokens, plan, 0, dev, None, None))
    compiled.append((fast, tokens, plan, 0, dev, None, None))
for name, cases in [("eager", eager), ("compiled", compiled)] * 2:
    timed, ratio = sample.bench(cases)
    print(f"{name:9s} first-frame latency {timed[0]['first_frame_latency_s'] * 1e3:.1f} ms / "
          f"{timed[1]['first_frame_latency_s'] * 1e3:.1f} ms, frames/s {timed[0]['frames_per_s']} / "
          f"{timed[1]['frames_per_s']}, latency ratio {ratio:.3f}", flush=True)
