"""Generation, written once: the bidirectional Euler sampler and the block-by-block KV-cached rollout that
sample.py streams from, eval.py judges and the later training stages roll out with.

Causal rollout, per block of `frames_per_block` frames:
  - teacher (solver "euler"): integrate the block's ODE over a step list with classifier-free guidance;
  - few-step student (solver "consistency"): x0 = G(x_t, t), re-noise with fresh noise to the next t,
    repeat; the last x0 is the block;
then run the model once on the finished block at t = 0 with cache_write=True, so later blocks attend
to clean keys/values of it. Text keys/values are computed once per video (inside the cache).
"""
import torch

import model as M


def contexts(model, tokens, guidance):
    """Text context [B, L, D]; with guidance > 1 the unconditional (empty prompt) half is appended."""
    ctx = model.encode_text(tokens)
    return torch.cat([ctx, torch.zeros_like(ctx)]) if guidance > 1 else ctx


def velocity(model, x, t, ctx, guidance, **kw):
    """v with classifier-free guidance v_u + w (v_c - v_u); cond and uncond run as one batch."""
    if guidance <= 1:
        return model(x, t, ctx, **kw)
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), ctx, **kw).chunk(2)
    return M.guidance(uncond, cond, guidance)


@torch.no_grad()
def sample_bidirectional(model, tokens, noise, steps=48, guidance=3.0, shift=None):
    """All frames at once: Euler along the shifted grid from t = 1000 to 0."""
    shift = shift or model.cfg.shift
    ctx = contexts(model, tokens, guidance)
    grid = torch.cat([M.timesteps(steps, shift), torch.zeros(1)]).tolist()
    x = noise
    B = x.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        v = velocity(model, x, torch.full((B,), t, device=x.device), ctx, guidance)
        x = M.euler_step(x, v, t, t_next)
    return x


def stream(model, tokens, noise, frames_per_block, steps, solver="consistency", first_steps=None,
           guidance=1.0, window=None, sink=0, generator=None):
    """Yield the video block by block ([B, C, frames_per_block, H, W] each) as it is generated.
    `steps`: the block's timestep list (e.g. model.timesteps(2, shift)); `first_steps` overrides it for
    block 0 (the frame-wise students give frame 0 four steps)."""
    B, _, n_frames = noise.shape[:3]
    if n_frames % frames_per_block:
        raise ValueError(f"{n_frames} frames are not a whole number of {frames_per_block}-frame blocks")
    width = 2 if guidance > 1 else 1
    with torch.no_grad():
        ctx = contexts(model, tokens, guidance)
    cache = model.new_cache(max_frames=max(n_frames, model.cfg.frames), window=window, sink=sink)
    for start in range(0, n_frames, frames_per_block):
        x = noise[:, :, start:start + frames_per_block]
        ts = list(first_steps if start == 0 and first_steps is not None else steps)
        with torch.no_grad():
            x0 = denoise_block(model, x, ts, ctx, cache, solver, guidance, generator)
            zero = torch.zeros(B * width, frames_per_block, device=x.device)
            model(x0.repeat(width, 1, 1, 1, 1), zero, ctx, kv_cache=cache, cache_write=True)
        yield x0


def denoise_block(model, x, ts, ctx, cache, solver, guidance, generator):
    B = x.shape[0]
    n = x.shape[2]
    if solver == "euler":
        for t, t_next in zip(ts, ts[1:] + [0.0]):
            v = velocity(model, x, torch.full((B, n), t, device=x.device), ctx, guidance, kv_cache=cache)
            x = M.euler_step(x, v, t, t_next)
        return x
    for i, t in enumerate(ts):
        t_now = torch.full((B, n), t, device=x.device)
        x0 = M.x0_from_v(x, velocity(model, x, t_now, ctx, guidance, kv_cache=cache), t_now)
        if i + 1 < len(ts):  # re-noise with fresh noise, not an ODE step
            fresh = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = M.add_noise(x0, fresh, torch.full((B, n), ts[i + 1], device=x.device))
    return x0


def generate(model, tokens, noise, **kw):
    return torch.cat(list(stream(model, tokens, noise, **kw)), dim=2)
