"""The Bouncing Shapes world (DESIGN §3): every toy stage trains on it, eval.py judges against it.

One coloured shape moves in a 32x32 black frame: it bounces off the walls (text-to-video world), or it is
pushed 2 px per frame by an action (world-model variant). Clips are made on the fly from a seed with
`np.random.default_rng(seed)` and never touch global random state, so a clip is the same in every process.
The Wan-scale stages read a latent data set instead (LatentStream: VAE latents and umT5 contexts written by
`python wan.py encode`); data.py itself needs neither transformers nor diffusers.

    python data.py --num-videos 54 --seed 0 --save-npy real.npy --out real.png
"""
import argparse
import json
import os
import sys

import numpy as np
import torch
from safetensors import safe_open

SIZE, FRAMES = 32, 12
COLOURS = ("red", "green", "blue", "yellow", "cyan", "magenta")
PALETTE = {"red": (1.0, 0.0, 0.0), "green": (0.0, 1.0, 0.0), "blue": (0.0, 0.0, 1.0),
           "yellow": (1.0, 1.0, 0.0), "cyan": (0.0, 1.0, 1.0), "magenta": (1.0, 0.0, 1.0)}
SHAPES = ("circle", "square", "triangle")
PROMPTS = tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)  # the 18 prompts
RADIUS, SPEED = (4.0, 6.0), (1.0, 2.5)  # size (radius or half-side, px) and speed (px/frame) ranges
ACTIONS = ("none", "up", "down", "left", "right")
ACTION_IDS = {a: i for i, a in enumerate(ACTIONS)}
MOVES = {"none": (0, 0), "up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}  # y points down
ACTION_STEP, STICKY = 2.0, 0.75  # px moved per action; chance that an action repeats in the next frame
# Seed tags, last in a seed tuple (numpy pads seeds with zeros, so (s,) == (s, 0, 0) and a tag must not be 0):
# the training stream and the evaluation sets never share a clip.
TRAIN, EVAL = 1, 2


def die(msg):
    """Bad user input: one line on stderr and exit code 2, never a traceback (DESIGN §6)."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- rendering

def shape_mask(shape, cx, cy, r, size=SIZE):
    """Bool mask [..., size, size]: pixel (x, y) is in when its centre (x+.5, y+.5) is inside the shape.
    cx, cy, r may be arrays (they broadcast), so a whole clip or a batch of templates is one call."""
    cx, cy, r = (np.asarray(v, dtype=np.float64)[..., None, None] for v in (cx, cy, r))
    px = np.arange(size) + 0.5
    dx, dy = px[None, :] - cx, px[:, None] - cy  # columns are x, rows are y
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= r ** 2
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "triangle":  # apex (cx, cy-r) on top, base from (cx-r, cy+r) to (cx+r, cy+r)
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"unknown shape {shape!r}; shapes: {', '.join(SHAPES)}")


def render(shape, colour, cx, cy, r, size=SIZE):
    """uint8 frame(s) [..., size, size, 3]: the shape in its pure palette colour on black."""
    mask = shape_mask(shape, cx, cy, r, size)
    return (mask[..., None] * np.array(PALETTE[colour]) * 255).astype(np.uint8)


# ----------------------------------------------------------------------------- the two worlds

def parse_prompt(prompt):
    """'<colour> <shape>' -> (colour, shape); anything else is a ValueError naming the allowed words."""
    words = prompt.split()
    if len(words) != 2:
        raise ValueError(f"prompt {prompt!r} must be '<colour> <shape>' "
                         f"(colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)})")
    if words[0] not in COLOURS:
        raise ValueError(f"unknown colour {words[0]!r} in prompt {prompt!r}; colours: {', '.join(COLOURS)}")
    if words[1] not in SHAPES:
        raise ValueError(f"unknown shape {words[1]!r} in prompt {prompt!r}; shapes: {', '.join(SHAPES)}")
    return words[0], words[1]


def _start(rng, prompt):
    """Draw the object and its starting centre (whole object inside). The draws happen even when a
    prompt is given, so a seed always places the object the same way."""
    shape, colour = SHAPES[rng.integers(len(SHAPES))], COLOURS[rng.integers(len(COLOURS))]
    if prompt is not None:
        colour, shape = parse_prompt(prompt)
    r = rng.uniform(*RADIUS)
    return shape, colour, r, rng.uniform(r, SIZE - r, size=2)


def bounce_path(seed, frames=FRAMES, prompt=None):
    """-> shape, colour, r, centres [T, 2] of a bouncing object; elastic reflection keeps it in frame."""
    rng = np.random.default_rng(seed)
    shape, colour, r, pos = _start(rng, prompt)
    angle = rng.uniform(0, 2 * np.pi)
    vel = rng.uniform(*SPEED) * np.array([np.cos(angle), np.sin(angle)])
    path = [pos.copy()]
    for _ in range(frames - 1):
        pos += vel
        for i in range(2):  # mirror an overshoot back into [r, SIZE - r] (one bounce per frame suffices)
            if not r <= pos[i] <= SIZE - r:
                wall = r if pos[i] < r else SIZE - r
                pos[i], vel[i] = 2 * wall - pos[i], -vel[i]
        path.append(pos.copy())
    return shape, colour, r, np.stack(path)


def action_path(seed, frames=FRAMES, actions=None, prompt=None):
    """-> shape, colour, r, centres [T, 2], actions: action t moves the object ACTION_STEP px from frame
    t-1 (action 0 is ignored: frame 0 is the initial state); at a wall the object stops (clamped)."""
    rng = np.random.default_rng(seed)
    shape, colour, r, pos = _start(rng, prompt)
    if actions is None:  # sticky: an action tends to repeat for a few frames, like a player holding a key
        actions = [ACTIONS[rng.integers(len(ACTIONS))]]
        for _ in range(frames - 1):
            actions.append(actions[-1] if rng.random() < STICKY else ACTIONS[rng.integers(len(ACTIONS))])
    if len(actions) != frames:
        raise ValueError(f"got {len(actions)} actions for {frames} frames")
    path = [pos.copy()]
    for a in actions[1:]:
        if a not in MOVES:
            raise ValueError(f"unknown action {a!r}; actions: {', '.join(ACTIONS)}")
        pos = np.clip(pos + ACTION_STEP * np.array(MOVES[a]), r, SIZE - r)
        path.append(pos)
    return shape, colour, r, np.stack(path), list(actions)


def make_clip(seed, frames=FRAMES, prompt=None):
    """-> (video uint8 [T, 32, 32, 3], prompt). seed: an int or a tuple of ints."""
    shape, colour, r, path = bounce_path(seed, frames, prompt)
    return render(shape, colour, path[:, 0], path[:, 1], r), f"{colour} {shape}"


def make_action_clip(seed, frames=FRAMES, actions=None, prompt=None):
    """-> (video uint8 [T, 32, 32, 3], prompt, actions); given actions are followed, else random sticky ones."""
    shape, colour, r, path, actions = action_path(seed, frames, actions, prompt)
    return render(shape, colour, path[:, 0], path[:, 1], r), f"{colour} {shape}", actions


def parse_action_script(text, frames):
    """"none,right*4" (NAME or NAME*COUNT, comma-separated) -> one action name per frame, exactly `frames`."""
    names, total = [], 0
    for item in text.split(","):
        name, star, times = (u.strip() for u in item.partition("*"))
        if name not in ACTIONS:
            raise ValueError(f"unknown action {name!r} in {item.strip()!r}; actions: {', '.join(ACTIONS)}")
        if star and not (times.isascii() and times.isdigit() and int(times) > 0):
            raise ValueError(f"{item.strip()!r} needs a positive whole count after '*'")
        count = int(times) if star else 1
        total += count
        names += [name] * min(count, frames + 1 - len(names))  # counted, not built, past one too many
    if total != frames:
        raise ValueError(f"the script gives {total} actions for {frames} frames; give exactly one per frame")
    return names


def make_clips(num, seed=0, frames=FRAMES, actions=False):
    """A fixed evaluation set: clip i has prompt PROMPTS[i % 18] (balanced) and seed (seed, i, EVAL).
    actions: False (text-to-video), True (random sticky actions) or one list of names every clip follows.
    -> videos uint8 [N, T, 32, 32, 3], prompts (, actions)."""
    script = actions if isinstance(actions, list) else None
    clips = [make_action_clip(s, frames, script, p) if actions is not False else make_clip(s, frames, p)
             for s, p in (((seed, i, EVAL), PROMPTS[i % len(PROMPTS)]) for i in range(num))]
    videos, prompts = np.stack([c[0] for c in clips]), [c[1] for c in clips]
    return (videos, prompts, [c[2] for c in clips]) if actions is not False else (videos, prompts)


# ----------------------------------------------------------------------------- model-side helpers

VOCAB = ("<pad>",) + COLOURS + SHAPES  # the toy text encoder's words (it stands in for umT5)
TEXT_LEN = 2


def tokenize(prompts):
    """list of '<colour> <shape>' -> LongTensor [B, 2]; '' is the unconditional prompt (all <pad>) for CFG."""
    ids = [[0, 0] if p.strip() == "" else [VOCAB.index(w) for w in parse_prompt(p)] for p in prompts]
    return torch.tensor(ids, dtype=torch.long).reshape(len(prompts), TEXT_LEN)


def action_ids(actions):
    """list of action names (or a list of such lists) -> LongTensor of the same shape."""
    def one(a):
        if isinstance(a, (list, tuple)):
            return [one(b) for b in a]
        if a not in ACTION_IDS:
            raise ValueError(f"unknown action {a!r}; actions: {', '.join(ACTIONS)}")
        return ACTION_IDS[a]
    return torch.tensor(one(list(actions)), dtype=torch.long)


def to_model(video):
    """uint8 [N, T, H, W, 3] (or [T, H, W, 3]) -> float [N, 3, T, H, W] in [-1, 1], the model's layout."""
    x = torch.as_tensor(np.asarray(video)).float() / 127.5 - 1
    return (x[None] if x.ndim == 4 else x).permute(0, 4, 1, 2, 3).contiguous()


def to_uint8(x):
    """float [N, 3, T, H, W] in [-1, 1] -> uint8 numpy [N, T, H, W, 3] (clamped and rounded)."""
    x = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).numpy()


class ClipStream:
    """Endless, reproducible training batches of fresh clips. Clip j of the global batch k has seed
    (seed, k * world_size * batch_size + j, TRAIN) and rank r takes its slice j in [r*B, (r+1)*B): ranks see different
    clips, N ranks see exactly the clips one rank with N times the batch would, and a run resumed with
    start_batch=k (save `stream.batch` in the checkpoint) continues the stream where it stopped."""

    def __init__(self, batch_size, seed=0, rank=0, world_size=1, frames=FRAMES, actions=False, start_batch=0):
        if batch_size < 1 or frames < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad stream: batch_size={batch_size}, frames={frames}, rank={rank}/{world_size}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.frames, self.actions, self.batch = frames, actions, start_batch

    def __iter__(self):
        return self

    def __next__(self):
        first = (self.batch * self.world_size + self.rank) * self.batch_size
        seeds = [(self.seed, first + i, TRAIN) for i in range(self.batch_size)]
        clips = [make_action_clip(s, self.frames) if self.actions else make_clip(s, self.frames) for s in seeds]
        self.batch += 1
        prompts = [c[1] for c in clips]
        out = dict(video=to_model(np.stack([c[0] for c in clips])), tokens=tokenize(prompts), prompts=prompts)
        if self.actions:
            out["actions"] = action_ids([c[2] for c in clips])
        return out


# ----------------------------------------------------------------------------- the Wan-scale latent data set

LATENT_INDEX, LATENT_SHARD = "index.json", "shard_{:05d}.safetensors"


class LatentStream:
    """Endless, reproducible Wan-scale training batches from a latent data set (DATA/, written by `python
    wan.py encode`). DATA/shard_NNNNN.safetensors holds `latents` [n, C, f, h, w] (bf16, the VAE's normalised
    latents), `context` [R, D] (bf16, the umT5 rows of its n prompts back to back, without their zero
    padding) and `lengths` [n] (each prompt's rows); DATA/index.json holds the shapes and the clips per shard.
    Batch k takes positions k*B .. k*B+B-1 of an endless run of epochs, each a permutation of all clips drawn
    from (seed, epoch): every clip once per epoch, and the same batch in every process and after a resume
    (start_batch=k). Yields {"video": [B, C, f, h, w], "context": [B, 512, D]} in float32, the context zero-
    padded back to its 512 rows. Shards are memory-mapped: a batch reads only its own rows."""

    def __init__(self, folder, batch_size, seed=0, start_batch=0):
        if batch_size < 1:
            raise ValueError(f"bad stream: batch_size={batch_size}")
        path = os.path.join(folder, LATENT_INDEX)
        if not os.path.exists(path):
            die(f"{folder} is not a latent data set: it has no {LATENT_INDEX} (write one with `python wan.py encode`)")
        try:
            with open(path) as f:
                index = json.load(f)
            self.shape, self.text_dim, self.text_len = tuple(index["latent_shape"]), index["text_dim"], index["text_len"]
            self.files = [safe_open(os.path.join(folder, LATENT_SHARD.format(i)), "pt") for i in range(len(index["shards"]))]
            lengths = [f.get_tensor("lengths") for f in self.files]
            fits = all(f.get_slice("latents").get_shape() == [n, *self.shape] and len(rows) == n
                       and f.get_slice("context").get_shape() == [int(rows.sum()), self.text_dim]
                       for f, n, rows in zip(self.files, index["shards"], lengths))
        except Exception as e:  # json, safetensors and a hand-edited index raise several types
            die(f"{folder} is not a readable latent data set ({type(e).__name__}: {str(e).splitlines()[0][:160]})")
        if not fits or not sum(index["shards"]):
            die(f"{folder}: its shards disagree with {LATENT_INDEX} (clips, latent shape or context rows), or it is empty")
        self.where = []  # clip -> (shard, row, first context row, context rows)
        for shard, rows in enumerate(lengths):
            starts = (torch.cumsum(rows, 0) - rows).tolist()
            self.where += [(shard, i, a, n) for i, (a, n) in enumerate(zip(starts, rows.tolist()))]
        self.folder, self.batch_size, self.seed, self.batch = folder, batch_size, seed, start_batch

    def __len__(self):
        return len(self.where)

    def __iter__(self):
        return self

    def __next__(self):
        self.batch += 1
        return self.at(self.batch - 1)

    def at(self, k):
        """Batch k."""
        n, pos = len(self), np.arange(k * self.batch_size, (k + 1) * self.batch_size)
        perms = {e: np.random.default_rng((self.seed, e, TRAIN)).permutation(n) for e in set((pos // n).tolist())}
        idx = [int(perms[p // n][p % n]) for p in pos.tolist()]
        video = torch.cat([self.files[s].get_slice("latents")[i:i + 1] for s, i, _, _ in (self.where[j] for j in idx)])
        return {"video": video.float(), "context": self.contexts(idx)}

    def contexts(self, idx):
        """umT5 contexts [len(idx), 512, D] of clips idx, zero past each prompt's rows."""
        out = torch.zeros(len(idx), self.text_len, self.text_dim)
        for row, j in enumerate(idx):
            s, _, a, n = self.where[int(j)]
            out[row, :n] = self.files[s].get_slice("context")[a:a + n].float()
        return out

    def check(self, cfg, what):
        """Exit 2 unless the model `what` (its model.Config `cfg`) takes these latents and contexts."""
        if cfg.vocab_size or cfg.num_actions:
            die(f"{what} is a toy-world model (token embedding or actions); latents come with umT5 contexts")
        takes = (cfg.in_dim, cfg.frames, cfg.height, cfg.width)
        if takes != self.shape or (cfg.text_len, cfg.text_dim) != (self.text_len, self.text_dim):
            die(f"{self.folder} holds latents {list(self.shape)} and {self.text_len}x{self.text_dim} contexts; "
                f"{what} takes latents {list(takes)} and {cfg.text_len}x{cfg.text_dim} contexts")


def ground_truth(step, batch_size, seed, frames, actions=False, latents=None):
    """The step's global batch of ground-truth clips, all from (seed, step): (video, text, actions). Toy: fresh
    Bouncing Shapes clips [B, 3, T, 32, 32], prompt token ids [B, 2] and (world model) actions; with `latents`
    (a LatentStream of this batch size and seed): Wan latents, umT5 contexts [B, 512, D] and no actions.
    Either text is all zeros for the empty prompt, so prompt dropout and guidance zero it."""
    if latents is None:
        clips = next(ClipStream(batch_size, seed, frames=frames, actions=actions, start_batch=step))
        return clips["video"], clips["tokens"], clips.get("actions")
    clips = latents.at(step)
    return clips["video"], clips["context"], None


# ----------------------------------------------------------------------------- previews

def _grid(frames, cols, scale, sep=2):
    """[M, H, W, 3] uint8 -> one image: `cols` per row, upscaled (nearest) and split by grey lines."""
    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    m, h, w, _ = frames.shape
    rows = -(-m // cols)
    out = np.full((rows * (h + sep) - sep, cols * (w + sep) - sep, 3), 96, np.uint8)
    for i, f in enumerate(frames):
        y, x = (i // cols) * (h + sep), (i % cols) * (w + sep)
        out[y:y + h, x:x + w] = f
    return out


def save_preview(videos, path, scale=None, fps=8):
    """uint8 [N, T, H, W, 3] -> .png contact sheet (a row per video, a column per frame), or a .gif/.mp4
    animation (the videos side by side, up to 8 per row). Sheets hold many frames, so they upscale x2 by
    default; animations show one frame at a time, so x4."""
    import imageio.v2 as imageio  # only previews need it
    videos = np.asarray(videos)
    n, t = videos.shape[:2]
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        imageio.imwrite(path, _grid(videos.reshape(n * t, *videos.shape[2:]), t, scale or 2))
        return
    if ext not in (".gif", ".mp4"):
        raise ValueError(f"preview {path!r} must end in .png, .gif or .mp4")
    frames = [_grid(videos[:, i], min(n, 8), scale or 4) for i in range(t)]
    if ext == ".gif":
        imageio.mimwrite(path, frames, duration=1000 / fps, loop=0)
    else:  # H.264 wants sides that are multiples of 16: pad with black instead of letting imageio resize
        h, w = frames[0].shape[:2]
        frames = [np.pad(f, ((0, -h % 16), (0, -w % 16), (0, 0))) for f in frames]
        imageio.mimwrite(path, frames, fps=fps, macro_block_size=1)


def main():
    p = argparse.ArgumentParser(description="Render Bouncing Shapes clips (balanced prompts) to .npy and/or a preview.")
    p.error = lambda message: die(f"{message} (see --help)")  # one line, exit 2, like every bad input
    p.add_argument("--num-videos", type=int, default=18)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--frames", type=int, default=FRAMES)
    p.add_argument("--actions", nargs="?", const="random", metavar="SCRIPT",
                   help="the action-controlled world (writes PATH.actions.txt). Alone: random sticky actions; with "
                        "SCRIPT (NAME or NAME*COUNT, comma-separated, as in sample.py) every clip follows it: what a "
                        "perfect world model would draw for that script")
    p.add_argument("--save-npy", metavar="PATH", help="uint8 [N,T,32,32,3]; prompts go to PATH.prompts.txt")
    p.add_argument("--out", help="preview: .png contact sheet, .gif or .mp4")
    a = p.parse_args()
    if a.num_videos < 1 or a.frames < 1:
        die(f"--num-videos and --frames must be positive (got {a.num_videos}, {a.frames})")
    if a.seed < 0:
        die(f"--seed must be non-negative (got {a.seed})")
    if a.save_npy is None and a.out is None:
        die("nothing to do: give --save-npy PATH and/or --out PREVIEW")
    if a.save_npy is not None and not a.save_npy.endswith(".npy"):
        die(f"--save-npy {a.save_npy!r} must end in .npy")
    if a.out is not None and os.path.splitext(a.out)[1].lower() not in (".png", ".gif", ".mp4"):
        die(f"--out {a.out!r} must end in .png, .gif or .mp4")
    actions = a.actions is not None
    if a.actions not in (None, "random"):
        try:
            actions = parse_action_script(a.actions, a.frames)
        except ValueError as e:
            die(f"--actions: {e}")
    videos, prompts, *clip_actions = make_clips(a.num_videos, a.seed, a.frames, actions)
    try:
        if a.save_npy:
            np.save(a.save_npy, videos)
            with open(a.save_npy + ".prompts.txt", "w") as f:
                f.write("\n".join(prompts) + "\n")
            if clip_actions:
                with open(a.save_npy + ".actions.txt", "w") as f:
                    f.write("\n".join(",".join(acts) for acts in clip_actions[0]) + "\n")
        if a.out:
            save_preview(videos, a.out)
    except OSError as e:
        die(f"cannot write: {e}")
    print(f"wrote {a.num_videos} clips of {a.frames} frames: " + ", ".join(x for x in (a.save_npy, a.out) if x))


if __name__ == "__main__":
    main()
