"""soup.py: the weight average of runs of one student, and its refusals."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import model as M
import sample
import soup
import trainer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = M.get_config("toy-tiny")


def run(stem, seed, guidance, cfg=CFG, **meta):
    torch.manual_seed(seed)
    net = M.build(cfg)
    torch.nn.init.normal_(net.head.head.weight, std=0.3)
    T.export(str(stem), net, {"kind": "student", "config": asdict(cfg), "init": "causal_cd_framewise",
                              "frames_per_block": 1, "steps_per_block": 2, "first_block_steps": 4,
                              "shift": cfg.shift, "real_guidance": guidance, **meta})
    return str(stem)


def test_the_soup_is_the_mean_of_the_runs_and_samples(tmp_path):
    a, b = run(tmp_path / "a", 0, 1.0), run(tmp_path / "b", 1, 0.0)
    soup.main([f"--out={tmp_path / 'ab'}.safetensors", a, b + ".safetensors"])  # a stem, with or without suffix
    assert sorted(os.listdir(tmp_path)) == sorted(f"{n}.{e}" for n in "a b ab".split() for e in ("json", "safetensors"))
    mixed, meta = T.load_checkpoint(str(tmp_path / "ab"))
    ta, _ = T.load_checkpoint(a)
    tb, _ = T.load_checkpoint(b)
    for k, v in mixed.items():
        assert v.dtype == ta[k].dtype
        assert torch.allclose(v.float(), ((ta[k].float() + tb[k].float()) / 2).to(v.dtype).float())
    assert not torch.equal(mixed["model.head.head.weight"], ta["model.head.head.weight"])
    assert "real_guidance" not in meta and meta["kind"] == "student" and meta["init"] == "causal_cd_framewise"
    assert meta["soup"] == [dict(stem=a, real_guidance=1.0), dict(stem=b, real_guidance=0.0)]  # no file tags
    sample.main(["--ckpt", str(tmp_path / "ab.safetensors"), "--num-frames", str(CFG.frames),
                 "--out", str(tmp_path / "v.png")])
    assert os.path.exists(tmp_path / "v.png")


@pytest.mark.parametrize("change, message", [
    (dict(meta={"timesteps": [1000.0, 250.0]}), "differs from"),
    (dict(meta={"init": "causal_ode_framewise"}), "differs from"),
    (dict(cfg=M.get_config("toy-tiny", num_layers=CFG.num_layers + 1)), "differs from"),
])
def test_runs_of_different_students_exit_2_with_one_line(tmp_path, change, message):
    a = run(tmp_path / "a", 0, 1.0)
    b = run(tmp_path / "b", 1, 0.0, change.get("cfg", CFG), **change.get("meta", {}))
    r = subprocess.run([sys.executable, "soup.py", f"--out={tmp_path / 'ab'}", a, b], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: ") and message in r.stderr, r.stderr
    assert len(r.stderr.strip().split("\n")) == 1 and not os.path.exists(tmp_path / "ab.json")


def test_bad_arguments_exit_2_with_one_line(tmp_path):
    a = run(tmp_path / "a", 0, 1.0)
    for args in ([f"--out={tmp_path / 'x'}", a], [a, a], [f"--out={tmp_path / 'x'}", a, str(tmp_path / "missing")],
                 ["--nope=1", a, a]):
        r = subprocess.run([sys.executable, "soup.py", *args], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().split("\n")) == 1, \
            (args, r.stderr)
