import sys, time, torch
sys.path.insert(0, '.')
import model as M
torch.manual_seed(0)
net = M.build("wan2.1-1.3b", device="cuda", dtype=torch.bfloat16).eval()
torch.nn.init.normal_(net.head.head.weight, std=0.02)  # the zero head would make every output 0
cfg, frames, S = net.cfg, 21, 1560
ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device="cuda", dtype=torch.bfloat16)
noise = torch.randn(1, cfg.in_dim, frames, cfg.height, cfg.width, device="cuda", dtype=torch.bfloat16)

@torch.no_grad()
def stream(fpb, steps, first, n, keep=False):
    cache, done, outs, t0 = net.new_cache(max_frames=n), [], [], time.perf_counter()
    for start in range(0, n, fpb):
        x = noise[:, :, start:start + fpb]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for t in (first if start == 0 else steps):
                v = net(x, torch.full((1, fpb), t, device="cuda"), ctx, kv_cache=cache)
                if keep: outs.append(v.float())
                x = (x - v * t / 1000).to(x.dtype)
            net(x, torch.zeros(1, fpb, device="cuda"), ctx, kv_cache=cache, cache_write=True)
        torch.cuda.synchronize()
        done.append(time.perf_counter() - t0)
    return done, outs

# model-level agreement on a short stream (random weights, non-zero head)
ref = {}
for b in ("sdpa", "triton"):
    net.attn_backend = b
    ref[b] = stream(1, (1000, 833), (1000, 833), 4, keep=True)[1]
errs = [((a - b).norm() / a.norm()).item() for a, b in zip(ref["sdpa"], ref["triton"])]
print("model rel err sdpa vs triton per call:", " ".join(f"{e:.1e}" for e in errs))
print("sampler | attention | cold first ms | cold total s | warm first ms | warm total s | warm frames/s")
for label, fpb, steps, first in (("frame-wise 2-step (frame 0: 4)", 1, (1000, 833), (1000, 938, 833, 625)),
                                 ("frame-wise 2-step (frame 0: 2)", 1, (1000, 833), (1000, 833)),
                                 ("chunk-wise 4-step", 3, (1000, 938, 833, 625), (1000, 938, 833, 625))):
    for b in ("sdpa", "triton"):
        net.attn_backend = b
        stream(fpb, steps, first, 2 * fpb)
        cold = stream(fpb, steps, first, frames)[0]
        warm = stream(fpb, steps, first, frames)[0]
        print(f"{label} | {b} | {1e3*cold[0]:.1f} | {cold[-1]:.2f} | {1e3*warm[0]:.1f} | {warm[-1]:.2f} | {frames/warm[-1]:.2f}")
