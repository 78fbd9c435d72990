"""Stage 2 (causal_cd.py): the CD target is one guided Euler step of the teacher followed by the EMA target's
x̂0; the EMA target survives a resume; the ODE snapshots sit on the grid and follow the teacher's trajectory;
student and target see the same context and only the student learns; every method runs end to end and its
export samples; the cost JSON."""
import json
import os
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import causal_cd as C
import data
import model as M
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIFT = 5.0  # the paper's shift, so that the snapshots are the paper's t = 1000, 937.5, 833.3, 625
TINY = ["--batch_size=2", "--clips=4", "--bf16=false", "--log_every=1", "--warmup=2"]


def random_model(seed):
    """A tiny model with a non-zero output head (a fresh one predicts v = 0, which would hide every bug)."""
    torch.manual_seed(seed)
    net = M.build("toy-tiny")
    torch.nn.init.normal_(net.head.head.weight, std=0.1)
    return net


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("teachers")
    config = asdict(M.get_config("toy-tiny"))
    for name, kind, fpb, seed in (("base", "base", None, 0), ("ar1", "ar_teacher", 1, 1), ("ar3", "ar_teacher", 3, 2)):
        T.export(str(folder / name), random_model(seed),
                 {"kind": kind, "config": config, "frames_per_block": fpb, "shift": SHIFT})
    return folder


def run(ckpts, out, *extra, method="cd", fpb=1):
    C.main(TINY + [f"--method={method}", f"--frames_per_block={fpb}", f"--teacher={ckpts}/ar{fpb}",
                   f"--base={ckpts}/base", f"--out={out}", *extra])
    return out


def losses(folder):
    return [json.loads(line)["loss"] for line in open(folder / "log.jsonl")]


def sigma(t):
    return t[:, None, :, None, None] / 1000


def test_cd_target_is_one_guided_teacher_euler_step_then_the_ema_targets_x0(ckpts):
    teacher, _ = T.load_model(str(ckpts / "ar1"))
    target, student = random_model(5), random_model(6)
    cfg = dict(C.DEFAULTS, guidance=3.0, batch_size=2)
    grid = M.timesteps(48, SHIFT)
    b = C.make_batch(cfg, 3, slice(0, 2), 6, grid, None)
    x, t, t1, gt, tokens = b["x_t"], b["t"], b["t_next"], b["gt"], b["tokens"]
    for row, row_next in zip(t, t1):  # one grid index k < 47 per clip, shared by its frames; then k + 1
        k = int((grid == row[0]).nonzero())
        assert k < 47 and (row == grid[k]).all() and (row_next == grid[k + 1]).all()

    with torch.no_grad():
        tf = dict(frames_per_block=1, clean_x=gt)
        v_c = teacher(x, t, teacher.encode_text(tokens), **tf)
        v_u = teacher(x, t, teacher.encode_text(data.tokenize(["", ""])), **tf)
        v = v_u + 3 * (v_c - v_u)
        x1 = x + (sigma(t1) - sigma(t)) * v
        want = x1 - sigma(t1) * target(x1, t1, target.encode_text(tokens), **tf)
        pred = x - sigma(t) * student(x, t, student.encode_text(tokens), **tf)
    assert not torch.allclose(v, v_c, atol=1e-3)  # guidance really changes the step here
    torch.testing.assert_close(C.cd_target(teacher, target, b, 3.0, 1), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(C.loss_fn(student, b, cfg, teacher, target), F.mse_loss(pred, want), atol=0, rtol=1e-5)


def test_ema_target_survives_kill_and_resume(ckpts, tmp_path):
    full = run(ckpts, tmp_path / "full", "--steps=4", "--ckpt_every=2")
    part = run(ckpts, tmp_path / "part", "--steps=2", "--ckpt_every=2")  # "killed" right after its checkpoint
    run(ckpts, part, "--steps=4", "--ckpt_every=2")  # resumed
    assert losses(part) == losses(full) and len(losses(full)) == 4
    a, _ = T.load_checkpoint(str(full / "ckpt"))
    b, meta = T.load_checkpoint(str(part / "ckpt"))
    assert meta["step"] == 4 and a.keys() == b.keys()
    for k in a:  # student, EMA target and optimizer state all continue exactly
        assert torch.equal(a[k], b[k]), k
    key = "head.head.weight"
    ema, student = a["ema_student." + key], a["student." + key]
    start = T.load_checkpoint(str(ckpts / "ar1"))[0]["model." + key].float()
    assert not torch.equal(ema, student) and not torch.equal(ema, start)  # an EMA: moved, and lagging


def test_student_and_target_see_the_same_context_and_only_the_student_learns(ckpts, tmp_path, monkeypatch):
    seen, weights = {}, []
    real = C.loss_fn
    copy = lambda state: {k: v.detach().clone() for k, v in state.items()}

    def spy(net, b, cfg, teacher, target):
        calls = {}
        def record(name):
            def hook(module, args, kw, out):
                calls.setdefault(name, (args, kw))  # the first call of each model in this loss
            return hook

        hooks = [m.register_forward_hook(record(n), with_kwargs=True)
                 for n, m in (("student", net), ("teacher", teacher), ("target", target),
                              ("student_text", net.token_embedding), ("target_text", target.token_embedding))]
        loss = real(net, b, cfg, teacher, target)
        for h in hooks:
            h.remove()
        seen.update(models=(net, teacher, target), calls=calls, batch=b)
        weights.append((copy(net.state_dict()), copy(target.state_dict())))
        return loss

    monkeypatch.setattr(C, "loss_fn", spy)
    run(ckpts, tmp_path / "cd", "--steps=2")
    net, teacher, target = seen["models"]
    calls, b = seen["calls"], seen["batch"]
    (s_args, s_kw), (g_args, g_kw), (t_args, t_kw) = calls["student"], calls["target"], calls["teacher"]
    assert torch.equal(s_kw["clean_x"], b["gt"]) and torch.equal(g_kw["clean_x"], b["gt"])  # the same GT frames
    assert s_kw["frames_per_block"] == g_kw["frames_per_block"] == t_kw["frames_per_block"] == 1
    for text in ("student_text", "target_text"):  # the same prompt, conditional only
        assert torch.equal(calls[text][0][0], b["tokens"])
    assert torch.equal(s_args[1], b["t"]) and torch.equal(g_args[1], b["t_next"])  # the target one grid step later
    assert not torch.equal(g_args[0], b["x_t"])
    assert t_args[0].shape[0] == 2 * len(b["x_t"]) and torch.equal(t_kw["clean_x"], torch.cat([b["gt"], b["gt"]]))
    for frozen in (teacher, target):
        assert all(p.grad is None and not p.requires_grad for p in frozen.parameters())
    assert all(p.grad is not None for p in net.parameters())
    (student0, target0), (student1, target1) = weights  # the target is the 0.99 EMA, refreshed every step
    for k in target0:
        assert torch.equal(target0[k], student0[k]), k
        assert torch.equal(target1[k], target0[k].lerp(student1[k], 1 - 0.99)), k
    assert not torch.equal(target1["head.head.weight"], target0["head.head.weight"])


def test_ode_batches_pair_a_stored_snapshot_with_the_ode_end(tmp_path):
    store = C.Trajectories(str(tmp_path), {"batch_size": 2, "clips": 3, "shift": SHIFT})
    for shard, clips in ((0, [0, 1]), (1, [2])):  # entry s of clip j holds the value 10 j + s everywhere
        value = 10 * torch.tensor(clips, dtype=torch.float)[:, None] + torch.arange(6.0)
        x = value[:, :, None, None, None, None].expand(-1, 6, 3, 6, 4, 4)
        store.write(shard, x, torch.ones(len(clips), 2, dtype=torch.long), 0.0)
    store.open()
    net = random_model(7)
    for method, fpb in (("ode", 1), ("bidir_ode", 3)):
        cfg = dict(C.DEFAULTS, method=method, frames_per_block=fpb, batch_size=4, clips=3)
        b = C.make_batch(cfg, 0, slice(0, 4), 6, None, store)
        clip = b["target"][:, 0, 0, 0, 0] // 10
        assert (b["target"] == 10 * clip[:, None, None, None, None] + 4).all()  # the ODE end
        k = (b["x_t"][:, 0, :, 0, 0] - 10 * clip[:, None]).long()  # [B, F]: the snapshot each frame was taken from
        assert (b["x_t"] == (10 * clip[:, None] + k)[:, None, :, None, None]).all() and torch.equal(b["t"], store.t[k])
        if method == "ode":  # one snapshot for the whole clip, teacher-forced on the GT
            assert (k == k[:, :1]).all() and (b["gt"] == 10 * clip[:, None, None, None, None] + 5).all()
        else:  # one snapshot per block, no GT: the student is block-causal on its own noisy frames
            blocks = k.view(4, 2, 3)
            assert (blocks == blocks[..., :1]).all() and (blocks[:, 0, 0] != blocks[:, 1, 0]).any() and "gt" not in b
            ctx = net.encode_text(b["tokens"])
            want = b["x_t"] - sigma(b["t"]) * net(b["x_t"], b["t"], ctx, frames_per_block=3)
            torch.testing.assert_close(C.predict_x0(net, b["x_t"], b["t"], b["tokens"], None, 3), want)


def test_ode_snapshots_sit_on_the_grid_and_follow_the_teachers_trajectory(ckpts, tmp_path, capsys):
    out = run(ckpts, tmp_path / "ode", "--steps=1", method="ode")
    shard = tmp_path / "ode" / "trajectories" / "00000.safetensors"
    stored = load_file(str(shard))
    torch.testing.assert_close(stored["t"], torch.tensor([1000, 937.5, 833.3333, 625]))
    clips = next(data.ClipStream(2, 0, frames=6))
    x = stored["x"].float()  # [2, 6, C, F, H, W]
    assert x.shape == (2, 6, 3, 6, 32, 32) and torch.equal(x[:, 5], clips["video"])  # the GT last
    assert torch.equal(stored["tokens"], clips["tokens"])

    teacher, _ = T.load_model(str(ckpts / "ar1"))  # the teacher's ODE of clip 0, by hand
    noise = torch.randn(clips["video"].shape, generator=T.step_generator(0, 0, stream=1))[:1]
    gt, tokens = clips["video"][:1], clips["tokens"][:1]
    grid = M.timesteps(48, SHIFT).tolist() + [0.0]
    cond, uncond = teacher.encode_text(tokens), teacher.encode_text(data.tokenize([""]))
    path = [noise]
    with torch.no_grad():
        for t, t_next in zip(grid[:-1], grid[1:]):
            t_all = torch.full((1, 6), t)  # every frame at the same t, teacher-forced on the GT
            v_c = teacher(path[-1], t_all, cond, frames_per_block=1, clean_x=gt)
            v_u = teacher(path[-1], t_all, uncond, frames_per_block=1, clean_x=gt)
            path.append(path[-1] + (t_next - t) / 1000 * (v_u + 6 * (v_c - v_u)))
    close = lambda a, b: torch.allclose(a, b, atol=1e-3, rtol=1e-3)  # fp16 storage
    for k in range(4):
        assert close(x[0, k], path[12 * k]), k
        assert k == 0 or not close(x[0, k], path[12 * k - 1]), k  # one grid step off would be caught
    assert close(x[0, 4], path[48])

    # atomic shards: a lost one is remade identically, the others are left alone; other settings are refused
    other = tmp_path / "ode" / "trajectories" / "00001.safetensors"
    before, kept = load_file(str(other)), shard.stat().st_mtime_ns
    other.unlink()
    run(ckpts, out, "--steps=1", method="ode")
    again = load_file(str(other))
    assert all(torch.equal(before[k], again[k]) for k in before) and shard.stat().st_mtime_ns == kept
    with pytest.raises(SystemExit) as stop:
        run(ckpts, out, "--steps=1", "--guidance=5", method="ode")
    assert stop.value.code == 2 and "other settings" in capsys.readouterr().err


def test_every_method_runs_exports_samples_and_records_its_cost(ckpts, tmp_path, monkeypatch):
    forwards = {"rows": 0}
    real_load = T.load_model

    def counting(*args, **kw):  # the teacher (or base) is the only model the script loads: count its rows
        net, meta = real_load(*args, **kw)
        net.register_forward_pre_hook(lambda mod, args: forwards.__setitem__("rows", forwards["rows"] + len(args[0])))
        return net, meta

    monkeypatch.setattr(T, "load_model", counting)
    cost_json = tmp_path / "stage2_cost.json"
    counted = {}
    for method, fpb, steps, cost in (("cd", 1, 1, True), ("ode", 1, 2, True), ("ode", 3, 4, False),
                                     ("bidir_ode", 3, 2, True)):
        stem = str(tmp_path / f"{method}{fpb}")
        forwards["rows"] = 0
        extra = [f"--export={stem}"] + ([f"--cost_json={cost_json}"] if cost else [])
        run(ckpts, tmp_path / f"run_{method}{fpb}", "--steps=2", *extra, method=method, fpb=fpb)
        counted[method, fpb] = forwards["rows"]
        meta = json.load(open(stem + ".json"))
        assert (meta["kind"], meta["frames_per_block"], meta["steps_per_block"], meta["init"], meta["shift"]) == \
               ("student", fpb, 4, method, SHIFT)
        assert meta["first_block_steps"] == (4 if fpb == 1 else None) and meta["config"]["shift"] == SHIFT
        assert os.path.exists(stem + ".log.jsonl")
        shipped, _ = T.load_checkpoint(stem)
        ema, _ = T.load_checkpoint(str(tmp_path / f"run_{method}{fpb}" / "ckpt"))
        assert all(torch.equal(v, ema["ema_student." + k[len("model."):]].half()) for k, v in shipped.items())
        npy = tmp_path / f"{method}{fpb}.npy"
        r = subprocess.run([sys.executable, "sample.py", "--ckpt", stem + ".safetensors", f"--steps={steps}",
                            "--num-samples=2", f"--out={tmp_path}/s.gif", f"--save-npy={npy}"],
                           cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
        assert r.returncode == 0, r.stderr
        video = np.load(npy)
        assert video.shape == (2, 6, 32, 32, 3) and video.dtype == np.uint8

    cost = json.load(open(cost_json))
    cd, ode = cost["causal_cd"], cost["causal_ode"]
    assert cd["teacher_forwards"] == counted["cd", 1] == 2 * 2 * 2  # steps x batch x (cond + uncond)
    assert ode["teacher_forwards"] == counted["ode", 1] == 4 * 48 * 2  # clips x grid x (cond + uncond)
    shards = (tmp_path / "run_ode1" / "trajectories").glob("*.safetensors")
    assert cd["stored_bytes"] == 0 and ode["stored_bytes"] == sum(p.stat().st_size for p in shards) > 0
    assert cd["wall_clock_s"] > 0 and ode["wall_clock_s"] >= ode["generation_s"] > 0
    assert cost["teacher_forward_ratio"] == round(ode["teacher_forwards"] / cd["teacher_forwards"], 3) == 48
    assert cost["wall_clock_ratio"] == round(ode["wall_clock_s"] / cd["wall_clock_s"], 3)
    assert cost["bidir_ode"]["frames_per_block"] == 3


def test_bad_input_exits_2_with_one_line(ckpts, tmp_path, capsys):
    for args, words in ((["--method=dmd"], "--method"), (["--steps=0"], "--steps"),
                        ([f"--teacher={tmp_path}/nope"], "teacher.py --stage=ar"),
                        ([f"--teacher={ckpts}/ar3"], "frame(s) per block"),
                        ([f"--teacher={ckpts}/base"], "'base' checkpoint"),
                        (["--guidance=0.5"], "--guidance must be 0 (the paper's) or a finite number >= 1"),
                        (["--guidance=nan"], "--guidance must be 0"),
                        (["--device=nope"], "--device nope is not usable here")):
        with pytest.raises(SystemExit) as stop:
            C.main(TINY + [f"--out={tmp_path}/x", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and words in err and err.count("\n") == 1, (args, err)


def test_a_damaged_trajectory_shard_is_one_line(ckpts, tmp_path, capsys):
    shard = tmp_path / "x" / "trajectories" / "00000.safetensors"
    shard.parent.mkdir(parents=True)
    shard.write_bytes(b"not a safetensors file")
    with pytest.raises(SystemExit) as stop:
        C.main(TINY + ["--method=ode", f"--teacher={ckpts}/ar1", f"--out={tmp_path}/x"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "00000.safetensors is a damaged shard" in err and err.count("\n") == 1, err


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cd", "ode"])
def test_torchrun_two_processes_take_the_same_steps_as_one(ckpts, tmp_path, method):
    one = run(ckpts, tmp_path / "one", "--steps=2", method=method)
    args = [*TINY, f"--method={method}", f"--teacher={ckpts}/ar1", "--steps=2", f"--out={tmp_path / 'two'}"]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "causal_cd.py", *args], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=300)
    assert r.returncode == 0, r.stderr  # whole: a rank's own error sits above the launcher's report
    if method == "ode":  # each process made every other shard; together the same data as one process
        for shard in ("00000", "00001"):
            a, b = (load_file(str(run_dir / "trajectories" / f"{shard}.safetensors"))
                    for run_dir in (one, tmp_path / "two"))
            assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-3) for k in a), shard
    a, _ = T.load_checkpoint(str(one / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "two" / "ckpt"))
    for k in a:
        if k.startswith(("student.", "ema_student.")):
            assert torch.allclose(a[k], b[k], atol=1e-5), k
    assert losses(one) == pytest.approx(losses(tmp_path / "two"), rel=1e-5)
