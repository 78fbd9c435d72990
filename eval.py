"""toy-VBench (DESIGN §4): VBench-style scores for videos of the Bouncing Shapes world.

Every score reads only pixels. Per frame, the object mask is the set of pixels whose largest channel exceeds
0.5; from it come the centroid, the area, the mean colour (-> nearest palette colour) and the shape (the
circle/square/triangle template of the same area, centred on the centroid, with the highest IoU).

    python data.py --num-videos 54 --seed 0 --save-npy real.npy
    python eval.py --npy real.npy --fd          # prompts are read from real.npy.prompts.txt
"""
import argparse
import json
import os

import numpy as np

import data
from data import die

QUALITY = ("subject_consistency", "background_consistency", "motion_smoothness", "dynamic_degree", "imaging_quality")
SEMANTIC = ("colour_accuracy", "shape_accuracy")
FEATURES = ("speed", "size", "colour_error", "shape_iou", "jerk", "crispness")  # per video, for the Fréchet distance
SMOOTH_WALL, JERK = 3, 1.5  # motion smoothness: skip triples this close to a wall (bounces); max |c+ - 2c + c-|


# ----------------------------------------------------------------------------- per-frame analysis

def _dilate(mask):
    """Grow a [M, H, W] mask by 1 px in all 8 directions (so a blurred rim is inside it)."""
    out = mask.copy()
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    grown = out.copy()
    grown[:, :, 1:] |= out[:, :, :-1]
    grown[:, :, :-1] |= out[:, :, 1:]
    return grown


def _pieces(mask):
    """Number of 4-connected pieces of each [M, H, W] mask, without scipy: every pixel takes the smallest
    pixel index among its neighbours, then jumps to its label's label, until nothing changes. The pixels
    that keep their own index are one per piece."""
    idx = np.arange(mask.size).reshape(mask.shape)
    none = mask.size  # the label of background pixels, larger than any pixel index
    lab = np.where(mask, idx, none)
    while True:
        new = lab.copy()
        new[:, 1:] = np.minimum(new[:, 1:], lab[:, :-1])
        new[:, :-1] = np.minimum(new[:, :-1], lab[:, 1:])
        new[:, :, 1:] = np.minimum(new[:, :, 1:], lab[:, :, :-1])
        new[:, :, :-1] = np.minimum(new[:, :, :-1], lab[:, :, 1:])
        new = np.where(mask, new, none)
        new = np.append(new.ravel(), none)[new]  # pointer jump: take the label's own label
        if np.array_equal(new, lab):
            return (mask & (lab == idx)).sum((1, 2))
        lab = new


def frame_stats(frames):
    """uint8 [M, H, W, 3] (square frames) -> dict of per-frame arrays: mask, area, centre [M, 2] (x, y in
    pixel-centre coordinates, like data.render), colour / shape (indices into data.COLOURS / data.SHAPES,
    -1 for an empty frame), colour_error, iou (best template), pieces, crisp, gap [M, 4] (free pixels between
    the object and the up/down/left/right wall: the order of data.ACTIONS[1:]), outside_sum / outside_count
    (pixel values and their number off the dilated mask)."""
    x = frames.astype(np.float32) / 255
    peak = x.max(-1)
    mask = peak > 0.5
    _, h, w = mask.shape
    area = mask.sum((1, 2))
    safe = np.maximum(area, 1)
    cols, rows = mask.any(1), mask.any(2)
    centre = np.stack([(mask.sum(1) * (np.arange(w) + 0.5)).sum(1), (mask.sum(2) * (np.arange(h) + 0.5)).sum(1)], 1)
    centre = centre / safe[:, None]
    rgb = (x * mask[..., None]).sum((1, 2)) / safe[:, None]
    dist = np.linalg.norm(rgb[:, None] - np.array([data.PALETTE[c] for c in data.COLOURS])[None], axis=-1)
    # Templates of the mask's area (circle pi r^2, square 4 r^2, triangle 2 r^2) centred on its centroid;
    # a triangle's centroid lies r/3 below the centre (cx, cy) that data.shape_mask takes.
    iou = []
    for shape, k, below in (("circle", np.pi, 0), ("square", 4, 0), ("triangle", 2, 1 / 3)):
        r = np.sqrt(area / k)
        t = data.shape_mask(shape, centre[:, 0], centre[:, 1] - below * r, r, h)
        iou.append((t & mask).sum((1, 2)) / np.maximum((t | mask).sum((1, 2)), 1))
    iou = np.stack(iou, 1)
    ring = _dilate(mask)
    sharp = (peak <= 0.25) | (peak >= 0.75)
    gap = np.stack([rows.argmax(1), rows[:, ::-1].argmax(1), cols.argmax(1), cols[:, ::-1].argmax(1)], 1)
    empty = area == 0
    return dict(area=area, centre=centre, iou=iou.max(1), pieces=_pieces(mask),
                colour=np.where(empty, -1, dist.argmin(1)), colour_error=np.where(empty, 1.0, dist.min(1)),
                shape=np.where(empty, -1, iou.argmax(1)), gap=np.where(empty[:, None], h, gap),
                crisp=(sharp & ring).sum((1, 2)) / np.maximum(ring.sum((1, 2)), 1),
                outside_sum=(x * ~ring[..., None]).sum((1, 2, 3)), outside_count=3 * (~ring).sum((1, 2)))


def video_stats(videos):
    """frame_stats of uint8 [N, T, H, W, 3], every array reshaped to [N, T, ...]."""
    videos = check_videos(videos)
    n, t = videos.shape[:2]
    return {k: v.reshape(n, t, *v.shape[1:]) for k, v in frame_stats(videos.reshape(n * t, *videos.shape[2:])).items()}


def check_videos(videos):
    """The one check of a video array's type and shape (ValueError with what was found)."""
    videos = np.asarray(videos)
    if videos.dtype != np.uint8 or videos.ndim != 5 or videos.shape[-1] != 3 or videos.shape[2] != videos.shape[3]:
        raise ValueError(f"videos must be uint8 [N, T, H, W, 3] with H == W, got {videos.dtype} {list(videos.shape)}")
    if videos.shape[0] < 1 or videos.shape[1] < 3 or videos.shape[2] < 1:
        raise ValueError(f"need at least 1 video of at least 3 frames of at least 1x1 pixels, got {list(videos.shape)}")
    return videos


def _jerk(s):
    """|c+ - 2c + c-| of the centroid for every interior frame, [N, T-2] (px/frame^2)."""
    c = s["centre"]
    return np.linalg.norm(c[:, 2:] - 2 * c[:, 1:-1] + c[:, :-2], axis=-1)


def _speeds(s):
    """Centroid step lengths [N, T-1] and which of them are measurable (object present in both frames)."""
    step = np.linalg.norm(np.diff(s["centre"], axis=1), axis=-1)
    present = s["area"] > 0
    return step, present[:, 1:] & present[:, :-1]


# ----------------------------------------------------------------------------- the scores

def evaluate(videos, prompts=None, actions=None):
    """uint8 [N, T, H, W, 3] -> dict of scores in [0, 1]. Without prompts the semantic scores and Total
    are None (they need to know what was asked for); with actions, also action_following."""
    s = video_stats(videos)
    n = len(s["area"])
    present, whole = s["area"] > 0, s["pieces"] == 1
    med = np.median(s["area"], axis=1, keepdims=True)
    same = (present & present[:, :1] & (s["colour"] == s["colour"][:, :1]) & (s["shape"] == s["shape"][:, :1])
            & (np.abs(s["area"] - med) <= 0.3 * med))
    # Motion: a bad frame (empty, or in pieces) makes its triples count as not smooth; good triples near a
    # wall are skipped, because a bounce is a real change of velocity.
    good = whole[:, 2:] & whole[:, 1:-1] & whole[:, :-2]
    near = s["gap"].min(-1) < SMOOTH_WALL
    near = near[:, 2:] | near[:, 1:-1] | near[:, :-2]
    counted = ~good | ~near
    step, ok = _speeds(s)
    speed = (step * ok).sum(1) / np.maximum(ok.sum(1), 1)
    out = dict(subject_consistency=same.mean(),
               background_consistency=1 - s["outside_sum"].sum() / max(s["outside_count"].sum(), 1),
               motion_smoothness=(good & ~near & (_jerk(s) < JERK)).sum() / counted.sum() if counted.any() else 1.0,
               dynamic_degree=(speed > 0.5).mean(),
               imaging_quality=(s["iou"] * whole * s["crisp"]).mean())
    out["quality"] = np.mean([out[k] for k in QUALITY])
    out.update(colour_accuracy=None, shape_accuracy=None, semantic=None, total=None)
    if prompts is not None:
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} videos")
        asked = [data.parse_prompt(p) for p in prompts]
        out["colour_accuracy"] = (s["colour"] == np.array([data.COLOURS.index(a[0]) for a in asked])[:, None]).mean()
        out["shape_accuracy"] = (s["shape"] == np.array([data.SHAPES.index(a[1]) for a in asked])[:, None]).mean()
        out["semantic"] = (out["colour_accuracy"] + out["shape_accuracy"]) / 2
        out["total"] = (4 * out["quality"] + out["semantic"]) / 5
    if actions is not None:
        out["action_following"] = action_following(videos, actions, s)
    order = ("total", "quality", "semantic") + QUALITY + SEMANTIC + ("action_following",)
    return {k: None if out[k] is None else float(out[k]) for k in order if k in out}


def action_following(videos, actions, stats=None):
    """Fraction of transitions t-1 -> t (t >= 1) where the centroid moved >= 1 px in the direction of action t
    with < 1 px sideways ('none': moved < 0.5 px). A push against a wall the object already touches is
    skipped; 'touches' = within one action step (data.ACTION_STEP px), the zone where the world clamps."""
    s = stats if stats is not None else video_stats(videos)
    n, t = s["area"].shape
    if len(actions) != n or any(len(row) != t for row in actions):
        raise ValueError(f"actions must be {t} per video for {n} videos, got {len(actions)} rows of "
                         f"{sorted({len(row) for row in actions})} actions")
    a = np.asarray(data.action_ids(actions) if isinstance(actions[0][0], str) else actions)  # names or ids
    if a.min() < 0 or a.max() >= len(data.ACTIONS):
        raise ValueError(f"action ids must be in 0..{len(data.ACTIONS) - 1} ({', '.join(data.ACTIONS)})")
    a = a[:, 1:]  # action 0 is ignored by the world
    d = np.diff(s["centre"], axis=1)
    u = np.array([data.MOVES[x] for x in data.ACTIONS], dtype=np.float64)[a]
    along, side = (d * u).sum(-1), np.abs(d[..., 0] * u[..., 1] - d[..., 1] * u[..., 0])
    _, ok = _speeds(s)
    followed = ok & np.where(a == 0, np.linalg.norm(d, axis=-1) < 0.5, (along >= 1) & (side < 1))
    gap = np.take_along_axis(s["gap"][:, :-1], np.maximum(a - 1, 0)[..., None], axis=-1)[..., 0]  # pushed-at wall
    skip = (a > 0) & (gap < data.ACTION_STEP)
    return float(followed[~skip].mean()) if (~skip).any() else 1.0


def video_features(videos):
    """[N, len(FEATURES)]: mean speed (px/frame), size (sqrt(mean area / pi), px), mean colour error
    (RGB distance to the nearest palette colour), mean best-template IoU, mean jerk |c+ - 2c + c-| (px),
    mean crispness. Sizes in px rather than areas in px^2 keep every feature on a scale of about 1."""
    s = video_stats(videos)
    step, ok = _speeds(s)
    jerk, jok = _jerk(s), ok[:, 1:] & ok[:, :-1]
    return np.stack([(step * ok).sum(1) / np.maximum(ok.sum(1), 1), np.sqrt(s["area"].mean(1) / np.pi),
                     s["colour_error"].mean(1), s["iou"].mean(1),
                     (jerk * jok).sum(1) / np.maximum(jok.sum(1), 1), s["crisp"].mean(1)], 1)


def reference_videos(frames=data.FRAMES, num=256, actions=False):
    """The default real set for the Fréchet distance: fixed clips, seeded apart from data.py's default 0."""
    return data.make_clips(num, seed=1, frames=frames, actions=actions)[0]


def _sqrt_psd(a):
    """Square root of a symmetric positive semi-definite matrix by eigen-decomposition (tiny negative
    eigenvalues from rounding are clipped, so nothing turns complex)."""
    w, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(real_videos, gen_videos):
    """Fréchet distance between the FEATURES of two video sets (lower is better); real_videos=None uses
    reference_videos()."""
    gen = video_features(gen_videos)
    real = video_features(reference_videos(np.asarray(gen_videos).shape[1]) if real_videos is None else real_videos)
    return features_distance(real, gen)


def features_distance(real, gen):
    """Fréchet distance between Gaussians fitted to two [N, D] feature sets (compute the reference's features
    once when scoring many models). tr sqrt(S1 S2) = tr sqrt(S1^½ S2 S1^½), a symmetric PSD matrix's root."""
    if len(real) < 2 or len(gen) < 2:
        raise ValueError("the Fréchet distance needs at least 2 videos on each side")
    m1, m2, s1, s2 = real.mean(0), gen.mean(0), np.cov(real, rowvar=False), np.cov(gen, rowvar=False)
    r1 = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)).sum()
    return float(max(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


# ----------------------------------------------------------------------------- command line

def score_model(model, kind, frames_per_block=1, per_prompt=3, seed=0, steps=48):
    """Sample `per_prompt` videos for each of the 18 prompts exactly as `sample.py` samples a teacher (its
    default sampler, rollout.TEACHER_SOLVER / TEACHER_GUIDANCE) and score them: the numbers the training
    logs (54 videos, fixed noise)."""
    import torch

    import sample
    prompts = [p for p in data.PROMPTS for _ in range(per_prompt)]
    plan = sample.plan({"kind": kind, "frames_per_block": frames_per_block}, sample.parse_args(["--steps", str(steps)]),
                       model.cfg)
    with torch.no_grad():
        x = sample.run(model, data.tokenize(prompts), plan, seed, next(model.parameters()).device)
    return evaluate(data.to_uint8(x), prompts)


def _load(path):
    try:
        return check_videos(np.load(path, allow_pickle=False))
    except (OSError, ValueError) as e:
        die(f"cannot use {path}: {e}")


def _lines(path, n, what):
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError as e:
        die(f"cannot read {what} file: {e}")
    if len(lines) != n:
        die(f"{path} has {len(lines)} lines of {what} for {n} videos")
    return lines


def main():
    p = argparse.ArgumentParser(description="Score videos of the Bouncing Shapes world with toy-VBench.")
    p.error = lambda message: die(f"{message} (see --help)")  # one line, exit 2, like every bad input
    p.add_argument("--npy", required=True, help="uint8 [N,T,H,W,3] videos")
    p.add_argument("--prompts", help="one '<colour> <shape>' per line (default: NPY.prompts.txt if it exists)")
    p.add_argument("--actions", help="comma-separated actions, a line per video (default: NPY.actions.txt if any)")
    p.add_argument("--fd", nargs="?", const="", metavar="REAL_NPY",
                   help="also the Fréchet distance to REAL_NPY (default: 256 fixed real clips of the same world)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    a = p.parse_args()
    videos = _load(a.npy)
    n = len(videos)
    prompts_path = a.prompts or (a.npy + ".prompts.txt" if os.path.exists(a.npy + ".prompts.txt") else None)
    actions_path = a.actions or (a.npy + ".actions.txt" if os.path.exists(a.npy + ".actions.txt") else None)
    prompts = _lines(prompts_path, n, "prompts") if prompts_path else None
    actions = None
    if actions_path:
        actions = [[x.strip() for x in line.split(",")] for line in _lines(actions_path, n, "actions")]
    try:
        scores = evaluate(videos, prompts, actions)
        if a.fd is not None:
            real = _load(a.fd) if a.fd else reference_videos(videos.shape[1], actions=actions is not None)
            scores["fd"] = frechet_distance(real, videos)
    except ValueError as e:
        die(str(e))
    if a.json:
        print(json.dumps(scores))
        return
    print(f"toy-VBench: {a.npy} ({n} videos x {videos.shape[1]} frames)")
    for k in ("total", "quality", "semantic") + QUALITY + SEMANTIC + ("action_following", "fd"):
        if k in scores:
            v = scores[k]
            print(f"  {k:<24} {'n/a (needs prompts)' if v is None else f'{v:.4f}'}")


if __name__ == "__main__":
    main()
