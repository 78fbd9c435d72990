"""Play the world model: a local web page where the arrow keys steer the object and the model draws each
next frame from the key held, in real time, for as long as the page stays open.

    python play.py                                         # checkpoints/world_framewise, http://127.0.0.1:8000
    python play.py --ckpt runs/my_world --port 8080 --fps 12
    python play.py --bench 600                             # a client plays for 10 min: frames/s and memory

The page runs a loop: it POSTs the arrow key held right now to /step, the server generates exactly one
frame for that action (the frame-wise sampler of sample.py: one 1-frame block on top of the KV cache of the
frames before) and answers with its pixels; the page draws it and asks for the next, at most --fps times a
second. Asking frame by frame instead of queueing frames ahead keeps the delay from key to picture at one
frame. The cache rolls (a window of the trained length, as sample.py does past the trained length), so a
session runs indefinitely. Every page has its own session: prompt, noise and cache.

The protocol, JSON over HTTP (standard library only):
    GET  /                                   the page (no build step: HTML and a little JavaScript)
    POST /session {"prompt", "seed"}      -> {"session"}
    POST /step    {"session", "action"}   -> {"frame": base64 of uint8 RGB [height, width, 3], "height",
                                              "width", "index", "ms"}
    anything malformed                    -> 4xx {"error": "..."}, and the server goes on
"""
import argparse
import base64
import json
import math
import os
import random
import secrets
import sys
import threading
import time
import traceback
from collections import OrderedDict
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.request import ProxyHandler, build_opener

# The browser usually runs on the same machine: OpenMP threads that spin while waiting starve it and each
# other (measured on 2 CPU cores: 840 ms a frame instead of 10). Set before torch starts OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

import data  # noqa: E402
import rollout  # noqa: E402
import sample  # noqa: E402
import trainer as T  # noqa: E402

MAX_SESSIONS = 16  # the least recently used session is dropped beyond this (its page simply starts a new one)
MAX_BODY = 4096  # bytes; every valid message is far smaller


class ModelWorld:
    """One session of the world model: a prompt, a noise stream and a rolling KV cache.
    step(action name) -> the next frame, uint8 [H, W, 3]."""

    def __init__(self, model, p, prompt, seed):
        device = next(model.parameters()).device
        self.model, self.p = model, p
        self.g = torch.Generator().manual_seed(seed)
        self.ctx = rollout.contexts(model, data.tokenize([prompt]).to(device), p["guidance"])
        self.cache = model.new_cache(window=p["window"], sink=p["sink"])
        self.steps, self.first = p["timesteps"], p["first"] or p["timesteps"]

    @torch.no_grad()
    def step(self, action):
        cfg, device = self.model.cfg, self.ctx.device
        fresh = lambda like: torch.randn(like.shape, generator=self.g).to(like.device)  # re-noising draws
        x = torch.randn(1, cfg.in_dim, 1, cfg.height, cfg.width, generator=self.g).to(device)
        a = data.action_ids([[action]]).to(device)
        ts = self.first if self.cache.next_frame == 0 else self.steps  # frame 0 on its own (longer) list
        x0 = rollout.denoise_block(self.model, x, ts, self.ctx, self.cache, self.p["solver"], self.p["guidance"],
                                   fresh, actions=a)
        rollout.commit(self.model, x0, self.ctx, self.cache, a)
        return data.to_uint8(x0)[0, 0]


def load_world(stem, device):
    """-> new_world(prompt, seed) for a frame-wise causal world-model checkpoint; bad ones exit 2."""
    model, meta = sample.load(stem, device)
    cfg = model.cfg
    if not cfg.num_actions:
        T.die(f"checkpoint {stem} is not an action world model (train one with teacher.py --actions=true)")
    # the checkpoint's sampler, on a rolling cache
    flags = argparse.Namespace(frames_per_block=None, num_frames=None, steps=None, timesteps=None, guidance=None,
                               solver=None, first_frame=None, window=cfg.frames, sink=sample.SINK)
    p = sample.plan(meta, flags, cfg)
    if p["kind"] == "base" or p["fpb"] != 1:
        T.die(f"checkpoint {stem} is not frame-wise causal (kind {p['kind']}, {p['fpb']} frames per block): "
              "play.py generates one frame per key press")
    return partial(ModelWorld, model, p)


class BadRequest(Exception):
    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def field(msg, key, kind, default=None):
    value = msg.get(key, default)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise BadRequest(f"{key!r} must be {'a string' if kind is str else 'an integer'}, got {value!r}")
    return value


class Play:
    """The sessions. `new_world(prompt, seed)` makes a session's world (anything with step(action) -> uint8
    [H, W, 3]: the model, or a scripted stand-in in the tests). The model is shared, so one frame is
    generated at a time."""

    def __init__(self, new_world, fps):
        self.new_world, self.fps = new_world, fps
        self.sessions = OrderedDict()  # id -> [world, frames generated], least recently used first
        self.lock = threading.Lock()

    def new_session(self, msg):
        prompt, seed = field(msg, "prompt", str, data.PROMPTS[0]), field(msg, "seed", int, 0)
        try:
            data.parse_prompt(prompt)
        except ValueError as e:
            raise BadRequest(str(e))
        if not 0 <= seed < 2 ** 63:
            raise BadRequest(f"'seed' must lie in [0, 2**63), got {seed}")
        sid = secrets.token_hex(8)
        with self.lock:
            self.sessions[sid] = [self.new_world(prompt, seed), 0]
            while len(self.sessions) > MAX_SESSIONS:
                self.sessions.popitem(last=False)
        return {"session": sid}

    def step(self, msg):
        sid, action = field(msg, "session", str), field(msg, "action", str)
        if action not in data.ACTIONS:
            raise BadRequest(f"unknown action {action!r}; actions: {', '.join(data.ACTIONS)}")
        with self.lock:
            if sid not in self.sessions:
                raise BadRequest(f"no session {sid!r} (it may have been dropped); POST /session for a new one", 404)
            self.sessions.move_to_end(sid)
            entry = self.sessions[sid]
            t0 = time.perf_counter()
            frame = entry[0].step(action)
            ms = (time.perf_counter() - t0) * 1000
            entry[1] += 1
        return {"frame": base64.b64encode(frame.tobytes()).decode(), "height": frame.shape[0],
                "width": frame.shape[1], "index": entry[1] - 1, "ms": round(ms, 1)}


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.split("?")[0] != "/":
            return self.reply(404, {"error": f"no page {self.path}; the game is at /"})
        page = PAGE.replace("__FPS__", str(self.server.play.fps)).replace("__PROMPTS__", json.dumps(data.PROMPTS))
        self.send(200, page.encode(), "text/html; charset=utf-8")

    def do_POST(self):
        routes = {"/session": self.server.play.new_session, "/step": self.server.play.step}
        try:
            if self.path not in routes:
                raise BadRequest(f"no endpoint {self.path}; POST /session or /step", 404)
            size = self.headers.get("Content-Length", "0")
            size = int(size) if size.isdigit() else 0
            if not 0 < size <= MAX_BODY:
                raise BadRequest(f"a message is a JSON object of 1 to {MAX_BODY} bytes, got {size}",
                                 413 if size else 400)
            try:
                msg = json.loads(self.rfile.read(size))
            except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser's stack
                raise BadRequest(f"the body is not JSON ({type(e).__name__})")
            if not isinstance(msg, dict):
                raise BadRequest("the body must be a JSON object")
            status, answer = 200, routes[self.path](msg)
        except BadRequest as e:
            status, answer = e.status, {"error": str(e)}
        except Exception as e:  # a bug in one request must not stop the game for everyone
            traceback.print_exc()
            status, answer = 500, {"error": f"{type(e).__name__}: {e}"}
        self.reply(status, answer)

    def reply(self, status, obj):
        self.send(status, json.dumps(obj).encode(), "application/json")

    def send(self, status, body, kind):
        try:
            self.send_response(status)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)
        except ConnectionError:  # the page went away mid-answer (closed, reloaded): nobody to tell
            pass

    def log_message(self, *args):  # ~10 requests a second per player: keep the terminal quiet
        pass


def make_server(new_world, host="127.0.0.1", port=0, fps=8):
    """An HTTP server (not yet serving: call serve_forever) for worlds made by new_world(prompt, seed);
    port 0 picks a free port (server.server_address[1])."""
    server = ThreadingHTTPServer((host, port), Handler)
    server.play = Play(new_world, fps)
    return server


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>Bouncing Shapes: the world model</title>
<style>
  body { font: 15px system-ui, sans-serif; background: #15161a; color: #ddd; margin: 2em; }
  canvas { width: 384px; height: 384px; image-rendering: pixelated; border: 1px solid #555; display: block;
           margin: 1em 0; background: #000; }
  #error { color: #f77; }
</style></head>
<body>
<h2>Bouncing Shapes world model</h2>
<p>Hold the arrow keys to push the object. Every frame is generated by the model from the key you hold.</p>
<label>prompt <select id="prompt"></select></label> <button id="restart">restart</button>
<canvas id="screen" width="32" height="32"></canvas>
<div><b id="fps">-</b> frames/s &middot; model <span id="ms">-</span> ms/frame &middot; action <b id="action">none</b>
  &middot; frame <span id="index">-</span></div>
<div id="error"></div>
<script>
const FPS = __FPS__, PROMPTS = __PROMPTS__;
const KEYS = {ArrowUp: "up", ArrowDown: "down", ArrowLeft: "left", ArrowRight: "right"};
const $ = id => document.getElementById(id);
const screen = $("screen").getContext("2d");
const held = [];  // arrows held down; the last one pressed wins
let session = null, shown = [];

for (const p of PROMPTS) $("prompt").add(new Option(p, p));
$("prompt").onchange = $("restart").onclick = () => { session = null; };
addEventListener("keydown", e => {
  const a = KEYS[e.key];
  if (!a) return;
  e.preventDefault();
  if (!held.includes(a)) held.push(a);
});
addEventListener("keyup", e => {
  const i = held.indexOf(KEYS[e.key]);
  if (i >= 0) held.splice(i, 1);
});
addEventListener("blur", () => { held.length = 0; });

async function post(path, body) {
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify(body)});
  const answer = await r.json();
  if (!r.ok) throw new Error(answer.error);
  return answer;
}

function draw(f) {
  const rgb = atob(f.frame), img = screen.createImageData(f.width, f.height);
  for (let i = 0, j = 0; i < rgb.length; i += 3, j += 4) {
    img.data[j] = rgb.charCodeAt(i); img.data[j + 1] = rgb.charCodeAt(i + 1);
    img.data[j + 2] = rgb.charCodeAt(i + 2); img.data[j + 3] = 255;
  }
  screen.putImageData(img, 0, 0);
  const now = performance.now();
  shown = shown.filter(t => t > now - 2000).concat([now]);  // the frame rate over the last two seconds
  if (shown.length > 1) $("fps").textContent = ((shown.length - 1) * 1000 / (now - shown[0])).toFixed(1);
  $("ms").textContent = f.ms; $("index").textContent = f.index;
}

const sleep = ms => new Promise(done => setTimeout(done, ms));
async function play() {
  for (;;) {
    const start = performance.now();
    try {
      if (!session) {
        const seed = Math.floor(Math.random() * 2 ** 31);
        session = (await post("/session", {prompt: $("prompt").value, seed})).session;
      }
      const action = held.length ? held[held.length - 1] : "none";
      $("action").textContent = action;
      draw(await post("/step", {session, action}));
      $("error").textContent = "";
    } catch (err) {
      $("error").textContent = err.message;
      session = null;
      await sleep(1000);
    }
    await sleep(1000 / FPS - (performance.now() - start));
  }
}
play();
</script>
</body></html>
"""


def rss_mib():
    """This process's resident memory now (Linux /proc; the peak from getrusage elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(server, seconds, report_every=60.0):
    """A client plays as fast as the server answers, through HTTP like the page, holding random keys
    (each kept for a while, as a player does), for `seconds`. Prints frames/s and resident memory every
    `report_every` seconds and, as its last line, one JSON object with the whole run's numbers."""
    url = f"http://127.0.0.1:{server.server_address[1]}"
    opener = build_opener(ProxyHandler({}))  # loopback: never through a proxy
    post = lambda path, msg: json.load(opener.open(url + path, json.dumps(msg).encode()))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sid, rng = post("/session", {"prompt": data.PROMPTS[0], "seed": 0})["session"], random.Random(0)
    action, frames, ms, rss = "none", 0, 0.0, [rss_mib()]
    start = last = time.perf_counter()
    while time.perf_counter() - start < seconds:
        action = action if rng.random() < 0.9 else rng.choice(data.ACTIONS)
        ms += post("/step", {"session": sid, "action": action})["ms"]
        frames += 1
        if time.perf_counter() - last >= report_every or time.perf_counter() - start >= seconds:
            last = time.perf_counter()
            rss.append(rss_mib())
            print(f"{last - start:7.0f} s  {frames} frames  {frames / (last - start):.1f} frames/s  "
                  f"{rss[-1]:.0f} MiB", file=sys.stderr, flush=True)
    server.shutdown()
    wall = time.perf_counter() - start
    print(json.dumps({"seconds": round(wall, 1), "frames": frames, "frames_per_s": round(frames / wall, 1),
                      "model_ms_per_frame": round(ms / max(frames, 1), 1), "rss_mib_first_report": round(rss[1], 1),
                      "rss_mib_last": round(rss[-1], 1), "rss_mib_max": round(max(rss), 1)}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.error = lambda message: T.die(f"{message} (see --help)")
    p.add_argument("--ckpt", default="checkpoints/world_framewise", help="a frame-wise world-model checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--fps", type=float, default=8, help="the most frames a second the page asks for")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bench", type=float, metavar="SECONDS", help="no page: a local client plays this long and "
                   "the last line is JSON with frames/s and resident memory (first report, last, max)")
    a = p.parse_args(argv)
    for name, value, ok in (("--fps", a.fps, 0 < a.fps < math.inf),
                            ("--bench", a.bench, a.bench is None or 0 < a.bench < math.inf),
                            ("--port", a.port, 0 <= a.port < 65536)):
        if not ok:
            T.die(f"{name} must be {'in 0..65535' if name == '--port' else 'positive and finite'}, got {value}")
    device = T.usable_device(a.device)
    stem = T.checkpoint_stem(a.ckpt)
    if not os.path.exists(stem + ".json"):
        T.die(f"no world model at {stem}.safetensors; train one first (docs: the world model) or pass --ckpt")
    new_world = load_world(stem, device)
    try:
        server = make_server(new_world, "127.0.0.1" if a.bench else a.host, 0 if a.bench else a.port, a.fps)
    except OSError as e:
        T.die(f"cannot listen on {a.host}:{a.port} ({e.strerror or e})")
    if a.bench:
        return bench(server, a.bench, report_every=min(60.0, a.bench / 2))
    print(f"playing {stem} at http://{a.host}:{server.server_address[1]}/ (Ctrl-C stops)", file=sys.stderr,
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()


if __name__ == "__main__":
    main()
