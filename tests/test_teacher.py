"""Stages 0/1 and the shared training machinery: DDP equivalence, resume, the NaN guard, end to end."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import model as M
import teacher
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--model=toy-tiny", "--batch_size=4", "--log_every=1", "--bf16=false", "--warmup=2"]


def run(tmp, name, *extra):
    teacher.main(TINY + [f"--out={tmp / name}", *extra])
    return tmp / name


def losses(folder):
    return [json.loads(line)["loss"] for line in open(folder / "log.jsonl") if '"loss"' in line]


def test_kill_and_resume_continues_the_same_trajectory(tmp_path, monkeypatch):
    full = run(tmp_path, "full", "--steps=4", "--ckpt_every=2")
    save = T.Run.save

    def killed_at_4(self, step):  # the process dies after logging step 4, before its checkpoint
        if step == 4:
            raise SystemExit("killed")
        save(self, step)

    monkeypatch.setattr(T.Run, "save", killed_at_4)
    with pytest.raises(SystemExit):
        run(tmp_path, "part", "--steps=4", "--ckpt_every=2")
    part = tmp_path / "part"
    assert len(losses(part)) == 4
    monkeypatch.setattr(T.Run, "save", save)
    run(tmp_path, "part", "--steps=4", "--ckpt_every=2")  # resumed from step 2
    assert losses(part) == losses(full) and len(losses(full)) == 4
    a, _ = T.load_checkpoint(str(full / "ckpt"))
    b, meta = T.load_checkpoint(str(part / "ckpt"))
    assert meta["step"] == 4 and a.keys() == b.keys()
    for k in a:  # weights, EMA and optimizer state all continue exactly
        assert torch.equal(a[k], b[k]), k


def test_a_torn_last_log_line_is_dropped_on_resume(tmp_path):
    """A run killed in the middle of appending to log.jsonl leaves a partial line; resuming drops it."""
    full = run(tmp_path, "full", "--steps=4", "--ckpt_every=2")
    part = run(tmp_path, "part", "--steps=2", "--ckpt_every=2")
    with open(part / "log.jsonl", "a") as f:
        f.write('{"step": 3, "lo')
    run(tmp_path, "part", "--steps=4", "--ckpt_every=2")
    assert losses(part) == losses(full)


def test_a_save_killed_between_its_two_files_is_caught_on_load(tmp_path, monkeypatch, capsys):
    """Overwriting a pair: the weights are renamed into place first. Killed before the JSON follows, the
    folder holds step 4's weights beside step 2's JSON; the resume must refuse it, not train on it."""
    part = run(tmp_path, "part", "--steps=2", "--ckpt_every=2")
    write = T.atomic_write

    def killed_before_the_json(path, fn):
        if path.endswith("ckpt.json"):
            raise SystemExit("killed")
        write(path, fn)

    monkeypatch.setattr(T, "atomic_write", killed_before_the_json)
    with pytest.raises(SystemExit):
        run(tmp_path, "part", "--steps=4", "--ckpt_every=2")
    monkeypatch.setattr(T, "atomic_write", write)
    assert json.load(open(part / "ckpt.json"))["step"] == 2
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "part", "--steps=6", "--ckpt_every=2")
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "come from different saves" in err and err.count("\n") == 1


def test_nan_stops_with_a_message_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real = teacher.loss_fn
    calls = {"n": 0}

    def poisoned(*args):
        calls["n"] += 1
        loss = real(*args)
        return loss * float("nan") if calls["n"] == 4 else loss

    monkeypatch.setattr(teacher, "loss_fn", poisoned)
    with pytest.raises(SystemExit) as stop:
        run(tmp_path, "nan", "--steps=6", "--ckpt_every=2")
    assert stop.value.code != 0
    err = capsys.readouterr().err
    assert "loss is nan at step 3" in err and "ckpt.safetensors" in err
    _, meta = T.load_checkpoint(str(tmp_path / "nan" / "ckpt"))
    assert meta["step"] == 2  # the last good one, untouched


def test_bad_options_exit_2_with_one_line(tmp_path):
    for args in (["--stage=middle"], ["--nope=1"], ["--steps=abc"], ["--stage=ar", "--frames_per_block=4"],
                 ["--device=nope"]):
        r = subprocess.run([sys.executable, "teacher.py", "--model=toy-tiny", f"--out={tmp_path}/x", *args],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error: "), (args, r.stderr)


@pytest.mark.parametrize("cuda, avx512_bf16, amx, native", [(False, False, False, False), (False, True, False, True),
                                                         (False, False, True, True), (True, False, False, True)])
def test_bf16_counts_as_native_on_cuda_avx512_bf16_and_amx_only(monkeypatch, cuda, avx512_bf16, amx, native):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert T.bf16_is_native() is native


def test_every_stage_defaults_to_autocast_only_where_bf16_is_native():
    # an AVX2-only CPU emulates bf16: autocast there made a toy teacher step ~9x slower than fp32
    import causal_cd
    import dmd
    import first_frame
    stages = (teacher, causal_cd, dmd, first_frame)
    assert {m.__name__: m.DEFAULTS["bf16"] for m in stages} == {m.__name__: T.bf16_is_native() for m in stages}


@pytest.mark.slow
def test_torchrun_two_processes_take_the_same_step_as_one(tmp_path):
    one = run(tmp_path, "one", "--steps=2", "--ckpt_every=2")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "teacher.py", *TINY, "--steps=2", "--ckpt_every=2", f"--out={tmp_path / 'two'}"],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr  # whole: a rank's own error sits above the launcher's report
    a, _ = T.load_checkpoint(str(one / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "two" / "ckpt"))
    for k in a:
        if k.startswith("model."):
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert losses(one) == pytest.approx(losses(tmp_path / "two"), rel=1e-5)


@pytest.mark.slow
def test_every_stage_runs_end_to_end_and_samples(tmp_path):
    base = str(tmp_path / "base")
    run(tmp_path, "b", "--steps=2", f"--export={base}", "--eval_every=2")
    scored = [json.loads(line) for line in open(base + ".log.jsonl") if "eval" in line]
    assert scored[0]["step"] == 2 and 0 <= scored[0]["eval"]["total"] <= 1  # the quality curve is in the log
    for fpb in (1, 3):
        ar = str(tmp_path / f"ar{fpb}")
        run(tmp_path, f"a{fpb}", "--stage=ar", f"--frames_per_block={fpb}", f"--init={base}", "--steps=2",
            f"--export={ar}")
        meta = json.load(open(ar + ".json"))
        assert meta["kind"] == "ar_teacher" and meta["frames_per_block"] == fpb
        assert os.path.exists(ar + ".log.jsonl")
    for ckpt in (base, str(tmp_path / "ar3")):
        npy = tmp_path / (os.path.basename(ckpt) + ".npy")
        r = subprocess.run([sys.executable, "sample.py", "--ckpt", ckpt + ".safetensors", "--steps=3",
                            "--num-samples=2", f"--out={tmp_path}/s.gif", f"--save-npy={npy}"],
                           cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        video = np.load(npy)
        assert video.shape == (2, 6, 32, 32, 3) and video.dtype == np.uint8


def test_learning_rate_warms_up_holds_then_cools_down_to_zero():
    lrs = [T.lr_at(s, 1.0, warmup=10, total=100, decay=20) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0 and lrs[80] == 1.0
    assert lrs[99] == pytest.approx(0.05) and all(a > b for a, b in zip(lrs[80:], lrs[81:]))
    assert [T.lr_at(s, 1.0, 10) for s in range(10, 100)] == [1.0] * 90  # no decay: constant after warm-up


def test_train_shift_moves_the_training_timesteps_and_not_the_sampler(tmp_path):
    cfg = dict(teacher.DEFAULTS, batch_size=256, shift=5.0)
    t5 = teacher.make_batch(dict(cfg, train_shift=5.0), 0, 2)[3]
    t1 = teacher.make_batch(dict(cfg, train_shift=1.0), 0, 2)[3]
    assert t1.mean() < 600 < t5.mean()  # uniform mean 500; shift 5 puts most draws near t = 1000
    out = run(tmp_path, "ts", "--steps=1", "--train_shift=1", "--export=" + str(tmp_path / "ship"))
    assert json.load(open(str(tmp_path / "ship") + ".json"))["config"]["shift"] == M.get_config("toy-tiny").shift
    assert out.exists()


def test_timesteps_are_one_per_clip_in_stage_0_and_one_per_block_in_stage_1():
    cfg = dict(teacher.DEFAULTS, batch_size=64, shift=5.0, train_shift=5.0, actions=False)
    t = teacher.make_batch(dict(cfg, stage="base"), 0, 6)[3]
    assert t.shape == (64, 6) and (t == t[:, :1]).all()  # the whole clip at one t
    t = teacher.make_batch(dict(cfg, stage="ar", frames_per_block=3), 0, 6)[3]
    assert (t[:, :3] == t[:, :1]).all() and (t[:, 3:] == t[:, 3:4]).all()  # one t within a block
    assert (t[:, 0] != t[:, 3]).float().mean() > 0.9  # and independent between blocks
    grid = set(M.timesteps(1000, 5.0).tolist())
    assert set(t.flatten().tolist()) <= grid  # drawn on the shifted 1000-step grid


@pytest.mark.parametrize("weighting", ["uniform", "bell"])
def test_the_loss_is_the_v_error_weighted_per_frame_by_its_t(weighting):
    """loss = mean over clips and frames of w(t_f) * mean over pixels |v - (noise - x0)|^2, w = 1 or the bell."""
    cfg = dict(teacher.DEFAULTS, stage="ar", frames_per_block=1, shift=5.0, weighting=weighting)
    torch.manual_seed(0)
    net = M.build("toy-tiny")
    torch.nn.init.normal_(net.head.head.weight, std=0.3)
    x0, noise = torch.randn(2, 3, 6, 32, 32), torch.randn(2, 3, 6, 32, 32)
    t = torch.tensor([[1000.0, 937.5, 833.3, 625.0, 250.0, 100.0]] * 2)
    tokens = torch.tensor([[1, 7], [2, 8]])
    got = teacher.loss_fn(net, cfg, x0, tokens, noise, t)
    with torch.no_grad():
        v = net(M.add_noise(x0, noise, t), t, net.encode_text(tokens), frames_per_block=1, clean_x=x0)
    per_frame = ((v - (noise - x0)) ** 2).mean(dim=(1, 3, 4))
    w = M.loss_weight(t, 5.0) if weighting == "bell" else torch.ones_like(t)
    assert torch.allclose(got, (per_frame * w).mean(), rtol=1e-5)
    if weighting == "bell":
        assert w[0, 0] == 0 and w[0, 3] > 1  # nothing at pure noise, most in the middle
