"""Generation, written once: the bidirectional Euler sampler and the block-by-block KV-cached rollout that
sample.py streams from, eval.py judges and dmd.py trains through (its self-forcing rollout).

Causal rollout, per block of `frames_per_block` frames:
  - solver "euler": integrate the block's ODE over a step list with classifier-free guidance;
  - solver "consistency" (the few-step students, and the teachers over their 48-step grid): x0 = G(x_t, t),
    re-noise with fresh noise to the next t, repeat; the last x0 is the block;
then run the model once on the finished block at t = 0 with cache_write=True, so later blocks attend
to clean keys/values of it. Text keys/values are computed once per video (inside the cache).

The training rollout of DMD is the same loop with `exit_steps`: each block stops at a random exit step,
whose x0 is the block, so it equals the sampler run with the step list cut after that step (tested).
"""
import torch

import model as M

# The teachers' sampler. The paper integrates the ODE (48 Euler steps, guidance 3). The toy teachers draw
# better with the consistency solver over the same 48-step grid (x0 at each point, re-noised with fresh
# noise): it forgets the errors of earlier steps instead of integrating them. Measured on three noise seeds
# in the README ("the teachers' sampler"); `--solver euler --guidance 3` gives the paper's sampler.
TEACHER_SOLVER, TEACHER_GUIDANCE = "consistency", 1.5


def contexts(model, tokens, guidance):
    """Text context [B, L, D] from the toy's prompt tokens; a model without a token embedding (Wan) takes
    its text encoder's output [B, L, text_dim] in their place. With guidance > 1 the unconditional
    (empty prompt) half is appended."""
    ctx = model.encode_text(tokens)
    return torch.cat([ctx, torch.zeros_like(ctx)]) if guidance > 1 else ctx


def velocity(model, x, t, ctx, guidance, **kw):
    """v with classifier-free guidance v_u + w (v_c - v_u); cond and uncond run as one batch."""
    if guidance <= 1:
        return model(x, t, ctx, **kw)
    for key in ("clean_x", "actions"):  # guidance is over text only: both halves see the same frames and actions
        if kw.get(key) is not None:
            kw = {**kw, key: torch.cat([kw[key], kw[key]])}
    cond, uncond = model(torch.cat([x, x]), torch.cat([t, t]), ctx, **kw).chunk(2)
    return M.guidance(uncond, cond, guidance)


@torch.no_grad()
def sample_bidirectional(model, tokens, noise, steps=48, guidance=3.0, actions=None, solver="euler", generator=None):
    """All frames at once along the shifted grid from t = 1000 to 0 (actions [B, F]: a world model's).
    solver "euler" follows the ODE; "consistency" takes x0 at every grid point and re-noises it with fresh
    noise to the next one, which forgets the errors of earlier steps instead of carrying them along."""
    ctx = contexts(model, tokens, guidance)
    grid = torch.cat([M.timesteps(steps, model.cfg.shift), torch.zeros(1)]).tolist()
    x = noise
    B = x.shape[0]
    for t, t_next in zip(grid[:-1], grid[1:]):
        t_now = torch.full((B,), t, device=x.device)
        v = velocity(model, x, t_now, ctx, guidance, actions=actions)
        if solver == "euler":
            x = M.euler_step(x, v, t, t_next)
        else:
            x0 = M.x0_from_v(x, v, t_now)
            eps = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
            x = M.add_noise(x0, eps, torch.full((B,), t_next, device=x.device))
    return x


class Frozen:
    """What a forward that carries gradient (the training rollout's exit step) sees of the KV cache: the
    history as it stands when that forward starts, held fixed, and nothing written. Later no-grad passes
    write the cache in place and commit more frames; a block recomputed in the backward (activation
    checkpointing) reads this view instead, so it attends to exactly the K/V the forward saw, and the
    backward never needs a buffer that was overwritten. The text K/V are recomputed: those cached by a
    no-grad pass would cut the text path out of the gradient (a few tokens, cheap next to the video's)."""

    def __init__(self, cache):
        self.cache, self.next_frame = cache, cache.next_frame

    def make_room(self, num_frames):
        """model.forward calls this once, before its blocks (a recompute does not): evict, then fix the view.
        It slices the preallocated buffers, which later commits only write behind the committed frames; a
        rolling window's eviction shifts frames in place, so there the view is a copy."""
        c = self.cache
        c.make_room(num_frames)

        def fixed(buf):
            if buf is None:  # nothing written yet
                return None
            part = buf[:, :c.length * (buf.shape[1] // c.capacity)]
            return part.clone() if c.rolling else part

        self.k, self.v = [fixed(b) for b in c.k], [fixed(b) for b in c.v]

    def attend(self, layer, k, v, tokens_per_frame):
        if self.k[layer] is None:
            return k, v
        return torch.cat([self.k[layer], k], 1), torch.cat([self.v[layer], v], 1)

    @property
    def text(self):  # a fresh list: what CrossAttention stores in it is dropped
        return [None] * len(self.cache.text)


def commit(model, x0, ctx, cache, actions=None):
    """Write a finished block's clean keys/values into the cache at t = 0; history carries no gradient.
    ctx may hold the unconditional half too (guidance): the block is then written for both."""
    width = ctx.shape[0] // x0.shape[0]
    with torch.no_grad():
        zero = torch.zeros(x0.shape[0] * width, x0.shape[2], device=x0.device)
        model(x0.detach().repeat(width, 1, 1, 1, 1), zero, ctx, kv_cache=cache, cache_write=True,
              actions=None if actions is None else actions.repeat(width, 1))


def stream(model, tokens, noise, frames_per_block, steps, solver="consistency", first_steps=None,
           guidance=1.0, window=None, sink=0, generator=None, context=None, exit_steps=None, rows=None,
           actions=None):
    """Yield the generated video block by block ([B, C, frames_per_block, H, W] each) as it is produced.

    steps: the block's timestep list (e.g. model.timesteps(2, shift)); `first_steps` overrides it for
      frame 0's block (the frame-wise students give frame 0 four steps).
    context: clean frames [B, C, k, H, W] written into the cache at t = 0 before anything is generated
      (image-to-video: the given frame is frame 0, so `first_steps` does not apply); not yielded.
    exit_steps=(j, j_first): the self-forcing training rollout. Every block stops at step j (frame 0's
      block at j_first of `first_steps`); the steps before run without grad, the exit step's forward
      runs with grad (when the caller has grad enabled) and its x0 is the block. Without it, no grad.
    rows=(slice, global batch): a process's share of a global batch under DDP. Fresh noise is drawn for
      the whole batch and sliced, so N processes roll out exactly what one process would.
    actions [B, F]: a world model's action id per frame of the whole video, the `context` frames first.
    A block is yielded before it is re-encoded into the cache: a consumer sees it as soon as it exists.
    """
    if exit_steps is not None and solver != "consistency":
        raise ValueError("exit steps belong to the consistency solver of the few-step students")
    net = getattr(model, "module", model)  # in training the generator may be DDP-wrapped; call the wrapper
    n_frames = noise.shape[2]
    if n_frames % frames_per_block:
        raise ValueError(f"{n_frames} frames are not a whole number of {frames_per_block}-frame blocks")
    grad = exit_steps is not None and torch.is_grad_enabled()

    def fresh(like):  # re-noising draws (see `rows`)
        shape = like.shape if rows is None else (rows[1], *like.shape[1:])
        eps = torch.randn(shape, generator=generator, dtype=like.dtype)
        return (eps if rows is None else eps[rows[0]]).to(like.device)

    def acts(start, n):  # the actions of frames [start, start + n) of the whole video
        return None if actions is None else actions[:, start:start + n]

    with torch.set_grad_enabled(grad):
        ctx = contexts(net, tokens, guidance)
    given = 0 if context is None else context.shape[2]
    cache = M.KVCache(net.cfg.num_layers, max(given + n_frames, net.cfg.frames), window, sink)
    if context is not None:
        commit(model, context, ctx, cache, acts(0, given))
    for start in range(0, n_frames, frames_per_block):
        first = start == 0 and context is None and first_steps is not None
        ts = list(first_steps if first else steps)
        j = None if exit_steps is None else exit_steps[1 if first else 0]
        x = noise[:, :, start:start + frames_per_block]
        a = acts(given + start, frames_per_block)
        x0 = denoise_block(model, x, ts, ctx, cache, solver, guidance, fresh, j, grad, a)
        yield x0
        if start + frames_per_block < n_frames:  # the last block is never attended to
            commit(model, x0, ctx, cache, a)


def denoise_block(model, x, ts, ctx, cache, solver, guidance, fresh, exit_step=None, grad=False, actions=None):
    """One block from noise to x0 over the step list `ts`; stops after `exit_step` when given, and only
    that step's forward may carry gradient. `fresh(x)` draws the re-noising noise; `actions` [B, n] are
    the block's (world model)."""
    B, n = x.shape[0], x.shape[2]
    if solver == "euler":
        with torch.no_grad():
            for t, t_next in zip(ts, ts[1:] + [0.0]):
                v = velocity(model, x, torch.full((B, n), t, device=x.device), ctx, guidance, kv_cache=cache,
                             actions=actions)
                x = M.euler_step(x, v, t, t_next)
        return x
    last = len(ts) - 1 if exit_step is None else exit_step
    for i, t in enumerate(ts[:last + 1]):
        t_now = torch.full((B, n), t, device=x.device)
        with_grad = grad and i == last
        with torch.set_grad_enabled(with_grad):
            kv = Frozen(cache) if with_grad else cache
            x0 = M.x0_from_v(x, velocity(model, x, t_now, ctx, guidance, kv_cache=kv, actions=actions), t_now)
        if i < last:  # re-noise with fresh noise, not an ODE step
            x = M.add_noise(x0, fresh(x), torch.full((B, n), ts[i + 1], device=x.device))
    return x0


def generate(model, tokens, noise, **kw):
    return torch.cat(list(stream(model, tokens, noise, **kw)), dim=2)
