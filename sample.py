"""Sample videos from a shipped checkpoint; the checkpoint's JSON picks the sampler.

    python sample.py                                   # the default checkpoint, one video + contact sheet
    python sample.py --prompt "cyan triangle" --num-samples 4 --out cyan.gif
    python sample.py --ckpt checkpoints/ar_teacher_framewise.safetensors --save-npy teacher.npy
    python sample.py --num-frames 48                   # past the trained length: rolling KV window
    python sample.py --bench                           # last line: JSON with latency and frames/s

kinds: `base` (bidirectional, all frames jointly, Euler + guidance), `ar_teacher` (block by block with
the KV cache, Euler + guidance per block, each finished block re-encoded at t = 0), and few-step
students (`student`: frame 0 on its own step list, then 1-2 consistency steps per block).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

import data
import model as M
import rollout
import trainer as T

DEFAULT_CKPTS = ("checkpoints/cfpp_framewise_2step", "checkpoints/ar_teacher_framewise")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="NAME.safetensors (+ NAME.json); default: the first shipped of "
                   + ", ".join(DEFAULT_CKPTS))
    p.add_argument("--prompt", default="red circle", help='"<colour> <shape>", e.g. "cyan triangle"')
    p.add_argument("--prompts-file", help="one prompt per line, one video each (overrides --prompt)")
    p.add_argument("--num-samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, help="default: the trained length; longer uses the rolling window")
    p.add_argument("--steps", type=int, help="denoising steps per block (default: the checkpoint's)")
    p.add_argument("--frames-per-block", type=int, help="default: the checkpoint's")
    p.add_argument("--guidance", type=float, help="classifier-free guidance (teachers; default 3)")
    p.add_argument("--window", type=int, help="rolling KV window in frames (default: the trained length "
                   "when --num-frames exceeds it)")
    p.add_argument("--sink", type=int, default=1, help="sink frames kept in the rolling window")
    p.add_argument("--out", default="samples/sample.mp4", help=".mp4, .gif or .png")
    p.add_argument("--save-npy", help="also write uint8 [N, T, H, W, 3] (and PATH.prompts.txt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bench", action="store_true", help="time first-frame latency and frames/s; JSON last line")
    return p.parse_args(argv)


def resolve_ckpt(path):
    if path:
        return path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    for stem in DEFAULT_CKPTS:
        if os.path.exists(stem + ".json"):
            return stem
    T.die("no shipped checkpoint found (" + ", ".join(s + ".safetensors" for s in DEFAULT_CKPTS)
          + "); train one (see README) or pass --ckpt")


def read_prompts(a):
    if a.prompts_file:
        if not os.path.exists(a.prompts_file):
            T.die(f"--prompts-file {a.prompts_file} not found")
        prompts = [line.strip() for line in open(a.prompts_file) if line.strip()]
        if not prompts:
            T.die(f"--prompts-file {a.prompts_file} holds no prompt")
    else:
        prompts = [a.prompt]
    prompts = [p for p in prompts for _ in range(a.num_samples)]
    try:
        return prompts, data.tokenize(prompts)
    except ValueError as e:
        T.die(str(e))


def plan(meta, a, cfg):
    """The sampler settings: the checkpoint's, overridden by the flags, checked for consistency."""
    kind = meta["kind"]
    fpb = a.frames_per_block or meta.get("frames_per_block") or 1
    n_frames = a.num_frames or cfg.frames
    if n_frames <= 0 or fpb <= 0 or (a.steps is not None and a.steps <= 0):
        T.die("--num-frames, --frames-per-block and --steps must be positive")
    if kind != "base" and n_frames % fpb:
        T.die(f"--num-frames {n_frames} is not a multiple of --frames-per-block {fpb}")
    if kind == "base" and n_frames != cfg.frames:
        T.die(f"the bidirectional base generates exactly its trained {cfg.frames} frames")
    window = a.window or (cfg.frames if n_frames > cfg.frames else None)
    if window is not None and not 0 <= a.sink < window or (window is not None and fpb > window - a.sink):
        T.die(f"--window {window} must exceed --sink {a.sink} by at least one block ({fpb} frames)")
    guidance = a.guidance if a.guidance is not None else meta.get("guidance", 3.0 if kind in ("base", "ar_teacher") else 1.0)
    if kind in ("base", "ar_teacher"):
        steps = a.steps or 48
        return dict(kind=kind, fpb=fpb, frames=n_frames, steps=steps, first=None, solver="euler",
                    guidance=guidance, window=window, sink=a.sink if window else 0)
    if kind != "student":
        T.die(f"checkpoint kind {kind!r} cannot be sampled")
    steps = a.steps or meta["steps_per_block"]
    return dict(kind=kind, fpb=fpb, frames=n_frames, steps=steps, first=meta.get("first_block_steps"),
                solver="consistency", guidance=guidance, window=window, sink=a.sink if window else 0)


def run(model, tokens, p, seed, device, on_block=None):
    """Generate; returns the video [N, 3, T, H, W] in [-1, 1]. `on_block(i)` is called as blocks finish."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(len(tokens), cfg.in_dim, p["frames"], cfg.height, cfg.width, generator=g).to(device)
    tokens = tokens.to(device)
    if p["kind"] == "base":
        video = rollout.sample_bidirectional(model, tokens, noise, p["steps"], p["guidance"])
        on_block and on_block(0)
        return video
    steps = M.timesteps(p["steps"], cfg.shift).tolist()
    first = M.timesteps(p["first"], cfg.shift).tolist() if p["first"] else None
    blocks = []
    for i, block in enumerate(rollout.stream(model, tokens, noise, p["fpb"], steps, p["solver"], first, p["guidance"],
                                             window=p["window"], sink=p["sink"], generator=g)):
        blocks.append(block)
        on_block and on_block(i)
    return torch.cat(blocks, dim=2)


def main(argv=None):
    a = parse_args(argv)
    stem = resolve_ckpt(a.ckpt)
    try:
        device = torch.device(a.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        T.die(f"--device {a.device} is not usable here ({str(e).splitlines()[0]})")
    if os.path.splitext(a.out)[1].lower() not in (".mp4", ".gif", ".png"):
        T.die(f"--out {a.out!r} must end in .mp4, .gif or .png")
    model, meta = T.load_model(stem, device)
    prompts, tokens = read_prompts(a)
    p = plan(meta, a, model.cfg)
    print(f"{os.path.basename(stem)} ({p['kind']}): {len(prompts)} video(s) x {p['frames']} frames, "
          f"{p['steps']} steps per block, guidance {p['guidance']}", file=sys.stderr)
    if a.bench:
        marks = []
        t0 = time.perf_counter()
        run(model, tokens[:1], p, a.seed, device, on_block=lambda i: marks.append(time.perf_counter()))
        total = time.perf_counter() - t0
        per_block = p["frames"] if p["kind"] == "base" else p["fpb"]
        print(json.dumps({"checkpoint": os.path.basename(stem), "first_frame_latency_s": round(marks[0] - t0, 4),
                          "frames_per_s": round(p["frames"] / total, 2), "frames_per_block": per_block}))
        return
    video = data.to_uint8(run(model, tokens, p, a.seed, device))
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    data.save_preview(video, a.out)
    sheet = os.path.splitext(a.out)[0] + ".png"
    if sheet != a.out:
        data.save_preview(video, sheet)
    print(f"wrote {a.out}" + (f" and {sheet}" if sheet != a.out else ""), file=sys.stderr)
    if a.save_npy:
        np.save(a.save_npy, video)
        with open(a.save_npy + ".prompts.txt", "w") as f:
            f.write("\n".join(prompts) + "\n")
        print(f"wrote {a.save_npy} {tuple(video.shape)}", file=sys.stderr)


if __name__ == "__main__":
    main()
