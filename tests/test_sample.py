"""The streaming sampler end to end from tiny checkpoints: files and shapes, streaming order, prompts
files, the rolling window, --bench/--compare, image-to-video, and one-line exit-2 errors on bad input."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

import data
import eval as E
import model as M
import rollout
import sample
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = M.get_config("toy-tiny")  # 6 frames of 32x32


def export(stem, seed, **meta):
    torch.manual_seed(seed)
    net = M.build(CFG)
    torch.nn.init.normal_(net.head.head.weight, std=0.3)  # random but not the zero head (x0 = x_t)
    T.export(stem, net, {"config": asdict(CFG), "shift": CFG.shift, **meta})
    return stem


@pytest.fixture(scope="module")
def ck(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpts")
    return dict(
        fw=export(str(tmp / "fw2"), 0, kind="student", frames_per_block=1, steps_per_block=2, first_block_steps=4),
        cw=export(str(tmp / "cw4"), 1, kind="student", frames_per_block=3, steps_per_block=4, first_block_steps=None),
        ar=export(str(tmp / "ar"), 2, kind="ar_teacher", frames_per_block=1),
        base=export(str(tmp / "base"), 3, kind="base", frames_per_block=None),
        dir=tmp)


def test_streams_video_sheet_and_npy(ck, tmp_path, monkeypatch):
    denoised, appended = [], []
    real_denoise, real_append = rollout.denoise_block, sample.VideoWriter.append
    monkeypatch.setattr(rollout, "denoise_block", lambda *a, **k: denoised.append(1) or real_denoise(*a, **k))
    monkeypatch.setattr(sample.VideoWriter, "append",
                        lambda self, v: appended.append((len(denoised), v.shape)) or real_append(self, v))
    out, npy = tmp_path / "v.mp4", tmp_path / "v.npy"
    sample.main(["--ckpt", ck["fw"] + ".safetensors", "--num-samples=2", f"--out={out}", f"--save-npy={npy}"])
    # each frame reaches the file as soon as it exists, before the next one is denoised
    assert appended == [(i + 1, (2, 1, 32, 32, 3)) for i in range(6)]
    video = np.load(npy)
    assert video.shape == (2, 6, 32, 32, 3) and video.dtype == np.uint8
    assert open(str(npy) + ".prompts.txt").read().split("\n")[:2] == ["red circle", "red circle"]
    frames = imageio.mimread(out)
    assert len(frames) == 6 and frames[0].shape == (128, 272, 3)  # two 128-px videos side by side, width padded to 16
    assert imageio.imread(tmp_path / "v.png").shape == (2 * 64 + 2, 6 * 64 + 5 * 2, 3)  # the contact sheet


def test_the_empty_prompt_leaves_no_prompts_file_and_eval_scores_quality(ck, tmp_path, capsys):
    """--prompt "" draws unconditional videos: eval.py must not read an empty or stale prompts file."""
    npy = tmp_path / "u.npy"
    (tmp_path / "u.npy.prompts.txt").write_text("red circle\n")  # left by an earlier run under the same name
    sample.main(["--ckpt", ck["fw"], "--prompt=", f"--out={tmp_path / 'U.PNG'}", f"--save-npy={npy}"])
    assert not (tmp_path / "u.npy.prompts.txt").exists()
    assert f"wrote {tmp_path / 'U.PNG'}\n" in capsys.readouterr().err and (tmp_path / "U.PNG").exists()
    r = subprocess.run([sys.executable, "eval.py", "--npy", str(npy), "--json"], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    scores = json.loads(r.stdout)
    assert scores["total"] is None and 0 <= scores["quality"] <= 1


def test_frame_0_gets_its_own_four_steps(ck, monkeypatch):
    lists = []
    real_denoise = rollout.denoise_block
    monkeypatch.setattr(rollout, "denoise_block",
                        lambda m, x, ts, *a, **k: lists.append(len(ts)) or real_denoise(m, x, ts, *a, **k))
    model, meta = sample.load(ck["fw"], torch.device("cpu"))
    p = sample.plan(meta, sample.parse_args([]), model.cfg)
    sample.run(model, data.tokenize(["red circle"]), p, 0, torch.device("cpu"))
    assert lists == [4, 2, 2, 2, 2, 2]


def test_prompts_file_and_chunkwise_gif(ck, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("cyan triangle\n\nyellow square\n")
    npy = tmp_path / "p.npy"
    sample.main(["--ckpt", ck["cw"], f"--prompts-file={prompts}", f"--out={tmp_path / 'p.gif'}", f"--save-npy={npy}"])
    assert np.load(npy).shape == (2, 6, 32, 32, 3)
    assert open(str(npy) + ".prompts.txt").read() == "cyan triangle\nyellow square\n"
    assert len(imageio.mimread(tmp_path / "p.gif")) == 6


def test_longer_than_trained_uses_the_rolling_window(ck, tmp_path, monkeypatch):
    caches = []
    real_cache = M.KVCache.__init__
    monkeypatch.setattr(M.KVCache, "__init__", lambda self, *a: caches.append(a) or real_cache(self, *a))
    for stem, frames in ((ck["fw"], 14), (ck["cw"], 12)):
        npy = tmp_path / "long.npy"
        sample.main(["--ckpt", stem, f"--num-frames={frames}", f"--out={tmp_path / 'long.png'}", f"--save-npy={npy}"])
        assert np.load(npy).shape == (1, frames, 32, 32, 3)
    assert [a[2:] for a in caches] == [(6, sample.SINK)] * 2  # window = the trained 6 frames
    caches.clear()
    sample.main(["--ckpt", ck["fw"], "--num-frames=14", "--sink=2", f"--out={tmp_path / 'long.png'}"])
    assert [a[2:] for a in caches] == [(6, 2)]


def test_window_as_wide_as_the_video_changes_nothing(ck):
    model, meta = sample.load(ck["fw"], torch.device("cpu"))
    tokens = data.tokenize(["red circle"])
    videos = [sample.run(model, tokens, sample.plan(meta, sample.parse_args(extra), model.cfg), 3, torch.device("cpu"))
              for extra in ([], ["--window=6", "--sink=1"])]
    assert torch.equal(*videos)


def test_teachers_still_sample(ck, tmp_path):
    for stem in (ck["ar"], ck["base"]):
        npy = tmp_path / "t.npy"
        sample.main(["--ckpt", stem, "--steps=2", "--num-samples=2", f"--out={tmp_path / 't.gif'}", f"--save-npy={npy}"])
        assert np.load(npy).shape == (2, 6, 32, 32, 3)


def test_teachers_default_to_the_measured_sampler_and_students_to_consistency_without_guidance():
    plan = lambda kind, *flags: sample.plan({"kind": kind, "steps_per_block": 2}, sample.parse_args(list(flags)), CFG)
    # README, "the teachers' sampler": the consistency solver at 1.5 beat the paper's Euler at 3 on three seeds
    assert (rollout.TEACHER_SOLVER, rollout.TEACHER_GUIDANCE) == ("consistency", 1.5)
    for kind in ("ar_teacher", "base"):
        p = plan(kind)
        assert (p["solver"], p["guidance"], p["steps"]) == (rollout.TEACHER_SOLVER, rollout.TEACHER_GUIDANCE, 48)
        p = plan(kind, "--solver", "euler", "--guidance", "3")  # the paper's sampler
        assert (p["solver"], p["guidance"]) == ("euler", 3)
    p = plan("student")
    assert (p["solver"], p["guidance"], p["steps"]) == ("consistency", 1.0, 2)  # a distilled student: no guidance


def test_training_logs_judge_the_teachers_with_the_sampler_users_get(ck, tmp_path):
    """eval.score_model (teacher.py --eval_every) and sample.py draw the same videos for the same seed."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(data.PROMPTS))
    for stem, kind in ((ck["ar"], "ar_teacher"), (ck["base"], "base")):
        npy = tmp_path / f"{kind}.npy"
        sample.main(["--ckpt", stem, "--steps=2", "--seed=5", f"--prompts-file={prompts}", f"--out={tmp_path / 'x.png'}",
                     f"--save-npy={npy}"])
        model, _ = T.load_model(stem)
        logged = E.score_model(model, kind, per_prompt=1, seed=5, steps=2)
        assert logged == E.evaluate(np.load(npy), data.PROMPTS)


def test_consistency_solver_re_noises_the_teachers_x0_with_fresh_noise(ck, tmp_path):
    """--solver consistency on the base: x0 at each grid point, then fresh noise to the next (by hand here)."""
    model, _ = T.load_model(ck["base"])
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, CFG.frames, 32, 32, generator=g)
    tokens, grid = data.tokenize(["red circle"]), M.timesteps(3, CFG.shift).tolist() + [0.0]
    w = rollout.TEACHER_GUIDANCE  # what sample.py gives a teacher by default
    ctx = rollout.contexts(model, tokens, w)
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            x0 = M.x0_from_v(x, rollout.velocity(model, x, torch.tensor([t]), ctx, w), torch.tensor([t]))
            x = M.add_noise(x0, torch.randn(x.shape, generator=g), torch.tensor([t_next]))
    videos = {}
    for solver in ("euler", "consistency"):
        npy = tmp_path / f"{solver}.npy"
        sample.main(["--ckpt", ck["base"], "--steps=3", f"--solver={solver}", f"--out={tmp_path / 'b.png'}",
                     f"--save-npy={npy}"])
        videos[solver] = np.load(npy)
    assert np.abs(videos["consistency"].astype(int) - data.to_uint8(x).astype(int)).max() <= 1
    assert np.abs(videos["consistency"].astype(int) - videos["euler"].astype(int)).max() > 10


def last_json(capsys):
    out = capsys.readouterr().out.strip().split("\n")
    return json.loads(out[-1])


def test_bench_and_compare_print_json_last(ck, capsys):
    sample.main(["--ckpt", ck["fw"], "--bench"])
    result = last_json(capsys)
    assert result["first_frame_latency_s"] > 0 and result["frames_per_s"] > 0 and "latency_ratio" not in result
    sample.main(["--ckpt", ck["fw"], "--compare", f"--compare-ckpt={ck['cw']}.safetensors"])
    result = last_json(capsys)
    assert result["compare"]["checkpoint"] == "cw4" and result["compare"]["frames_per_block"] == 3
    assert result["latency_ratio"] > 0


def test_compare_times_round_robin_and_reports_the_median_paired_ratio(ck, capsys, monkeypatch):
    """Noisy machines: the two checkpoints alternate, and the ratio is the median of the per-round ratios
    (here 1.0), not the ratio of the medians (here 0.5)."""
    order, latencies = [], iter([1, 2, 3, 1, 1, 4, 2, 2, 1, 1])  # rounds (A, B): ratios 0.5, 3, 0.25, 1, 1
    monkeypatch.setattr(sample, "time_video", lambda model, tokens, p, *rest: order.append(p["fpb"]) or
                        (next(latencies), 10.0))
    sample.main(["--ckpt", ck["fw"], "--compare", f"--compare-ckpt={ck['cw']}"])
    result = last_json(capsys)
    assert order == [1, 3] * sample.BENCH_REPS == [1, 3] * 5
    assert (result["first_frame_latency_s"], result["compare"]["first_frame_latency_s"]) == (1, 2)
    assert result["latency_ratio"] == 1.0 and result["frames_per_s"] == 10.0


def test_first_frame_is_cached_context(ck, tmp_path):
    clip, _ = data.make_clip(5, frames=2, prompt="green circle")
    videos = []
    for i, frame in enumerate(clip):
        png, npy = tmp_path / f"f{i}.png", tmp_path / f"i2v{i}.npy"
        imageio.imwrite(png, frame)
        sample.main(["--ckpt", ck["fw"], "--prompt=green circle", f"--first-frame={png}", f"--out={tmp_path / 'i.gif'}",
                     f"--save-npy={npy}"])
        videos.append(np.load(npy))
        assert videos[-1].shape == (1, 6, 32, 32, 3) and np.array_equal(videos[-1][0, 0], frame)
    assert not np.array_equal(videos[0][:, 1:], videos[1][:, 1:])  # the rest depends on the given frame


def test_a_students_timestep_list_comes_from_its_json_or_timesteps(ck, monkeypatch):
    """dmd.py --timesteps ships an explicit block list in the JSON; sample.py samples it by default,
    --timesteps overrides it, --steps goes back to the warped list; frame 0 keeps its 4-step list, or the
    JSON's first_timesteps (first_frame.py --first_timesteps) when it has one."""
    lists = []
    real_denoise = rollout.denoise_block
    monkeypatch.setattr(rollout, "denoise_block",
                        lambda m, x, ts, *a, **k: lists.append([round(t, 1) for t in ts]) or real_denoise(m, x, ts, *a, **k))
    model, meta = sample.load(ck["fw"], torch.device("cpu"))
    warped = lambda n: [round(t, 1) for t in M.timesteps(n, model.cfg.shift).tolist()]
    first = warped(4)
    for json_list, flags, want in ((None, [], warped(2)), ([1000, 250], [], [1000.0, 250.0]),
                                   ([1000, 250], ["--timesteps", "1000,500,100"], [1000.0, 500.0, 100.0]),
                                   ([1000, 250], ["--steps", "1"], [1000.0])):
        lists.clear()
        listed = {**meta, "timesteps": json_list} if json_list else meta
        p = sample.plan(listed, sample.parse_args(flags), model.cfg)
        sample.run(model, data.tokenize(["red circle"]), p, 0, torch.device("cpu"))
        assert lists == [first] + [want] * 5 and p["steps"] == len(want), (json_list, flags, lists)
    lists.clear()
    own = {**meta, "timesteps": [1000, 250], "first_timesteps": [1000, 833.3, 625, 250]}
    sample.run(model, data.tokenize(["red circle"]), sample.plan(own, sample.parse_args([]), model.cfg), 0,
               torch.device("cpu"))
    assert lists == [[1000.0, 833.3, 625.0, 250.0]] + [[1000.0, 250.0]] * 5, lists
    for bad_list in ({"timesteps": [250, 1000]}, {"first_timesteps": [250, 1000]}):  # one line, not a traceback
        with pytest.raises(SystemExit):
            sample.plan({**meta, **bad_list}, sample.parse_args([]), model.cfg)


@pytest.fixture(scope="module")
def bad(ck):
    d = ck["dir"]
    (d / "corrupt.safetensors").write_bytes(os.urandom(300))
    (d / "corrupt.json").write_text(open(ck["fw"] + ".json").read())
    meta = json.load(open(ck["fw"] + ".json"))
    variants = dict(other={**meta, "config": {**meta["config"], "dim": 64}},  # weights of another config
                    foreign={"config": [1, 2], "kind": "student"}, nosteps={**meta, "steps_per_block": None},
                    trainrun={**meta, "kind": "train_dmd"}, wordy={**meta, "guidance": "high"})
    for name, m in variants.items():
        (d / f"{name}.safetensors").write_bytes(open(ck["fw"] + ".safetensors", "rb").read())
        (d / f"{name}.json").write_text(json.dumps(m))
    latent = M.get_config("toy-tiny", in_dim=16, out_dim=16)
    T.export(str(d / "latent"), M.build(latent), {**meta, "config": asdict(latent)})
    imageio.imwrite(d / "small.png", np.zeros((16, 16, 3), np.uint8))
    imageio.imwrite(d / "gray.png", np.zeros((32, 32), np.uint8))
    imageio.imwrite(d / "clear.png", np.zeros((32, 32, 4), np.uint8))
    imageio.imwrite(d / "ok.png", np.zeros((32, 32, 3), np.uint8))
    (d / "text.png").write_text("not an image")
    (d / "prompts.txt").write_text("red circle\npurple circle\n")
    return d


CASES = [
    (["--prompt=purple circle"], "unknown colour 'purple'"),
    (["--prompt=red"], "must be '<colour> <shape>'"),
    (["--prompts-file={d}/prompts.txt"], "unknown colour 'purple'"),
    (["--prompts-file={d}/none.txt"], "cannot be read"),
    (["--ckpt={d}/missing"], "missing.safetensors not found"),
    (["--ckpt={d}/corrupt"], "corrupt or not ours"),
    (["--ckpt={d}/other"], "does not fit this code's model"),
    (["--ckpt={d}/foreign"], "not a model checkpoint of this project"),
    (["--ckpt={d}/nosteps"], "no steps_per_block"),
    (["--ckpt={d}/trainrun"], "cannot be sampled"),
    (["--ckpt={d}/latent"], "not a toy-world model"),
    (["--num-frames=0"], "must be positive"),
    (["--steps=-1"], "must be positive"),
    (["--num-samples=0"], "--num-samples must be positive"),
    (["--ckpt={d}/cw4", "--num-frames=7"], "not a multiple of --frames-per-block 3"),
    (["--window=2", "--sink=2"], "must exceed --sink 2"),
    (["--num-samples=two"], "invalid int value"),
    (["--out=video.avi"], "must end in .mp4, .gif or .png"),
    (["--first-frame={d}/none.png"], "not found"),
    (["--first-frame={d}/small.png"], "is 16x16; the model's frames are 32x32"),
    (["--first-frame={d}/gray.png"], "must be an 8-bit RGB image"),
    (["--first-frame={d}/clear.png"], "transparent"),
    (["--first-frame={d}/text.png"], "not a readable image"),
    (["--first-frame={d}/ok.png", "--ckpt={d}/cw4"], "needs a frame-wise causal checkpoint"),
    (["--first-frame={d}/ok.png", "--ckpt={d}/base"], "needs a frame-wise causal checkpoint"),
    (["--compare", "--compare-ckpt={d}/missing"], "--compare needs the chunk-wise student"),
    (["--timesteps=1000,abc"], "--timesteps must be numbers"),
    (["--timesteps=250,1000"], "strictly descending numbers in (0, 1000]"),
    (["--timesteps=1000,0"], "strictly descending numbers in (0, 1000]"),
    (["--timesteps=1000,250", "--steps=2"], "give --steps or --timesteps, not both"),
    (["--timesteps=1000,250", "--ckpt={d}/base"], "--timesteps is for distilled students"),
    (["--guidance=nan"], "--guidance must be a finite number >= 1"),
    (["--guidance=inf"], "--guidance must be a finite number >= 1"),
    (["--guidance=0"], "--guidance must be a finite number >= 1"),  # not silently 1
    (["--ckpt={d}/wordy"], "the checkpoint JSON's guidance must be a finite number >= 1 (1 = no guidance), got 'high'"),
    (["--seed=-1"], "--seed must lie in [0, 2^63)"),
    (["--seed=99999999999999999999"], "--seed must lie in [0, 2^63)"),
    (["--sink=1"], "--sink keeps frames of a rolling window"),
    (["--ckpt={d}/base", "--window=6"], "--window and --sink are for causal checkpoints"),
]


@pytest.mark.parametrize("extra,message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_bad_input_exits_2_with_one_line(ck, bad, capsys, tmp_path, extra, message):
    argv = [f"--ckpt={ck['fw']}", f"--out={tmp_path / 'x.gif'}"] + [e.format(d=bad) for e in extra]
    with pytest.raises(SystemExit) as stop:
        sample.main(argv)
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err


def test_cli_without_arguments_uses_the_shipped_student(ck, bad, tmp_path):
    (tmp_path / "checkpoints").mkdir()
    for ext in (".safetensors", ".json"):
        os.link(ck["fw"] + ext, tmp_path / "checkpoints" / ("cfpp_framewise_2step" + ext))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py")], cwd=tmp_path, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "samples" / "sample.mp4").exists() and (tmp_path / "samples" / "sample.png").exists()
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), f"--ckpt={bad}/corrupt"], cwd=tmp_path,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().split("\n")) == 1
