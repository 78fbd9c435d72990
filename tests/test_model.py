"""The DiT's mechanisms: masks, caches, teacher forcing, rolling window, Wan parity, the scheduler."""
import importlib.metadata
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import model as M

TINY = M.Config(dim=48, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=16, text_len=4,
                in_dim=3, out_dim=3, patch_size=(1, 2, 2), frames=6, height=4, width=4)


def tiny_model(seed=0, cfg=TINY):
    torch.manual_seed(seed)
    m = M.build(cfg).eval()
    torch.nn.init.normal_(m.head.head.weight, std=0.1)  # the official zero head would hide every difference
    return m


def inputs(B=2, F=6, seed=1, cfg=TINY):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_dim, F, cfg.height, cfg.width, generator=g)
    t = torch.rand(B, F, generator=g) * 1000
    ctx = torch.randn(B, cfg.text_len, cfg.text_dim, generator=g)
    return x, t, ctx


def decode(m, x, t, ctx, fpb, cache=None, clean=None):
    """Block by block with the KV cache; `clean` (GT) is written into the cache instead of nothing."""
    cache = cache or m.new_cache(max_frames=x.shape[2])
    outs = []
    for s in range(0, x.shape[2], fpb):
        outs.append(m(x[:, :, s:s + fpb], t[:, s:s + fpb], ctx, kv_cache=cache))
        commit = x if clean is None else clean
        m(commit[:, :, s:s + fpb], torch.zeros_like(t[:, s:s + fpb]), ctx, kv_cache=cache, cache_write=True)
    return torch.cat(outs, dim=2), cache


# ---------------------------------------------------------------------------------------------------
# scheduler

def test_scheduler_numbers_match_design():
    grid = M.timesteps(48, shift=5.0)
    assert len(grid) == 48 and grid[0] == 1000
    assert torch.allclose(grid[[0, 12, 24, 36]], torch.tensor([1000, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.allclose(grid[[1, 2, 45, 46, 47]], torch.tensor([995.8, 991.4, 250.0, 178.6, 96.2]), atol=0.06)
    assert torch.allclose(M.timesteps(4), torch.tensor([1000, 937.5, 833.3333, 625.0]))
    assert torch.allclose(M.timesteps(2), torch.tensor([1000, 833.3333]))
    assert M.timesteps(1).tolist() == [1000.0]
    assert (grid[1:] < grid[:-1]).all()  # runs from noise to data
    w = M.loss_weight(torch.tensor([1000, 937.5, 833.33, 625, 500, 250, 50]), shift=5.0)
    assert torch.allclose(w, torch.tensor([0.0, 0.40, 1.03, 1.91, 2.08, 1.46, 0.31]), atol=0.01)


def test_flow_matching_identities():
    x0, eps = torch.randn(2, 3, 4, 8, 8), torch.randn(2, 3, 4, 8, 8)
    t = torch.tensor([[1000.0, 500, 250, 100], [900, 900, 10, 10]])
    xt = M.add_noise(x0, eps, t)
    assert torch.allclose(M.add_noise(x0, eps, torch.full((2,), 1000.0)), eps)
    v = eps - x0
    assert torch.allclose(M.x0_from_v(xt, v, t), x0, atol=1e-5)
    assert torch.allclose(M.v_from_x0(xt, x0, t), v, atol=1e-4)
    t2 = t * 0.5  # an Euler step along the straight path lands exactly on it
    assert torch.allclose(M.euler_step(xt, v, t, t2), M.add_noise(x0, eps, t2), atol=1e-5)
    assert torch.allclose(M.guidance(torch.zeros(3), torch.ones(3), 3.0), torch.full((3,), 3.0))


def test_per_frame_timesteps_broadcast():
    m = tiny_model()
    x, t, ctx = inputs()
    same = torch.full((2,), 321.0)
    assert torch.allclose(m(x, same, ctx), m(x, same[:, None].expand(2, 6), ctx))
    assert not torch.allclose(m(x, t, ctx), m(x, same, ctx))


@pytest.mark.parametrize("teacher_forcing", [False, True])
def test_x0_prediction_returns_the_v_whose_x0_is_what_the_head_drew(teacher_forcing):
    """The same weights read as a v model give the head's raw output; the x0 model must return the v for
    which x - sigma v is exactly that output, with the noisy frames' own t (not the clean half's zeros)."""
    from dataclasses import replace
    m_v, m_x = tiny_model(), tiny_model(cfg=replace(TINY, prediction="x0"))
    x, t, ctx = inputs()
    t = t.clamp(min=M.X0_MIN_SIGMA * 1000)
    kw = dict(frames_per_block=3, clean_x=torch.randn_like(x)) if teacher_forcing else {}
    drawn, v = m_v(x, t, ctx, **kw), m_x(x, t, ctx, **kw)
    assert torch.allclose(M.x0_from_v(x, v, t), drawn, atol=1e-5)
    zero = torch.zeros_like(t)  # a t = 0 pass (the cache write) divides by the floor, not by zero
    assert torch.allclose(m_x(x, zero, ctx), (x - m_v(x, zero, ctx)) / M.X0_MIN_SIGMA, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# masks and caches

@pytest.mark.parametrize("fpb", [1, 3])
def test_block_causal_mask_hides_the_future(fpb):
    m = tiny_model()
    x, t, ctx = inputs()
    out = m(x, t, ctx, frames_per_block=fpb)
    k = 3  # perturb frame 3 (a block start for both fpb = 1 and 3)
    x2 = x.clone()
    x2[:, :, k] += 1.0
    out2 = m(x2, t, ctx, frames_per_block=fpb)
    assert torch.equal(out[:, :, :k], out2[:, :, :k])
    assert (out[:, :, k:] - out2[:, :, k:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-4  # later frames see it
    if fpb == 3:  # inside a block attention is full: perturbing the block's last frame moves its first
        x3 = x.clone()
        x3[:, :, 5] += 1.0
        assert (m(x3, t, ctx, frames_per_block=3)[:, :, 3] - out[:, :, 3]).abs().max() > 1e-4


@pytest.mark.parametrize("fpb", [1, 3])
@pytest.mark.parametrize("text", [True, False])
def test_cache_equals_full_block_causal_forward(fpb, text):
    m = tiny_model()
    x, t, ctx = inputs()
    if not text:
        ctx = torch.zeros_like(ctx)  # the empty prompt
    full = m(x, t, ctx, frames_per_block=fpb)
    cache = m.new_cache(max_frames=6)  # each block is committed with its own inputs, as the full pass sees them
    outs = []
    for s in range(0, 6, fpb):
        outs.append(m(x[:, :, s:s + fpb], t[:, s:s + fpb], ctx, kv_cache=cache, cache_write=True))
    assert torch.allclose(torch.cat(outs, dim=2), full, atol=1e-5)
    assert cache.length == 6 and cache.next_frame == 6


@pytest.mark.parametrize("fpb", [1, 3])
def test_teacher_forcing_equals_cached_forward_on_gt_context(fpb):
    m = tiny_model()
    x, t, ctx = inputs()
    gt = torch.randn_like(x)
    t = t.view(2, -1, fpb)[:, :, :1].expand(2, 6 // fpb, fpb).reshape(2, 6)  # one t per block
    tf = m(x, t, ctx, frames_per_block=fpb, clean_x=gt)
    cached, _ = decode(m, x, t, ctx, fpb, clean=gt)
    assert tf.shape == x.shape
    assert torch.allclose(tf, cached, atol=1e-5)


def test_teacher_forcing_mask_isolates_noisy_blocks():
    """No noisy token sees another block's noisy tokens or a later block's clean tokens."""
    m = tiny_model()
    x, t, ctx = inputs()
    gt = torch.randn_like(x)
    out = m(x, t, ctx, frames_per_block=1, clean_x=gt)
    xn = x.clone()
    xn[:, :, 2] += 1.0  # another block's noisy frame
    changed = (m(xn, t, ctx, frames_per_block=1, clean_x=gt) - out).abs().amax(dim=(0, 1, 3, 4))
    assert changed[2] > 1e-4 and changed[[0, 1, 3, 4, 5]].max() == 0
    gn = gt.clone()
    gn[:, :, 2] += 1.0  # clean frame 2 is context for noisy frames 3.. only
    changed = (m(x, t, ctx, frames_per_block=1, clean_x=gn) - out).abs().amax(dim=(0, 1, 3, 4))
    assert changed[:3].max() == 0 and changed[3:].min() > 1e-4


def test_rolling_window_equals_full_cache_when_wide_enough():
    m = tiny_model()
    x, t, ctx = inputs()
    full, _ = decode(m, x, t, ctx, 1)
    rolled, _ = decode(m, x, t, ctx, 1, cache=m.new_cache(max_frames=6, window=6, sink=1))
    assert torch.allclose(full, rolled, atol=1e-6)


def test_rolling_window_is_bounded_and_keeps_sink_frames():
    m = tiny_model()
    x, t, ctx = inputs(F=12)
    window, sink = 4, 1
    cache = m.new_cache(max_frames=6, window=window, sink=sink)
    _, cache = decode(m, x, t, ctx, 1, cache=cache)  # twice the cache's nominal length
    assert cache.next_frame == 12 and cache.length == window
    assert cache.k[0].shape[1] == window * 4  # the buffers never grew (4 tokens per frame)
    # Layer-0 keys depend on their own frame only, so the survivors must be frame 0 (the sink) and the
    # last three frames, as a full cache of the same run holds them.
    ref, full = decode(m, x, t, ctx, 1, cache=m.new_cache(max_frames=12))
    keep = torch.cat([full.k[0][:, :4], full.k[0][:, 9 * 4:12 * 4]], dim=1)
    assert torch.allclose(cache.k[0], keep, atol=1e-6)
    with pytest.raises(ValueError, match="window"):
        decode(m, x, t, ctx, 1, cache=m.new_cache(max_frames=6))


# ---------------------------------------------------------------------------------------------------
# Wan compatibility

def _diffusers_model(seed=0):
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(seed)
    ref = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=24, in_channels=3, out_channels=3,
        text_dim=16, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", eps=1e-6).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; randomise everything so parity means something
        for p in ref.parameters():
            p.normal_(0, 0.2)
    return ref


def test_parity_with_diffusers_wan_transformer():
    ref = _diffusers_model()
    ours = M.build(TINY).eval()
    M.load_wan_weights(ours, ref.state_dict())
    x, _, ctx = inputs(B=2, F=3)
    t = torch.tensor([999.0, 321.0])
    with torch.no_grad():
        expected = ref(x, t, ctx, return_dict=False)[0]
        got = ours(x, t, ctx)
    assert (got - expected).abs().max() <= 1e-5 * max(1.0, expected.abs().max().item())


def test_from_pretrained_reads_diffusers_and_official_folders(tmp_path):
    ref = _diffusers_model(seed=3)
    ref.save_pretrained(tmp_path / "diffusers")
    from_diffusers = M.from_pretrained(tmp_path / "diffusers")
    x, _, ctx = inputs(B=1, F=2)
    t = torch.tensor([500.0])
    assert from_diffusers.cfg.text_len == 512  # diffusers' config has no text_len: Wan's 512 applies
    padded = torch.nn.functional.pad(ctx, (0, 0, 0, 512 - ctx.shape[1]))  # as Wan's pipelines pad the prompt
    with torch.no_grad():
        expected = ref(x, t, padded, return_dict=False)[0]
        assert torch.allclose(from_diffusers.eval()(x, t, ctx), expected, atol=1e-4)  # 512 text tokens
    # official layout: official key names, and a config.json that omits patch_size/text_dim like Wan's does
    folder = tmp_path / "official"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in from_diffusers.state_dict().items()},
              folder / "diffusion_pytorch_model.safetensors")
    (folder / "config.json").write_text(json.dumps(
        {"_class_name": "WanModel", "model_type": "t2v", "dim": 48, "eps": 1e-6, "ffn_dim": 64, "freq_dim": 32,
         "in_dim": 3, "num_heads": 2, "num_layers": 2, "out_dim": 3, "text_len": 512, "text_dim": 16}))
    with torch.no_grad():
        assert torch.allclose(M.from_pretrained(folder).eval()(x, t, ctx), expected, atol=1e-4)


def test_wan_13b_preset_has_the_official_keys_and_count():
    m = M.build("wan2.1-1.3b", device="meta")
    sd = m.state_dict()
    assert len(sd) == 825
    assert sum(v.numel() for v in sd.values()) == 1_418_996_800
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["patch_embedding.weight"] == (1536, 16, 1, 2, 2)
    assert shapes["time_projection.1.weight"] == (9216, 1536)
    assert shapes["blocks.29.modulation"] == (1, 6, 1536)
    assert shapes["blocks.0.norm3.weight"] == (1536,) and shapes["blocks.0.self_attn.norm_q.weight"] == (1536,)
    assert shapes["blocks.0.ffn.0.weight"] == (8960, 1536)
    assert shapes["head.head.weight"] == (64, 1536) and shapes["head.modulation"] == (1, 2, 1536)
    assert not any(".norm1." in k or ".norm2." in k or "freqs" in k for k in sd)
    assert M.build("wan2.1-14b", device="meta").state_dict()["blocks.39.ffn.0.weight"].shape == (13824, 5120)


def test_synthetic_13b_state_dicts_load_strictly_and_mismatches_are_named():
    m = M.build("wan2.1-1.3b", device="meta")
    official = {k: torch.empty(v.shape, device="meta") for k, v in m.state_dict().items()}
    M.load_wan_weights(m, official)
    diff_names = {k: v for k, v in _to_diffusers_names(official).items()}
    assert "condition_embedder.time_proj.weight" in diff_names
    M.load_wan_weights(M.build("wan2.1-1.3b", device="meta"), diff_names)
    M.load_wan_weights(M.build("wan2.1-1.3b", device="meta"), {"model." + k: v for k, v in official.items()})
    broken = dict(official)
    del broken["blocks.3.self_attn.q.weight"]
    broken["blocks.0.extra.weight"] = torch.empty(3, device="meta")
    broken["head.head.weight"] = torch.empty(16, 1536, device="meta")
    with pytest.raises(ValueError) as err:
        M.load_wan_weights(M.build("wan2.1-1.3b", device="meta"), broken)
    msg = str(err.value)
    assert "missing: blocks.3.self_attn.q.weight" in msg and "unexpected: blocks.0.extra.weight" in msg
    assert "mis-shaped: head.head.weight (16, 1536) != (64, 1536)" in msg


def _to_diffusers_names(official):
    """The forward direction of the conversion table, written out independently for the test."""
    out = {}
    for k, v in official.items():
        k = (k.replace("time_embedding.0", "condition_embedder.time_embedder.linear_1")
             .replace("time_embedding.2", "condition_embedder.time_embedder.linear_2")
             .replace("text_embedding.0", "condition_embedder.text_embedder.linear_1")
             .replace("text_embedding.2", "condition_embedder.text_embedder.linear_2")
             .replace("time_projection.1", "condition_embedder.time_proj")
             .replace("head.modulation", "scale_shift_table").replace("head.head", "proj_out")
             .replace(".modulation", ".scale_shift_table").replace("ffn.0", "ffn.net.0.proj")
             .replace("ffn.2", "ffn.net.2").replace(".norm3.", ".norm2.")
             .replace("self_attn.o", "attn1.to_out.0").replace("cross_attn.o", "attn2.to_out.0")
             .replace("self_attn.norm_", "attn1.norm_").replace("cross_attn.norm_", "attn2.norm_")
             .replace("self_attn.", "attn1.to_").replace("cross_attn.", "attn2.to_"))
        out[k] = v
    return out


def test_auto_gives_the_kernel_only_masked_attention_on_cuda():
    # measured on an H200 (README, kernel section): the kernel wins with a mask, cuDNN SDPA without one
    assert M.uses_kernel("auto", on_cuda=True, masked=True)
    assert not M.uses_kernel("auto", on_cuda=True, masked=False)
    assert not M.uses_kernel("auto", on_cuda=False, masked=True)
    assert M.uses_kernel("triton", on_cuda=False, masked=False) and not M.uses_kernel("sdpa", True, True)


@pytest.mark.parametrize("mode", ["bidirectional", "block_causal", "teacher_forcing", "cache"])
def test_outputs_equal_with_the_triton_kernel_forced_on_and_off(mode):
    m = tiny_model()
    x, t, ctx = inputs(B=1)

    def forward():
        if mode == "bidirectional":
            return m(x, t, ctx)
        if mode == "block_causal":
            return m(x, t, ctx, frames_per_block=3)
        if mode == "teacher_forcing":
            return m(x, t, ctx, frames_per_block=1, clean_x=x.flip(2))
        return decode(m, x, t, ctx, 3)[0]

    outputs = {}
    for backend in ("sdpa", "triton"):
        m.attn_backend = backend
        with torch.no_grad():
            outputs[backend] = forward()
    assert torch.allclose(outputs["sdpa"], outputs["triton"], atol=1e-4)


def test_no_module_of_ours_shadows_an_installed_package():
    """The repo root comes first on sys.path, so a top-level module named like an installed package hides
    that package from every library importing it. Our Triton package was `kernels/` until transformers
    began importing Hugging Face's `kernels` (installed beside transformers 5.25), which broke umT5 loading."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    ours = {f[:-3] for f in os.listdir(root) if f.endswith(".py")}
    ours |= {d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py"))}
    installed = importlib.metadata.packages_distributions()
    assert "model" in ours and "causal_flash" in ours
    assert not {name: installed[name] for name in ours if name in installed}
