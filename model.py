"""A causal video DiT that is the Wan2.1 DiT, parameter for parameter, plus the flow-matching core.

One module, every attention mode, one code path:
  - bidirectional                    model(x, t, ctx)
  - block-causal                     model(x, t, ctx, frames_per_block=k)
  - teacher forcing [clean | noisy]  model(x, t, ctx, frames_per_block=k, clean_x=x0)
  - incremental decoding (KV cache)  model(x_block, t_block, ctx, kv_cache=cache, cache_write=...)
The parameter names and shapes are the official ones (wan/modules/model.py), so the released
`diffusion_pytorch_model.safetensors` loads with strict=True; the diffusers naming goes through one table.
Shapes: x [B, C, F, H, W]; t [B] or [B, F] in [0, 1000]; context [B, L, text_dim]; returns v = eps - x0.
A world model (cfg.num_actions > 0) also takes actions [B, F], one action id per frame.
"""
import json
import math
import os
import re
from dataclasses import dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from causal_flash.mask import block_mask

# ----------------------------------------------------------------------------------------------------
# Configs


@dataclass(frozen=True)
class Config:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_dim: int = 4096  # umT5-XXL width
    text_len: int = 512  # context is zero-padded to this many tokens, unmasked, as in the official model
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    eps: float = 1e-6
    vocab_size: int = 0  # > 0: a learned token embedding stands in for umT5 (toy world only)
    num_actions: int = 0  # > 0: one action id per frame conditions the model (the toy world model)
    shift: float = 5.0  # timestep shift of the flow-matching schedule used with this model
    prediction: str = "v"  # what the head draws: "v" (Wan) or "x0" (the pixel-space toy; forward still returns v)
    frames: int = 21  # trained length (latent frames) and frame size the model is used at
    height: int = 60
    width: int = 104

    @property
    def head_dim(self):
        return self.dim // self.num_heads


PRESETS = {
    # Bouncing Shapes: 32x32 RGB pixels, 12 frames, 4x4 patches -> 64 tokens per frame. Shift 5 (the paper's):
    # after ~550 steps this model drew one object per frame at shift 5 and a scatter of patch-sized blobs at 3.
    # x0 prediction: a 48-value pixel patch is easier to draw than the noise in it (Li & He 2025, "Back to
    # Basics"); with it the frames come out in one clean piece far sooner (README, "the teachers").
    "toy": Config(dim=128, ffn_dim=512, num_heads=2, num_layers=4, freq_dim=256, text_dim=32, text_len=2,
                  in_dim=3, out_dim=3, patch_size=(1, 4, 4), vocab_size=10, shift=5.0, prediction="x0",
                  frames=12, height=32, width=32),
    # A few-second stand-in of the toy world for tests and smoke runs (6 frames).
    "toy-tiny": Config(dim=32, ffn_dim=64, num_heads=1, num_layers=1, freq_dim=32, text_dim=8, text_len=2,
                       in_dim=3, out_dim=3, patch_size=(1, 4, 4), vocab_size=10, shift=3.0, prediction="x0",
                       frames=6, height=32, width=32),
    "wan2.1-1.3b": Config(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": Config(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_config(name, **overrides):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def config_from_dict(d):
    """Config from a dict (our JSON, an official config.json or a diffusers config.json)."""
    if "num_attention_heads" in d:  # diffusers WanTransformer3DModel
        d = {"dim": d["num_attention_heads"] * d["attention_head_dim"], "num_heads": d["num_attention_heads"],
             "ffn_dim": d["ffn_dim"], "num_layers": d["num_layers"], "freq_dim": d.get("freq_dim", 256),
             "text_dim": d.get("text_dim", 4096), "in_dim": d["in_channels"], "out_dim": d["out_channels"],
             "patch_size": d.get("patch_size", (1, 2, 2)), "eps": d.get("eps", 1e-6)}
    known = {f.name for f in fields(Config)}
    d = {k: (tuple(v) if k == "patch_size" else v) for k, v in d.items() if k in known}
    return Config(**d)  # keys the official file omits (patch_size, text_dim, ...) take the class defaults


# ----------------------------------------------------------------------------------------------------
# Flow-matching core (Wan rectified flow): x_t = (1 - s) x0 + s eps, v = eps - x0, t = 1000 s.


X0_MIN_SIGMA = 0.05  # x0-prediction models return v = (x - x0) / max(sigma, this) (JiT's clamp)


def shift_sigma(sigma, shift):
    return shift * sigma / (1 + (shift - 1) * sigma)


def timesteps(num_steps, shift=5.0):
    """The shifted grid t_k = 1000 shift(1 - k/n), k = 0..n-1: n=48 is the ODE/CD grid, n=4/2/1 the
    warped few-step lists [1000, 937.5, 833.3, 625] / [1000, 833.3] / [1000]."""
    sigma = 1 - torch.arange(num_steps, dtype=torch.float64) / num_steps
    return (1000 * shift_sigma(sigma, shift)).float()


def timestep_list(values):
    """A few-step student's explicit block list ("1000,250" or [1000, 250]) -> floats, strictly descending
    in (0, 1000]; ValueError otherwise."""
    try:
        ts = [float(v) for v in (values.split(",") if isinstance(values, str) else values)]
    except (TypeError, ValueError):
        raise ValueError("must be numbers") from None
    if not ts or not all(0 < t <= 1000 for t in ts) or any(b >= a for a, b in zip(ts, ts[1:])):
        raise ValueError("must be strictly descending numbers in (0, 1000]")
    return ts


def _sigma(t, x):
    """t [B] or [B, F] -> sigma broadcastable against x [B, C, F, H, W]."""
    t = torch.as_tensor(t, dtype=torch.float32, device=x.device)
    if t.ndim == 0:
        t = t.expand(x.shape[0])
    t = t.view(t.shape[0], 1, -1, 1, 1) if t.ndim == 2 else t.view(-1, 1, 1, 1, 1)
    return (t / 1000).to(x.dtype)


def add_noise(x0, noise, t):
    s = _sigma(t, x0)
    return (1 - s) * x0 + s * noise


def x0_from_v(x_t, v, t):
    return x_t - _sigma(t, x_t) * v


def v_from_x0(x_t, x0, t):
    return (x_t - x0) / _sigma(t, x_t)


def euler_step(x_t, v, t, t_next):
    return x_t + (_sigma(t_next, x_t) - _sigma(t, x_t)) * v


def guidance(uncond, cond, scale):
    return uncond + scale * (cond - uncond)


def loss_weight(t, shift=5.0):
    """The stage-1 'bell' weight: exp(-2((t-500)/1000)^2) minus its minimum on the 1000-step training
    grid, normalised to mean 1 over that grid (zero at t = 1000)."""
    grid = timesteps(1000, shift)
    bell = lambda u: torch.exp(-2 * ((u - 500) / 1000) ** 2)
    y = bell(grid)
    return (bell(torch.as_tensor(t, dtype=torch.float32)) - y.min()) * 1000 / (y - y.min()).sum()


def sample_t(shape, shift, generator=None, device=None):
    """Training timesteps: uniform indices into the shifted 1000-step grid."""
    idx = torch.randint(0, 1000, shape, generator=generator)
    return timesteps(1000, shift)[idx].to(device)


# ----------------------------------------------------------------------------------------------------
# Embeddings


def sinusoid(dim, t):
    """Wan's time embedding: cos first, base 10000, exponent j/half, computed in float64."""
    half = dim // 2
    freqs = torch.pow(10000, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angle = t.double()[:, None] * freqs
    return torch.cat([torch.cos(angle), torch.sin(angle)], dim=1).float()


def rope_split(head_dim):
    """Real dims per axis (frame, height, width): 44/42/42 for head_dim 128."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(head_dim, frame_pos, grid_h, grid_w, device):
    """Rotation angle per token and complex pair: [len(frame_pos) * grid_h * grid_w, head_dim / 2].
    Each axis has its own base 10000^(-2j/n); token order (f, h, w) row-major."""
    def axis(pos, n):
        freqs = torch.pow(10000, -torch.arange(0, n, 2, dtype=torch.float64, device=device) / n)
        return pos.double()[:, None] * freqs

    nf, nh, nw = rope_split(head_dim)
    f = axis(frame_pos.to(device), nf)
    h = axis(torch.arange(grid_h, device=device), nh)
    w = axis(torch.arange(grid_w, device=device), nw)
    T, Hh, Ww = len(frame_pos), grid_h, grid_w
    return torch.cat([f[:, None, None].expand(T, Hh, Ww, -1), h[None, :, None].expand(T, Hh, Ww, -1),
                      w[None, None, :].expand(T, Hh, Ww, -1)], dim=-1).reshape(T * Hh * Ww, -1)


def apply_rope(x, rotation):
    """x [B, L, H, D]; rotate adjacent pairs (x[2i], x[2i+1]) as complex numbers by e^(i angle) [L, D/2]
    (one complex multiply is ~10x faster than building the rotation from real slices)."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(xc * rotation[:, None]).flatten(-2).type_as(x)


# ----------------------------------------------------------------------------------------------------
# Attention: one dispatch point; `backend` ("sdpa" | "triton") forces either. "auto" gives the Triton kernel
# the masked calls on CUDA: at Wan-1.3B shapes on an H200 it ran block-causal attention 1.6-1.75x (forward) and
# 1.2-1.35x (forward+backward) faster than SDPA's best masked backend (cuDNN), teacher forcing 2.6-2.8x / 2.0-2.2x.
# The unmasked calls (KV-cache decode, bidirectional) go to SDPA: its cuDNN kernel was 1.4-2.3x faster than ours.


def uses_kernel(backend, on_cuda, masked):
    return backend == "triton" or (backend == "auto" and on_cuda and masked)


def attention(q, k, v, tokens_per_block=None, clean_len=0, backend="auto"):
    """q, k, v [B, H, L, D] -> [B, H, Lq, D]; the mask (if any) is the rule of causal_flash/mask.py."""
    if uses_kernel(backend, q.is_cuda, tokens_per_block is not None):
        from causal_flash.flash_attention import flash_attention
        return flash_attention(q, k, v, tokens_per_block=tokens_per_block, clean_len=clean_len)
    mask = None if tokens_per_block is None else block_mask(q.shape[2], tokens_per_block, clean_len, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class KVCache:
    """Per-layer self-attention keys/values (post-RoPE) of the frames generated so far, plus the text
    keys/values, computed once. A block is first *read* (denoising steps: its own K/V sit in the slot
    after the committed frames and are overwritten on every step), then *committed* (cache_write=True,
    the final t = 0 pass). With `window` the cache holds at most `window` frames including the block
    being generated; the oldest non-sink frames are evicted, the first `sink` frames are kept for good."""

    def __init__(self, num_layers, max_frames, window=None, sink=0):
        if window is not None and not 0 <= sink < window:
            raise ValueError(f"need 0 <= sink ({sink}) < window ({window})")
        self.capacity = max_frames if window is None else window
        self.rolling = window is not None
        self.sink = sink
        self.k = [None] * num_layers
        self.v = [None] * num_layers
        self.text = [None] * num_layers
        self.length = 0  # committed frames held
        self.next_frame = 0  # absolute index of the next frame (its RoPE position)

    def make_room(self, num_frames):
        """Evict the oldest non-sink frames so that `num_frames` more fit behind the committed ones."""
        if num_frames > self.capacity - self.sink:
            raise ValueError(f"a block of {num_frames} frames does not fit a window of {self.capacity} "
                             f"frames with {self.sink} sink frames")
        excess = self.length + num_frames - self.capacity
        if excess <= 0 or self.k[0] is None:
            return
        if not self.rolling:
            raise ValueError(f"the cache holds {self.capacity} frames; pass window=W to generate longer videos")
        s = self.k[0].shape[1] // self.capacity  # tokens per frame
        keep_from, keep_to = (self.sink + excess) * s, self.length * s
        for buf in self.k + self.v:
            buf[:, self.sink * s:keep_to - excess * s] = buf[:, keep_from:keep_to].clone()
        self.length -= excess

    def attend(self, layer, k, v, tokens_per_frame):
        """Write the block's K/V [B, n, H, D] behind the committed frames; return the visible K/V."""
        if self.k[layer] is None:
            shape = (k.shape[0], self.capacity * tokens_per_frame, *k.shape[2:])
            self.k[layer], self.v[layer] = k.new_zeros(shape), v.new_zeros(shape)
        start = self.length * tokens_per_frame
        end = start + k.shape[1]
        self.k[layer][:, start:end] = k
        self.v[layer][:, start:end] = v
        return self.k[layer][:, :end], self.v[layer][:, :end]

    def commit(self, num_frames):
        self.length += num_frames
        self.next_frame += num_frames


# ----------------------------------------------------------------------------------------------------
# The network


def rms(norm, x):
    """qk RMSNorm in fp32 (as the official model computes it), cast back to the activations' dtype."""
    return norm(x.float()).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)  # across all heads

    def forward(self, x, rope, ctx, layer):
        heads = lambda u: u.unflatten(-1, (self.num_heads, -1))
        q = apply_rope(heads(rms(self.norm_q, self.q(x))), rope)
        k = apply_rope(heads(rms(self.norm_k, self.k(x))), rope)
        v = heads(self.v(x))
        if ctx.cache is not None:
            k, v = ctx.cache.attend(layer, k, v, ctx.tokens_per_frame)
        out = attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                        ctx.tokens_per_block, ctx.clean_len, ctx.backend)
        return self.o(out.transpose(1, 2).flatten(2))


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads, eps):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q, self.norm_k = nn.RMSNorm(dim, eps=eps), nn.RMSNorm(dim, eps=eps)

    def forward(self, x, context, ctx, layer):
        heads = lambda u: u.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
        cached = ctx.cache.text[layer] if ctx.cache is not None else None
        if cached is None:  # text K/V depend only on the prompt: computed once per video
            cached = heads(rms(self.norm_k, self.k(context))), heads(self.v(context))
            if ctx.cache is not None:
                ctx.cache.text[layer] = cached
        out = F.scaled_dot_product_attention(heads(rms(self.norm_q, self.q(x))), *cached)
        return self.o(out.transpose(1, 2).flatten(2))


def layer_norm(x, eps):
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).type_as(x)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.eps = cfg.eps
        self.self_attn = SelfAttention(d, cfg.num_heads, cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)  # the affine cross-attention pre-norm (official name)
        self.cross_attn = CrossAttention(d, cfg.num_heads, cfg.eps)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d ** 0.5)

    def forward(self, x, e0, context, rope, ctx, layer):
        """x [B, F, S, D] (frame-major tokens), e0 [B, F, 6, D]: every frame has its own adaLN."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation[:, None] + e0).chunk(6, dim=2)
        flat = lambda u: u.flatten(1, 2)
        h = layer_norm(x, self.eps) * (1 + scale1) + shift1
        x = x + self.self_attn(flat(h), rope, ctx, layer).view_as(x) * gate1
        x = x + self.cross_attn(flat(self.norm3(x.float()).type_as(x)), context, ctx, layer).view_as(x)
        h = layer_norm(x, self.eps) * (1 + scale2) + shift2
        return x + self.ffn(h) * gate2


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.eps = cfg.eps
        self.head = nn.Linear(cfg.dim, math.prod(cfg.patch_size) * cfg.out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation[:, None] + e[:, :, None]).chunk(2, dim=2)  # from e, not e0
        return self.head(layer_norm(x, self.eps) * (1 + scale) + shift)


class _Ctx:
    """What every attention layer of one forward needs to know about the mode."""

    def __init__(self, tokens_per_frame, tokens_per_block, clean_len, cache, backend):
        self.tokens_per_frame, self.tokens_per_block = tokens_per_frame, tokens_per_block
        self.clean_len, self.cache, self.backend = clean_len, cache, backend


class CausalWanModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.attn_backend = "auto"  # "auto" | "sdpa" | "triton"
        self.patch_embedding = nn.Conv3d(cfg.in_dim, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        if cfg.vocab_size:
            self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        if cfg.num_actions:  # only here: the official keys stay exactly Wan's
            self.action_embedding = nn.Embedding(cfg.num_actions, d)
            self.action_projection = nn.Linear(d, d)
        self.init_weights()

    def init_weights(self):
        """The official initialisation; the zero output head makes a fresh model predict v = 0."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        if self.cfg.vocab_size:
            nn.init.normal_(self.token_embedding.weight, std=1.0)
        if self.cfg.num_actions:  # zero projection: a fresh action path leaves the model it joins unchanged
            nn.init.normal_(self.action_embedding.weight, std=1.0)
            nn.init.zeros_(self.action_projection.weight)

    def encode_text(self, tokens):
        """Toy stand-in for umT5: token ids [B, L] -> embeddings [B, L, text_dim]; id 0 (pad) encodes as
        zeros, like the zero padding of a real umT5 context, so the empty prompt is all zeros. A model
        without a token embedding (Wan, vocab_size 0) is given the umT5 context itself: it passes through."""
        if not self.cfg.vocab_size:
            return tokens
        return self.token_embedding(tokens) * (tokens > 0)[..., None]

    def new_cache(self, max_frames=None, window=None, sink=0):
        return KVCache(self.cfg.num_layers, max_frames or self.cfg.frames, window, sink)

    def forward(self, x, t, context, *, frames_per_block=None, clean_x=None, kv_cache=None, cache_write=False,
                actions=None):
        """actions [B, F]: the action id of each frame of x, for a model with cfg.num_actions > 0."""
        cfg = self.cfg
        B, _, n_frames = x.shape[:3]
        if (actions is None) != (cfg.num_actions == 0):
            raise ValueError("an action model needs actions=[B, F]" if actions is None
                             else "this model takes no actions (num_actions = 0)")
        if actions is not None and tuple(actions.shape) != (B, n_frames):
            raise ValueError(f"actions must be [B, F] = [{B}, {n_frames}], got {list(actions.shape)}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(B) if t.ndim == 0 else t
        t = t[:, None].expand(B, n_frames) if t.ndim == 1 else t  # per-frame timesteps [B, F]
        if clean_x is not None and frames_per_block is None:
            raise ValueError("teacher forcing needs frames_per_block")
        if kv_cache is not None and (clean_x is not None or frames_per_block is not None):
            raise ValueError("the KV-cache mode takes one block and no mask")

        tokens = self.patch_embedding(x)  # [B, D, F, h, w]
        grid_h, grid_w = tokens.shape[3:]
        S = grid_h * grid_w
        tokens = tokens.flatten(3).permute(0, 2, 3, 1).contiguous()  # [B, F, S, D]; contiguous: ~7% faster blocks
        start = kv_cache.next_frame if kv_cache is not None else 0
        angles = rope_angles(cfg.head_dim, torch.arange(start, start + n_frames), grid_h, grid_w, x.device)
        clean_len, t_noisy = 0, t
        if clean_x is not None:  # [clean | noisy]: the same RoPE positions, clean tokens at t = 0
            clean = self.patch_embedding(clean_x).flatten(3).permute(0, 2, 3, 1)
            tokens = torch.cat([clean, tokens], dim=1)
            t = torch.cat([torch.zeros_like(t), t], dim=1)
            angles = angles.repeat(2, 1)
            clean_len = n_frames * S
        rope = torch.polar(torch.ones_like(angles), angles).to(torch.complex64)

        e = self.time_embedding(sinusoid(cfg.freq_dim, t.flatten())).unflatten(0, t.shape)  # [B, F', D]
        if actions is not None:  # joins the frame's timestep embedding: it steers every adaLN and the head
            actions = actions.repeat(1, 2) if clean_x is not None else actions  # the clean half: the same actions
            e = e + self.action_projection(self.action_embedding(actions.to(x.device)))
        e0 = self.time_projection(e).unflatten(2, (6, cfg.dim))  # [B, F', 6, D]
        if context.shape[1] < cfg.text_len:  # the official model zero-pads the text to text_len, unmasked
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        context = self.text_embedding(context)

        if kv_cache is not None:
            kv_cache.make_room(n_frames)
        tokens_per_block = None if frames_per_block is None else frames_per_block * S
        ctx = _Ctx(S, tokens_per_block, clean_len, kv_cache, self.attn_backend)
        for i, block in enumerate(self.blocks):
            tokens = block(tokens, e0, context, rope, ctx, i)
        if kv_cache is not None and cache_write:
            kv_cache.commit(n_frames)

        if clean_x is not None:  # only the noisy half is returned
            tokens, e = tokens[:, n_frames:], e[:, n_frames:]
        out = self.head(tokens, e)  # [B, F, S, prod(patch) * out_dim]
        pt, ph, pw = cfg.patch_size
        out = rearrange(out, "b f (h w) (pt ph pw c) -> b c (f pt) (h ph) (w pw)",
                        h=grid_h, w=grid_w, pt=pt, ph=ph, pw=pw).float()
        if cfg.prediction == "x0":  # the head drew x0; callers take v. sigma is capped below so that a t = 0
            # pass (the cache write) stays finite and the v loss's implied weight 1/sigma^2 on x0 stays bounded
            sigma = (t_noisy / 1000).clamp(min=X0_MIN_SIGMA)[:, None, :, None, None]
            out = (x.float() - out) / sigma
        return out


def build(name_or_config, device=None, dtype=None):
    cfg = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    if device == "meta" or str(device) == "meta":
        with torch.device("meta"):
            return CausalWanModel(cfg).to(dtype=dtype)
    return CausalWanModel(cfg).to(device=device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------
# Loading official and diffusers weights

# diffusers -> official, applied in order (the inverse of diffusers' convert_wan_to_diffusers table).
DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    (r"\.norm2\.", ".norm3."),  # diffusers' affine cross-attn norm is norm2; its FFN norm3 has no params
    (r"\.attn1\.to_out\.0\.", ".self_attn.o."),
    (r"\.attn1\.to_([qkv])\.", r".self_attn.\1."),
    (r"\.attn1\.norm_([qk])\.", r".self_attn.norm_\1."),
    (r"\.attn2\.to_out\.0\.", ".cross_attn.o."),
    (r"\.attn2\.to_([qkv])\.", r".cross_attn.\1."),
    (r"\.attn2\.norm_([qk])\.", r".cross_attn.norm_\1."),
]


def to_official_names(state_dict):
    """Accept official, diffusers-named or `model.`-prefixed (Self-Forcing / Causal Forcing) state dicts."""
    if all(k.startswith("model.") for k in state_dict):
        state_dict = {k[len("model."):]: v for k, v in state_dict.items()}
    if not any(k.startswith("condition_embedder.") or k == "scale_shift_table" for k in state_dict):
        return dict(state_dict)
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in DIFFUSERS_TO_OFFICIAL:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def _weights_file(folder):
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if os.path.exists(os.path.join(folder, name)):
            return [os.path.join(folder, name)]
    index = os.path.join(folder, "diffusion_pytorch_model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return sorted({os.path.join(folder, v) for v in json.load(f)["weight_map"].values()})
    raise FileNotFoundError(f"no diffusion_pytorch_model.safetensors (or sharded index) in {folder}")


def read_state_dict(source):
    """A state dict from a .safetensors file, a folder holding one (or shards), or a dict."""
    if isinstance(source, dict):
        return source
    from safetensors.torch import load_file
    files = _weights_file(source) if os.path.isdir(source) else [source]
    state = {}
    for f in files:
        state.update(load_file(f))
    return state


def load_wan_weights(model, source):
    """Load weights strictly; a mismatch raises ValueError naming missing, unexpected and mis-shaped keys."""
    state = to_official_names(read_state_dict(source))
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or misshaped:
        show = lambda keys: ", ".join(keys[:8]) + (f" (+{len(keys) - 8} more)" if len(keys) > 8 else "")
        parts = [f"{label}: {show(keys)}" for label, keys in
                 (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)) if keys]
        raise ValueError("weights do not match the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=True, assign=next(iter(own.values())).is_meta)
    return model


def from_pretrained(folder, device=None, dtype=None):
    """Build from the folder's config.json (official or diffusers format) and load its weights."""
    with open(os.path.join(folder, "config.json")) as f:
        cfg = config_from_dict(json.load(f))
    model = build(cfg, device="meta")
    load_wan_weights(model, folder)
    return model.to(device=device, dtype=dtype)

