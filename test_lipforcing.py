"""
Tests for lipforcing. Each states the invariant it checks in its docstring and compares against
an independent reference where one exists. Run: python -m pytest -q test_lipforcing.py
"""

import math
import os
import subprocess

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import torch

import lipforcing as L
from lipforcing import (FPS, SAMPLE_RATE, SAMPLES_PER_FRAME, MediaError, atomic_path, has_audio,
                        read_audio, read_video, resample_audio, write_audio, write_video)


GOLDEN_MOUTH = [[0.0, 0.4000000059604645, 0.0], [0.28870001435279846, 0.5684000253677368, 0.3368000090122223], [0.0012000000569969416, 0.40059998631477356, 0.001500000013038516], [0.13429999351501465, 0.35519999265670776, 0.04479999840259552], [0.16189999878406525, 0.7581999897956848, 0.9753000140190125]]  # train clip 0, frames 0, 10, .., 40


def assert_close(a, b, atol, msg=""):
    """allclose that reports the max and mean absolute error when it fails."""
    err = (torch.as_tensor(a) - torch.as_tensor(b)).abs()
    assert err.max() <= atol, f"{msg} max err {err.max():.3g}, mean err {err.mean():.3g} (atol {atol})"


# -----------------------------------------------------------------------------
# SynthTalk


def test_corpus_is_deterministic():
    """Clip i of a split is identical every time it is made; other clips differ."""
    a, b = L.synthtalk_clip("train", 7, 1.0), L.synthtalk_clip("train", 7, 1.0)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.audio, b.audio)
    assert np.array_equal(a.mouth, b.mouth)
    c = L.synthtalk_clip("train", 8, 1.0)
    assert not np.array_equal(a.frames, c.frames) and not np.allclose(a.mouth, c.mouth)


def test_corpus_golden_values():
    """The speech of train clip 0 matches values recorded when the corpus was defined, so a change
    to the generator (which would silently change every number in README) is caught."""
    c = L.synthtalk_clip("train", 0, 2.0)
    assert c.frames.shape == (50, 64, 64, 3) and c.audio.shape == (50 * SAMPLES_PER_FRAME,)
    assert_close(c.mouth[::10], torch.tensor(GOLDEN_MOUTH), 1e-4, "mouth trajectory")


def _identity_key(ident):
    return tuple(np.round(np.concatenate([np.ravel(v) for v in ident.values()]), 6))


def test_identities_distinct_and_splits_disjoint():
    """10,000 train identities are pairwise distinct, and no test identity appears among them."""
    train = {_identity_key(L.synth_identity(L.seeded_rng(L.SPLITS["train"], i, 0))) for i in range(10_000)}
    assert len(train) == 10_000
    test = {_identity_key(L.synth_identity(L.seeded_rng(L.SPLITS["test"], i, 0))) for i in range(L.TEST_CLIPS)}
    assert len(test) == L.TEST_CLIPS and not (train & test)


def test_mouth_follows_the_audio_only():
    """The same speech drawn for two different speakers' faces and head motions gives the same
    mouth trajectory; during silence the lips rest closed, and the mouth moves when speech does."""
    voice = L.synth_identity(L.seeded_rng(1, 0, 0))
    a1, m1 = L.synth_speech(L.seeded_rng(9, 9, 9), voice, 100)
    a2, m2 = L.synth_speech(L.seeded_rng(9, 9, 9), voice, 100)
    assert np.array_equal(m1, m2) and np.array_equal(a1, a2)
    rms = np.sqrt((a1.reshape(100, -1) ** 2).mean(1))
    silent = rms < 0.003
    speaking = rms > 0.03
    assert silent.any() and speaking.any()
    assert m1[silent, 0].max() < 0.1                       # mouth closed in silence
    assert m1[speaking, 0].std() > 0.1                      # and moving while speaking


def test_test_split_has_a_different_dub_track():
    """Each test clip carries a second driving audio, different from its own, with its own mouth."""
    c = L.synthtalk_clip("test", 0, 2.0)
    assert c.dub_audio.shape == c.audio.shape and c.dub_mouth.shape == c.mouth.shape
    assert np.abs(c.dub_mouth - c.mouth).mean() > 0.05


def test_render_any_resolution():
    """The same clip renders at 128 px as a sharper version of the 64 px picture."""
    c = L.synthtalk_clip("test", 1, 0.2, size=64)
    big = L.synthtalk_clip("test", 1, 0.2, size=128)
    down = L.resize_frames(big.frames, 64)
    assert big.frames.shape[1:3] == (128, 128)
    assert np.abs(down.astype(float) - c.frames).mean() < 4


# -----------------------------------------------------------------------------
# audio front end


def test_log_mel_is_frame_aligned_and_causal_in_prefix():
    """4 mel frames per video frame, and the features of the first k frames do not change when more
    audio follows (zero padding, no look-ahead beyond the 25 ms window into the next frame)."""
    audio = torch.randn(10 * SAMPLES_PER_FRAME)
    full = L.log_mel(audio)
    assert full.shape == (10 * L.MELS_PER_FRAME, L.N_MELS)
    longer = L.log_mel(torch.cat([audio, torch.randn(5 * SAMPLES_PER_FRAME)]))
    assert_close(longer[:9 * L.MELS_PER_FRAME], full[:9 * L.MELS_PER_FRAME], 1e-4)


def test_log_mel_places_a_tone_in_the_right_band():
    """A 1 kHz tone peaks in the mel band whose centre is nearest 1 kHz."""
    t = torch.arange(4 * SAMPLES_PER_FRAME) / SAMPLE_RATE
    mel = L.log_mel(torch.sin(2 * torch.pi * 1000 * t))
    centres = (L.mel_filterbank().numpy() * np.linspace(0, SAMPLE_RATE / 2, L.MEL_FFT // 2 + 1)[:, None]).sum(0) \
        / L.mel_filterbank().numpy().sum(0)
    assert int(mel[4:-4].mean(0).argmax()) == int(np.abs(centres - 1000).argmin())


# -----------------------------------------------------------------------------
# video autoencoder


def test_ae_latent_layout():
    """1 + 4k frames -> 1 + k latent frames of 16 channels at 1/8 size, and back to 1 + 4k frames."""
    ae = L.VideoAE(L.AEConfig())
    x = torch.rand(2, 9, 3, 64, 32) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 3, 16, 8, 4)
    assert ae.decode(z)[0].shape == x.shape


def test_ae_streaming_decode_equals_whole_decode():
    """Decoding latents chunk by chunk (1, then 3, then 3 latent frames) with the carried memory
    gives the same frames as decoding the whole clip at once."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig()).eval().double()     # float64: compare structure, not rounding
    for p in ae.parameters():                 # a fresh model is near-linear; make it bite
        p.data += 0.05 * torch.randn_like(p)
    z = torch.randn(1, 7, 16, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        whole, _ = ae.decode(z)
        parts, mem = [], None
        for a, b in ((0, 1), (1, 4), (4, 7)):
            out, mem = ae.decode(z[:, a:b], mem)
            parts.append(out)
        streamed = torch.cat(parts, 1)
        assert streamed.shape == whole.shape == (1, 25, 3, 64, 64)
        assert_close(streamed, whole, 1e-5, "streamed vs whole decode")
        # and the memory matters: decoding the last chunk without it gives different frames
        alone, _ = ae.decode(z[:, 4:7], [m * 0 for m in mem])
        assert (alone - whole[:, -12:]).abs().max() > 1e-3


def test_checkpoint_round_trip(tmp_path):
    """A checkpoint rebuilds its model from the config stored inside it, with identical outputs."""
    cfg = L.AEConfig(width=16, seed=3)
    ae = L.VideoAE(cfg).eval()
    p = tmp_path / "ae.safetensors"
    L.save_checkpoint(p, ae, cfg, extra={"psnr": 1.5})
    ae2, cfg2, extra = L.load_checkpoint(p, L.AEConfig, L.VideoAE)
    assert cfg2 == cfg and extra == {"psnr": 1.5}
    x = torch.rand(1, 5, 3, 32, 32)
    assert torch.equal(ae(x), ae2(x))
    with pytest.raises(ValueError):
        L.load_checkpoint(p, L.SyncNetConfig, L.SyncNet)


# -----------------------------------------------------------------------------
# sync metrics


def syncnet_python_scores(feat1, feat2, vshift):
    """A straight numpy port of syncnet_python (SyncNetInstance.evaluate + calc_pdist)."""
    win_size = vshift * 2 + 1
    feat2p = np.pad(feat2, ((vshift, vshift), (0, 0)))
    dists = []
    for i in range(len(feat1)):
        diff = np.repeat(feat1[[i], :], win_size, 0) - feat2p[i:i + win_size, :] + 1e-6  # pairwise_distance eps
        dists.append(np.sqrt((diff ** 2).sum(1)))
    mdist = np.mean(np.stack(dists, 1), 1)
    minidx = int(np.argmin(mdist))
    minval = mdist[minidx]
    return vshift - minidx, minval, np.median(mdist) - minval


@pytest.mark.parametrize("shift", [0, 4, -7])
def test_sync_scores_match_the_published_algorithm(shift):
    """sync_scores equals the numpy port of syncnet_python on random embeddings, and recovers a
    planted offset: audio embeddings that match the video `shift` frames later give av_offset -shift."""
    rng = np.random.default_rng(shift + 10)
    N, D = 120, 32
    v = rng.normal(size=(N, D)).astype(np.float32)
    a = np.roll(v, shift, axis=0) + 0.3 * rng.normal(size=(N, D)).astype(np.float32)
    ours = L.sync_scores(torch.from_numpy(v), torch.from_numpy(a), vshift=15)
    ref = syncnet_python_scores(v.astype(np.float64), a.astype(np.float64), 15)
    assert ours[0] == ref[0] == -shift
    assert abs(ours[1] - ref[1]) < 1e-4 and abs(ours[2] - ref[2]) < 1e-4
    # and on unrelated embeddings (no planted offset) they still agree
    b = rng.normal(size=(N, D)).astype(np.float32)
    ours, ref = L.sync_scores(torch.from_numpy(v), torch.from_numpy(b)), syncnet_python_scores(v, b, 15)
    assert ours[0] == ref[0] and abs(ours[1] - ref[1]) < 1e-4 and abs(ours[2] - ref[2]) < 1e-4


def test_sync_embeddings_window_count():
    """syncnet_python evaluates T - 5 windows of a T-frame clip; so do we."""
    net = L.SyncNet(L.SyncNetConfig()).eval()
    v, a = L.sync_embeddings(net, torch.rand(30, 3, 64, 64) * 2 - 1, np.zeros(30 * SAMPLES_PER_FRAME, np.float32))
    assert v.shape == a.shape == (25, net.cfg.embed)


def test_contrastive_loss_reference():
    """contrastive_loss equals the formula written out by hand."""
    d = torch.tensor([[0.5, 3.0], [12.0, 2.0]])
    same = torch.eye(2)
    expected = (0.5 ** 2 + 2.0 ** 2 + (10 - 3.0) ** 2 + 0) / 4 / 2
    assert abs(L.contrastive_loss(d, same, 10.0).item() - expected) < 1e-6


# -----------------------------------------------------------------------------
# data from a folder of real clips


def test_training_reads_a_folder_of_clips(tmp_path):
    """SynthTalk clips written to disk as mp4 with audio are read back by --data and trained on."""
    import train
    for i in range(2):
        c = L.synthtalk_clip("train", i, 1.0)
        write_video(tmp_path / f"clip{i}.mp4", c.frames, c.audio)
    pool = L.folder_pool(tmp_path, 64, progress=False)
    assert len(pool) == 2 and pool[0].frames.shape == (25, 64, 64, 3)
    assert pool[0].audio.shape == (25 * SAMPLES_PER_FRAME,)
    ref = L.synthtalk_clip("train", 0, 1.0)
    assert np.abs(pool[0].frames.astype(float) - ref.frames).mean() < 4
    out = tmp_path / "ae.safetensors"
    train.main(["vae", "--data", str(tmp_path), "--steps", "3", "--batch", "2", "--test-clips", "1",
                "--out", str(out)])
    L.load_checkpoint(out, L.AEConfig, L.VideoAE)
    with pytest.raises(MediaError):
        L.folder_pool(tmp_path / "nothing-here")


# -----------------------------------------------------------------------------
# media I/O


def synthetic_frames(T=50, H=64, W=64):
    """Smooth content x264 can hold at crf 18: colour gradients plus a moving soft-edged square."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    frames = np.empty((T, H, W, 3), np.uint8)
    for t in range(T):
        img = np.stack([x / W * 200 + 20, y / H * 200 + 20, np.full_like(x, 60 + 2 * t)], -1)
        cx, cy = 10 + t * (W - 20) / T, H / 2
        d = np.maximum(abs(x - cx), abs(y - cy))
        img += 120 * np.clip(8 - d, 0, 1)[..., None]  # square with a 1-pixel ramp edge
        frames[t] = np.clip(img, 0, 255).astype(np.uint8)
    return frames


def tone(seconds, sr, f=440.0, onset=0.0):
    t = np.arange(round(seconds * sr)) / sr
    return (0.5 * np.sin(2 * np.pi * f * t) * (t >= onset)).astype(np.float32)


def dominant_hz(x, sr):
    return np.argmax(np.abs(np.fft.rfft(x))) * sr / len(x)


def ffmpeg(*args):
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-v", "error", *args], check=True)


@pytest.fixture(scope="module")
def silent_mp4(tmp_path_factory):
    p = tmp_path_factory.mktemp("v") / "silent.mp4"
    write_video(p, synthetic_frames(10))
    return p


def test_mp4_round_trip(tmp_path):
    """Frames and audio survive write_video/read_video/read_audio within codec tolerance and stay in sync."""
    frames = synthetic_frames()
    # A pure tone correlates at every period; the silent first half second makes the lag unambiguous.
    audio = tone(2.0, SAMPLE_RATE, onset=0.5)
    p = tmp_path / "out.mp4"
    write_video(p, frames, audio)
    back, src_fps = read_video(p)
    assert back.shape == frames.shape and src_fps == FPS
    assert np.abs(back.astype(np.float32) - frames).mean() < 4.0
    assert has_audio(p)
    a = read_audio(p)
    # AAC codes 1024-sample blocks; the edit list trims the priming, but the last block may come
    # back padded, so allow up to two video frames of slack.
    assert abs(len(a) - len(audio)) <= 2 * SAMPLES_PER_FRAME
    n = min(len(a), len(audio)) - 700
    corr = {lag: np.corrcoef(audio[350:350 + n], a[350 + lag:350 + lag + n])[0, 1] for lag in range(-320, 321)}
    lag = max(corr, key=corr.get)
    assert corr[lag] > 0.9 and abs(lag) <= 160, (lag, corr[lag])  # A/V sync within 10 ms


def test_resample_audio_exact_length_and_band_limit():
    """resample_audio hits round(N*out/in) exactly, keeps in-band tones and removes (not aliases) out-of-band ones."""
    for n, si, so in [(44107, 44100, 16000), (16000, 16000, 16000), (1001, 22050, 16000), (3333, 8000, 16000), (0, 48000, 16000)]:
        assert len(resample_audio(np.zeros(n, np.float32), si, so)) == round(n * so / si)
    y = resample_audio(tone(1.0, 48000, f=3000), 48000, 16000)
    assert y.dtype == np.float32 and abs(dominant_hz(y, 16000) - 3000) <= 2
    assert abs(np.sqrt(np.mean(y[800:-800] ** 2)) - 0.5 / np.sqrt(2)) < 0.01  # amplitude kept
    alias = resample_audio(tone(1.0, 48000, f=10000), 48000, 16000)  # would alias to 6 kHz
    assert np.sqrt(np.mean(alias ** 2)) < 0.01
    up = resample_audio(tone(1.0, 8000, f=1000), 8000, 16000)
    assert abs(dominant_hz(up, 16000) - 1000) <= 2


def test_read_audio_resamples_44k_stereo_wav_and_mp3(tmp_path):
    """A 44.1 kHz stereo wav reads back mono at 16 kHz with the right length and pitch; so does an mp3 made from it."""
    n = 44100 + 7  # odd length exercises the rounding
    x = tone(n / 44100, 44100)
    wav = tmp_path / "stereo.wav"
    sf.write(wav, np.stack([x, x], 1), 44100)
    a = read_audio(wav)
    assert a.dtype == np.float32 and a.ndim == 1 and len(a) == round(n * 16000 / 44100)
    assert abs(dominant_hz(a, SAMPLE_RATE) - 440) <= 2
    assert abs(np.abs(a).max() - 0.5) < 0.02  # downmix averages L and R: no doubling, no cancelling
    mp3 = tmp_path / "stereo.mp3"
    ffmpeg("-i", str(wav), str(mp3))
    b = read_audio(mp3)
    assert abs(len(b) / SAMPLE_RATE - n / 44100) <= 0.05
    assert abs(dominant_hz(b, SAMPLE_RATE) - 440) <= 2


def test_read_video_resamples_30fps_to_25(tmp_path):
    """A 60-frame 30 fps clip gives 50 frames at 25 fps, output i being source frame floor(i*30/25)."""
    levels = 10 + 4 * np.arange(60)  # each frame's brightness encodes its index
    frames = np.broadcast_to(levels[:, None, None, None], (60, 32, 32, 3)).astype(np.uint8)
    p = tmp_path / "30fps.mp4"
    write_video(p, frames, fps=30)
    back, src_fps = read_video(p)
    assert src_fps == pytest.approx(30) and len(back) == 50
    got = back.reshape(50, -1).mean(1)
    want = levels[np.floor(np.arange(50) * 30 / 25 + 1e-6).astype(int)]
    assert np.abs(got - want).max() < 1.5
    # and the other way: 30 -> 60 fps repeats frames, still timestamp-exact
    up, _ = read_video(p, fps=60)
    assert len(up) == 120 and np.abs(up.reshape(120, -1).mean(1) - levels[np.arange(120) // 2]).max() < 1.5
    # 7 frames at 30 fps last 0.233 s: only 5 whole 25 fps frames fit (floor, not round or ceil)
    write_video(p, frames[:7], fps=30)
    assert len(read_video(p)[0]) == 5


def test_bad_inputs_raise_media_error_with_path(tmp_path, silent_mp4):
    """Every bad input raises a one-line MediaError that names the file."""
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(5000))
    wav = tmp_path / "a.wav"
    sf.write(wav, tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    cases = [
        (read_video, tmp_path / "missing.mp4", "does not exist"),
        (read_audio, tmp_path / "missing.wav", "does not exist"),
        (read_video, tmp_path, "directory"),
        (read_audio, tmp_path, "directory"),
        (read_video, corrupt, "could not be decoded"),
        (read_audio, corrupt, "could not be decoded"),
        (read_audio, silent_mp4, "no audio track"),
        (read_video, wav, "no video stream"),
        (read_audio, empty, "no audio samples"),
    ]
    for fn, path, what in cases:
        with pytest.raises(MediaError) as e:
            fn(path)
        msg = str(e.value)
        assert str(path) in msg and what in msg and "\n" not in msg, (fn.__name__, msg)
    assert not has_audio(silent_mp4) and not has_audio(corrupt) and has_audio(wav)
    with pytest.raises(MediaError, match="uint8"):
        write_video(tmp_path / "f.mp4", np.zeros((5, 16, 16, 3), np.float32))
    with pytest.raises(MediaError, match=r"\(T, H, W, 3\)"):
        write_video(tmp_path / "f.mp4", np.zeros((16, 16, 3), np.uint8))


def test_silent_audio_is_not_an_error(tmp_path):
    """All-zero audio reads back as zeros; only zero-length audio is an error."""
    p = tmp_path / "silence.wav"
    write_audio(p, np.zeros(1600, np.float32))
    a = read_audio(p)
    assert len(a) == 1600 and not a.any()


def test_atomic_write_leaves_nothing_on_failure(tmp_path, monkeypatch):
    """A write that fails midway leaves no target, no temp files, and an existing target untouched."""
    out = tmp_path / "out.mp4"
    calls = []

    def flaky_pad(frame):  # fail after ffmpeg has started and received a few frames
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("boom")
        return frame

    monkeypatch.setattr(L, "_pad_even", flaky_pad)
    with pytest.raises(RuntimeError, match="boom"):
        write_video(out, synthetic_frames(20), tone(0.8, SAMPLE_RATE))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    out.write_bytes(b"old")
    monkeypatch.setattr(L.sf, "write", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        write_audio(tmp_path / "out.wav", tone(0.1, SAMPLE_RATE))
    monkeypatch.undo()
    with pytest.raises(MediaError):  # bad shape is caught before anything is written
        write_video(out, np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError):  # failure inside the block itself
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"] and out.read_bytes() == b"old"

    with atomic_path(out) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".out.tmp-") and tmp.suffix == ".mp4"
        tmp.write_bytes(b"new")
    assert sorted(os.listdir(tmp_path)) == ["out.mp4"] and out.read_bytes() == b"new"


def test_write_creates_missing_folders(tmp_path):
    """write_audio/write_video create missing parent folders; write_audio round-trips at 16 kHz."""
    x = tone(0.5, SAMPLE_RATE)
    write_audio(tmp_path / "a" / "b" / "x.wav", x)
    assert np.abs(read_audio(tmp_path / "a" / "b" / "x.wav") - x).max() < 1e-3  # 16-bit PCM
    write_video(tmp_path / "c" / "v.mp4", synthetic_frames(3))
    assert read_video(tmp_path / "c" / "v.mp4")[0].shape == (3, 64, 64, 3)


def test_odd_size_is_padded_to_even(tmp_path):
    """123x77 frames come back 124x78: original pixels kept, the extra column/row copy the last ones."""
    frames = synthetic_frames(5, H=77, W=123)
    write_video(tmp_path / "odd.mp4", frames)
    back, _ = read_video(tmp_path / "odd.mp4")
    assert back.shape == (5, 78, 124, 3)
    back = back.astype(np.float32)
    assert np.abs(back[:, :77, :123] - frames).mean() < 4.0
    assert np.abs(back[:, :77, 123] - frames[:, :, 122]).mean() < 4.0
    assert np.abs(back[:, 77, :123] - frames[:, 76, :]).mean() < 4.0


# -----------------------------------------------------------------------------
# DiT, flow matching, the teacher's sampler


def tiny_dit(**kw):
    return L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128, **kw))


def dit_inputs(B=2, Fr=3, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = L.DiTConfig()
    A = (4 + 2 * cfg.audio_context) * L.MELS_PER_FRAME * L.N_MELS
    return (torch.randn(B, Fr, 16, hw, hw, generator=g), torch.rand(B, Fr, generator=g),
            torch.randn(B, Fr, cfg.cond_channels, hw, hw, generator=g), torch.randn(B, Fr, A, generator=g))


def test_fresh_dit_outputs_zero_and_blocks_are_identity():
    """adaLN-Zero: a fresh model predicts exactly 0, and every block returns its input unchanged."""
    model = tiny_dit()
    x, t, cond, audio = dit_inputs()
    assert torch.equal(model(x, t, cond, audio), torch.zeros_like(x))
    tok = torch.randn(2, 3, 4, 64)
    c, a = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    angles = L.rope_angles(model.rope, torch.arange(3), 2, 2)
    for blk in model.blocks:
        assert torch.equal(blk(tok, c, a, angles), tok)


def test_rope_is_relative():
    """With 3D RoPE, attention scores depend only on position differences: shifting every frame
    position by the same amount leaves the attention output unchanged."""
    torch.manual_seed(0)
    attn = L.Attention(64, 4)
    freqs = L.rope_freqs(16, 10000.0)
    x = torch.randn(1, 3 * 4, 64)
    a0 = attn(x, L.rope_angles(freqs, torch.arange(3), 2, 2))
    a7 = attn(x, L.rope_angles(freqs, torch.arange(3) + 7, 2, 2))
    assert_close(a7, a0, 1e-5, "shifted positions")
    swapped = attn(x, L.rope_angles(freqs, torch.tensor([0, 2, 1]), 2, 2))
    assert (swapped - a0).abs().max() > 1e-3          # but the order does matter


def test_ode_schedule_landmarks():
    """The teacher's shifted 50-step ODE: t_20 = 0.882, t_30 = 0.769, t_40 = 0.556 (METHOD.md)."""
    assert round(L.ode_t(20), 3) == 0.882 and round(L.ode_t(30), 3) == 0.769 and round(L.ode_t(40), 3) == 0.556
    assert L.ode_t(0) == 1.0 and L.ode_t(50) == 0.0


def test_cfg_scale_one_is_the_conditional_prediction():
    """guided_velocity at scale 1 equals the plain conditional prediction, and at another scale it
    is v_uncond + s (v_cond - v_uncond) with the audio (only) zeroed for v_uncond."""
    torch.manual_seed(0)
    model = tiny_dit()
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    x, t, cond, audio = dit_inputs()
    assert_close(L.guided_velocity(model, x, t, cond, audio, 1.0), model(x, t, cond, audio), 1e-5)
    v_c, v_u = model(x, t, cond, audio), model(x, t, cond, torch.zeros_like(audio))
    assert_close(L.guided_velocity(model, x, t, cond, audio, 4.5), v_u + 4.5 * (v_c - v_u), 1e-4)
    assert (v_c - v_u).abs().max() > 1e-4                 # the audio is actually used


def test_sampler_same_seed_is_bitwise_identical():
    """Two runs of the 50-step sampler from the same seed give bitwise identical latents."""
    torch.manual_seed(0)
    model = tiny_dit()
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    _, _, cond, audio = dit_inputs(B=1)
    runs = [L.sample_ode(model, cond, audio, torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(5)),
                         steps=10, cfg=4.5) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_overfitting_one_batch_drives_the_loss_near_zero():
    """Flow matching on one fixed batch (fixed noise and t) is learnable: the loss falls by >95%."""
    torch.manual_seed(0)
    model = tiny_dit()
    x0, t, cond, audio = dit_inputs(B=2)
    eps = torch.randn_like(x0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(300):
        loss = (model(L.add_noise(x0, eps, t), t, cond, audio) - (eps - x0)).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.05 * losses[0], (losses[0], losses[-1])


def test_pack_audio_alignment():
    """Latent frame f of a window at frame s carries the audio of video frames s+4f-3-c .. s+4f+c."""
    c = 2
    T = 20
    audio = np.zeros(T * SAMPLES_PER_FRAME, np.float32)
    audio[9 * SAMPLES_PER_FRAME:10 * SAMPLES_PER_FRAME] = 0.5            # a click in video frame 9 only
    feats = L.audio_frame_features(audio, c)
    assert feats.shape == (T + 3 + 2 * c, L.MELS_PER_FRAME * L.N_MELS)
    packed = L.pack_audio(feats, 4, 3, c).view(3, 4 + 2 * c, -1)          # window at frame 4: latents 0, 1, 2
    loud = packed.mean(-1) > feats.mean(-1).min() + 1.0                   # (3, 8) which packed frames hear it
    # latent 1 covers frames 5..8 (+-2 context: 3..10), latent 2 frames 9..12 (7..14); latent 0: 1..4 (-1..6)
    assert loud[0].sum() == 0
    assert loud[1].nonzero().flatten().tolist() == [6] and loud[2].nonzero().flatten().tolist() == [2]


def test_training_resumes_identically(tmp_path, monkeypatch):
    """A teacher run stopped after 3 steps and resumed gives the same losses as one uninterrupted run."""
    import train
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    base = ["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "6",
            "--batch", "2", "--latent-frames", "3", "--preset", "tiny"]
    whole = train.STAGES["teacher"](train.get_args(base + ["--out", str(tmp_path / "a.safetensors")]))
    first = train.STAGES["teacher"](train.get_args(base + ["--stop-after", "3", "--out", str(tmp_path / "b.safetensors")]))
    rest = train.STAGES["teacher"](train.get_args(base + ["--resume", "--out", str(tmp_path / "b.safetensors")]))
    assert len(first) == 3 and len(rest) == 3
    assert first + rest == whole
    a = L.load_checkpoint(tmp_path / "a.safetensors", L.DiTConfig, L.DiT)[0]
    b = L.load_checkpoint(tmp_path / "b.safetensors", L.DiTConfig, L.DiT)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_ssim_matches_a_direct_computation():
    """ssim equals SSIM computed window by window with explicit loops (Wang et al. 2004, Gaussian
    7x7 window, sigma 1.5, valid windows only, averaged over channels and positions)."""
    rng = np.random.default_rng(0)
    a = (rng.random((1, 12, 10, 3)) * 255).astype(np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    g = np.exp(-0.5 * ((np.arange(7) - 3) / 1.5) ** 2)
    w = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(3):
        x, y = a[0, :, :, ch].astype(float), b[0, :, :, ch].astype(float)
        for i in range(12 - 6):
            for j in range(10 - 6):
                px, py = x[i:i + 7, j:j + 7], y[i:i + 7, j:j + 7]
                mx, my = (w * px).sum(), (w * py).sum()
                vx, vy = (w * (px - mx) ** 2).sum(), (w * (py - my) ** 2).sum()
                cxy = (w * (px - mx) * (py - my)).sum()
                vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert abs(L.ssim(a, b) - np.mean(vals)) < 1e-6
    assert L.ssim(a, a) == pytest.approx(1.0)


# -----------------------------------------------------------------------------
# causal student: block-causal attention, sink + rolling KV cache, dynamic RoPE


def bitey_dit(seed=0, **kw):
    """A small DiT whose zero-initialised layers are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = tiny_dit(**kw).double().eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model


def stream_inputs(n_frames, seed=1):
    x, t, cond, audio = dit_inputs(B=1, Fr=n_frames, hw=4, seed=seed)
    return x.double(), torch.zeros_like(t).double(), cond.double(), audio.double()


def test_streaming_with_cache_equals_block_causal_forward():
    """(a) While the stream fits the window, running chunk after chunk with the KV cache (each
    pass writing its keys) equals one block-causal forward over the whole sequence, to 1e-5."""
    model = bitey_dit()
    chunk, n_chunks = 3, 4
    x, t, cond, audio = stream_inputs(chunk * n_chunks)
    N = 4                                                         # tokens per latent frame (4x4 latent, patch 2)
    full = model(x, t, cond, audio, mask=L.block_causal_mask(x.shape[1], N, chunk))
    cache = L.KVCache(len(model.blocks), sink=1, window=chunk * n_chunks, chunk=chunk)
    parts = []
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        parts.append(model(x[:, sl], t[:, sl], cond[:, sl], audio[:, sl], cache=cache, update_cache=True))
    assert_close(torch.cat(parts, 1), full, 1e-5, "streamed vs block-causal")
    bidirectional = model(x, t, cond, audio)
    assert (bidirectional - full)[:, :-chunk].abs().max() > 1e-3    # the mask really changes the result


def test_rolling_cache_attention_equals_explicit_slicing():
    """(b) With rolling, each chunk attends exactly [sink frame | the last 3 cached frames | itself],
    rotated by place: one attention layer fed chunk by chunk equals a reference that assembles
    those keys by hand from all frames' projections."""
    torch.manual_seed(0)
    D, H, N, chunk = 32, 4, 4, 3
    attn = L.Attention(D, H).double()
    freqs = L.rope_freqs(D // H, 10000.0)
    cache = L.KVCache(1, sink=1, window=7, chunk=chunk)
    xs = torch.randn(1, 6 * chunk * N, D, dtype=torch.float64)           # 6 chunks of 3 frames of N tokens
    q_all, k_all, v_all = attn.qkv(xs).view(1, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)
    k_all = attn.k_norm(k_all)
    for c in range(6):
        x = xs[:, c * chunk * N:(c + 1) * chunk * N]
        past = cache.cached_frames
        out = attn(x, L.rope_angles(freqs, torch.arange(past + chunk), 2, 2), cache=cache, tokens_per_frame=N)
        cache.update = True                                               # the refresh pass writes
        attn(x, L.rope_angles(freqs, torch.arange(past + chunk), 2, 2), cache=cache, tokens_per_frame=N)
        cache.update = False
        cache.frames += chunk
        # reference: frames [0] + the 3 before this chunk (or fewer) + this chunk, by hand
        frames = sorted(set([0] * (c > 0) + list(range(max(1, c * chunk - 3), c * chunk)))) + \
            list(range(c * chunk, (c + 1) * chunk))
        tok = torch.cat([torch.arange(f * N, (f + 1) * N) for f in frames])
        ang = L.rope_angles(freqs, torch.arange(len(frames)), 2, 2)
        q = L.apply_rope(attn.q_norm(q_all[:, :, c * chunk * N:(c + 1) * chunk * N]), ang[-chunk * N:])
        k = L.apply_rope(k_all[:, :, tok], ang)
        ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v_all[:, :, tok]
        ref = attn.proj(ref.transpose(1, 2).reshape(1, -1, D))
        assert_close(out, ref, 1e-10, f"chunk {c}")
    assert cache.cached_frames == 4 and cache.k[0].shape[2] == 4 * N


def test_dynamic_rope_output_depends_only_on_cache_contents():
    """(c) With the same input every chunk the cache contents repeat once the window is full, so the
    output at chunk 5 and at chunk 500 are identical: positions come from the place in the cache,
    not from how far into the stream we are."""
    model = bitey_dit()
    x, t, cond, audio = stream_inputs(3)
    cache = L.KVCache(len(model.blocks), sink=1, window=7, chunk=3)
    outs = {}
    with torch.no_grad():
        first = model(x, t, cond, audio, cache=cache, update_cache=True)
        for c in range(1, 501):
            out = model(x, t, cond, audio, cache=cache)
            model(x, t, cond, audio, cache=cache, update_cache=True)
            outs[c] = out
    assert torch.equal(outs[5], outs[500]) and cache.frames == 501 * 3
    assert (outs[5] - first).abs().max() > 1e-4       # the cache does matter


def test_cache_memory_is_constant_once_the_window_fills():
    """(d) The cache holds sink + recent frames at most: its size after chunk 3 equals its size
    after chunk 40."""
    model = bitey_dit()
    x, t, cond, audio = stream_inputs(3)
    cache = L.KVCache(len(model.blocks), sink=1, window=7, chunk=3)
    sizes = []
    with torch.no_grad():
        for c in range(40):
            model(x, t, cond, audio, cache=cache, update_cache=True)
            sizes.append(cache.nbytes())
    assert sizes[1] > sizes[0] and sizes[2] == sizes[39] and cache.cached_frames == 4
