"""The Wan-scale path with tiny random models of the real classes (umT5, AutoencoderKLWan, our DiT) in the
diffusers folder layout: the VAE's frame pattern and streaming decode, umT5's zero padding, released
checkpoints converted without unpickling code, sample.py --model wan2.1-1.3b end to end, FSDP2, and the latent
data set: `wan.py encode`, data.LatentStream and the three stages trained on it."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, replace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import causal_cd
import data
import dmd
import model as M
import rollout
import sample
import teacher
import trainer as T
import wan

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a corgi runs on the beach at sunset".split()
# 128-wide heads like every Wan DiT (wan.config_from_state relies on it); latents 3 x 4 x 4 = 9 frames of 32x32
DIT = M.Config(dim=128, ffn_dim=64, num_heads=1, num_layers=1, freq_dim=32, text_dim=32, in_dim=4, out_dim=4,
               frames=3, height=4, width=4)


def converted(tmp_path, seed, name="cfpp"):
    """A tiny release converted by `wan.py convert`, its JSON then set to the tiny video size."""
    torch.save({"generator_ema": tiny_release(seed)}, tmp_path / f"{name}.pt")
    wan.main(["convert", str(tmp_path / f"{name}.pt"), str(tmp_path / f"{name}.safetensors"), "--ema"])
    meta = json.load(open(tmp_path / f"{name}.json"))
    json.dump({**meta, "config": asdict(DIT)}, open(tmp_path / f"{name}.json", "w"))
    return str(tmp_path / f"{name}.safetensors")


def tiny_release(seed):
    """A released-generator state dict of the tiny DiT: `model.`-prefixed official names, random head."""
    torch.manual_seed(seed)
    net = M.build(DIT)
    torch.nn.init.normal_(net.head.head.weight, std=0.3)
    return {"model." + k: v for k, v in net.state_dict().items()}


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    """tokenizer/, text_encoder/ and vae/ of a tiny Wan2.1-T2V-Diffusers folder, built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    folder = tmp_path_factory.mktemp("wan")
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(folder / "tokenizer")
    torch.manual_seed(0)
    transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=len(vocab), d_model=DIT.text_dim, d_kv=8, d_ff=16, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8)).save_pretrained(folder / "text_encoder")
    diffusers.AutoencoderKLWan(base_dim=8, z_dim=DIT.in_dim, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                               latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]
                               ).save_pretrained(folder / "vae")
    return folder


def test_vae_frame_pattern_normalisation_and_streaming_decode(wan_dir):
    vae = wan.load_vae(str(wan_dir))
    g = torch.Generator().manual_seed(0)
    for frames, latents in ((1, 1), (5, 2), (9, 3)):  # 4n + 1 frames <-> n + 1 latents
        z = vae.encode(torch.rand(1, 3, frames, 32, 32, generator=g) * 2 - 1)
        assert z.shape == (1, 4, latents, 4, 4)
        assert vae.decode(z).shape == (1, 3, frames, 32, 32)
    raw = vae.vae.encode(torch.zeros(1, 3, 1, 32, 32)).latent_dist.mode()
    expected = (raw - torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)) / torch.tensor([1.5, 0.5, 2.0, 1.0]).view(1, 4, 1, 1, 1)
    assert torch.allclose(vae.encode(torch.zeros(1, 3, 1, 32, 32)), expected, atol=1e-6)
    z = torch.randn(2, 4, 3, 4, 4, generator=g)
    feed = vae.stream()
    parts = [feed(z[:, :, i:i + 1]) for i in range(3)]
    assert [p.shape[2] for p in parts] == [1, 4, 4]  # the first latent is one frame, each later one four
    assert torch.allclose(torch.cat(parts, dim=2), vae.decode(z), atol=1e-5)


def test_text_encoder_keeps_the_prompt_and_zero_pads_to_512(wan_dir):
    text = wan.load_text_encoder(str(wan_dir))
    ctx = text(["a corgi runs", "  the corgi runs on the beach  at sunset "])
    assert ctx.shape == (2, 512, DIT.text_dim)
    assert ctx[0, :4].abs().min() > 0 and ctx[0, 4:].abs().max() == 0  # 3 words + </s>, then zeros
    assert ctx[1, :9].abs().min() > 0 and ctx[1, 9:].abs().max() == 0
    ids = text.tokenizer(["a corgi runs"], return_tensors="pt").input_ids  # unpadded: Wan's "cut to the real length"
    with torch.no_grad():
        alone = text.encoder(input_ids=ids).last_hidden_state
    assert torch.allclose(ctx[0, :4], alone[0], atol=1e-5)
    assert wan.clean_prompt(" a &amp;amp; b\n\tc ") == "a & b c"


def test_convert_reads_tensors_only_and_writes_a_sampler_checkpoint(tmp_path, capsys):
    pt = tmp_path / "framewise-2step.pt"
    torch.save({"generator": tiny_release(1), "generator_ema": tiny_release(2)}, pt)
    out = tmp_path / "cfpp.safetensors"
    wan.main(["convert", str(pt), str(out), "--ema"])
    dit, meta = wan.load_dit(str(out))
    assert meta["kind"] == "student" and meta["source"] == "framewise-2step.pt[generator_ema]"
    assert (meta["frames_per_block"], meta["steps_per_block"], meta["first_block_steps"]) == (1, 2, 4)
    assert M.config_from_dict(meta["config"]) == replace(DIT, frames=21, height=60, width=104)  # Wan's 81 x 480 x 832
    for k, v in dit.state_dict().items():
        assert torch.equal(v, tiny_release(2)["model." + k]), k
    capsys.readouterr()

    def refused(src, *flags):
        with pytest.raises(SystemExit) as stop:
            wan.main(["convert", str(src), str(tmp_path / "x.safetensors"), *flags])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
        return err

    torch.save({"generator": tiny_release(1)}, tmp_path / "no_ema.pt")
    assert "no 'generator_ema'" in refused(tmp_path / "no_ema.pt", "--ema")
    torch.save({"generator": {"model.x.weight": torch.zeros(3)}}, tmp_path / "other.pt")
    assert "not a Wan DiT" in refused(tmp_path / "other.pt")
    assert "cannot be read" in refused(tmp_path / "missing.pt")
    assert not (tmp_path / "x.safetensors").exists()


class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_convert_refuses_a_pickle_that_runs_code(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"generator": tiny_release(0), "extra": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(SystemExit) as stop:
        wan.main(["convert", str(tmp_path / "evil.pt"), str(tmp_path / "out.safetensors")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "needs code to unpickle" in err and err.count("\n") == 1, err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_damaged_or_misfit_inputs_are_one_line(tmp_path, capsys):
    """A Wan folder with damaged weights, a block size that does not divide the 21 latent frames, a place
    that cannot be written: each exits 2 with one line."""
    folder = tmp_path / "wan"
    wan_base(folder, 0)
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"\x00" * 64)
    torch.save({"generator_ema": tiny_release(0)}, tmp_path / "r.pt")
    for call, message in ((lambda: wan.load_dit(str(folder)), "is not a Wan DiT folder"),
                          (lambda: wan.main(["convert", str(tmp_path / "r.pt"), str(tmp_path / "o.safetensors"), "--ema",
                                             "--frames-per-block=4"]), "does not divide the model's 21 latent frames"),
                          (lambda: wan.main(["convert", str(tmp_path / "r.pt"), str(tmp_path / "r.pt" / "o"), "--ema"]),
                           "cannot write checkpoint")):
        with pytest.raises(SystemExit) as stop:
            call()
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, err


def test_a_13b_shaped_release_reads_as_the_13b_preset(tmp_path):
    """A release file of the real 1.3B shapes, on the meta device (no memory): the loader infers the preset."""
    sd = M.build("wan2.1-1.3b", device="meta").state_dict()
    torch.save({"generator_ema": {"model." + k: v for k, v in sd.items()}}, tmp_path / "release.pt")
    state, cfg = wan.read_release(str(tmp_path / "release.pt"), ema=True)
    assert cfg == M.get_config("wan2.1-1.3b") and len(state) == 825


def test_sample_wan_streams_an_mp4_that_equals_decoding_the_rollout(wan_dir, tmp_path, monkeypatch):
    ckpt = converted(tmp_path, 3)
    monkeypatch.setitem(M.PRESETS, "wan2.1-1.3b", DIT)  # the preset whose architecture --ckpt must have
    events = []
    real_denoise, real_feed = rollout.denoise_block, wan.VAE.stream
    monkeypatch.setattr(rollout, "denoise_block", lambda *a, **k: events.append("dit") or real_denoise(*a, **k))
    monkeypatch.setattr(wan.VAE, "stream", lambda self: (lambda f: (lambda z: events.append("vae") or f(z)))(real_feed(self)))
    out, npy = tmp_path / "corgi.mp4", tmp_path / "corgi.npy"
    sample.main(["--model", "wan2.1-1.3b", "--wan-dir", str(wan_dir), "--ckpt", ckpt,
                 "--prompt", "a corgi runs on the beach", "--seed", "5", f"--out={out}", f"--save-npy={npy}"])
    assert events == ["dit", "vae"] * 3  # each latent frame is decoded before the next one is generated
    video = np.load(npy)
    assert video.shape == (1, 9, 32, 32, 3) and video.dtype == np.uint8
    frames = imageio.mimread(out)
    assert len(frames) == 9 and frames[0].shape == (32, 32, 3)
    with imageio.get_reader(out) as reader:
        assert reader.get_meta_data()["fps"] == 16

    # the same video by hand: umT5 context, the rollout's latents, one full VAE decode
    dit, _ = wan.load_dit(ckpt)
    context = wan.load_text_encoder(str(wan_dir))(["a corgi runs on the beach"])
    g = torch.Generator().manual_seed(5)
    noise = torch.randn(1, 4, 3, 4, 4, generator=g)
    with torch.no_grad():
        z = rollout.generate(dit, context, noise, frames_per_block=1, steps=M.timesteps(2).tolist(),
                             first_steps=M.timesteps(4).tolist(), generator=g)
    expected = ((wan.load_vae(str(wan_dir)).decode(z).clamp(-1, 1) + 1) * 127.5).round()
    assert (torch.from_numpy(video).permute(0, 4, 1, 2, 3).float() - expected).abs().max() <= 1


def test_sample_wan_bad_input_is_one_line(wan_dir, tmp_path, capsys):
    ckpt = converted(tmp_path, 0)
    capsys.readouterr()
    cases = [([], "needs --wan-dir"), (["--wan-dir", str(tmp_path), "--ckpt", ckpt], "has no tokenizer/"),
             (["--wan-dir", str(wan_dir), "--ckpt", ckpt], "not wan2.1-1.3b"),
             (["--wan-dir", str(wan_dir), "--ckpt", ckpt, "--out=x.gif"], "writes .mp4"),
             (["--wan-dir", str(wan_dir), "--ckpt", ckpt, "--guidance=3"], "guidance-free")]
    for args, message in cases:
        with pytest.raises(SystemExit) as stop:
            sample.main(["--model", "wan2.1-1.3b", *args])
        err = capsys.readouterr().err
        assert stop.value.code == 2 and message in err and err.count("\n") == 1, (args, err)


@pytest.mark.slow
def test_fsdp2_two_ranks_train_and_resume_exactly_as_one_process(tmp_path):
    """torchrun, 2 gloo ranks, FSDP2: 2 steps, a sharded checkpoint gathered to rank 0, then a resume (with
    activation checkpointing) to step 3; weights, EMA and AdamW state equal the one-process run."""
    tiny = ["--model=toy-tiny", "--batch_size=4", "--log_every=1", "--bf16=false", "--warmup=2", "--ckpt_every=2"]
    teacher.main(tiny + ["--steps=3", f"--out={tmp_path / 'one'}"])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for steps, extra in ((2, []), (3, ["--checkpointing=true"])):
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                            "teacher.py", *tiny, f"--steps={steps}", "--parallel=fsdp", *extra,
                            f"--out={tmp_path / 'two'}"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr  # whole: a rank's own error sits above the launcher's report
    a, _ = T.load_checkpoint(str(tmp_path / "one" / "ckpt"))
    b, meta = T.load_checkpoint(str(tmp_path / "two" / "ckpt"))
    assert meta["step"] == 3 and a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    losses = lambda run: [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)


# ----------------------------------------------------------------------------------------------------
# the latent data set and the stages on it

PROMPTS = {"a": "a corgi runs", "b": "the beach at sunset", "c": "a corgi on the beach"}  # 4, 5, 6 umT5 rows
ENCODE = ["--frames", "9", "--height", "32", "--width", "32", "--device", "cpu", "--shard-size", "2"]  # DIT's 3x4x4


def encode(wan_dir, videos, out, *flags):
    wan.main(["encode", "--wan-dir", str(wan_dir), "--videos", str(videos), "--out", str(out), *(flags or ENCODE)])


@pytest.fixture(scope="module")
def latent_set(wan_dir, tmp_path_factory):
    """clips/: three mp4s of three sizes (10-12 frames) with their prompts; data/: them encoded, 2 + 1 clips."""
    root = tmp_path_factory.mktemp("latents")
    (root / "clips").mkdir()
    for (name, prompt), (h, w, n) in zip(PROMPTS.items(), ((48, 64, 10), (32, 32, 9), (64, 48, 12))):
        y, x = np.mgrid[:h, :w]
        video = [np.stack([(4 * x + 9 * t) % 256, 4 * y % 256, np.full_like(x, 20 * t)], -1) for t in range(n)]
        imageio.mimwrite(root / "clips" / f"{name}.mp4", np.array(video, np.uint8), fps=16)
        (root / "clips" / f"{name}.txt").write_text(prompt + "\n")
    encode(wan_dir, root / "clips", root / "data")
    return root


def one_line_exit_2(capsys, call, message):
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_read_video_scales_crops_and_takes_the_first_frames(tmp_path):
    wide = np.zeros((6, 32, 64, 3), np.uint8)  # red | grey 40 t | green: the crop keeps only the grey middle
    wide[:, :, :16, 0], wide[:, :, 48:, 1] = 255, 255
    wide[:, :, 16:48] = (40 * np.arange(6))[:, None, None, None]
    imageio.mimwrite(tmp_path / "wide.mp4", wide, fps=16)
    clip = wan.read_video(str(tmp_path / "wide.mp4"), 5, 32, 32)
    assert clip.shape == (3, 5, 32, 32)
    grey = torch.tensor(40 * np.arange(5) / 127.5 - 1, dtype=torch.float32).view(1, 5, 1, 1)
    assert (clip - grey).abs().max() < 0.1  # no red or green left, frames in order
    tall = np.zeros((1, 64, 64, 3), np.uint8)
    tall[:, :32] = 255  # scaled by 1/2: the top half white, the bottom black
    imageio.mimwrite(tmp_path / "big.mp4", tall, fps=16)
    clip = wan.read_video(str(tmp_path / "big.mp4"), 1, 32, 32)
    assert clip.shape == (3, 1, 32, 32) and clip[:, :, :14].min() > 0.9 and clip[:, :, 18:].max() < -0.9


def test_encode_writes_shards_of_latents_and_real_umt5_rows(wan_dir, latent_set):
    folder = latent_set / "data"
    assert sorted(os.listdir(folder)) == ["index.json", "shard_00000.safetensors", "shard_00001.safetensors"]
    index = json.load(open(folder / "index.json"))
    assert (index["latent_shape"], index["text_dim"], index["text_len"], index["shards"]) == ([4, 3, 4, 4], 32, 512, [2, 1])
    assert index["videos"] == str(latent_set / "clips") and index["wan_dir"] == str(wan_dir)
    shards = [load_file(folder / f"shard_0000{i}.safetensors") for i in (0, 1)]
    assert [s["lengths"].tolist() for s in shards] == [[4, 5], [6]]  # words + </s>: the rows stored, no padding
    assert [s["context"].shape for s in shards] == [(9, 32), (6, 32)] and shards[0]["latents"].dtype == torch.bfloat16
    vae = wan.load_vae(str(wan_dir))
    for j, name in enumerate(PROMPTS):  # sorted by name: a, b in shard 0, c in shard 1
        z = vae.encode(wan.read_video(str(latent_set / "clips" / f"{name}.mp4"), 9, 32, 32)[None])
        assert torch.equal(shards[j // 2]["latents"][j % 2], z[0].bfloat16()), name
    context, lengths = wan.load_text_encoder(str(wan_dir)).encode(list(PROMPTS.values()))
    got = data.LatentStream(str(folder), 3).contexts([0, 1, 2])  # re-padded to 512 rows, float32
    assert got.shape == (3, 512, 32) and got.dtype == torch.float32
    torch.testing.assert_close(got, context, atol=1e-2, rtol=1e-2)  # bf16 storage
    for row, n in zip(got, lengths.tolist()):
        assert row[:n].abs().min() > 0 and (row[n:] == 0).all()


def test_encode_resumes_at_the_missing_shards(wan_dir, latent_set, tmp_path, monkeypatch, capsys):
    folder = latent_set / "data"
    done, redo = folder / "shard_00000.safetensors", folder / "shard_00001.safetensors"
    stamp, before = done.stat().st_mtime_ns, load_file(redo)
    redo.unlink()
    (folder / "index.json").unlink()
    calls, real_encode = [], wan.VAE.encode
    monkeypatch.setattr(wan.VAE, "encode", lambda self, video: calls.append(1) or real_encode(self, video))
    encode(wan_dir, latent_set / "clips", folder)
    assert len(calls) == 1 and done.stat().st_mtime_ns == stamp  # only shard 1's clip was encoded
    assert all(torch.equal(v, before[k]) for k, v in load_file(redo).items()) and (folder / "index.json").exists()
    monkeypatch.setattr(wan, "load_vae", lambda *a: pytest.fail("nothing to encode, yet the VAE was loaded"))
    encode(wan_dir, latent_set / "clips", folder)  # all done: rewrites the index only
    one_line_exit_2(capsys, lambda: encode(wan_dir, latent_set / "clips", folder, *ENCODE[:-1], "3"), "other clips or sizes")


def test_encode_bad_input_is_one_line(wan_dir, latent_set, tmp_path, capsys):
    clips = latent_set / "clips"
    (tmp_path / "empty").mkdir()
    (tmp_path / "mute").mkdir()
    shutil.copy(clips / "a.mp4", tmp_path / "mute" / "a.mp4")
    out = tmp_path / "out"
    cases = [((clips, "--frames", "8"), "4n + 1"), ((clips, "--height", "40"), "multiples of 16"),
             ((clips, "--shard-size", "0"), "--shard-size"), ((tmp_path / "empty",), "no .mp4"),
             ((tmp_path / "mute",), "needs its prompt in a.txt")]
    for (videos, *flags), message in cases:
        one_line_exit_2(capsys, lambda: encode(wan_dir, videos, out, *ENCODE, *flags), message)
    with pytest.raises(SystemExit) as stop:  # found mid-run, after the models' and the progress bar's output
        encode(wan_dir, clips, out, *ENCODE, "--frames", "13")
    assert stop.value.code == 2 and capsys.readouterr().err.endswith("a.mp4 has 10 frames; --frames 13 takes the first 13\n")
    one_line_exit_2(capsys, lambda: encode(tmp_path, clips, out), "has no tokenizer/")
    assert not (out / "index.json").exists()


def test_latent_stream_is_deterministic_and_shuffles_whole_epochs(latent_set, tmp_path, capsys):
    folder = str(latent_set / "data")
    every = torch.cat([load_file(latent_set / "data" / f"shard_0000{i}.safetensors")["latents"] for i in (0, 1)]).float()
    which = lambda video: [int(((every - v).abs().amax(dim=(1, 2, 3, 4)) == 0).nonzero()) for v in video]
    stream = data.LatentStream(folder, 3, seed=1)
    batches = [next(stream) for _ in range(4)]
    orders = [which(b["video"]) for b in batches]
    assert all(sorted(order) == [0, 1, 2] for order in orders) and len(set(map(tuple, orders))) > 1  # epochs
    for b, order in zip(batches, orders):  # each clip comes with its own prompt
        assert b["video"].dtype == torch.float32 and torch.equal(b["context"], stream.contexts(order))
    resumed = next(data.LatentStream(folder, 3, seed=1, start_batch=2))
    assert torch.equal(resumed["video"], batches[2]["video"]) and torch.equal(resumed["context"], batches[2]["context"])
    other = data.LatentStream(folder, 3, seed=2)
    assert [which(next(other)["video"]) for _ in range(4)] != orders
    pairs = data.LatentStream(folder, 2, seed=1)  # batches across the epoch boundary: the same sequence
    assert sum((which(next(pairs)["video"]) for _ in range(6)), []) == sum(orders, [])

    one_line_exit_2(capsys, lambda: data.LatentStream(str(tmp_path), 2), "no index.json")
    shutil.copytree(folder, tmp_path / "bad")
    json.dump({**json.load(open(tmp_path / "bad" / "index.json")), "shards": [2, 2]}, open(tmp_path / "bad" / "index.json", "w"))
    one_line_exit_2(capsys, lambda: data.LatentStream(str(tmp_path / "bad"), 2), "disagree")
    (tmp_path / "bad" / "shard_00001.safetensors").unlink()
    one_line_exit_2(capsys, lambda: data.LatentStream(str(tmp_path / "bad"), 2), "not a readable latent data set")


def wan_base(folder, seed):
    """A tiny Wan DiT folder (config.json + diffusion_pytorch_model.safetensors), as --init / --real read it."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(asdict(DIT)))
    state = {k[len("model."):]: v for k, v in tiny_release(seed).items()}
    for k in ("text_embedding.0.weight", "text_embedding.2.weight"):  # a fresh 0.02 std barely hears the prompt:
        state[k] = state[k] * 15  # DMD's guided real score would then hardly move G, and AdamW's first steps
    save_file(state, folder / "diffusion_pytorch_model.safetensors")  # would amplify rounding (1 vs 2 ranks)
    return str(folder)


def torchrun(tmp_path, stage, *args):
    """`torchrun --nproc_per_node=2 STAGE.py ARGS` with the 1.3B preset set to the tiny DiT in every rank."""
    launcher = tmp_path / f"tiny_{stage}.py"
    launcher.write_text(f"import sys\nimport model\nimport {stage}\nfrom model import Config\n"
                        f"model.PRESETS['wan2.1-1.3b'] = {DIT!r}\n{stage}.main(sys.argv[1:])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        str(launcher), *args], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def same_run(a, b):
    """Two run folders hold the same checkpoint (weights, EMA, AdamW) and logged the same values."""
    ta, _ = T.load_checkpoint(str(a / "ckpt"))
    tb, _ = T.load_checkpoint(str(b / "ckpt"))
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.allclose(ta[k], tb[k], atol=1e-5), k
    log = lambda run: [{k: v for k, v in json.loads(line).items() if k != "wall_s"} for line in open(run / "log.jsonl")]
    assert log(a) == [pytest.approx(record, rel=1e-5) for record in log(b)] and len(log(a)) > 1


@pytest.mark.slow
def test_teacher_on_latents_trains_the_wan_preset_and_fsdp_matches_one_process(latent_set, tmp_path, monkeypatch):
    monkeypatch.setitem(M.PRESETS, "wan2.1-1.3b", DIT)
    folder, base = str(latent_set / "data"), wan_base(tmp_path / "base", 4)
    stream = data.LatentStream(folder, 2)
    cfg = dict(teacher.DEFAULTS, stage="ar", batch_size=2, shift=5.0, train_shift=5.0, weighting="bell")
    for step in (0, 1):  # the step's batch of the stream: latents with their own contexts
        x0, text, _, _, _ = teacher.make_batch(dict(cfg, prompt_dropout=0.0), step, 3, stream)
        assert torch.equal(x0, stream.at(step)["video"]) and torch.equal(text, stream.at(step)["context"])
    assert (teacher.make_batch(dict(cfg, prompt_dropout=1.0), 0, 3, stream)[1] == 0).all()  # the empty prompt
    args = ["--stage=ar", "--model=wan2.1-1.3b", f"--data={folder}", f"--init={base}", "--batch_size=2", "--steps=2",
            "--log_every=1", "--bf16=false", "--warmup=2", "--prompt_dropout=0.5"]
    teacher.main(args + [f"--out={tmp_path / 'one'}"])
    first = teacher.loss_fn(wan.load_dit(base)[0], dict(cfg, prompt_dropout=0.5),
                            *teacher.make_batch(dict(cfg, prompt_dropout=0.5), 0, 3, stream)[:4])
    assert json.loads(open(tmp_path / "one" / "log.jsonl").readline())["loss"] == pytest.approx(first.item(), rel=1e-5)
    torchrun(tmp_path, "teacher", *args, "--parallel=fsdp", "--checkpointing=true", f"--out={tmp_path / 'two'}")
    same_run(tmp_path / "one", tmp_path / "two")


@pytest.mark.slow
def test_causal_cd_and_dmd_take_their_steps_on_latents(latent_set, tmp_path):
    folder, stream = str(latent_set / "data"), data.LatentStream(str(latent_set / "data"), 2)
    torch.manual_seed(5)
    ar = str(tmp_path / "ar")
    T.export(ar, wan.load_dit(wan_base(tmp_path / "base", 5))[0], {"kind": "ar_teacher", "config": asdict(DIT),
                                                                    "frames_per_block": 1, "shift": DIT.shift})
    b = causal_cd.make_batch(dict(causal_cd.DEFAULTS, batch_size=2), 0, slice(0, 2), 3, M.timesteps(48), None,
                             latents=stream)
    assert torch.equal(b["gt"], stream.at(0)["video"]) and torch.equal(b["tokens"], stream.at(0)["context"])
    student = str(tmp_path / "student")
    args = [f"--teacher={ar}", f"--data={folder}", "--steps=2", "--batch_size=2", "--bf16=false", "--log_every=1"]
    causal_cd.main(args + [f"--out={tmp_path / 'cd'}", f"--export={student}"])
    assert json.loads(open(tmp_path / "cd" / "log.jsonl").readline())["loss"] > 0
    torchrun(tmp_path, "causal_cd", *args, "--parallel=fsdp", "--checkpointing=true", f"--out={tmp_path / 'cd2'}")
    same_run(tmp_path / "cd", tmp_path / "cd2")

    sched = dmd.schedule(1, 2, DIT.shift)
    b = dmd.make_batch(dict(seed=0, batch_size=4), 0, 0, (4, 3, 4, 4), sched, DIT.shift, latents=stream)
    every = stream.contexts([0, 1, 2])
    assert all(any(torch.equal(row, c) for c in every) for row in b["tokens"])  # the set's prompts, at random
    args = [f"--init={student}", f"--real={tmp_path / 'base'}", f"--data={folder}", "--steps=2", "--critic_updates=1",
            "--batch_size=2", "--bf16=false", "--log_every=1"]
    dmd.main(args + [f"--out={tmp_path / 'dmd'}"])
    logged = json.loads(open(tmp_path / "dmd" / "log.jsonl").readline())
    assert logged["gen_grad_norm"] > 0 and logged["critic_loss"] > 0  # both networks took their step
    torchrun(tmp_path, "dmd", *args, "--parallel=fsdp", "--checkpointing=true", f"--out={tmp_path / 'dmd2'}")
    same_run(tmp_path / "dmd", tmp_path / "dmd2")


def test_stages_refuse_latents_that_do_not_fit(latent_set, tmp_path, monkeypatch, capsys):
    folder = str(latent_set / "data")
    monkeypatch.setitem(M.PRESETS, "wan2.1-1.3b", replace(DIT, frames=5))
    run = lambda *args: lambda: teacher.main([f"--data={folder}", f"--out={tmp_path / 'x'}", *args])
    one_line_exit_2(capsys, run("--model=toy-tiny"), "toy-world model")
    one_line_exit_2(capsys, run("--model=wan2.1-1.3b"), "takes latents [4, 5, 4, 4]")
    one_line_exit_2(capsys, run("--model=wan2.1-1.3b", "--eval_every=2"), "do not apply")
    one_line_exit_2(capsys, lambda: teacher.main([f"--data={tmp_path}", "--model=wan2.1-1.3b"]), "no index.json")
    one_line_exit_2(capsys, lambda: causal_cd.main([f"--data={folder}", "--method=ode"]), "--method=cd")
