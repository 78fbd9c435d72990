"""report.py from tiny checkpoints: each row's numbers are sample.py + eval.py's, the claims are decided by
them, missing checkpoints say how to make them, and the hand-written reading survives a rewrite."""
import json
import os
import re

import imageio.v2 as imageio
import numpy as np
import pytest

import causal_cd
import data
import eval as E
import report
import sample
from test_sample import export

STUDENT = dict(kind="student", frames_per_block=1, steps_per_block=2, first_block_steps=4)
CHUNK = dict(kind="student", frames_per_block=3, steps_per_block=4, first_block_steps=None)


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("shipped")
    ck = lambda name, seed, **meta: export(str(tmp / name), seed, **meta)
    cost = lambda fwd, stored: dict(frames_per_block=1, teacher_forwards=fwd, stored_bytes=stored, wall_clock_s=60.0)
    ck("ar_teacher_framewise", 0, kind="ar_teacher", frames_per_block=1)
    ck("causal_cd_framewise", 1, **STUDENT, init="cd", stage2_cost=cost(6400, 0))
    ck("causal_ode_framewise", 2, **STUDENT, init="ode", stage2_cost=cost(24576, 3 * 2**20))
    ck("bidir_ode_framewise", 3, **STUDENT, init="bidir_ode", stage2_cost=cost(24576, 3 * 2**20))
    ck("cfpp_framewise_2step", 4, **STUDENT, init="causal_cd_framewise", batch_size=8)
    ck("cfpp_framewise_1step", 5, **dict(STUDENT, steps_per_block=1), init="causal_cd_framewise")
    ck("ode_framewise_2step", 6, **STUDENT, init="causal_ode_framewise")
    ck("cf_chunkwise_4step", 7, **CHUNK, init="causal_ode_chunkwise")
    ck("sf_chunkwise_4step", 8, **CHUNK, init="bidir_ode_chunkwise")
    causal_cd.record_cost(str(tmp / "stage2_cost.json"), "causal_cd", cost(6400, 0))
    causal_cd.record_cost(str(tmp / "stage2_cost.json"), "causal_ode", cost(24576, 3 * 2**20))
    with open(tmp / "ar_teacher_framewise.log.jsonl", "w") as f:  # a teacher's log: flow-matching loss, evals
        for step in range(10, 210, 10):
            f.write(json.dumps({"step": step, "wall_s": step * 0.6, "loss": 1 / step}) + "\n")
        f.write(json.dumps({"step": 200, "wall_s": 130.0, "eval": {"total": 0.61}}) + "\n")
    for log in ("cfpp_framewise_2step", "cfpp_framewise_2step.first_frame2"):  # DMD's fields, G every 2nd step
        with open(tmp / f"{log}.log.jsonl", "w") as f:
            for step in range(1, 41):
                g = {"dmd_loss": 1 / step, "gen_grad_norm": 0.3} if step % 2 else {}
                f.write(json.dumps({"step": step, "wall_s": step * 1.0, "critic_loss": 0.05, **g}) + "\n")
    with open(tmp / "cfpp_framewise_2step.next_frame.log.jsonl", "w") as f:  # stage 3c's fields
        for step in range(25, 1025, 25):
            f.write(json.dumps({"step": step, "wall_s": step * 1.5, "regression_loss": 1 / step, "keep_loss": 0.001,
                                "grad_norm": 1.0}) + "\n")
    return tmp


def row(text, label):
    line = next(s for s in text.splitlines() if s.startswith(f"| {label} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_report_rows_claims_pictures_and_the_kept_reading(shipped, tmp_path):
    out = tmp_path / "RESULTS.md"
    report.main(["--quick", f"--checkpoints={shipped}", f"--out={out}"])
    text = open(out).read()

    # a row is exactly what sample.py draws for the 18 prompts and eval.py scores
    (tmp_path / "prompts.txt").write_text("\n".join(data.PROMPTS) + "\n")
    npy = tmp_path / "cfpp.npy"
    sample.main(["--ckpt", str(shipped / "cfpp_framewise_2step"), f"--prompts-file={tmp_path / 'prompts.txt'}",
                 f"--save-npy={npy}", f"--out={tmp_path / 'cfpp.png'}"])
    scores = E.evaluate(np.load(npy), list(data.PROMPTS))
    cells = row(text, report.ROWS[3][0])
    assert cells[1:4] == [f"{scores[k]:.3f}" for k in ("total", "quality", "semantic")]
    assert float(cells[5]) > 0 and float(cells[6]) > 0  # latency and frames/s were measured
    assert cells[7:10] == ["6,400", "0.0 MiB", "1.0 min"]  # the Stage-2 cost of its init (causal_cd_framewise)

    # the claims are decided by the numbers: 24576 / 6400 = 3.84 < 4
    assert "**does not hold**: Stage 2 by causal CD costs ≈ 4× fewer" in text and "ODE ÷ CD = 3.84" in text
    assert len(re.findall(r"^- \*\*(holds|does not hold)\*\*", text, re.M)) == 6
    cf, cfpp = row(text, report.ROWS[2][0]), row(text, report.ROWS[3][0])
    verdict = "holds" if float(cfpp[1]) >= float(cf[1]) and float(cfpp[2]) >= float(cf[2]) else "does not hold"
    assert f"**{verdict}**: CF++ frame-wise 2-step ≥ Causal Forcing" in text

    # pictures: a contact sheet and a GIF per row, the loss curve of the shipped log
    assets = tmp_path / "results"
    assert imageio.imread(assets / "cfpp_framewise_2step.png").shape == (6 * 64 + 5 * 2, 6 * 64 + 5 * 2, 3)
    assert len(imageio.mimread(assets / "cfpp_framewise_2step.gif")) == 6
    curve = imageio.imread(assets / "loss_ar_teacher_framewise.png")
    assert (curve[..., 2] > 150).any() and (curve[..., 0] < 60).any()  # the blue moving average is drawn
    assert "0.610 at step 200 (2 min)" in text
    # stage 3 logs carry the generator's DMD loss on its own steps, and stage 3b's passes have their own rows
    runs = text.split("## Training runs")[1]
    assert row(runs, "cfpp_framewise_2step")[1:6] == ["student", "39", "8", "1 min", "dmd_loss"]
    assert row(runs, "cfpp_framewise_2step.first_frame2")[1:6] == ["student, stage 3b", "39", "—", "1 min", "dmd_loss"]
    assert (assets / "loss_cfpp_framewise_2step.first_frame2.png").exists()
    assert row(runs, "cfpp_framewise_2step.next_frame")[1:6] == ["student, stage 3c", "1,000", "—", "25 min",
                                                                 "regression_loss"]

    # rewrite without two checkpoints: their rows say how to train them, the claims they decide are open,
    # and the reading written by hand below the mark is kept
    open(out, "a").write("Our reading: hand-written.\n")
    for name in ("cf_chunkwise_4step", "bidir_ode_framewise"):
        os.remove(shipped / f"{name}.json")
    try:
        report.main(["--quick", f"--checkpoints={shipped}", f"--out={out}"])
    finally:
        for i, name in ((7, "cf_chunkwise_4step"), (3, "bidir_ode_framewise")):
            export(str(shipped / name), i, **(CHUNK if "chunk" in name else STUDENT), init="x")
    text = open(out).read()
    assert "not shipped: `python dmd.py --init=checkpoints/causal_ode_chunkwise" in text
    assert text.count("**not measured**") == 3  # CF++ vs CF on Total, the latency ratio, the bidir 1-step
    assert text.endswith("Our reading: hand-written.\n") and text.count(report.READING_MARK) == 1


def test_bad_checkpoint_folder_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        report.main([f"--checkpoints={tmp_path / 'nowhere'}"])
    assert e.value.code == 2 and "not a folder" in capsys.readouterr().err
    (tmp_path / "damaged").mkdir()
    (tmp_path / "damaged" / "ar_teacher_framewise.json").write_text("{not json")
    with pytest.raises(SystemExit) as e:
        report.main(["--quick", f"--checkpoints={tmp_path / 'damaged'}", f"--out={tmp_path / 'R.md'}"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after the progress line: one line of error, no traceback
    assert e.value.code == 2 and last.startswith("error: cannot read") and "ar_teacher_framewise.json" in last, err
    assert "Traceback" not in err
    with pytest.raises(SystemExit) as e:
        report.main(["--device=nope", f"--checkpoints={tmp_path}"])
    assert e.value.code == 2 and "--device nope is not usable here" in capsys.readouterr().err


@pytest.mark.slow
def test_quick_report_on_the_shipped_checkpoints(tmp_path):
    """CI's smoke run of the real report: whatever is shipped is sampled, the rest says how to train it."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "RESULTS.md"
    report.main(["--quick", f"--checkpoints={os.path.join(root, 'checkpoints')}", f"--out={out}"])
    text = open(out).read()
    for label, name, _ in report.ROWS:
        shipped = os.path.exists(os.path.join(root, "checkpoints", name + ".json"))
        assert (f"| {label} | not shipped" in text) != shipped
    assert "## Training runs" in text and (tmp_path / "results" / "loss_base.png").exists()
    assert row(text.split("## Training runs")[1], "cfpp_framewise_2step")[5] == "dmd_loss"  # the DMD logs too


def test_the_init_ablation_cells_are_means_over_noise_seeds(shipped):
    stem = str(shipped / "causal_cd_framewise")
    got = [(*report.measure(stem, ["--steps", "1"], list(data.PROMPTS), seed, "cpu", 0), stem) for seed in (0, 1)]
    assert not np.array_equal(got[0][2], got[1][2])  # two seeds, two sets of videos
    scores, timing, videos, where = report.averaged(got)
    assert scores["totals"] == [g[0]["total"] for g in got]
    for key in report.SCORES:
        assert scores[key] == pytest.approx((got[0][0][key] + got[1][0][key]) / 2)
    assert timing is None and videos is got[0][2] and where == stem
    assert report.averaged([None, None]) is None
