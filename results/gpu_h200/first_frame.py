import sys, time, torch
sys.path.insert(0, '.')
import model as M
dev = "cuda" if torch.cuda.is_available() else "cpu"
name = "wan2.1-1.3b" if dev == "cuda" else "toy"
net = M.build(name, device=dev, dtype=torch.bfloat16 if dev == "cuda" else torch.float32).eval()
cfg = net.cfg
ctx = torch.randn(1, cfg.text_len, cfg.text_dim, device=dev, dtype=next(net.parameters()).dtype)
sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
for fpb in (1, 3):
    x = torch.randn(1, cfg.in_dim, fpb, cfg.height, cfg.width, device=dev, dtype=ctx.dtype)

    @torch.no_grad()
    @torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda")
    def first_call():
        cache = net.new_cache(max_frames=21)
        net(x, torch.full((1, fpb), 1000., device=dev), ctx, kv_cache=cache)  # the first: allocates + text K/V
        sync()
        t0 = time.perf_counter()
        for _ in range(4):
            net(x, torch.full((1, fpb), 900., device=dev), ctx, kv_cache=cache)
        sync()
        return (time.perf_counter() - t0) / 4, cache

    for _ in range(2):
        first_call()
    wall, cache = first_call()
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if dev == "cuda" else [])
    with torch.no_grad(), torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"), \
            torch.profiler.profile(activities=acts) as prof:
        net(x, torch.full((1, fpb), 900., device=dev), ctx, kv_cache=cache)
        sync()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=3)
    print(f"== first block of {fpb} frame(s), a denoising call on a fresh cache: wall {wall * 1e3:.1f} ms")
    print("\n".join(table.splitlines()[-3:]))
