"""The reproduction report: the paper's table at toy scale, regenerated from the shipped checkpoints.

    python report.py            # RESULTS.md + results/*.png|gif: 54 videos a row, ~10 min on 2 CPU cores
    python report.py --quick    # 18 videos a row, one noise seed and a 12-step teacher: the smoke version CI runs

Every row is sampled with fixed seeds by sample.py's own sampler (the same plan, the same stream), judged
by eval.py (toy-VBench and the Fréchet distance to 256 real clips) and timed by sample.py's --bench, all
in this one process, so latencies compare like with like. The Stage-2 cost of a DMD student is the one
its init recorded (causal_cd.py's `stage2_cost`). A checkpoint that is not shipped yet gives a row that
says so and how to train it; the claims it decides read "not measured". The init ablation's gaps are as small
as the spread between noise seeds, so its rows are means over ABLATION_SEEDS seeds. RESULTS.md is rewritten each time,
except for the hand-written reading at its end (everything below READING_MARK), which is kept.
"""
import argparse
import functools
import json
import os
import platform
import sys
import time

import numpy as np
import torch

import data
import eval as E
import rollout
import sample as S
import trainer as T

ROWS = (  # the paper's table: label, shipped checkpoint, how to make it
    (f"AR teacher, frame-wise, 48-step {rollout.TEACHER_SOLVER} sampler, guidance {rollout.TEACHER_GUIDANCE:g} "
     "(the ceiling; 12 steps with --quick)",
     "ar_teacher_framewise",
     "python teacher.py --stage=ar --frames_per_block=1"),
    ("Self-Forcing style: bidirectional ODE init + DMD, chunk-wise 4-step", "sf_chunkwise_4step",
     "python dmd.py --init=checkpoints/bidir_ode_chunkwise --frames_per_block=3 --steps_per_block=4"),
    ("Causal Forcing: causal ODE init + DMD, chunk-wise 4-step", "cf_chunkwise_4step",
     "python dmd.py --init=checkpoints/causal_ode_chunkwise --frames_per_block=3 --steps_per_block=4"),
    ("CF++: causal CD init + DMD, frame-wise 2-step", "cfpp_framewise_2step",
     "python dmd.py --init=checkpoints/causal_cd_framewise --timesteps=1000,250"),
    ("CF++: causal CD init + DMD, frame-wise 1-step", "cfpp_framewise_1step",
     "python dmd.py --init=checkpoints/causal_cd_framewise --steps_per_block=1"),
)
ABLATION = (  # stage-2 students before DMD, sampled frame-wise at 1, 2 and 4 steps (frame 0 always 4)
    ("causal ODE init (Causal Forcing)", "causal_ode_framewise", "python causal_cd.py --method=ode"),
    ("causal CD init (CF++)", "causal_cd_framewise", "python causal_cd.py --method=cd"),
    ("bidirectional ODE init (Self-Forcing style)", "bidir_ode_framewise", "python causal_cd.py --method=bidir_ode"),
)
AFTER_DMD = (  # the frame-wise 2-step pair after DMD: only the init differs
    ("causal ODE init + DMD", "ode_framewise_2step",
     "python dmd.py --init=checkpoints/causal_ode_framewise --timesteps=1000,250"),
    ("causal CD init + DMD (CF++)", "cfpp_framewise_2step",
     "python dmd.py --init=checkpoints/causal_cd_framewise --timesteps=1000,250"),
)
ABLATION_SEEDS = 3  # noise seeds seed, seed + 1, ... per init ablation cell (1 with --quick)
SHOWN = (0, 4, 8, 9, 13, 17)  # the prompts on the contact sheets: every colour, every shape twice
READING_MARK = "<!-- Everything below this line is written by hand and kept when report.py rewrites the file. -->"
real_clips = functools.lru_cache(E.reference_videos)  # the same 256 real clips for every row: render them once
SCORES = ("total", "quality", "semantic") + E.QUALITY + E.SEMANTIC + ("fd",)


# ----------------------------------------------------------------------------------------------------
# measuring one checkpoint


def measure(stem, flags, prompts, seed, device, reps):
    """Sample `prompts` (one video each) as `sample.py --ckpt STEM FLAGS` would, score them and, when `reps`
    is set, time that many videos (medians). -> (scores, timing or None, uint8 videos) or None when the
    checkpoint is not there."""
    if not os.path.exists(stem + ".json"):
        return None
    model, meta = S.load(stem, device)
    p = S.plan(meta, S.parse_args(flags), model.cfg)
    tokens = data.tokenize(prompts)
    with torch.no_grad():
        videos = data.to_uint8(S.run(model, tokens, p, seed, device))
        timing = S.bench([(model, tokens, p, seed, device, None, None)], reps)[0][0] if reps else None
    scores = E.evaluate(videos, prompts)
    scores["fd"] = E.frechet_distance(real_clips(videos.shape[1]), videos)
    return scores, timing, videos


def averaged(results):
    """measure() + stem of one checkpoint at several noise seeds -> one such result: the mean of every score
    (and `totals`, the Totals seed by seed) and the first seed's videos; None when it is not shipped."""
    if results[0] is None:
        return None
    scores = {k: float(np.mean([r[0][k] for r in results])) for k in SCORES}
    scores["totals"] = [r[0]["total"] for r in results]
    return (scores, None, *results[0][2:])


def paired_latency(folder, seed, device, reps):
    """First-frame latency of CF++ 2-step / Causal Forcing 4-step, the two timed round-robin in one loop
    (`sample.py --compare`): the median of the paired ratios. None when either is not shipped."""
    cases = []
    for name in ("cfpp_framewise_2step", "cf_chunkwise_4step"):
        stem = os.path.join(folder, name)
        if not os.path.exists(stem + ".json"):
            return None
        model, meta = S.load(stem, device)
        cases.append((model, data.tokenize(["red circle"]), S.plan(meta, S.parse_args([]), model.cfg), seed, device,
                      None, None))
    with torch.no_grad():
        return S.bench(cases, reps)[1]


def stage2_cost(stem):
    """The Stage-2 cost behind a student: its own (a stage-2 student) or its DMD init's."""
    meta = read_json(stem + ".json")
    if "stage2_cost" in meta:
        return meta["stage2_cost"]
    init = os.path.join(os.path.dirname(stem), str(meta.get("init", "")) + ".json")
    return read_json(init).get("stage2_cost") if os.path.exists(init) else None


# ----------------------------------------------------------------------------------------------------
# pictures: contact sheets, GIFs and loss curves (numpy and imageio only)


def line(img, x0, y0, x1, y1, colour):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs, ys = np.linspace(x0, x1, n).round().astype(int), np.linspace(y0, y1, n).round().astype(int)
    keep = (xs >= 0) & (xs < img.shape[1]) & (ys >= 0) & (ys < img.shape[0])
    img[ys[keep], xs[keep]] = colour


def plot_loss(steps, losses, path, w=480, h=200, pad=8):
    """Loss against step, log y: the raw log in light grey, a moving average in blue, a faint line at every
    power of ten. -> the y range drawn (the caption states it; there is no font)."""
    import imageio.v2 as imageio
    img = np.full((h, w, 3), 255, np.uint8)
    x = np.asarray(steps, float)
    y = np.log10(np.maximum(np.asarray(losses, float), 1e-8))
    lo, hi = np.floor(y.min()), np.ceil(y.max() + 1e-9)
    px = lambda s: pad + (s - x.min()) / max(x.max() - x.min(), 1) * (w - 2 * pad)
    py = lambda v: h - pad - (v - lo) / max(hi - lo, 1e-9) * (h - 2 * pad)
    for decade in np.arange(lo, hi + 1):
        line(img, pad, py(decade), w - pad, py(decade), (225, 225, 225))
    k = max(1, len(y) // 25)
    smooth = np.convolve(y, np.ones(k) / k, mode="valid")
    for ys, xs, colour in ((y, x, (190, 190, 190)), (smooth, x[k - 1:], (20, 60, 200))):
        for i in range(len(ys) - 1):
            line(img, px(xs[i]), py(ys[i]), px(xs[i + 1]), py(ys[i + 1]), colour)
    line(img, pad, h - pad, w - pad, h - pad, (0, 0, 0))
    line(img, pad, pad, pad, h - pad, (0, 0, 0))
    imageio.imwrite(path, img)
    return 10 ** lo, 10 ** hi


def training_runs(folder, assets):
    """One line per shipped training log (NAME.log.jsonl beside NAME.json; NAME.first_frameK.log.jsonl for a
    pass of stage 3b on it, NAME.next_frame.log.jsonl for stage 3c): steps, batch, wall-clock, the last losses,
    and the loss curve as a PNG. The loss is the stage's own: flow matching or CD (`loss`), the generator's DMD
    loss (`dmd_loss`) in stages 3 and 3b, the regression on real clips (`regression_loss`) in stage 3c."""
    rows = []
    for log in sorted(f for f in os.listdir(folder) if f.endswith(".log.jsonl")):
        name = log[: -len(".log.jsonl")]
        try:
            entries = [json.loads(s) for s in open(os.path.join(folder, log)) if s.strip()]
        except ValueError as e:
            T.die(f"cannot read the log {os.path.join(folder, log)} ({e})")
        key = next((k for k in ("loss", "regression_loss") if any(k in e for e in entries)), "dmd_loss")
        points = [(e["step"], e[key]) for e in entries if key in e]
        if len(points) < 2:
            continue
        stem, _, later = name.partition(".")  # later: a stage run on the shipped student, first_frameK or next_frame
        meta_path = os.path.join(folder, stem + ".json")
        meta = read_json(meta_path) if os.path.exists(meta_path) else {}
        png = os.path.join(assets, f"loss_{name}.png")
        lo, hi = plot_loss(*zip(*points), png)
        tail = [v for _, v in points[-max(1, len(points) // 10):]]
        evals = [(e["step"], e.get("wall_s", 0) / 60, e["eval"]["total"]) for e in entries if "eval" in e]
        stage = ", stage 3c" if later == "next_frame" else ", stage 3b" if later else ""
        rows.append(dict(name=name, kind=meta.get("kind", "?") + stage, steps=points[-1][0],
                         batch="—" if later else meta.get("batch_size", "?"), key=key,
                         minutes=max(e.get("wall_s", 0) for e in entries) / 60, loss=sum(tail) / len(tail),
                         png=png, y_range=(lo, hi), evals=evals))
    return rows


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        T.die(f"cannot read {path} ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


# ----------------------------------------------------------------------------------------------------
# the report


def fmt(v, digits=3):
    return "—" if v is None else f"{v:.{digits}f}"


def claim(text, verdict, evidence):
    mark = {True: "holds", False: "does not hold", None: "not measured"}[verdict]
    return f"- **{mark}**: {text} ({evidence})"


def claims(main, ablation, after, folder, latency, reps, over):
    """The paper's claims, each decided by the numbers in this run (None = a checkpoint is missing)."""
    get = lambda name: main.get(name) and main[name][0]
    out = []
    cfpp, cf = get("cfpp_framewise_2step"), get("cf_chunkwise_4step")
    ok = None if not (cfpp and cf) else cfpp["total"] >= cf["total"] and cfpp["quality"] >= cf["quality"]
    out.append(claim("CF++ frame-wise 2-step ≥ Causal Forcing chunk-wise 4-step on Total and Quality", ok,
                     "—" if ok is None else f"Total {cfpp['total']:.3f} vs {cf['total']:.3f}, "
                     f"Quality {cfpp['quality']:.3f} vs {cf['quality']:.3f}"))
    out.append(claim("first-frame latency of CF++ 2-step ≤ ½ of Causal Forcing 4-step (paper 0.45)",
                     None if latency is None else latency <= 0.5,
                     "—" if latency is None else f"ratio {latency:.3f}, the median of {reps} paired timings"))
    cost_json = os.path.join(folder, "stage2_cost.json")  # the frame-wise pair, measured one after the other
    cost = read_json(cost_json) if os.path.exists(cost_json) else {}
    ratio = cost.get("teacher_forward_ratio")
    out.append(claim("Stage 2 by causal CD costs ≈ 4× fewer teacher forwards than causal ODE", None if ratio is None
                     else ratio >= 4, "—" if ratio is None else f"ODE ÷ CD = {ratio:.2f} in teacher forwards, "
                     f"{cost['wall_clock_ratio']:.2f} in wall-clock; ODE stores "
                     f"{cost['causal_ode']['stored_bytes'] / 2**20:.1f} MiB, CD 0"))
    pairs = [(n, ablation["causal_cd_framewise"][n][0]["total"], ablation["causal_ode_framewise"][n][0]["total"])
             for n in (1, 2, 4) if ablation.get("causal_cd_framewise") and ablation.get("causal_ode_framewise")]
    out.append(claim("causal CD init ≥ causal ODE init at 1, 2 and 4 steps (before DMD)",
                     None if not pairs else all(c >= o for _, c, o in pairs),
                     "; ".join(f"{n}-step {c:.3f} vs {o:.3f}" for n, c, o in pairs) + f" ({over})" if pairs else "—"))
    if after.get("ode_framewise_2step") and after.get("cfpp_framewise_2step"):
        c, o = after["cfpp_framewise_2step"][0]["total"], after["ode_framewise_2step"][0]["total"]
        out.append(claim("after DMD, the CD-initialised frame-wise 2-step student ≥ the ODE-initialised one",
                         c >= o, f"Total {c:.3f} vs {o:.3f}"))
    else:
        out.append(claim("after DMD, the CD-initialised frame-wise 2-step student ≥ the ODE-initialised one", None, "—"))
    bidir, causal = ablation.get("bidir_ode_framewise"), ablation.get("causal_cd_framewise")
    out.append(claim("the bidirectional-ODE frame-wise 1-step model degrades: dynamic degree and Total below the "
                     "causal CD init's", None if not (bidir and causal) else
                     bidir[1][0]["dynamic_degree"] < causal[1][0]["dynamic_degree"] and bidir[1][0]["total"] < causal[1][0]["total"],
                     "—" if not (bidir and causal) else f"dynamic degree {bidir[1][0]['dynamic_degree']:.3f} vs "
                     f"{causal[1][0]['dynamic_degree']:.3f}, Total {bidir[1][0]['total']:.3f} vs {causal[1][0]['total']:.3f}"))
    return out


def previews(name, videos, per_prompt, assets):
    shown = videos[[i * per_prompt for i in SHOWN]]
    sheet, gif = os.path.join(assets, f"{name}.png"), os.path.join(assets, f"{name}.gif")
    data.save_preview(shown, sheet)
    data.save_preview(shown, gif)
    return sheet, gif


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: T.die(f"{message} (see --help)")
    p.add_argument("--quick", action="store_true", help="1 video per prompt and a 12-step teacher (CI's smoke run)")
    p.add_argument("--checkpoints", default="checkpoints", help="the folder of shipped checkpoints")
    p.add_argument("--out", default="RESULTS.md", help="the report; its pictures go to results/ beside it")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    if not os.path.isdir(a.checkpoints):
        T.die(f"--checkpoints {a.checkpoints} is not a folder")
    device = T.usable_device(a.device)
    start = time.time()
    per_prompt = 1 if a.quick else 3
    prompts = [q for q in data.PROMPTS for _ in range(per_prompt)]
    assets = os.path.join(os.path.dirname(os.path.abspath(a.out)), "results")
    os.makedirs(assets, exist_ok=True)
    teacher_flags = ["--steps", "12"] if a.quick else []
    reps = 2 if a.quick else S.BENCH_REPS

    seeds = [a.seed + i for i in range(1 if a.quick else ABLATION_SEEDS)]
    over = f"seed {a.seed}" if len(seeds) == 1 else f"means over noise seeds {', '.join(map(str, seeds))}"

    def run(name, flags=(), timed=False, seed=a.seed):  # only the main table shows timings
        stem = os.path.join(a.checkpoints, name)
        kind = read_json(stem + ".json").get("kind") if os.path.exists(stem + ".json") else None
        got = measure(stem, (teacher_flags if kind in ("base", "ar_teacher") else []) + list(flags),
                      prompts, seed, device, reps if timed else 0)
        print(f"  {name} {' '.join(flags)} seed {seed}: " + ("not shipped" if got is None else
                                                             f"Total {got[0]['total']:.3f}"), file=sys.stderr)
        return None if got is None else (*got, stem)

    print("sampling the table's rows", file=sys.stderr)
    main_rows = {name: run(name, timed=True) for _, name, _ in ROWS}
    ablation = {name: {n: averaged([run(name, ["--steps", str(n), "--frames-per-block", "1"], seed=s) for s in seeds])
                       for n in (1, 2, 4)} for _, name, _ in ABLATION}
    ablation = {name: r for name, r in ablation.items() if r[1] is not None}
    after = {name: main_rows.get(name) or run(name) for _, name, _ in AFTER_DMD}
    latency = paired_latency(a.checkpoints, a.seed, device, reps)
    runs = training_runs(a.checkpoints, assets)

    md = [f"# Results: the paper's table at toy scale", "",
          f"Regenerated by `python report.py{' --quick' if a.quick else ''}` in {(time.time() - start) / 60:.1f} "
          f"minutes on {platform.machine()}, {os.cpu_count()} CPU cores, {device.type}"
          f"{' (' + torch.cuda.get_device_name(device) + ')' if device.type == 'cuda' else ''}, torch "
          f"{torch.__version__}, {time.strftime('%Y-%m-%d')}. {len(prompts)} videos per row ({per_prompt} per "
          f"prompt, seed {a.seed}), judged by `eval.py`; FD is the Fréchet distance to 256 real clips. Latency "
          f"and frames/s: medians of {reps} timed videos a row (`sample.py --bench`); the latency claim times CF++ "
          "2-step and Causal Forcing 4-step round-robin (`sample.py --compare`).", "",
          "| model | Total | Quality | Semantic | FD | first-frame latency (s) | frames/s | Stage 2: teacher forwards "
          "| stored | wall-clock |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, name, how in ROWS:
        r = main_rows[name]
        if r is None:
            md.append(f"| {label} | not shipped: `{how} --export=checkpoints/{name}` | | | | | | | | |")
            continue
        s, t, _, stem = r
        c = stage2_cost(stem) if "teacher" not in name else None
        cost = ["—"] * 3 if not c else [f"{c['teacher_forwards']:,}", f"{c['stored_bytes'] / 2**20:.1f} MiB",
                                         f"{c['wall_clock_s'] / 60:.1f} min"]
        md.append(f"| {label} | {fmt(s['total'])} | {fmt(s['quality'])} | {fmt(s['semantic'])} | {fmt(s['fd'], 2)} | "
                  f"{fmt(t['first_frame_latency_s'], 4)} | {fmt(t['frames_per_s'], 1)} | " + " | ".join(cost) + " |")
    md += ["", "## The paper's claims, checked", ""] + claims(main_rows, ablation, after, a.checkpoints, latency, reps, over)
    md += ["", "## Init ablation: the stage-2 students before DMD (Total, frame-wise, frame 0 with 4 steps)", "",
           f"Each cell: the {over}" + ("; seed by seed in brackets." if len(seeds) > 1 else ".") +
           " The \"Every score\" rows below are the same means.", "",
           "| init | 1 step | 2 steps | 4 steps | dynamic degree at 1 step |", "|---|---|---|---|---|"]
    cell = lambda s: fmt(s["total"]) + (" (" + " / ".join(map(fmt, s["totals"])) + ")" if len(seeds) > 1 else "")
    for label, name, how in ABLATION:
        r = ablation.get(name)
        md.append(f"| {label} | " + (" | ".join(cell(r[n][0]) for n in (1, 2, 4)) +
                                     f" | {fmt(r[1][0]['dynamic_degree'])} |" if r else
                                     f"not shipped: `{how} --export=checkpoints/{name}` | | | |"))
    md += ["", "After DMD, the frame-wise 2-step pair:", "", "| init | Total | Quality | Semantic | FD |", "|---|---|---|---|---|"]
    for label, name, how in AFTER_DMD:
        r = after[name]
        md.append(f"| {label} | " + (f"{fmt(r[0]['total'])} | {fmt(r[0]['quality'])} | {fmt(r[0]['semantic'])} | "
                                     f"{fmt(r[0]['fd'], 2)} |" if r else f"not shipped: `{how} --export=checkpoints/{name}` | | | |"))
    md += ["", "## Every score", "", "| model | " + " | ".join(SCORES) + " |", "|---" * (len(SCORES) + 1) + "|"]
    measured = [(name, r) for name, r in main_rows.items() if r] + \
               [(f"{name} ({n}-step)", r[n]) for name, r in ablation.items() for n in (1, 2, 4)] + \
               [(name, r) for name, r in after.items() if r and name not in main_rows]
    for name, r in measured:
        md.append(f"| {name} | " + " | ".join(fmt(r[0][k], 2 if k == "fd" else 3) for k in SCORES) + " |")
    md += ["", "## What they draw", "", f"Frames left to right; one row per prompt ({', '.join(data.PROMPTS[i] for i in SHOWN)}), "
           "the first seed of each.", ""]
    for name, r in [(n, r) for n, r in main_rows.items() if r] + [(f"{n}_1step", r[1]) for n, r in ablation.items()]:
        sheet, gif = previews(name, r[2], per_prompt, assets)
        rel = lambda f: os.path.relpath(f, os.path.dirname(os.path.abspath(a.out)))
        md += [f"**{name}**", "", f"![{name}]({rel(sheet)}) ![{name} animated]({rel(gif)})", ""]
    md += ["## Training runs (the JSONL logs shipped beside the checkpoints)", "",
           "| checkpoint | kind | steps | batch | wall-clock | loss | final |", "|---|---|---|---|---|---|---|"]
    md += [f"| {r['name']} | {r['kind']} | {r['steps']:,} | {r['batch']} | {r['minutes']:.0f} min | {r['key']} | "
           f"{r['loss']:.4f} |" for r in runs]
    md.append("")
    for r in runs:
        md += [f"![loss of {r['name']}]({os.path.relpath(r['png'], os.path.dirname(os.path.abspath(a.out)))})", "",
               f"*{r['name']}*: {r['key']} (log scale, {r['y_range'][0]:g} to {r['y_range'][1]:g}; grey: logged every "
               f"few steps, blue: moving average) against step 0 to {r['steps']:,}."
               + ("" if not r["evals"] else " Total while training: " + ", ".join(
                   f"{total:.3f} at step {step:,} ({minutes:.0f} min)" for step, minutes, total in r["evals"]) + "."), ""]
    reading = "## Reading\n\n(to be written by hand after a full run)\n"
    if os.path.exists(a.out):
        old = open(a.out).read()
        if READING_MARK in old:
            reading = old.split(READING_MARK, 1)[1].lstrip("\n")
    text = "\n".join(md) + "\n" + READING_MARK + "\n\n" + reading
    T.atomic_write(a.out, lambda f: open(f, "w").write(text))
    print(f"wrote {a.out} and {len(os.listdir(assets))} pictures in {assets} ({(time.time() - start) / 60:.1f} min)",
          file=sys.stderr)


if __name__ == "__main__":
    main()
