"""The Wan-scale path with tiny random models of the real classes (umT5, AutoencoderKLWan, our DiT) in the
diffusers folder layout: the VAE's frame pattern and streaming decode, umT5's zero padding, released
checkpoints converted without unpickling code, sample.py --model wan2.1-1.3b end to end, and FSDP2."""
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace

import imageio.v2 as imageio
import numpy as np
import pytest
import torch

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
        assert r.returncode == 0, r.stderr[-2000:]
    a, _ = T.load_checkpoint(str(tmp_path / "one" / "ckpt"))
    b, meta = T.load_checkpoint(str(tmp_path / "two" / "ckpt"))
    assert meta["step"] == 3 and a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    losses = lambda run: [json.loads(line)["loss"] for line in open(tmp_path / run / "log.jsonl")]
    assert losses("two") == pytest.approx(losses("one"), rel=1e-5)
