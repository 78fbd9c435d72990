"""toy-VBench keeps DESIGN §4: real clips score high, and each corruption lowers the score it should."""
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as toy  # noqa: E402  (our eval.py, not the builtin)


@pytest.fixture(scope="module")
def real():
    """54 real clips, 3 per prompt (the set the README reports)."""
    return data.make_clips(54, seed=0)


@pytest.fixture(scope="module")
def real_scores(real):
    return toy.evaluate(*real)


def blur(videos):  # 3x3 box blur of every frame
    x = np.pad(videos.astype(np.float32), ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    out = sum(x[:, :, i:i + 32, j:j + 32] for i in range(3) for j in range(3)) / 9
    return out.round().astype(np.uint8)


# ----------------------------------------------------------------------------- per-frame analysis

def test_frame_stats_by_hand():
    frames = np.stack([data.render("circle", "red", 16, 16, 4), data.render("triangle", "cyan", 10.2, 20.7, 5),
                       data.render("square", "blue", 25, 6.5, 4.5), np.zeros((32, 32, 3), np.uint8)])
    s = toy.frame_stats(frames)
    assert s["area"][0] == 52 and np.allclose(s["centre"][0], [16, 16])
    assert s["colour"].tolist() == [0, 4, 2, -1] and s["shape"].tolist() == [0, 2, 1, -1]
    assert s["pieces"].tolist() == [1, 1, 1, 0] and (s["crisp"][:3] == 1).all() and (s["iou"][:3] > 0.75).all()
    assert s["gap"][2].tolist() == [2, 21, 20, 2]  # free pixels to the up, down, left, right walls


def test_pieces_use_4_connectivity():
    m = np.zeros((3, 8, 8), bool)
    m[0, 1:7, 1] = m[0, 6, 1:7] = m[0, 1:7, 6] = True  # a U: one piece that needs labels to travel far
    m[1, 2, 2] = m[1, 3, 3] = True  # touching only at a corner: two pieces
    m[2, 0, 0] = m[2, 7, 7] = m[2, 4, 2:5] = True
    assert toy._pieces(m).tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------- real clips

def test_real_clips_score_high(real_scores):
    assert real_scores["total"] >= 0.97  # the metric's own check (DESIGN §4)
    assert all(real_scores[k] >= 0.97 for k in toy.QUALITY + toy.SEMANTIC)
    assert real_scores["colour_accuracy"] == real_scores["shape_accuracy"] == 1
    q = np.mean([real_scores[k] for k in toy.QUALITY])
    assert np.isclose(real_scores["quality"], q)
    assert np.isclose(real_scores["total"], (4 * q + real_scores["semantic"]) / 5)


def test_fast_and_long_videos(real):
    t = time.perf_counter()
    toy.evaluate(*real)
    assert time.perf_counter() - t < 2.0
    videos, prompts = data.make_clips(6, frames=48)
    assert toy.evaluate(videos, prompts)["total"] >= 0.97


def test_without_prompts_only_quality(real, real_scores):
    s = toy.evaluate(real[0])
    assert s["total"] is s["semantic"] is s["colour_accuracy"] is s["shape_accuracy"] is None
    assert s["quality"] == real_scores["quality"]


# ----------------------------------------------------------------------------- corruptions

def test_blur_lowers_imaging_quality(real, real_scores):
    s = toy.evaluate(blur(real[0]), real[1])
    assert s["imaging_quality"] < real_scores["imaging_quality"] - 0.3


def test_static_video_has_no_dynamics(real, real_scores):
    static = np.repeat(real[0][:, :1], 12, axis=1)
    s = toy.evaluate(static, real[1])
    assert s["dynamic_degree"] == 0 and real_scores["dynamic_degree"] == 1


def test_shuffled_frames_are_not_smooth(real, real_scores):
    rng = np.random.default_rng(0)
    shuffled = np.stack([v[rng.permutation(12)] for v in real[0]])
    s = toy.evaluate(shuffled, real[1])
    assert s["motion_smoothness"] < real_scores["motion_smoothness"] - 0.4


def test_wrong_colours_and_shapes(real):
    s = toy.evaluate(real[0][..., [1, 2, 0]], real[1])  # red -> blue, yellow -> cyan, ...: every colour moves
    assert s["colour_accuracy"] == 0 and s["shape_accuracy"] == 1
    wrong = [f"{c} {data.SHAPES[(data.SHAPES.index(sh) + 1) % 3]}" for c, sh in map(data.parse_prompt, real[1])]
    assert toy.evaluate(real[0], wrong)["shape_accuracy"] < 0.05


def test_noise_lowers_background_and_imaging(real, real_scores):
    rng = np.random.default_rng(0)
    noisy = np.clip(real[0] + rng.normal(0, 40, real[0].shape), 0, 255).astype(np.uint8)
    s = toy.evaluate(noisy, real[1])
    assert s["background_consistency"] < real_scores["background_consistency"] - 0.05
    assert s["imaging_quality"] < real_scores["imaging_quality"] - 0.3


def test_a_second_object_breaks_smoothness_and_imaging(real, real_scores):
    videos = real[0].copy()
    videos[:, :, 14:17, 14:17] = 255  # a white speck in the middle of every frame
    s = toy.evaluate(videos, real[1])
    assert s["imaging_quality"] < real_scores["imaging_quality"] - 0.3
    assert s["motion_smoothness"] < real_scores["motion_smoothness"] - 0.3


# ----------------------------------------------------------------------------- action following

OPPOSITE = {"none": "none", "up": "down", "down": "up", "left": "right", "right": "left"}


def test_action_following():
    videos, prompts, actions = data.make_clips(36, seed=0, actions=True)
    assert toy.evaluate(videos, prompts, actions)["action_following"] >= 0.95
    swapped = [[OPPOSITE[a] for a in row] for row in actions]
    assert toy.action_following(videos, swapped) < 0.5
    ids = data.action_ids(actions).numpy()  # ids work as well as names
    assert toy.action_following(videos, ids) == toy.action_following(videos, actions)
    still = np.repeat(videos[:, :1], 12, axis=1)
    assert toy.action_following(still, [["none"] * 12] * 36) == 1
    with pytest.raises(ValueError, match="actions must be 12 per video"):
        toy.action_following(videos, [row[:-1] for row in actions])
    with pytest.raises(ValueError, match="'jump'"):
        toy.action_following(videos[:1], [["jump"] * 12])


# ----------------------------------------------------------------------------- Fréchet distance

def test_sqrt_psd():
    a = np.random.default_rng(0).normal(size=(5, 3))
    s = a @ a.T  # rank 3: singular
    r = toy._sqrt_psd(s)
    assert np.allclose(r @ r, s, atol=1e-8) and np.allclose(r, r.T)


def test_frechet_distance(real):
    ref = toy.video_features(toy.reference_videos())
    assert ref.shape == (256, len(toy.FEATURES))
    near = toy.features_distance(ref, toy.video_features(real[0]))  # two samples of the real world: the noise floor
    assert near < 0.1 and near == toy.frechet_distance(None, real[0])  # None = the default reference
    assert toy.frechet_distance(real[0], real[0]) < 1e-6
    assert toy.features_distance(ref, toy.video_features(blur(real[0]))) > 5 * near  # crispness, colour purity
    static = np.repeat(real[0][:, :1], 12, axis=1)
    assert toy.features_distance(ref, toy.video_features(static)) > 50 * near  # speed
    with pytest.raises(ValueError, match="at least 2 videos"):
        toy.frechet_distance(real[0][:1], real[0])


# ----------------------------------------------------------------------------- bad input

def test_evaluate_rejects_bad_input(real):
    for bad in (real[0].astype(np.float32), real[0][0], real[0][:, :2]):
        with pytest.raises(ValueError, match="videos|frames"):
            toy.evaluate(bad)
    with pytest.raises(ValueError, match="53 prompts for 54 videos"):
        toy.evaluate(real[0], real[1][:-1])
    with pytest.raises(ValueError, match="'purple'"):
        toy.evaluate(real[0][:1], ["purple circle"])


# ----------------------------------------------------------------------------- command line

def test_cli_pipeline(tmp_path):
    path = str(tmp_path / "real.npy")
    run = dict(cwd=ROOT, capture_output=True, text=True, check=True)
    subprocess.run([sys.executable, "data.py", "--num-videos", "18", "--save-npy", path], **run)
    out = subprocess.run([sys.executable, "eval.py", "--npy", path, "--fd", "--json"], **run).stdout
    scores = json.loads(out)  # the prompts were found next to the .npy
    assert scores["total"] >= 0.97 and 0 <= scores["fd"] < 0.2
    assert set(toy.QUALITY + toy.SEMANTIC + ("total", "quality", "semantic")) <= set(scores)


def test_cli_table_with_actions(monkeypatch, capsys, tmp_path):
    videos, prompts, actions = data.make_clips(18, actions=True)
    np.save(tmp_path / "w.npy", videos)
    (tmp_path / "w.npy.actions.txt").write_text("\n".join(",".join(a) for a in actions) + "\n")
    monkeypatch.setattr(sys, "argv", ["eval.py", "--npy", str(tmp_path / "w.npy"), "--fd"])
    toy.main()
    table = capsys.readouterr().out  # no prompts file: quality only, and the actions were found
    assert "total                    n/a (needs prompts)" in table and "action_following         1.0000" in table
    assert float(table.split("fd")[-1]) < 0.1  # against real clips of the action world (bouncing ones: 0.27)


def run_eval(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["eval.py", *argv])
    with pytest.raises(SystemExit) as e:
        toy.main()
    return e.value.code, capsys.readouterr().err


@pytest.fixture
def files(tmp_path, real):
    """Small good and bad input files."""
    good = tmp_path / "good.npy"
    np.save(good, real[0][:3])
    (tmp_path / "good.npy.prompts.txt").write_text("\n".join(real[1][:3]) + "\n")
    np.save(tmp_path / "float.npy", real[0][:3].astype(np.float32))
    np.save(tmp_path / "shape.npy", real[0][0])
    np.save(tmp_path / "pickle.npy", np.array([{"a": 1}], dtype=object))
    np.save(tmp_path / "empty.npy", np.zeros((2, 4, 0, 0, 3), np.uint8))
    (tmp_path / "two.txt").write_text("red circle\nred square\n")
    (tmp_path / "purple.txt").write_text("red circle\npurple circle\nred square\n")
    (tmp_path / "acts.txt").write_text("none,up\nnone,up\nnone,up\n")
    (tmp_path / "jump.txt").write_text("\n".join([",".join(["none"] * 11 + ["jump"])] * 3) + "\n")
    return tmp_path


@pytest.mark.parametrize("argv,message", [
    (["--npy", "missing.npy"], "cannot use missing.npy"), (["--npy", "float.npy"], "must be uint8"),
    (["--npy", "shape.npy"], "must be uint8 [N, T, H, W, 3]"), (["--npy", "pickle.npy"], "cannot use pickle.npy"),
    (["--npy", "empty.npy"], "at least 1x1 pixels"),
    (["--npy", "good.npy", "--prompts", "two.txt"], "2 lines of prompts for 3 videos"),
    (["--npy", "good.npy", "--prompts", "purple.txt"], "purple"),
    (["--npy", "good.npy", "--prompts", "missing.txt"], "cannot read prompts file"),
    (["--npy", "good.npy", "--actions", "acts.txt"], "actions"),
    (["--npy", "good.npy", "--actions", "jump.txt"], "unknown action 'jump'"),
    (["--npy", "good.npy", "--fd", "float.npy"], "must be uint8"),
    ([], "--npy"), (["--npy", "good.npy", "--frobnicate"], "unrecognized arguments")])
def test_cli_bad_input(monkeypatch, capsys, files, argv, message):
    monkeypatch.chdir(files)
    code, err = run_eval(monkeypatch, capsys, *argv)
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_cli_bad_input_in_a_real_process(files):
    out = subprocess.run([sys.executable, str(ROOT / "eval.py"), "--npy", "good.npy", "--prompts", "purple.txt"],
                         cwd=files, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "purple" in out.stderr and "red, green" in out.stderr
