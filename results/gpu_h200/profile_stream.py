import sys, time, torch
sys.path.insert(0, '.')
import model as M
name = sys.argv[1] if len(sys.argv) > 1 else "wan2.1-1.3b"
dev = "cuda" if torch.cuda.is_available() else "cpu"
dt = torch.bfloat16 if dev == "cuda" else torch.float32
net = M.build(name, device=dev, dtype=dt).eval()
cfg = net.cfg
ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=dt)
x = torch.randn(1, cfg.in_dim, 1, cfg.height, cfg.width, device=dev, dtype=dt)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

@torch.no_grad()
@torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
def prefill(n):
    cache = net.new_cache(max_frames=21)
    for _ in range(n):
        net(x, torch.zeros(1, 1, device=dev), ctx, kv_cache=cache, cache_write=True)
    return cache

@torch.no_grad()
@torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
def step(cache):
    return net(x, torch.full((1, 1), 500., device=dev), ctx, kv_cache=cache)

outs = {}
for b in ("sdpa", "triton") if dev == "cuda" else ("sdpa",):
    net.attn_backend = b
    c = prefill(5)
    outs[b] = step(c).float()
if dev == "cuda":
    print("model-level rel err sdpa vs triton (5 cached frames):",
          ((outs["sdpa"] - outs["triton"]).norm() / outs["sdpa"].norm()).item())
for b in ("sdpa", "triton") if dev == "cuda" else ("sdpa",):
    net.attn_backend = b
    c = prefill(10)
    for _ in range(3):
        step(c)
    sync()
    t0 = time.perf_counter()
    for _ in range(10):
        step(c)
    sync()
    wall = (time.perf_counter() - t0) / 10
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        step(c)
        sync()
    ka = prof.key_averages()
    gpu_us = sum(e.self_device_time_total for e in ka) if dev == "cuda" else 0
    launches = sum(e.count for e in ka if e.key.startswith("cudaLaunchKernel") or e.key.startswith("cuLaunchKernel"))
    print(f"\n== {b}: decode forward, 10 cached frames + 1: wall {wall*1e3:.1f} ms; GPU kernel time {gpu_us/1e3:.1f} ms; kernel launches {launches}")
    print(ka.table(sort_by="self_device_time_total" if dev == "cuda" else "self_cpu_time_total", row_limit=18, max_name_column_width=50))
