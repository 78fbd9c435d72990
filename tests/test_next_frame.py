"""Stage 3c (next_frame.py): the frames the world determines are regressed on the real clip, the frames it
leaves free are held where the frozen init had them (frame 0 on its own rollout's inputs, on its 4-step
list), only the generator trains, resume is exact, and the shipped student keeps its sampler."""
import json
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import model as M
import next_frame
import sample
import trainer as T

TEXT = M.get_config("toy-tiny")  # 6 frames of 32x32
WORLD = replace(TEXT, num_actions=5)
FIRST = [1000.0, 750.0, 500.0, 250.0]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Random frame-wise students (text, action world, and one without the toy's token embedding) with the
    shipped CF++ sampler fields, and a chunk-wise one."""
    tmp = tmp_path_factory.mktemp("ckpts")
    kinds = (("text", TEXT, 1), ("world", WORLD, 1), ("cw", TEXT, 3), ("wan", replace(TEXT, vocab_size=0), 1))
    for name, cfg, fpb in kinds:
        torch.manual_seed(fpb)
        net = M.build(cfg)
        torch.nn.init.normal_(net.head.head.weight, std=0.3)  # the zero-initialised head would make x0 = x_t
        if cfg.num_actions:
            torch.nn.init.normal_(net.action_projection.weight, std=0.3)
        T.export(str(tmp / name), net, {"kind": "student", "config": asdict(cfg), "frames_per_block": fpb,
                                        "steps_per_block": 2, "first_block_steps": 4 if fpb == 1 else None,
                                        "first_timesteps": FIRST, "timesteps": [1000.0, 250.0],
                                        "shift": cfg.shift, "log": "x.log.jsonl"})
    return {k: str(tmp / k) for k in ("text", "world", "cw", "wan")}


def args(init, out, *extra):
    return [f"--init={init}", "--batch_size=2", "--lr=1e-2", "--log_every=1", "--bf16=false", f"--out={out}", *extra]


class Moved(torch.nn.Module):
    """The frozen init with its output moved on some frames of a video (a one-frame input is frame 0), or,
    as the oracle, drawing exactly the clean clip it is teacher-forced on."""

    def __init__(self, net, frames=None, oracle=False):
        super().__init__()
        self.net, self.cfg, self.frames, self.oracle = net, net.cfg, frames, oracle
        self.calls = []

    def encode_text(self, tokens):
        return self.net.encode_text(tokens)

    def forward(self, x, t, ctx, **k):
        self.calls.append((x.shape[2], t[0].tolist()))
        if self.oracle and k.get("clean_x") is not None:
            return M.v_from_x0(x, k["clean_x"], t)
        v = self.net(x, t, ctx, **k).clone()
        if self.frames is not None:
            v[:, :, self.frames] += 1.0
        return v


def terms(gen, stem, step=0):
    frozen, meta = T.load_model(stem)
    cfg = {**next_frame.DEFAULTS, "batch_size": 2}
    regression, keep = next_frame.losses(gen(frozen), frozen, cfg, step, meta["timesteps"], FIRST)
    return regression.item(), keep.item()


@pytest.mark.parametrize("world", ["text", "world"])
def test_the_regression_target_is_the_real_clip_and_the_keep_term_the_frozen_init(ckpts, world):
    regression, keep = terms(lambda f: f, ckpts[world])
    assert regression > 0 and keep == 0.0  # a fresh copy keeps the init exactly; the init is not the data
    regression, keep = terms(lambda f: Moved(f, oracle=True), ckpts[world])
    assert regression == pytest.approx(0.0, abs=1e-10)  # drawing the real frames is the optimum
    assert (keep == 0.0) == (world == "world")  # the text world's frame 1 is free: the oracle moved it


def test_the_world_leaves_frame_0_free_and_the_text_world_frames_0_and_1(ckpts):
    base = {w: terms(lambda f: f, ckpts[w]) for w in ("text", "world")}
    for world, free in (("world", 1), ("text", 2)):
        regression, keep = terms(lambda f: Moved(f, slice(0, 1)), ckpts[world])  # frame 0 (and the rollout's)
        assert regression == base[world][0] and keep > 0
        regression, keep = terms(lambda f: Moved(f, slice(1, 2)), ckpts[world])  # frame 1
        assert (regression == base[world][0]) == (free == 2) and (keep > 0) == (free == 2)
        regression, keep = terms(lambda f: Moved(f, slice(2, None)), ckpts[world])  # frames 2..
        assert regression != base[world][0] and keep == 0.0


def test_frame_0_is_held_on_its_own_4_step_list(ckpts):
    frozen, meta = T.load_model(ckpts["world"])
    gen = Moved(frozen)
    next_frame.losses(gen, frozen, {**next_frame.DEFAULTS, "batch_size": 2}, 0, meta["timesteps"], FIRST)
    one_frame = [t for frames, t in gen.calls if frames == 1]
    assert one_frame == [[t] for t in FIRST]  # one call per step of frame 0's list, never the block list
    videos = [t for frames, t in gen.calls if frames > 1]
    assert len(videos) == 1 and set(videos[0]) <= {1000.0, 250.0}  # the teacher-forced clip: block timesteps


def test_only_the_generator_trains_and_the_frozen_init_stays(ckpts, tmp_path):
    next_frame.main(args(ckpts["world"], tmp_path / "run", "--steps=2", "--ckpt_every=2"))
    saved = T.load_checkpoint(str(tmp_path / "run" / "ckpt"))[0]
    init, _ = T.load_model(ckpts["world"])
    assert {k.split(".")[0] for k in saved} == {"generator", "ema_generator", "optim_generator"}
    assert any(not torch.equal(v, init.state_dict()[k]) for k, v in T.split_prefix(saved, "generator.").items())
    again, _ = T.load_model(ckpts["world"])
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), init.state_dict().values()))


def test_resume_continues_the_same_trajectory(ckpts, tmp_path):
    next_frame.main(args(ckpts["text"], tmp_path / "full", "--steps=3", "--ckpt_every=2"))
    next_frame.main(args(ckpts["text"], tmp_path / "part", "--steps=2", "--ckpt_every=2"))  # "killed" after it
    next_frame.main(args(ckpts["text"], tmp_path / "part", "--steps=3", "--ckpt_every=2"))  # resumed
    log = lambda run: [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                       for line in open(tmp_path / run / "log.jsonl")]
    assert log("part") == log("full") and len(log("full")) == 3 and "regression_loss" in log("full")[0]
    a, _ = T.load_checkpoint(str(tmp_path / "full" / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "part" / "ckpt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_shipped_student_keeps_its_sampler_and_streams(ckpts, tmp_path):
    stem = str(tmp_path / "world_framewise")
    next_frame.main(args(ckpts["world"], tmp_path / "run", "--steps=1", f"--export={stem}"))
    meta, init = json.load(open(stem + ".json")), json.load(open(ckpts["world"] + ".json"))
    for key in ("kind", "frames_per_block", "steps_per_block", "first_block_steps", "first_timesteps", "timesteps"):
        assert meta[key] == init[key], key
    assert meta["next_frame"]["init"] == "world" and meta["next_frame"]["init_log"] == "x.log.jsonl"
    assert meta["next_frame"]["regressed_from_frame"] == 1
    assert meta["log"] == "world_framewise.next_frame.log.jsonl" and open(f"{stem}.next_frame.log.jsonl").readline()
    npy = tmp_path / "v.npy"
    sample.main(["--ckpt", stem, "--actions", "none,right*5", "--out", str(tmp_path / "v.png"), "--save-npy", str(npy)])
    assert np.load(npy).shape == (1, 6, 32, 32, 3)


@pytest.mark.parametrize("extra,message", [
    (["--init={cw}"], "must be a frame-wise student"),
    (["--init={wan}"], "not a toy-world model"),
    (["--keep_weight=-1"], "--keep_weight must be >= 0"),
    (["--steps=0"], "--steps must be positive"),
    (["--init={tmp}/missing"], "not found"),
])
def test_bad_options_exit_2_with_one_line(ckpts, tmp_path, capsys, extra, message):
    extra = [e.format(tmp=tmp_path, **ckpts) for e in extra]
    with pytest.raises(SystemExit) as stop:
        next_frame.main(args(ckpts["text"], tmp_path / "bad", "--steps=1", *extra))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
