"""The world model: the zero-initialised action path, teacher forcing = cache with actions, the pipeline and
sample.py --actions end to end, and play.py: its protocol, its errors, one cache per client, and a real
browser that steers the object with the arrow keys."""
import base64
import json
import os
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import asdict, replace

import numpy as np
import pytest
import torch

import causal_cd
import data
import dmd
import model as M
import play
import sample
import teacher
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = M.Config(dim=32, ffn_dim=64, num_heads=2, num_layers=2, freq_dim=32, text_dim=8, text_len=2, in_dim=3,
                 out_dim=3, patch_size=(1, 2, 2), frames=6, height=4, width=4)
WORLD = replace(M.get_config("toy-tiny"), num_actions=len(data.ACTIONS))  # 6 frames of 32x32
ACTION_KEYS = {"action_embedding.weight", "action_projection.weight", "action_projection.bias"}


def pair(seed=0):
    """A fresh world model (head made non-zero) and the text-to-video model holding all its other weights."""
    torch.manual_seed(seed)
    world = M.build(replace(SMALL, num_actions=5)).eval()
    torch.nn.init.normal_(world.head.head.weight, std=0.1)  # the zero head would hide every difference
    plain = M.build(SMALL).eval()
    plain.load_state_dict({k: v for k, v in world.state_dict().items() if k not in ACTION_KEYS})
    return world, plain


def inputs(B=2, F=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 3, F, 4, 4, generator=g)
    t, ctx = torch.rand(B, F, generator=g) * 1000, torch.randn(B, 2, 8, generator=g)
    return x, t, ctx, torch.randint(5, (B, F), generator=g), torch.randn(B, 3, F, 4, 4, generator=g)


def decode(m, x, t, ctx, fpb, clean, actions=None):
    """Block by block with the KV cache, the GT block committed at t = 0 (with the block's actions)."""
    cache, outs = m.new_cache(max_frames=x.shape[2]), []
    for s in range(0, x.shape[2], fpb):
        a = None if actions is None else actions[:, s:s + fpb]
        outs.append(m(x[:, :, s:s + fpb], t[:, s:s + fpb], ctx, kv_cache=cache, actions=a))
        m(clean[:, :, s:s + fpb], torch.zeros_like(t[:, s:s + fpb]), ctx, kv_cache=cache, cache_write=True, actions=a)
    return torch.cat(outs, dim=2)


@torch.no_grad()
def test_a_fresh_action_path_changes_nothing_and_official_keys_stay():
    for name in M.PRESETS:  # no preset grows action weights: the official Wan keys load as before
        assert M.get_config(name).num_actions == 0
        assert not any("action" in k for k in M.build(name, device="meta").state_dict()), name
    world, plain = pair()
    assert set(world.state_dict()) - set(plain.state_dict()) == ACTION_KEYS
    assert not world.action_projection.weight.any() and not world.action_projection.bias.any()
    x, t, ctx, actions, clean = inputs()
    assert torch.equal(world(x, t, ctx, actions=actions), plain(x, t, ctx))
    assert torch.equal(world(x, t, ctx, frames_per_block=3, clean_x=clean, actions=actions),
                       plain(x, t, ctx, frames_per_block=3, clean_x=clean))
    assert torch.equal(decode(world, x, t, ctx, 1, clean, actions), decode(plain, x, t, ctx, 1, clean))
    with pytest.raises(ValueError, match="needs actions"):
        world(x, t, ctx)
    with pytest.raises(ValueError, match="takes no actions"):
        plain(x, t, ctx, actions=actions)
    with pytest.raises(ValueError, match=r"\[2, 6\]"):
        world(x, t, ctx, actions=actions[:, :3])


@torch.no_grad()
@pytest.mark.parametrize("fpb", [1, 3])
def test_teacher_forcing_equals_the_cache_with_actions_and_a_frame_sees_no_later_action(fpb):
    world, _ = pair()
    torch.nn.init.normal_(world.action_projection.weight, std=0.5)  # as if trained
    x, t, ctx, actions, clean = inputs()
    tf = world(x, t, ctx, frames_per_block=fpb, clean_x=clean, actions=actions)
    assert torch.allclose(tf, decode(world, x, t, ctx, fpb, clean, actions), atol=1e-5)
    other = actions.clone()
    other[:, -fpb:] = (other[:, -fpb:] + 1) % 5  # change only the last block's actions
    tf2 = world(x, t, ctx, frames_per_block=fpb, clean_x=clean, actions=other)
    assert torch.equal(tf[:, :, :-fpb], tf2[:, :, :-fpb]) and not torch.allclose(tf[:, :, -fpb:], tf2[:, :, -fpb:])


def test_the_training_rollout_with_actions_is_the_sampler():
    gen = random_world(0)
    meta = {"kind": "student", "frames_per_block": 1, "steps_per_block": 2, "first_block_steps": 4}
    p = sample.plan(meta, sample.parse_args([]), WORLD)
    tokens = data.tokenize(["red circle", "blue square"])
    actions = torch.tensor([[0, 4, 4, 1, 1, 0], [0, 2, 3, 3, 2, 0]])
    video = sample.run(gen, tokens, p, seed=7, device=torch.device("cpu"), actions=actions)
    sched = dmd.schedule(1, 2, WORLD.shift)
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 3, 6, 32, 32, generator=g)
    with torch.no_grad():
        x = dmd.self_forcing(gen, dict(tokens=tokens, noise=noise, fresh=g, exits=(1, 3), actions=actions), sched)
    assert torch.allclose(x, video, atol=1e-5)
    b = dmd.make_batch(dict(seed=0, batch_size=3), 0, 0, (3, 6, 32, 32), sched, WORLD.shift, actions=True)
    assert b["actions"].shape == (3, 6) and b["actions"].dtype == torch.long


# ---------------------------------------------------------------------------------------------------
# the pipeline and sample.py --actions


def random_world(seed, cfg=WORLD):
    torch.manual_seed(seed)
    net = M.build(cfg).eval()
    torch.nn.init.normal_(net.head.head.weight, std=0.3)  # random but not the zero head (x0 = x_t)
    torch.nn.init.normal_(net.action_projection.weight, std=0.3)
    return net


def export_world(stem, seed=0, cfg=WORLD, **meta):
    meta = {"kind": "student", "frames_per_block": 1, "steps_per_block": 2, "first_block_steps": 4, **meta}
    T.export(stem, random_world(seed, cfg), {"config": asdict(cfg), "shift": cfg.shift, **meta})
    return stem


@pytest.mark.slow
def test_the_world_pipeline_runs_on_one_flag_and_samples_with_actions(tmp_path):
    """base -> AR teacher (teacher.py --actions=true) -> causal CD -> DMD -> sample.py --actions -> eval.py."""
    tiny = ["--batch_size=2", "--bf16=false", "--steps=1"]
    base, ar, cd, world = (str(tmp_path / n) for n in ("base", "ar", "cd", "world"))
    teacher.main(["--model=toy-tiny", "--actions=true", *tiny, f"--out={tmp_path}/r0", f"--export={base}"])
    teacher.main(["--model=toy-tiny", "--actions=true", "--stage=ar", f"--init={base}", *tiny,
                  f"--out={tmp_path}/r1", f"--export={ar}"])
    assert json.load(open(ar + ".json"))["config"]["num_actions"] == 5
    causal_cd.main([f"--teacher={ar}", *tiny, f"--out={tmp_path}/r2", f"--export={cd}"])
    dmd.main([f"--init={cd}", f"--real={base}", "--steps_per_block=2", *tiny, f"--out={tmp_path}/r3",
              f"--export={world}"])
    npy = str(tmp_path / "w.npy")
    sample.main(["--ckpt", world, "--actions", "none,right*2, up ,left*2", "--num-samples=2", f"--save-npy={npy}",
                 f"--out={tmp_path}/w.png"])
    assert np.load(npy).shape == (2, 6, 32, 32, 3)
    assert open(npy + ".actions.txt").read() == "none,right,right,up,left,left\n" * 2
    r = subprocess.run([sys.executable, "eval.py", "--npy", npy, "--json"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert 0 <= json.loads(r.stdout)["action_following"] <= 1
    with pytest.raises(SystemExit) as stop:  # the ODE methods are text-to-video only
        causal_cd.main([f"--teacher={ar}", "--method=ode", *tiny, f"--out={tmp_path}/r4"])
    assert stop.value.code == 2


def test_parse_actions():
    assert sample.parse_actions("none,right*4,up*4,none*3", 12) == ["none"] + ["right"] * 4 + ["up"] * 4 + ["none"] * 3
    assert sample.parse_actions(" left * 2 ,down", 3) == ["left", "left", "down"]


@pytest.mark.parametrize("text,frames,message", [
    ("none,right*4", 6, "gives 5 actions for 6 frames"),
    ("none,jump*5", 6, "unknown action 'jump'"),
    ("none,right*0,up*5", 6, "positive whole count"),
    ("none,right*x", 2, "positive whole count"),
    ("none,,up*4", 6, "unknown action ''"),
    ("none*1000000000000", 12, "gives 1000000000000 actions for 12 frames"),  # counted, never built
    ("none,right*\u00b2", 2, "positive whole count"),  # a superscript two is a digit to str.isdigit
])
def test_bad_actions_exit_2_with_one_line(text, frames, message, capsys):
    with pytest.raises(SystemExit) as stop:
        sample.parse_actions(text, frames)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.count("\n") == 1


def test_sample_refuses_actions_that_do_not_fit_the_checkpoint(tmp_path, capsys):
    world = export_world(str(tmp_path / "world"))
    plain = str(tmp_path / "plain")
    T.export(plain, M.build("toy-tiny"), {"config": asdict(M.get_config("toy-tiny")), "kind": "student",
                                          "frames_per_block": 1, "steps_per_block": 2})
    for argv, message in (([f"--ckpt={world}"], "pass --actions"),
                          ([f"--ckpt={plain}", "--actions=none*6"], "needs an action world model"),
                          ([f"--ckpt={world}", "--actions=none*5"], "gives 5 actions for 6 frames")):
        with pytest.raises(SystemExit) as stop:
            sample.main(argv + [f"--out={tmp_path}/x.png"])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------------------------------
# play.py


@contextmanager
def serving(new_world, fps=8):
    server = play.make_server(new_world, fps=fps)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy


def request(url, path, body=None, raw=None, method="POST"):
    """-> (status, decoded JSON or page text)."""
    data_ = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(url + path, data=data_, method=method, headers={"Content-Type": "application/json"})
    try:
        with OPENER.open(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    return status, (json.loads(text) if text.startswith("{") else text)


def frame_of(answer):
    return np.frombuffer(base64.b64decode(answer["frame"]), np.uint8).reshape(answer["height"], answer["width"], 3)


def play_frames(url, sid, actions):
    out = []
    for a in actions:
        status, answer = request(url, "/step", {"session": sid, "action": a})
        assert status == 200, answer
        out.append(frame_of(answer))
    return out


@pytest.fixture(scope="module")
def model_url(tmp_path_factory):
    """play.py's real model path on a tiny random world model."""
    stem = export_world(str(tmp_path_factory.mktemp("world") / "world"))
    with serving(play.load_world(stem, torch.device("cpu"))) as url:
        yield url


def new_session(url, **body):
    status, answer = request(url, "/session", {"prompt": "cyan square", "seed": 3, **body})
    assert status == 200, answer
    return answer["session"]


def test_a_client_gets_the_page_and_streams_frames_past_the_window(model_url):
    status, page = request(model_url, "/", method="GET")
    assert status == 200 and "<canvas" in page and "ArrowUp" in page and "cyan square" in page
    sid = new_session(model_url)
    actions = ["none", "right", "right", "up", "up", "left", "down", "none", "none"]  # 9 frames > the window of 6
    frames = play_frames(model_url, sid, actions)
    assert all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    assert len({f.tobytes() for f in frames}) > 1
    status, answer = request(model_url, "/step", {"session": sid, "action": "none"})
    assert status == 200 and answer["index"] == len(actions) and answer["ms"] >= 0


def test_two_clients_do_not_share_a_cache(model_url):
    actions = ["none", "right", "up", "up", "left", "none", "down", "right"]
    alone = play_frames(model_url, new_session(model_url), actions)
    a, b = new_session(model_url), new_session(model_url, prompt="red circle", seed=9)
    together = []
    for act in actions:  # interleaved with another client's frames
        together += play_frames(model_url, a, [act])
        play_frames(model_url, b, ["left"])
    assert all(np.array_equal(x, y) for x, y in zip(alone, together))


@pytest.mark.parametrize("path,body,status,message", [
    ("/step", b"{not json", 400, "not JSON"),
    ("/step", b"[" * 2000 + b"]" * 2000, 400, "not JSON"),  # nested past the parser's recursion limit
    ("/step", b"[1, 2]", 400, "JSON object"),
    ("/step", b"", 400, "1 to 4096 bytes"),
    ("/step", b"{" + b" " * 5000 + b"}", 413, "1 to 4096 bytes"),
    ("/step", {"session": "SID", "action": "jump"}, 400, "unknown action 'jump'"),
    ("/step", {"session": "SID"}, 400, "'action' must be a string"),
    ("/step", {"session": "nope", "action": "up"}, 404, "no session 'nope'"),
    ("/session", {"prompt": "purple blob"}, 400, "unknown colour"),
    ("/session", {"seed": -1}, 400, "'seed' must lie in"),
    ("/session", {"seed": "one"}, 400, "'seed' must be an integer"),
    ("/nowhere", {}, 404, "no endpoint"),
])
def test_malformed_messages_get_an_error_reply_and_the_server_goes_on(model_url, path, body, status, message):
    sid = new_session(model_url)
    if isinstance(body, dict):
        body = json.dumps({k: (sid if v == "SID" else v) for k, v in body.items()}).encode()
    got, answer = request(model_url, path, raw=body)
    assert got == status and message in answer["error"], answer
    assert play_frames(model_url, sid, ["up"])[0].shape == (32, 32, 3)  # still serving
    assert request(model_url, "/missing", method="GET")[0] == 404


def test_play_refuses_checkpoints_it_cannot_play(tmp_path, capsys):
    plain, chunk = str(tmp_path / "plain"), str(tmp_path / "chunk")
    T.export(plain, M.build("toy-tiny"), {"config": asdict(M.get_config("toy-tiny")), "kind": "student",
                                          "frames_per_block": 1, "steps_per_block": 2})
    export_world(chunk, frames_per_block=3, steps_per_block=4, first_block_steps=None)
    for argv, message in (([f"--ckpt={tmp_path}/none"], "no world model"),
                          ([f"--ckpt={plain}"], "not an action world model"),
                          ([f"--ckpt={chunk}"], "not frame-wise"),
                          (["--fps=0"], "--fps must be positive"),
                          (["--fps=inf"], "--fps must be positive and finite"),
                          (["--bench=-1"], "--bench must be positive")):
        with pytest.raises(SystemExit) as stop:
            play.main(argv)
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err


class Pusher:
    """A scripted stand-in for the model (the tiny random one cannot have learned directions): a yellow
    square that each action pushes 2 px, the toy world's rule."""

    def __init__(self, prompt, seed):
        self.pos = np.array([16.0, 16.0])

    def step(self, action):
        self.pos = np.clip(self.pos + data.ACTION_STEP * np.array(data.MOVES[action]), 4, 28)
        return data.render("square", "yellow", self.pos[0], self.pos[1], 3)


CENTROID = """() => {
  const c = document.getElementById("screen"), d = c.getContext("2d").getImageData(0, 0, c.width, c.height).data;
  let n = 0, x = 0, y = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.max(d[i], d[i + 1], d[i + 2]) > 128) { n++; x += (i / 4) % c.width; y += Math.floor(i / 4 / c.width); }
  return {x: x / n, y: y / n, index: Number(document.getElementById("index").textContent)};
}"""


def test_a_browser_steers_the_object_with_the_arrow_keys():
    """Headless Chromium: the page draws the streamed frames and the keys held move the object their way."""
    from playwright.sync_api import sync_playwright  # CI installs it with Debian's chromium (.ci/run)
    with serving(Pusher, fps=30) as url, sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.goto(url)

            def settle(after):  # wait for two more frames, then read where the object is
                page.wait_for_function(f"Number(document.getElementById('index').textContent) >= {after + 2}")
                return page.evaluate(CENTROID)

            start = settle(0)
            assert start["x"] == pytest.approx(16, abs=0.5) and start["y"] == pytest.approx(16, abs=0.5)
            for key, axis, sign in (("ArrowRight", "x", 1), ("ArrowUp", "y", -1), ("ArrowLeft", "x", -1)):
                before = page.evaluate(CENTROID)
                page.keyboard.down(key)  # held until the object has moved 4 px its way (a loaded CI box lags)
                page.wait_for_function(f"(() => {{ const c = ({CENTROID})(); "
                                       f"return {sign} * (c.{axis} - {before[axis]}) >= 4; }})()", timeout=30000)
                page.keyboard.up(key)
                after = settle(page.evaluate(CENTROID)["index"])  # the key is up: the object has stopped
                other = "y" if axis == "x" else "x"
                assert sign * (after[axis] - before[axis]) >= 4 and after[other] == pytest.approx(before[other]), key
            assert float(page.inner_text("#fps")) > 0 and page.inner_text("#error") == ""
        finally:
            browser.close()


def test_a_world_base_starts_from_a_text_to_video_base_unchanged(tmp_path):
    """teacher.py --stage=base --actions=true --init=TEXT_BASE: the action path starts at zero, so before any
    learning the world model predicts exactly what the text-to-video base does, whatever the actions."""
    tiny = ["--model=toy-tiny", "--batch_size=2", "--bf16=false", "--steps=1"]
    text, world = str(tmp_path / "text"), str(tmp_path / "world")
    teacher.main([*tiny, f"--out={tmp_path}/r0", f"--export={text}"])
    teacher.main([*tiny, "--actions=true", f"--init={text}", "--lr=0", f"--out={tmp_path}/r1", f"--export={world}"])
    t2v, _ = T.load_model(text)
    wm, _ = T.load_model(world)
    x, t = torch.randn(2, 3, 6, 32, 32), torch.tensor([900.0, 300.0])
    ctx = t2v.encode_text(data.tokenize(["red circle", "blue square"]))
    with torch.no_grad():
        for actions in (torch.zeros(2, 6, dtype=torch.long), torch.randint(0, 5, (2, 6))):
            assert torch.equal(wm(x, t, ctx, actions=actions), t2v(x, t, ctx))
    with pytest.raises(SystemExit) as stop:  # another size of model is refused with one line
        teacher.main(["--model=toy", "--batch_size=2", "--steps=1", "--actions=true", f"--init={text}",
                      f"--out={tmp_path}/r2"])
    assert stop.value.code == 2


def test_play_bench_plays_through_http_and_reports_speed_and_memory(tmp_path, capsys):
    stem = export_world(str(tmp_path / "world"))
    play.main(["--ckpt", stem, "--bench", "2"])
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])
    assert result["frames"] > 12 and result["seconds"] >= 2  # past the rolling window, for the time asked
    assert result["frames_per_s"] == pytest.approx(result["frames"] / result["seconds"], rel=0.05)
    assert 0 < result["rss_mib_first_report"] <= result["rss_mib_max"] and "frames/s" in err
