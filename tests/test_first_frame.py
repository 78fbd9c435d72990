"""Stage 3b (first_frame.py): the generator rolls out frame 0 alone on its 4-step list, the keep term holds
frames 1.. (and only those) where the frozen init had them, each optimiser moves only its network while the
real score and the init stay frozen, resume is exact, and the shipped student keeps its sampler."""
import json
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

import first_frame
import model as M
import rollout
import sample
import soup
import teacher
import trainer as T

CFG = M.get_config("toy-tiny")  # 6 frames of 32x32


def tiny(seed):
    torch.manual_seed(seed)
    net = M.build(CFG)
    torch.nn.init.normal_(net.head.head.weight, std=0.3)  # the zero-initialised head would make x0 = x_t
    return net


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny frame-wise AR teacher (teacher.py, one step each stage) and random frame-wise / chunk-wise
    students with the shipped CF++ sampler fields."""
    tmp = tmp_path_factory.mktemp("ckpts")
    common = ["--model=toy-tiny", "--steps=1", "--batch_size=2", "--bf16=false"]
    teacher.main([*common, f"--out={tmp / 'run'}", f"--export={tmp / 'base'}"])
    teacher.main([*common, "--stage=ar", f"--init={tmp / 'base'}", f"--out={tmp / 'ar_run'}", f"--export={tmp / 'ar'}"])
    for name, fpb, first in (("fw", 1, 4), ("cw", 3, None)):
        T.export(str(tmp / name), tiny(fpb), {"kind": "student", "config": asdict(CFG), "frames_per_block": fpb,
                                              "steps_per_block": 2, "first_block_steps": first,
                                              "timesteps": [1000.0, 250.0], "shift": CFG.shift, "log": "x.log.jsonl"})
    return {k: str(tmp / k) for k in ("base", "ar", "fw", "cw")}


def args(ckpts, out, *extra):
    return [f"--init={ckpts['fw']}", f"--real={ckpts['ar']}", "--batch_size=2", "--keep_batch=2",
            "--critic_updates=2", "--lr=1e-2", "--critic_lr=1e-2", "--log_every=1", "--bf16=false", f"--out={out}", *extra]


def test_the_generator_rolls_out_frame_0_alone_on_its_4_step_list(ckpts, tmp_path, monkeypatch):
    lists = []
    real_denoise = rollout.denoise_block
    monkeypatch.setattr(rollout, "denoise_block", lambda m, x, ts, *a, **k:
                        lists.append((x.shape[2], [round(t, 1) for t in ts])) or real_denoise(m, x, ts, *a, **k))
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=2"))
    first = [round(t, 1) for t in M.timesteps(4, CFG.shift).tolist()]
    assert lists and all(item == (1, first) for item in lists)  # one frame, never the block list


def test_a_frame_0_list_is_trained_on_shipped_and_sampled_and_kept_by_the_next_pass(ckpts, tmp_path, monkeypatch):
    """--first_timesteps: the rollouts run frame 0 on that list, the JSON ships it, sample.py's frame 0 takes it
    (and the block list stays the init's), and a later pass without the flag trains on it too."""
    lists = []
    real_denoise = rollout.denoise_block
    monkeypatch.setattr(rollout, "denoise_block", lambda m, x, ts, *a, **k:
                        lists.append([round(t, 1) for t in ts]) or real_denoise(m, x, ts, *a, **k))
    stem = str(tmp_path / "cfpp")
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=2", "--first_timesteps=1000,500,100", f"--export={stem}"))
    assert lists and all(ts == [1000.0, 500.0, 100.0] for ts in lists)
    meta = json.load(open(stem + ".json"))
    assert meta["first_timesteps"] == [1000.0, 500.0, 100.0] and meta["first_block_steps"] == 3
    p = sample.plan(meta, sample.parse_args([]), CFG)
    assert p["first"] == [1000.0, 500.0, 100.0] and p["timesteps"] == [1000.0, 250.0]
    lists.clear()
    first_frame.main(args(ckpts, tmp_path / "run2", "--steps=2", f"--init={stem}", f"--export={tmp_path / 'again'}"))
    assert lists and all(ts == [1000.0, 500.0, 100.0] for ts in lists)
    assert json.load(open(tmp_path / "again.json"))["first_timesteps"] == [1000.0, 500.0, 100.0]


class FrameZeroOnly(torch.nn.Module):
    """The frozen init, with its output moved on frame 0 only (or on every frame)."""

    def __init__(self, net, frames):
        super().__init__()
        self.net, self.cfg, self.frames = net, net.cfg, frames

    def encode_text(self, tokens):
        return self.net.encode_text(tokens)

    def forward(self, x, *a, **k):
        v = self.net(x, *a, **k).clone()
        v[:, :, self.frames] += 1.0
        return v


def test_the_keep_term_holds_frames_1_on_and_ignores_frame_0(ckpts):
    cfg = {**first_frame.DEFAULTS, "keep_batch": 2}
    frozen, _ = T.load_model(ckpts["fw"])
    keep = lambda gen: first_frame.keep_loss(gen, frozen, cfg, 0, [1000.0, 250.0]).item()
    assert keep(frozen) == 0.0
    assert keep(FrameZeroOnly(frozen, slice(0, 1))) == 0.0  # frame 0 is this stage's to change
    assert keep(FrameZeroOnly(frozen, slice(1, None))) > 0.0


def test_each_optimiser_moves_only_its_network_and_the_frozen_ones_stay(ckpts, tmp_path):
    cfg = {**first_frame.DEFAULTS, "init": ckpts["fw"], "real": ckpts["ar"]}
    gen, frozen, real, critic, meta = first_frame.networks(cfg, torch.device("cpu"))
    assert not any(p.requires_grad for p in [*frozen.parameters(), *real.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), critic.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(gen.state_dict().values(), frozen.state_dict().values()))
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=4", "--ckpt_every=4"))  # G steps at 0 and 2
    saved = T.load_checkpoint(str(tmp_path / "run" / "ckpt"))[0]
    moved = lambda prefix, ref: any(not torch.equal(v, ref.state_dict()[k])
                                    for k, v in T.split_prefix(saved, prefix).items())
    assert moved("generator.", frozen) and moved("critic.", real)
    assert {k.split(".")[0] for k in saved} == {"generator", "critic", "ema_generator", "optim_generator",
                                                 "optim_critic"}
    again_real, _ = T.load_model(ckpts["ar"])
    again_init, _ = T.load_model(ckpts["fw"])
    assert all(torch.equal(a, b) for a, b in zip(again_real.state_dict().values(), real.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(again_init.state_dict().values(), frozen.state_dict().values()))


def test_resume_continues_the_same_trajectory(ckpts, tmp_path):
    first_frame.main(args(ckpts, tmp_path / "full", "--steps=4", "--ckpt_every=3"))  # between generator updates
    first_frame.main(args(ckpts, tmp_path / "part", "--steps=3", "--ckpt_every=3"))  # "killed" after its checkpoint
    first_frame.main(args(ckpts, tmp_path / "part", "--steps=4", "--ckpt_every=3"))  # resumed
    log = lambda run: [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                       for line in open(tmp_path / run / "log.jsonl")]
    assert log("part") == log("full") and len(log("full")) == 4 and "keep_loss" in log("full")[0]
    a, _ = T.load_checkpoint(str(tmp_path / "full" / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "part" / "ckpt"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_a_folder_resumes_only_its_own_run(ckpts, tmp_path, capsys):
    """A second pass with another seed in the first pass's folder stops (exit 2, one line) instead of resuming
    and re-shipping the first pass; the finished run is left as it was."""
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=2", "--ckpt_every=2"))
    before, _ = T.load_checkpoint(str(tmp_path / "run" / "ckpt"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        first_frame.main(args(ckpts, tmp_path / "run", "--steps=2", "--seed=1", f"--export={tmp_path / 'x'}"))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and "holds another run (seed was 0, now 1)" in err and "\n" not in err, err
    assert not (tmp_path / "x.json").exists()
    after, _ = T.load_checkpoint(str(tmp_path / "run" / "ckpt"))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_the_shipped_student_keeps_its_sampler_and_streams(ckpts, tmp_path):
    stem = str(tmp_path / "cfpp")
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=2", f"--export={stem}"))
    meta = json.load(open(stem + ".json"))
    init = json.load(open(ckpts["fw"] + ".json"))
    for key in ("kind", "frames_per_block", "steps_per_block", "first_block_steps", "timesteps", "shift"):
        assert meta[key] == init[key], key
    assert meta["first_frame"]["real"] == "ar" and meta["dmd_log"] == "x.log.jsonl"
    assert meta["log"] == "cfpp.first_frame.log.jsonl" and open(stem + ".first_frame.log.jsonl").readline()
    npy = tmp_path / "v.npy"
    sample.main(["--ckpt", stem, "--out", str(tmp_path / "v.png"), "--save-npy", str(npy)])
    assert np.load(npy).shape == (1, 6, 32, 32, 3)


def test_a_second_pass_keeps_the_first_passs_record_and_log(ckpts, tmp_path):
    stem = str(tmp_path / "cfpp")
    first_frame.main(args(ckpts, tmp_path / "run", "--steps=2", f"--export={stem}"))
    first = json.load(open(stem + ".json"))
    first_log = open(stem + ".first_frame.log.jsonl").read()
    # a later --init overrides args'; exported into the init's own stem, as a shipped student would be
    first_frame.main(args(ckpts, tmp_path / "run2", "--steps=2", "--seed=1", f"--export={stem}", f"--init={stem}"))
    meta = json.load(open(stem + ".json"))
    assert meta["first_frame"]["seed"] == 1 and meta["dmd_log"] == "x.log.jsonl"
    assert meta["first_frame"]["earlier"] == {**first["first_frame"], "log": first["log"], "wall_s": first["wall_s"]}
    assert meta["log"] == "cfpp.first_frame2.log.jsonl" and open(stem + ".first_frame2.log.jsonl").readline()
    assert open(stem + ".first_frame.log.jsonl").read() == first_log  # the first pass's log is not overwritten


def test_a_pass_on_a_soup_of_passes_keeps_the_soup_and_counts_its_passes(ckpts, tmp_path):
    """soup.py drops the fields its sources differ in (here their first_frame records) to its list of them;
    the next pass files that list as its earlier record, keeps the video DMD's log, and is the second pass."""
    for seed in (0, 1):
        first_frame.main(args(ckpts, tmp_path / f"run{seed}", "--steps=2", f"--seed={seed}",
                              f"--export={tmp_path / f'p{seed}' / 'cfpp'}"))
    stem = tmp_path / "soup" / "cfpp"
    soup.main([f"--out={stem}", str(tmp_path / "p0" / "cfpp"), str(tmp_path / "p1" / "cfpp")])
    souped = json.load(open(f"{stem}.json"))
    first_frame.main(args(ckpts, tmp_path / "run2", "--steps=2", "--seed=2", f"--export={stem}", f"--init={stem}"))
    meta = json.load(open(f"{stem}.json"))
    assert meta["first_frame"]["seed"] == 2 and meta["first_frame"]["earlier"] == {"soup": souped["soup"]}
    assert "soup" not in meta and meta["dmd_log"] == "x.log.jsonl" and meta["log"] == "cfpp.first_frame2.log.jsonl"
    assert [s["first_frame"]["seed"] for s in meta["first_frame"]["earlier"]["soup"]] == [0, 1]


def test_a_soup_of_a_soup_names_every_run_and_the_next_pass_counts_the_deepest_chain(ckpts, tmp_path):
    """The shipped world student's shape: the soup of (a soup of passes) and a further pass on that soup.
    Its JSON keeps the inner soup's list; a pass on it is numbered after the deepest chain (here 2 + 1)."""
    run = lambda n, *extra: first_frame.main(args(ckpts, tmp_path / f"run{n}", "--steps=2", f"--seed={n}", *extra))
    p0, p1, p2 = (tmp_path / f"p{n}" / "cfpp" for n in range(3))
    inner, outer = tmp_path / "s01" / "cfpp", tmp_path / "s012" / "cfpp"
    run(0, f"--export={p0}")
    run(1, f"--export={p1}")
    soup.main([f"--out={inner}", str(p0), str(p1)])
    run(2, f"--init={inner}", f"--export={p2}")
    soup.main([f"--out={outer}", str(inner), str(p2)])
    entries = json.load(open(f"{outer}.json"))["soup"]
    assert [s["stem"] for s in entries[0]["soup"]] == [os.path.normpath(p0), os.path.normpath(p1)]
    assert entries[1]["first_frame"]["seed"] == 2 and "soup" not in entries[1]
    run(3, f"--init={outer}", f"--export={outer}")
    meta = json.load(open(f"{outer}.json"))
    assert meta["first_frame"]["earlier"] == {"soup": entries} and meta["log"] == "cfpp.first_frame3.log.jsonl"


@pytest.mark.parametrize("extra,message", [
    (["--init={cw}"], "must be a frame-wise student"),
    (["--init={ar}"], "expected 'student'"),
    (["--real={base}"], "expected 'ar_teacher'"),
    (["--keep_weight=-1"], "--keep_weight must be >= 0"),
    (["--batch_size=0"], "--batch_size must be positive"),
    (["--first_timesteps=250,1000"], "--first_timesteps must be strictly descending"),
])
def test_bad_options_exit_2_with_one_line(ckpts, tmp_path, capsys, extra, message):
    extra = [e.format(**ckpts) for e in extra]
    with pytest.raises(SystemExit) as stop:
        first_frame.main(args(ckpts, tmp_path / "bad", "--steps=1", *extra))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
