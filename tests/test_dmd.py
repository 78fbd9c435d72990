"""Stage 3: the self-forcing training rollout is the sampler, gradient flows only through the exit steps,
activation checkpointing of the exit-step forwards changes no gradient, the generator and critic optimisers
stay apart, the DMD gradient is the formula, resume is exact, and the stage runs end to end into
checkpoints that sample.py streams."""
import copy
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import data
import dmd
import model as M
import rollout
import sample
import teacher
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = M.get_config("toy-tiny")  # 6 frames of 32x32
SHAPE = (CFG.in_dim, CFG.frames, CFG.height, CFG.width)


def tiny(seed, cfg=CFG):
    torch.manual_seed(seed)
    net = M.build(cfg)
    torch.nn.init.normal_(net.head.head.weight, std=0.3)  # the zero-initialised head would make x0 = x_t
    return net


def student(stem, fpb, steps):
    T.export(stem, tiny(fpb), {"kind": "student", "config": asdict(CFG), "frames_per_block": fpb,
                               "steps_per_block": steps, "first_block_steps": None, "shift": CFG.shift})
    return stem


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """A tiny base trained for one step by teacher.py, and random stage-2 students (frame- and chunk-wise)."""
    tmp = tmp_path_factory.mktemp("ckpts")
    teacher.main(["--model=toy-tiny", "--steps=1", "--batch_size=2", "--bf16=false", f"--out={tmp / 'run'}",
                  f"--export={tmp / 'base'}"])
    teacher.main(["--model=toy-tiny", "--stage=ar", f"--init={tmp / 'base'}", "--steps=1", "--batch_size=2",
                  "--bf16=false", f"--out={tmp / 'ar_run'}", f"--export={tmp / 'ar'}"])
    return dict(base=str(tmp / "base"), ar=str(tmp / "ar"), fw=student(str(tmp / "cd_fw"), 1, 4),
                cw=student(str(tmp / "ode_cw"), 3, 4))


def batch(sched, seed=0, n=2):
    return dmd.make_batch(dict(seed=seed, batch_size=n), 0, 0, SHAPE, sched, CFG.shift)


@pytest.mark.parametrize("fpb,steps,first", [(1, 2, 4), (3, 4, None)])
def test_training_rollout_is_the_sampler(fpb, steps, first):
    gen = tiny(0)
    meta = {"kind": "student", "frames_per_block": fpb, "steps_per_block": steps, "first_block_steps": first}
    p = sample.plan(meta, sample.parse_args([]), CFG)
    tokens = data.tokenize(["red circle", "blue square"])
    video = sample.run(gen, tokens, p, seed=7, device=torch.device("cpu"))
    sched = dmd.schedule(fpb, steps, CFG.shift)
    assert sched["first_block_steps"] == first

    def training(exits):  # the same noise as sample.run draws for seed 7
        g = torch.Generator().manual_seed(7)
        noise = torch.randn(len(tokens), *SHAPE, generator=g)
        return dmd.self_forcing(gen, dict(tokens=tokens, noise=noise, fresh=g, exits=exits), sched)

    assert torch.equal(training((steps - 1, (first or 1) - 1)), video)
    # an earlier exit is the sampler with the step lists cut after the exit step
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(len(tokens), *SHAPE, generator=g)
    cut = rollout.generate(gen, tokens, noise, frames_per_block=fpb, steps=sched["steps"][:1],
                           first_steps=sched["first"][:2] if first else None, generator=g)
    assert torch.equal(training((0, 1)), cut)


def test_only_the_exit_step_carries_gradient():
    gen = tiny(1)
    calls = []

    def record(module, args, kwargs):  # every forward: (grad enabled, its t, writes the cache)
        calls.append((torch.is_grad_enabled(), round(args[1].flatten()[0].item(), 3), kwargs.get("cache_write", False)))

    gen.register_forward_pre_hook(record, with_kwargs=True)
    sched = dmd.schedule(1, 2, CFG.shift)  # frame-wise 2-step; frame 0 on its 4-step list
    b = batch(sched)
    b["exits"] = (1, 2)
    b["noise"].requires_grad_(True)
    x = dmd.self_forcing(gen, b, sched)
    first, rest = [round(t, 3) for t in sched["first"]], [round(t, 3) for t in sched["steps"]]
    reencode = [(False, 0.0, True)]  # the finished block, at t = 0, without grad, written into the cache
    expected = [(False, first[0], False), (False, first[1], False), (True, first[2], False)] + reencode
    for block in range(1, 6):
        expected += [(False, rest[0], False), (True, rest[1], False)] + (reencode if block < 5 else [])
    assert calls == expected
    x.square().sum().backward()
    # the exit step's input was re-noised from a no-grad x0: the noise, the earlier steps and (through the
    # cache) the earlier blocks are not even in the graph
    assert b["noise"].grad is None
    for name, p in gen.named_parameters():  # text path included: grad forwards recompute text K/V
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_gradient_reaches_only_its_own_block_when_exiting_at_step_0():
    gen = tiny(2)
    sched = dmd.schedule(3, 4, CFG.shift)
    b = batch(sched)
    b["exits"] = (0, 0)
    b["noise"].requires_grad_(True)
    x = dmd.self_forcing(gen, b, sched)
    x[:, :, 3:].sum().backward()  # the second block depends on the first only through the detached cache
    assert torch.count_nonzero(b["noise"].grad[:, :, :3]) == 0 and torch.count_nonzero(b["noise"].grad[:, :, 3:]) > 0
    calls = []
    gen.register_forward_pre_hook(lambda m, args: calls.append(torch.is_grad_enabled()))
    with torch.no_grad():  # the critic's rollout: no forward carries gradient
        dmd.self_forcing(gen, batch(sched), sched)
    assert calls and not any(calls)


@pytest.mark.parametrize("fpb,steps,exits,window", [(1, 2, (1, 2), None), (3, 4, (2, 1), None), (1, 2, (1, 3), 3)])
def test_checkpointed_exit_steps_give_the_same_loss_and_gradients(fpb, steps, exits, window):
    """Checkpointed blocks are recomputed in the backward, after later blocks were committed; each must attend
    to the history its forward saw. Last: a rolling window that wraps, whose evictions shift the cache in place."""
    gen = tiny(6, replace(CFG, num_layers=2))  # two blocks: the second block's input depends on the history too
    ck = T.checkpoint_blocks(copy.deepcopy(gen))
    sched = dmd.schedule(fpb, steps, CFG.shift)
    b = batch(sched)
    weight = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))

    def run(net):
        x = rollout.generate(net, b["tokens"], b["noise"], frames_per_block=fpb, steps=sched["steps"],
                             first_steps=sched["first"], generator=torch.Generator().manual_seed(3),
                             exit_steps=exits, window=window, sink=1 if window else 0)
        loss = (x * weight).sum()
        loss.backward()
        return loss, [p.grad for p in net.parameters()]

    (loss, grads), (loss_ck, grads_ck) = run(gen), run(ck)
    assert torch.equal(loss, loss_ck)
    for g, g_ck in zip(grads, grads_ck):
        torch.testing.assert_close(g_ck, g, rtol=1e-6, atol=1e-7)


def test_a_recomputed_block_attends_to_the_history_its_forward_saw(monkeypatch):
    seen, attention = [], M.attention

    def spy(q, k, v, *args):  # the keys and values of every attention that carries gradient
        if torch.is_grad_enabled():
            seen.append((k.shape[2], k.sum().item(), v.sum().item()))
        return attention(q, k, v, *args)

    monkeypatch.setattr(M, "attention", spy)
    gen = T.checkpoint_blocks(tiny(7, replace(CFG, num_layers=2)))
    sched = dmd.schedule(1, 2, CFG.shift)
    b = batch(sched)
    b["exits"] = (1, 2)
    x = dmd.self_forcing(gen, b, sched)
    forward = list(seen)
    x.sum().backward()
    recomputed = seen[len(forward):]
    # 6 frame-wise blocks x 2 layers: block i attends to i + 1 frames of 64 tokens, and so does its recompute,
    # though by then all 6 frames are in the cache
    assert sorted(n for n, _, _ in forward) == sorted(64 * (i + 1) for i in range(6) for _ in range(2))
    assert sorted(recomputed) == sorted(forward)


def snapshot(net):
    return {k: v.clone() for k, v in net.state_dict().items()}


def same(net, snap):
    return all(torch.equal(v, snap[k]) for k, v in net.state_dict().items())


def test_each_optimiser_moves_only_its_network_and_the_real_score_stays_frozen(ckpts):
    cfg = {**dmd.DEFAULTS, "init": ckpts["fw"], "real": ckpts["base"], "steps_per_block": 2}
    gen, real, critic, sched, _, first = dmd.networks(cfg, torch.device("cpu"))
    assert first is None  # no --first_real: no frame-0 score pair
    assert not any(p.requires_grad for p in real.parameters())
    assert all(torch.equal(a, b) for a, b in zip(real.state_dict().values(), critic.state_dict().values()))
    opt_g = torch.optim.AdamW(gen.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    opt_c = torch.optim.AdamW(critic.parameters(), lr=1e-2, betas=(0.0, 0.999), weight_decay=0.01)
    g0, c0, r0 = snapshot(gen), snapshot(critic), snapshot(real)

    b = batch(sched)
    loss, _ = dmd.dmd_loss(dmd.self_forcing(gen, b, sched), real, critic, b["tokens"], b["t"], b["eps"], 3.0)
    T.optimizer_step(opt_g, loss, 1e-2, 10.0)
    assert not same(gen, g0) and same(critic, c0) and same(real, r0)
    assert all(p.grad is None for p in [*critic.parameters(), *real.parameters()])

    g1 = snapshot(gen)
    b = batch(sched, seed=1)
    with torch.no_grad():
        x = dmd.self_forcing(gen, b, sched)
    T.optimizer_step(opt_c, dmd.critic_loss(critic, x, b["tokens"], b["t"], b["eps"]), 1e-2, 10.0)
    assert not same(critic, c0) and same(gen, g1) and same(real, r0)


def test_the_critic_may_start_from_another_base_than_the_real_score(ckpts, tmp_path):
    """The paper's Wan recipe: a larger real score, a smaller critic. Here: a wider real score."""
    wide = replace(CFG, dim=64, ffn_dim=128)
    T.export(str(tmp_path / "wide"), tiny(9, wide), {"kind": "base", "config": asdict(wide), "shift": CFG.shift})
    cfg = {**dmd.DEFAULTS, "init": ckpts["fw"], "real": str(tmp_path / "wide"), "critic": ckpts["base"],
           "steps_per_block": 2}
    gen, real, critic, sched, *_ = dmd.networks(cfg, torch.device("cpu"))
    assert real.cfg.dim == 64 and critic.cfg.dim == CFG.dim
    base, _ = T.load_model(ckpts["base"])
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), critic.state_dict().values()))
    b = batch(sched)
    loss, _ = dmd.dmd_loss(dmd.self_forcing(gen, b, sched), real, critic, b["tokens"], b["t"], b["eps"], 3.0)
    assert torch.isfinite(loss)


def test_dmd_gradient_is_the_formula():
    real, critic = tiny(3), tiny(4)
    tokens = data.tokenize(["green triangle", "cyan square"])
    torch.manual_seed(5)
    x = torch.randn(2, *SHAPE, requires_grad=True)
    eps = torch.randn(2, *SHAPE)
    t = torch.tensor([300.0, 700.0])
    loss, g = dmd.dmd_loss(x, real, critic, tokens, t, eps, 3.0)
    loss.backward()
    with torch.no_grad():  # by hand: x_t, both scores' x0, guidance x0_c + 3 (x0_c - x0_u), the normaliser
        s = (t / 1000).view(2, 1, 1, 1, 1)
        x_t = (1 - s) * x + s * eps
        x0 = lambda net, words: x_t - s * net(x_t, t, net.encode_text(data.tokenize(words)))
        c, u = x0(real, ["green triangle", "cyan square"]), x0(real, ["", ""])
        x0_real = c + 3 * (c - u)
        want = (x0(critic, ["green triangle", "cyan square"]) - x0_real)
        want = want / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x.grad, want / x.numel(), rtol=1e-4, atol=1e-9)
    assert loss.item() == pytest.approx(0.5 * want.square().mean().item(), rel=1e-4)


def test_an_ar_teacher_as_real_score_scores_the_rollout_teacher_forced():
    """--real=AR teacher: the real score and the critic see each block of the noised rollout in the context of
    the clean rollout's earlier blocks (stage 1's teacher forcing), not the whole clip at once."""
    real, critic = tiny(3), tiny(4)
    words = ["green triangle", "cyan square"]
    tokens = data.tokenize(words)
    torch.manual_seed(5)
    x, eps, t = torch.randn(2, *SHAPE), torch.randn(2, *SHAPE), torch.tensor([300.0, 700.0])
    _, g = dmd.dmd_loss(x, real, critic, tokens, t, eps, 3.0, score_fpb=1)
    _, g_whole = dmd.dmd_loss(x, real, critic, tokens, t, eps, 3.0)
    with torch.no_grad():  # by hand, as in the formula test, with clean_x = the rollout and 1-frame blocks
        s = (t / 1000).view(2, 1, 1, 1, 1)
        x_t = (1 - s) * x + s * eps
        x0 = lambda net, w: x_t - s * net(x_t, t, net.encode_text(data.tokenize(w)), frames_per_block=1, clean_x=x)
        c, u = x0(real, words), x0(real, ["", ""])
        x0_real = c + 3 * (c - u)
        want = (x0(critic, words) - x0_real) / (x - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
        v = critic(x_t, t, critic.encode_text(tokens), frames_per_block=1, clean_x=x)
    torch.testing.assert_close(g, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(g, g_whole, atol=1e-3)  # the context is what changed
    torch.testing.assert_close(dmd.critic_loss(critic, x, tokens, t, eps, score_fpb=1),
                               torch.nn.functional.mse_loss(v, eps - x))


def test_dmd_runs_with_an_ar_teacher_as_real_score_and_critic(ckpts, tmp_path):
    ar = ckpts["ar"]
    cfg = {**dmd.DEFAULTS, "init": ckpts["fw"], "real": ar, "steps_per_block": 2}
    *_, score_fpb, _ = dmd.networks(cfg, torch.device("cpu"))
    assert score_fpb == 1
    dmd.main(args(ckpts, tmp_path / "run", "--steps=2", f"--real={ar}", f"--export={tmp_path / 'g'}"))
    assert json.load(open(str(tmp_path / "g.json")))["real"] == "ar"
    with pytest.raises(SystemExit) as stop:  # the critic must be the same kind of score as the real one
        dmd.main(args(ckpts, tmp_path / "bad", "--steps=1", f"--real={ar}", f"--critic={ckpts['base']}"))
    assert stop.value.code == 2


def test_the_frame0_term_scores_frame_0_alone_with_its_own_pair():
    """--first_real: G's loss is the video's DMD term plus first_weight x the DMD term of frame 0 alone,
    scored by the AR teacher (guidance first_guidance) and its own critic; the later frames get only the
    video's gradient."""
    real, critic, first_real, first_critic = tiny(3), tiny(4), tiny(5), tiny(6)
    words = ["green triangle", "cyan square"]
    torch.manual_seed(5)
    b = dict(tokens=data.tokenize(words), t=torch.tensor([300.0, 700.0]), eps=torch.randn(2, *SHAPE))
    cfg = {**dmd.DEFAULTS, "real_guidance": 1.0, "first_guidance": 0.5, "first_weight": 0.25}
    x = torch.randn(2, *SHAPE, requires_grad=True)
    dmd.generator_loss(x, b, cfg, real, critic, None, (first_real, first_critic)).backward()
    video = x.detach().clone().requires_grad_(True)
    dmd.dmd_loss(video, real, critic, b["tokens"], b["t"], b["eps"], 1.0)[0].backward()
    with torch.no_grad():  # frame 0 by hand: one frame noised, both scores on it alone, guidance 0.5
        f, e = x[:, :, :1], b["eps"][:, :, :1]
        s = (b["t"] / 1000).view(2, 1, 1, 1, 1)
        x_t = (1 - s) * f + s * e
        x0 = lambda net, w: x_t - s * net(x_t, b["t"], net.encode_text(data.tokenize(w)))
        c, u = x0(first_real, words), x0(first_real, ["", ""])
        x0_real = c + 0.5 * (c - u)
        g0 = (x0(first_critic, words) - x0_real) / (f - x0_real).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    torch.testing.assert_close(x.grad[:, :, 1:], video.grad[:, :, 1:])
    torch.testing.assert_close(x.grad[:, :, :1], video.grad[:, :, :1] + 0.25 * g0 / f.numel(), rtol=1e-4, atol=1e-9)
    assert g0.abs().mean() > 0.01  # the frame-0 term is not vanishing


def test_the_frame0_critic_trains_resumes_and_ships(ckpts, tmp_path):
    """--first_real end to end: a frozen AR teacher, a critic that starts as its copy and is the only network
    its optimiser moves, both saved and resumed exactly, and the student's JSON names them."""
    cfg = {**dmd.DEFAULTS, "init": ckpts["fw"], "real": ckpts["base"], "steps_per_block": 2,
           "first_real": ckpts["ar"]}
    *_, (first_real, first_critic) = dmd.networks(cfg, torch.device("cpu"))
    assert not any(p.requires_grad for p in first_real.parameters())
    assert all(torch.equal(a, b) for a, b in zip(first_real.state_dict().values(), first_critic.state_dict().values()))
    first = f"--first_real={ckpts['ar']}"
    dmd.main(args(ckpts, tmp_path / "full", "--steps=4", "--ckpt_every=2", first, f"--export={tmp_path / 'g'}"))
    dmd.main(args(ckpts, tmp_path / "part", "--steps=2", "--ckpt_every=2", first))
    dmd.main(args(ckpts, tmp_path / "part", "--steps=4", "--ckpt_every=2", first))
    log = lambda run: [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
                       for line in open(tmp_path / run / "log.jsonl")]
    assert log("part") == log("full") and all("first_critic_loss" in row for row in log("full"))
    a, _ = T.load_checkpoint(str(tmp_path / "full" / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "part" / "ckpt"))
    assert {k.split(".")[0] for k in a} >= {"first_critic", "optim_first_critic"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    trained = T.split_prefix(a, "first_critic.")
    assert any(not torch.equal(v, first_real.state_dict()[k]) for k, v in trained.items())  # it learned
    meta = json.load(open(str(tmp_path / "g.json")))
    assert (meta["first_real"], meta["first_guidance"], meta["first_weight"]) == ("ar", 0.5, 0.25)


def args(ckpts, out, *extra):
    return [f"--init={ckpts['fw']}", f"--real={ckpts['base']}", "--steps_per_block=2", "--batch_size=2",
            "--critic_updates=2", "--log_every=1", "--bf16=false", f"--out={out}", *extra]


def test_resume_continues_the_same_trajectory(ckpts, tmp_path):
    """Killed after step 3's checkpoint, between two generator updates (one every 2 steps)."""
    dmd.main(args(ckpts, tmp_path / "full", "--steps=4", "--ckpt_every=3"))
    dmd.main(args(ckpts, tmp_path / "part", "--steps=3", "--ckpt_every=3"))  # "killed" after its checkpoint
    dmd.main(args(ckpts, tmp_path / "part", "--steps=4", "--ckpt_every=3"))  # resumed
    log = lambda run: [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "wall_s"} for r in rows]
    assert strip(log("part")) == strip(log("full")) and len(log("full")) == 4
    a, _ = T.load_checkpoint(str(tmp_path / "full" / "ckpt"))
    b, meta = T.load_checkpoint(str(tmp_path / "part" / "ckpt"))
    assert meta["step"] == 4 and a.keys() == b.keys()
    assert {k.split(".")[0] for k in a} == {"generator", "critic", "ema_generator", "optim_generator", "optim_critic"}
    for k in a:  # both networks, the EMA and both optimizer states continue exactly
        assert torch.equal(a[k], b[k]), k


def test_checkpointing_covers_the_generator_and_changes_no_step(ckpts, tmp_path, monkeypatch):
    wrapped, checkpoint_blocks = [], T.checkpoint_blocks
    monkeypatch.setattr(T, "checkpoint_blocks", lambda net: wrapped.append(net) or checkpoint_blocks(net))
    dmd.main(args(ckpts, tmp_path / "ck", "--steps=2", "--checkpointing=true"))
    assert len(wrapped) == 2  # the generator and the critic
    dmd.main(args(ckpts, tmp_path / "plain", "--steps=2"))
    a, _ = T.load_checkpoint(str(tmp_path / "ck" / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "plain" / "ckpt"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-6, atol=1e-7, msg=k)


@pytest.mark.slow
def test_torchrun_two_processes_take_the_same_steps_as_one(ckpts, tmp_path):
    """Each process draws the global batch's noise (fresh re-noising included) and keeps its rows; the
    generator's several grad-carrying forwards per backward all-reduce correctly under DDP."""
    dmd.main(args(ckpts, tmp_path / "one", "--batch_size=4", "--steps=3"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "dmd.py", *args(ckpts, tmp_path / "two", "--batch_size=4", "--steps=3")],
                       cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr  # whole: a rank's own error sits above the launcher's report
    a, _ = T.load_checkpoint(str(tmp_path / "one" / "ckpt"))
    b, _ = T.load_checkpoint(str(tmp_path / "two" / "ckpt"))
    for k in a:
        if not k.startswith("optim"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5, msg=k)
    log = lambda run: [json.loads(line) for line in open(tmp_path / run / "log.jsonl")]
    for x, y in zip(log("one"), log("two")):
        assert x["critic_loss"] == pytest.approx(y["critic_loss"], rel=1e-5, abs=1e-6)  # the log keeps 6 decimals
        assert x.keys() == y.keys()  # the generator's fields on its own steps only, in both
        if "dmd_loss" in x:
            assert x["dmd_loss"] == pytest.approx(y["dmd_loss"], rel=1e-4, abs=1e-6)


def test_students_export_and_stream(ckpts, tmp_path):
    fw = str(tmp_path / "cfpp_framewise_2step")
    dmd.main(args(ckpts, tmp_path / "fw", "--steps=2", f"--export={fw}", "--bf16=true"))
    cw = str(tmp_path / "cf_chunkwise_4step")
    dmd.main([f"--init={ckpts['cw']}", f"--real={ckpts['base']}", "--frames_per_block=3", "--steps_per_block=4",
              "--batch_size=2", "--steps=1", f"--out={tmp_path / 'cw'}", f"--export={cw}"])
    for stem, counts in ((fw, (1, 2, 4)), (cw, (3, 4, None))):
        meta = json.load(open(stem + ".json"))
        assert meta["kind"] == "student" and meta["shift"] == CFG.shift
        assert (meta["frames_per_block"], meta["steps_per_block"], meta["first_block_steps"]) == counts
        assert meta["log"] == stem.split("/")[-1] + ".log.jsonl" and open(stem + ".log.jsonl").readline()
    shipped, _ = T.load_model(fw)
    ema = T.load_checkpoint(str(tmp_path / "fw" / "ckpt"))[0]
    for k, v in shipped.state_dict().items():  # the shipped weights are the EMA (stored in fp16)
        assert torch.equal(v, ema["ema_generator." + k].half().float()), k
    npy = tmp_path / "v.npy"
    sample.main(["--ckpt", fw, "--out", str(tmp_path / "v.gif"), "--save-npy", str(npy)])
    video = np.load(npy)
    assert video.shape == (1, 6, 32, 32, 3) and video.dtype == np.uint8


def test_an_explicit_timestep_list_is_trained_and_shipped(ckpts, tmp_path, monkeypatch):
    """--timesteps: G's rollout steps on that list (frame 0 on the warped 4-step one), the JSON ships it and
    sample.py samples with it by default."""
    lists = []
    real_denoise = rollout.denoise_block
    monkeypatch.setattr(rollout, "denoise_block",
                        lambda m, x, ts, *a, **k: lists.append([round(t, 1) for t in ts]) or real_denoise(m, x, ts, *a, **k))
    stem = str(tmp_path / "listed")
    dmd.main(args(ckpts, tmp_path / "run", "--steps=1", "--timesteps=1000,250", f"--export={stem}"))
    first = [round(t, 1) for t in M.timesteps(4, CFG.shift).tolist()]
    assert lists and all(ts in ([1000.0, 250.0], first) for ts in lists) and [1000.0, 250.0] in lists
    meta = json.load(open(stem + ".json"))
    assert (meta["steps_per_block"], meta["first_block_steps"], meta["timesteps"]) == (2, 4, [1000.0, 250.0])
    lists.clear()
    sample.main(["--ckpt", stem, "--out", str(tmp_path / "v.png")])
    assert lists == [first] + [[1000.0, 250.0]] * (CFG.frames - 1)


@pytest.mark.parametrize("extra,message", [
    (["--timesteps=1000,abc"], "--timesteps must be numbers"),
    (["--timesteps=1000,500,250"], "--steps_per_block 2 differs from the 3 --timesteps"),
    (["--critic_updates=0"], "--critic_updates must be positive"),
    (["--frames_per_block=3"], "differs from the init's 1"),
    (["--frames_per_block=4"], "must divide the 6 frames"),
    (["--real={fw}"], "expected 'base' or 'ar_teacher'"),
    (["--init={base}"], "expected 'student'"),
    (["--init=nowhere/missing"], "not found"),
    (["--first_real={base}"], "expected 'ar_teacher'"),
    (["--init={cw}", "--first_real={ar}", "--steps_per_block=4"], "needs a frame-wise student"),
    (["--lr=fast"], "--lr expects a float"),
    (["--real_guidance=-1"], "--real_guidance must be >= 0"),
    (["--first_weight=-0.5"], "--first_weight must be >= 0"),
    (["--device=nope"], "--device nope is not usable here"),
])
def test_bad_options_exit_2_with_one_line(ckpts, tmp_path, capsys, extra, message):
    extra = [e.format(**ckpts) for e in extra]
    with pytest.raises(SystemExit) as stop:
        dmd.main(args(ckpts, tmp_path / "bad", "--steps=1", *extra))
    err = capsys.readouterr().err.strip()
    assert stop.value.code == 2 and err.startswith("error: ") and message in err and "\n" not in err, err
