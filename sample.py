"""Stream videos from a shipped checkpoint; the checkpoint's JSON picks the sampler.

    python sample.py                                   # the default checkpoint, one video + contact sheet
    python sample.py --prompt "cyan triangle" --num-samples 4 --out cyan.gif
    python sample.py --ckpt checkpoints/ar_teacher_framewise.safetensors --save-npy teacher.npy
    python sample.py --num-frames 48                   # past the trained length: rolling KV window
    python sample.py --first-frame start.png           # image-to-video: frame 0 is given, the rest streams
    python sample.py --ckpt checkpoints/world_framewise --actions "none,right*4,up*4,none*3"   # the world model
    python sample.py --bench --compare                 # last line: JSON with latency, frames/s and the ratio

kinds: `base` (bidirectional, all frames jointly, Euler + guidance), `ar_teacher` (block by block with
the KV cache, Euler + guidance per block, each finished block re-encoded at t = 0), and few-step
students (`student`: frame-wise 1-2 consistency steps per frame with frame 0 on its own 4-step list, or
chunk-wise 4 steps per 3-frame block). A .mp4/.gif grows block by block while the video is generated;
the PNG contact sheet is written at the end.
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

import numpy as np
import torch

import data
import model as M
import rollout
import trainer as T

DEFAULT_CKPTS = ("checkpoints/cfpp_framewise_2step", "checkpoints/ar_teacher_framewise", "checkpoints/base")
COMPARE_CKPT = "checkpoints/cf_chunkwise_4step"  # Causal Forcing, chunk-wise 4-step: the baseline to beat
FPS = 8
BENCH_REPS = 5  # --bench: timed videos per checkpoint (medians; --compare's ratio is the median of paired ratios)
SINK = 0  # frames the rolling window keeps for good. 0 measured best (README, "Four times the trained length"):
# cached keys carry absolute RoPE positions, so a kept frame 0 sits further back than any offset seen in training


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda message: T.die(f"{message} (see --help)")  # one line, exit 2, like every bad input
    p.add_argument("--ckpt", help="NAME.safetensors (+ NAME.json); default: the first shipped of "
                   + ", ".join(DEFAULT_CKPTS))
    p.add_argument("--model", default="toy", choices=["toy"] + [n for n in M.PRESETS if n.startswith("wan")],
                   help="toy (the shipped checkpoints), or a Wan preset: sample a converted Wan-scale student "
                   "(--ckpt, see wan.py) with the umT5 and VAE of --wan-dir; --num-frames then counts latent "
                   "frames (21 -> 81 video frames)")
    p.add_argument("--wan-dir", help="the Wan2.1-T2V-1.3B-Diffusers folder (tokenizer/, text_encoder/, vae/)")
    p.add_argument("--prompt", default="red circle", help='"<colour> <shape>", e.g. "cyan triangle"')
    p.add_argument("--prompts-file", help="one prompt per line, one video each (overrides --prompt)")
    p.add_argument("--num-samples", type=int, default=1, help="videos per prompt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-frames", type=int, help="default: the trained length; longer uses the rolling window")
    p.add_argument("--steps", type=int, help="denoising steps per block (default: the checkpoint's), on the "
                   "warped list (students: 4 -> 1000,937.5,833.3,625; 2 -> 1000,833.3) or the 48-step grid (teachers)")
    p.add_argument("--timesteps", help="a student's timestep list per block, comma-separated and descending in "
                   "(0, 1000], e.g. 1000,250 (default: the checkpoint's; frame 0 keeps its own list)")
    p.add_argument("--frames-per-block", type=int, help="default: the checkpoint's")
    p.add_argument("--solver", choices=("euler", "consistency"), help="euler: the ODE (the paper's teacher "
                   "sampler); consistency: x0 at every step, re-noised with fresh noise (default: consistency for "
                   f"students, {rollout.TEACHER_SOLVER} for teachers)")
    p.add_argument("--guidance", type=float, help=f"classifier-free guidance (teachers; default {rollout.TEACHER_GUIDANCE:g})")
    p.add_argument("--window", type=int, help="rolling KV window in frames (default: the trained length "
                   "when --num-frames exceeds it)")
    p.add_argument("--sink", type=int, default=SINK, help=f"sink frames kept in the rolling window (default {SINK})")
    p.add_argument("--first-frame", metavar="PATH.png", help="image-to-video: this RGB frame (the model's "
                   "size, 32x32) is written into the cache at t = 0 as frame 0 and the rest is generated")
    p.add_argument("--actions", help='a world model\'s action per frame, NAME or NAME*COUNT, comma-separated, '
                   'exactly --num-frames of them, e.g. "none,right*4,up*4,none*3" (the first is ignored: frame 0 '
                   "is the start); names: " + ", ".join(data.ACTIONS))
    p.add_argument("--out", default="samples/sample.mp4", help=".mp4, .gif or .png")
    p.add_argument("--save-npy", help="also write uint8 [N, T, H, W, 3] (and PATH.prompts.txt, PATH.actions.txt)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bench", action="store_true", help="time first-frame latency and frames/s; JSON last line")
    p.add_argument("--compare", action="store_true", help="--bench, and also time the chunk-wise 4-step "
                   "student in the same run and report latency_ratio (this checkpoint / that one)")
    p.add_argument("--compare-ckpt", default=COMPARE_CKPT, help=f"what --compare times (default {COMPARE_CKPT})")
    a = p.parse_args(argv)
    a.bench = a.bench or a.compare
    if not 0 <= a.seed < 2 ** 63:
        T.die(f"--seed must lie in [0, 2^63), got {a.seed}")
    return a


def resolve_ckpt(path):
    if path:
        return T.checkpoint_stem(path)
    for stem in DEFAULT_CKPTS:
        if os.path.exists(stem + ".json"):
            return stem
    T.die("no shipped checkpoint found (" + ", ".join(s + ".safetensors" for s in DEFAULT_CKPTS)
          + "); train one (see README) or pass --ckpt")


def load(stem, device):
    """A checkpoint this sampler can draw from: the toy world's pixels and prompt tokens."""
    try:
        model, meta = T.load_model(stem, device)
    except (AttributeError, KeyError, TypeError, ValueError) as e:  # a JSON of some other project
        T.die(f"checkpoint {stem} is not a model checkpoint of this project ({type(e).__name__}: {e})")
    cfg = model.cfg
    if (cfg.in_dim, cfg.out_dim) != (3, 3) or cfg.vocab_size < len(data.VOCAB):
        T.die(f"checkpoint {stem} is not a toy-world model (in_dim {cfg.in_dim}, vocab {cfg.vocab_size}): "
              "sample.py draws 3-channel pixels from '<colour> <shape>' prompts")
    return model, meta


def prompt_list(a):
    """--prompt or --prompts-file, each repeated --num-samples times."""
    if a.num_samples <= 0:
        T.die(f"--num-samples must be positive, got {a.num_samples}")
    if a.prompts_file:
        try:
            with open(a.prompts_file) as f:
                prompts = [line.strip() for line in f if line.strip()]
        except (OSError, UnicodeDecodeError) as e:
            T.die(f"--prompts-file {a.prompts_file} cannot be read ({type(e).__name__})")
        if not prompts:
            T.die(f"--prompts-file {a.prompts_file} holds no prompt")
    else:
        prompts = [a.prompt]
    return [p for p in prompts for _ in range(a.num_samples)]


def read_prompts(a):
    prompts = prompt_list(a)
    try:
        return prompts, data.tokenize(prompts)
    except ValueError as e:
        T.die(str(e))


def parse_actions(text, n_frames):
    """--actions "none,right*4" -> one action name per frame, exactly n_frames of them."""
    try:
        return data.parse_action_script(text, n_frames)
    except ValueError as e:
        T.die(f"--actions: {e}")


def read_actions(a, cfg, p, n_videos):
    """The world model's actions [N, T] (the same for every video), or None for a text-to-video model."""
    if bool(cfg.num_actions) != (a.actions is not None):
        T.die("this checkpoint is an action world model: pass --actions" if cfg.num_actions
              else "--actions needs an action world model checkpoint (e.g. checkpoints/world_framewise)")
    if a.actions is None:
        return None
    return data.action_ids(parse_actions(a.actions, p["frames"]))[None].expand(n_videos, -1)


def read_frame(path, cfg):
    """--first-frame: an 8-bit RGB image of the model's frame size -> [1, 3, 1, H, W] in [-1, 1]."""
    import imageio.v3 as iio
    if not os.path.isfile(path):
        T.die(f"--first-frame {path} not found")
    try:
        img = np.asarray(iio.imread(path, plugin="pillow"))  # as stored: no silent conversion of mode or depth
    except Exception as e:  # Pillow raises several types on a file that is not an image
        T.die(f"--first-frame {path} is not a readable image ({type(e).__name__})")
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] not in (3, 4):
        T.die(f"--first-frame {path} must be an 8-bit RGB image, got {img.dtype} with shape {img.shape}")
    if img.shape[2] == 4 and (img[..., 3] < 255).any():
        T.die(f"--first-frame {path} has transparent pixels; give an opaque RGB image")
    if img.shape[:2] != (cfg.height, cfg.width):
        T.die(f"--first-frame {path} is {img.shape[1]}x{img.shape[0]}; the model's frames are {cfg.width}x{cfg.height}")
    return data.to_model(img[None, ..., :3])


def count(meta, key, default=None):
    """A positive whole number from the checkpoint's JSON (or the default when absent)."""
    value = meta.get(key, default)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        T.die(f"checkpoint JSON has a bad {key}: {value!r}")
    return value


def plan(meta, a, cfg):
    """The sampler settings: the checkpoint's, overridden by the flags, checked for consistency."""
    kind = meta["kind"]
    if kind not in ("base", "ar_teacher", "student"):
        T.die(f"checkpoint kind {kind!r} cannot be sampled (base, ar_teacher or student)")
    fpb = a.frames_per_block if a.frames_per_block is not None else count(meta, "frames_per_block") or 1
    n_frames = a.num_frames if a.num_frames is not None else cfg.frames
    if n_frames <= 0 or fpb <= 0 or (a.steps is not None and a.steps <= 0):
        T.die("--num-frames, --frames-per-block and --steps must be positive")
    given = 1 if getattr(a, "first_frame", None) else 0
    if given and (kind == "base" or fpb != 1):
        T.die("--first-frame needs a frame-wise causal checkpoint (frames_per_block 1): frame 0 becomes cached context")
    if given and n_frames < 2:
        T.die("--first-frame needs --num-frames of at least 2 (frame 0 is the given one)")
    if kind != "base" and (n_frames - given) % fpb:
        T.die(f"--num-frames {n_frames} is not a multiple of --frames-per-block {fpb}")
    if kind == "base" and n_frames != cfg.frames:
        T.die(f"the bidirectional base generates exactly its trained {cfg.frames} frames")
    if kind == "base" and (a.window is not None or a.sink):
        T.die("--window and --sink are for causal checkpoints: the bidirectional base denoises all frames at once")
    window = a.window if a.window is not None else (cfg.frames if n_frames > cfg.frames else None)
    if a.sink and window is None:
        T.die(f"--sink keeps frames of a rolling window: give --window, or more than {cfg.frames} frames")
    if window is not None and not (0 <= a.sink < window and fpb <= window - a.sink):
        T.die(f"--window {window} must exceed --sink {a.sink} by at least one block ({fpb} frames)")
    teacher = kind in ("base", "ar_teacher")
    guidance = a.guidance if a.guidance is not None else meta.get("guidance", rollout.TEACHER_GUIDANCE if teacher else 1.0)
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not 1 <= guidance < math.inf:
        where = "--guidance" if a.guidance is not None else "the checkpoint JSON's guidance"
        T.die(f"{where} must be a finite number >= 1 (1 = no guidance), got {guidance!r}")
    if teacher:
        if a.timesteps:
            T.die("--timesteps is for distilled students; a teacher takes --steps on its grid")
        steps = a.steps or 48
        return dict(kind=kind, fpb=fpb, frames=n_frames, steps=steps, timesteps=M.timesteps(steps, cfg.shift).tolist(),
                    first=None, solver=a.solver or rollout.TEACHER_SOLVER,
                    guidance=guidance, window=window, sink=a.sink if window else 0)
    if a.steps and a.timesteps:
        T.die("give --steps or --timesteps, not both")
    if a.timesteps:
        ts = timestep_list(a.timesteps, "--timesteps")
    elif a.steps or "timesteps" not in meta:
        steps = a.steps or count(meta, "steps_per_block")
        if steps is None:
            T.die("student checkpoint JSON has no steps_per_block")
        ts = M.timesteps(steps, cfg.shift).tolist()
    else:
        ts = timestep_list(meta["timesteps"], "the checkpoint JSON's timesteps")
    first = count(meta, "first_block_steps")
    if first and "first_timesteps" in meta:  # frame 0's own list (first_frame.py --first_timesteps)
        first = timestep_list(meta["first_timesteps"], "the checkpoint JSON's first_timesteps")
    elif first:
        first = M.timesteps(first, cfg.shift).tolist()
    return dict(kind=kind, fpb=fpb, frames=n_frames, steps=len(ts), timesteps=ts, first=first,
                solver=a.solver or "consistency", guidance=guidance, window=window, sink=a.sink if window else 0)


def timestep_list(values, what):
    try:
        return M.timestep_list(values)
    except ValueError as e:
        T.die(f"{what} {e}, got {values!r}")


def blocks(model, tokens, p, seed, device, first_frame=None, actions=None):
    """Yield the video [N, 3, k, H, W] in [-1, 1] as it is produced: the given first frame (if any), then
    block by block (the bidirectional base: all frames at once). actions [N, T]: a world model's."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(seed)
    given = 0 if first_frame is None else 1
    noise = torch.randn(len(tokens), cfg.in_dim, p["frames"] - given, cfg.height, cfg.width, generator=g).to(device)
    tokens = tokens.to(device)
    actions = None if actions is None else actions.to(device)
    if p["kind"] == "base":
        yield rollout.sample_bidirectional(model, tokens, noise, p["steps"], p["guidance"], actions=actions,
                                           solver=p["solver"], generator=g)
        return
    context = None
    if first_frame is not None:
        context = first_frame.to(device).expand(len(tokens), -1, -1, -1, -1)
        yield context
    yield from rollout.stream(model, tokens, noise, p["fpb"], p["timesteps"], p["solver"], p["first"], p["guidance"],
                              window=p["window"], sink=p["sink"], generator=g, context=context, actions=actions)


def run(model, tokens, p, seed, device, first_frame=None, actions=None):
    """Generate; returns the video [N, 3, T, H, W] in [-1, 1]."""
    return torch.cat(list(blocks(model, tokens, p, seed, device, first_frame, actions)), dim=2)


def time_video(model, tokens, p, seed, device, first_frame=None, actions=None):
    """-> (first-frame latency s, frames/s) of one video of tokens[0]: the latency runs until the first
    generated block exists."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    actions = None if actions is None else actions[:1]
    marks, t0 = [], time.perf_counter()
    for _ in blocks(model, tokens[:1], p, seed, device, first_frame, actions):
        sync()
        marks.append(time.perf_counter())
    given = 0 if first_frame is None else 1
    return marks[given] - t0, (p["frames"] - given) / (marks[-1] - t0)


def bench(cases, reps=BENCH_REPS):
    """Time `reps` videos of each case, a tuple of time_video's seven arguments, round-robin (A, B, A, B,
    ...) after one warm-up block each (one-off costs are not latency), so that a change in the machine's
    load hits every case alike. -> ([per case: median latency and frames/s], the median over rounds of
    case 0's latency / case 1's, or None for one case)."""
    for model, tokens, p, seed, device, _, actions in cases:
        next(blocks(model, tokens[:1], p, seed, device, actions=None if actions is None else actions[:1]))
    rounds = [[time_video(*case) for case in cases] for _ in range(reps)]
    out = [{"first_frame_latency_s": round(statistics.median(r[i][0] for r in rounds), 4),
            "frames_per_s": round(statistics.median(r[i][1] for r in rounds), 2),
            "frames_per_block": p["frames"] if p["kind"] == "base" else p["fpb"], "steps": p["steps"]}
           for i, (_, _, p, *_) in enumerate(cases)]
    ratio = statistics.median(r[0][0] / r[1][0] for r in rounds) if len(cases) > 1 else None
    return out, ratio


class VideoWriter:
    """A .mp4 or .gif that grows as blocks arrive; each frame shows the videos side by side in
    data.save_preview's layout (up to 8 per row, x4 nearest upscale)."""

    def __init__(self, path):
        import imageio.v2 as imageio
        self.mp4 = path.lower().endswith(".mp4")
        self.writer = (imageio.get_writer(path, fps=FPS, macro_block_size=1) if self.mp4
                       else imageio.get_writer(path, duration=1000 / FPS, loop=0))

    def append(self, video):
        """video: uint8 [N, k, H, W, 3]."""
        for i in range(video.shape[1]):
            frame = data._grid(video[:, i], min(len(video), 8), 4)
            if self.mp4:  # H.264 wants sides that are multiples of 16: pad with black, never resize
                frame = np.pad(frame, ((0, -frame.shape[0] % 16), (0, -frame.shape[1] % 16), (0, 0)))
            self.writer.append_data(frame)

    def close(self):
        self.writer.close()


def write(a, model, tokens, p, device, first_frame, prompts, actions=None):
    """Stream the video into --out as it is generated; then the contact sheet and --save-npy."""
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    writer = None if a.out.lower().endswith(".png") else VideoWriter(a.out)
    parts = []
    for block in blocks(model, tokens, p, a.seed, device, first_frame, actions):
        parts.append(data.to_uint8(block))
        if writer:
            writer.append(parts[-1])
    if writer:
        writer.close()
    video = np.concatenate(parts, axis=1)
    sheet = a.out if a.out.lower().endswith(".png") else os.path.splitext(a.out)[0] + ".png"
    data.save_preview(video, sheet)
    print(f"wrote {a.out}" + (f" and {sheet}" if sheet != a.out else ""), file=sys.stderr)
    if a.save_npy:
        np.save(a.save_npy, video)
        # eval.py --npy reads these: Semantic scores need the prompts (the empty, unconditional prompt asks for
        # nothing), action following the actions. A file left by an earlier run under the same name is removed.
        sidecars = {".prompts.txt": prompts if all(prompts) else None,
                    ".actions.txt": None if actions is None else
                    [",".join(data.ACTIONS[i] for i in row) for row in actions.tolist()]}
        for suffix, lines in sidecars.items():
            if lines is not None:
                with open(a.save_npy + suffix, "w") as f:
                    f.write("\n".join(lines) + "\n")
            elif os.path.exists(a.save_npy + suffix):
                os.remove(a.save_npy + suffix)
        print(f"wrote {a.save_npy} {tuple(video.shape)}", file=sys.stderr)


def baseline(a, device):
    """--compare: the chunk-wise 4-step student, planned for the same prompt and length.
    -> (name, model, plan)"""
    stem = resolve_ckpt(a.compare_ckpt)
    if not os.path.exists(stem + ".json"):
        T.die(f"--compare needs the chunk-wise student {stem}.safetensors (train it, or pass --compare-ckpt)")
    model, meta = load(stem, device)
    own = argparse.Namespace(**{**vars(a), "steps": None, "timesteps": None, "frames_per_block": None, "guidance": None,
                                "solver": None, "first_frame": None})  # its own sampler, not this checkpoint's overrides
    return os.path.basename(stem), model, plan(meta, own, model.cfg)


def main(argv=None):
    a = parse_args(argv)
    device = T.usable_device(a.device)
    if os.path.splitext(a.out)[1].lower() not in (".mp4", ".gif", ".png"):
        T.die(f"--out {a.out!r} must end in .mp4, .gif or .png")
    if a.save_npy and not a.save_npy.endswith(".npy"):
        T.die(f"--save-npy {a.save_npy!r} must end in .npy")
    if a.model != "toy":  # the Wan scale: umT5, the Wan VAE and diffusers are imported on this path only
        import wan
        model, meta = wan.load_generator(a, device)
        return wan.write_videos(a, model, prompt_list(a), plan(meta, a, model.cfg), device)
    stem = resolve_ckpt(a.ckpt)
    model, meta = load(stem, device)
    prompts, tokens = read_prompts(a)
    first_frame = read_frame(a.first_frame, model.cfg) if a.first_frame else None
    p = plan(meta, a, model.cfg)
    actions = read_actions(a, model.cfg, p, len(prompts))
    other = baseline(a, device) if a.compare else None  # every check before any work
    listed = f" (t = {', '.join(f'{t:g}' for t in p['timesteps'])})" if p["kind"] == "student" else ""
    print(f"{os.path.basename(stem)} ({p['kind']}): {len(prompts)} video(s) x {p['frames']} frames, "
          f"{p['steps']} steps per block{listed}, guidance {p['guidance']}", file=sys.stderr)
    if a.bench:
        cases = [(model, tokens, p, a.seed, device, first_frame, actions)]
        if other:
            name, other_model, other_p = other
            cases.append((other_model, tokens, other_p, a.seed, device, None, None))
        timed, ratio = bench(cases)
        result = {"checkpoint": os.path.basename(stem), **timed[0]}
        if other:
            result["compare"] = {"checkpoint": name, **timed[1]}
            result["latency_ratio"] = round(ratio, 4)
        print(json.dumps(result))
        return
    try:
        write(a, model, tokens, p, device, first_frame, prompts, actions)
    except OSError as e:
        T.die(f"cannot write the output: {e}")


if __name__ == "__main__":
    main()
