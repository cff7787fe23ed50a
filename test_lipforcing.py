"""
Tests for lipforcing. Each states the invariant it checks in its docstring and compares against
an independent reference where one exists. Run: python -m pytest -q test_lipforcing.py
"""

import copy
import csv
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import analyze as A
import lipforcing as L
import sample
import train
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
    """synth_speech makes the audio and the mouth from one articulatory trajectory, seeded by its
    rng and voice alone (no face or head motion enters it): the same seed gives the same pair;
    during silence the lips rest closed, and the mouth moves when speech does."""
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


def test_the_dub_truth_is_the_same_face_moving_the_same_way_with_the_dub_mouth():
    """synthtalk_render with a clip's own mouth gives its frames; with the dub's mouth, frames that
    match them above the face's centre (the mask's half; head motion moves that line by a row or
    two) and differ below, where the mouth and jaw are."""
    c = L.synthtalk_clip("test", 3, 1.0, 32)
    assert np.array_equal(L.synthtalk_render("test", 3, c.mouth, 32), c.frames)
    dub = L.synthtalk_render("test", 3, c.dub_mouth, 32)
    assert dub.shape == c.frames.shape
    assert np.array_equal(dub[:, :14], c.frames[:, :14])
    assert np.abs(dub[:, 16:].astype(int) - c.frames[:, 16:]).mean() > 0.2
    mouths = [L.synthtalk_clip("test", i, 0.4, 32).dub_mouth for i in range(3)]       # in 2 processes, as the evals do
    assert all(np.array_equal(a, L.synthtalk_render("test", i, m, 32)) for i, (a, m) in
               enumerate(zip(L.synthtalk_renders("test", mouths, 32, workers=2, progress=False), mouths)))


def test_the_ratio_to_ground_truth_carries_its_standard_error_over_clips(capsys):
    """mean_rows' gt_ratio_se, the SE over clips of a row's Sync-C / GT: 0 for a row that is a fixed
    multiple of the ground truth clip by clip; with the same ground truth on every clip, the plain
    SE of the row's mean over that constant. print_table shows it beside the ratio."""
    gt = [18.0, 19.0, 20.5, 17.5]
    metrics = lambda c: dict(sync_c=c, sync_d=1.0, mouth_err=0.1)
    x = [9.0, 12.0, 11.0, 14.0]
    rows = {"ground truth": [metrics(g) for g in gt], "half": [metrics(g / 2) for g in gt],
            "flat gt": [metrics(v) for v in x]}
    res = train.mean_rows(rows, 4)
    assert "gt_ratio_se" not in res["ground truth"] and res["half"]["gt_ratio_se"] == pytest.approx(0, abs=1e-12)
    flat = train.mean_rows({"ground truth": [metrics(19.0)] * 4, "x": [metrics(v) for v in x]}, 4)
    assert flat["x"]["gt_ratio_se"] == pytest.approx(np.std(x, ddof=1) / 2 / 19.0)
    assert train.mean_rows(rows, 4, gt=[19.0] * 4)["flat gt"]["gt_ratio_se"] == pytest.approx(flat["x"]["gt_ratio_se"])
    train.print_table(flat, "t", 4)
    assert f"| x | 11.50 | {11.5 / 19:.3f} +- {np.std(x, ddof=1) / 2 / 19:.3f} |" in capsys.readouterr().out


def test_eval_rows_score_a_dub_against_the_dubs_true_video(monkeypatch, capsys):
    """The evaluations' dub rows are scored against the dub's true video (test_pool's dub_truth):
    a student whose dub is that video scores the PSNR cap and mouth SSIM 1 there, and the "ground
    truth, dub" row is added. The table shows no fidelity for dub rows of results written before."""
    args = train.get_args(["eval-student", "--test-clips", "2", "--size", "32"])
    monkeypatch.setattr(L, "synthtalk_pool", lambda split, n, seconds, size, workers=None:
                        [L.synthtalk_clip(split, i, 1.0, size) for i in range(n)])
    clips = train.test_pool(args, dub_truth=True)
    assert all(c.dub_frames is not None for c in clips) and train.test_pool(args)[0].dub_frames is None
    perfect = lambda model, ae, frames, audio, seed: next(c.frames if audio is c.audio else c.dub_frames
                                                          for c in clips if audio is c.audio or audio is c.dub_audio)
    monkeypatch.setattr(L, "lipsync", perfect)
    nets = L.SyncNet(L.SyncNetConfig(width=4)).eval(), L.MouthNet(L.MouthNetConfig())
    rows = {}
    for c in clips:
        train.reference_rows(rows, L.VideoAE(L.AEConfig(width=8)), c, len(c.frames), *nets, "cpu")
    train.student_rows(rows, "s", None, None, clips, *nets)
    res = train.mean_rows(rows, len(clips))
    cap = res["ground truth"]["psnr"]
    for row in ("ground truth, dub", "s, dub", "s, recon"):
        assert res[row]["psnr"] == res[row]["mouth_psnr"] == cap and res[row]["mouth_ssim"] == 1.0, row
    assert res["s, dub"]["sync_c"] == res["ground truth, dub"]["sync_c"]
    train.print_table(res, "now", 2)
    old = {k: v for k, v in res.items() if k != "ground truth, dub"}
    train.print_table(old, "before", 2)
    now, before = capsys.readouterr().out.split("before")
    assert "| s, dub |" in now and "- | - | -" not in now
    assert [line for line in before.splitlines() if "- | - | -" in line] == [
        line for line in before.splitlines() if line.startswith("| s, dub |")]


def test_pool_grows_from_a_cached_prefix_in_worker_processes(tmp_path):
    """A pool is clips 0..n-1 whichever way it is made: generated in 2 worker processes, extended
    from a smaller cached pool, or cut from a larger one, each clip equals synthtalk_clip's."""
    refs = [L.synthtalk_clip("test", i, 0.4, 32) for i in range(11)]

    def same(pool):
        for i, (c, ref) in enumerate(zip(pool, refs)):
            assert c.name == ref.name, i
            for k in ("frames", "audio", "mouth", "dub_audio", "dub_mouth"):
                assert np.array_equal(getattr(c, k), getattr(ref, k)), (i, k)

    pool = lambda n: L.synthtalk_pool("test", n, 0.4, 32, cache_dir=tmp_path, progress=False, workers=2)
    same(pool(3))                                   # 3 clips < 4 per worker: one process
    grown = pool(11)                                # 8 new clips: 2 worker processes
    same(grown)
    assert sorted(os.listdir(tmp_path)) == ["synthtalk-test-n11-s0.4-32px.npz", "synthtalk-test-n3-s0.4-32px.npz"]
    same(pool(7))                                   # cut from the 11-clip file, nothing written
    assert len(os.listdir(tmp_path)) == 2


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


def htk_edges(n_mels=L.N_MELS, fmin=40.0, fmax=7600.0):
    """The n_mels + 2 band edges in Hz, evenly spaced on the HTK mel scale m = 2595 log10(1 + f / 700)."""
    m_lo, m_hi = (2595 * math.log10(1 + f / 700) for f in (fmin, fmax))
    return [700 * (10 ** ((m_lo + i * (m_hi - m_lo) / (n_mels + 1)) / 2595) - 1) for i in range(n_mels + 2)]


def test_mel_filterbank_is_htk_triangles():
    """Filter k, written bin by bin: 0 up to edge k, rising linearly to 1 at edge k + 1, falling to
    0 at edge k + 2 (htk_edges, 40 Hz to 7.6 kHz), over the 257 bins of a 512-point FFT at 16 kHz."""
    f = htk_edges()
    ref = np.zeros((L.MEL_FFT // 2 + 1, L.N_MELS))
    for k in range(L.N_MELS):
        for b in range(L.MEL_FFT // 2 + 1):
            hz = b * SAMPLE_RATE / L.MEL_FFT
            if f[k] <= hz <= f[k + 1]:
                ref[b, k] = (hz - f[k]) / (f[k + 1] - f[k])
            elif f[k + 1] < hz <= f[k + 2]:
                ref[b, k] = (f[k + 2] - hz) / (f[k + 2] - f[k + 1])
    assert_close(L.mel_filterbank().double(), torch.from_numpy(ref), 1e-5)


def test_log_mel_places_a_tone_in_the_right_band():
    """A 1 kHz tone peaks in the mel band whose centre (its triangle's apex) is nearest 1 kHz."""
    t = torch.arange(4 * SAMPLES_PER_FRAME) / SAMPLE_RATE
    mel = L.log_mel(torch.sin(2 * torch.pi * 1000 * t))
    centres = np.array(htk_edges()[1:-1])
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


def test_conv_models_in_channels_last_memory_compute_what_they_compute_contiguous(tmp_path):
    """train.py --channels-last: the autoencoder (encode, decode, streamed decode), SyncNet and
    MouthNet in channels-last memory give their contiguous twins' outputs and gradients, and the
    checkpoint written from them loads into a contiguous model with the same weights."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig()).double()
    for p in ae.parameters():
        p.data += 0.05 * torch.randn_like(p)
    ae_cl = train.conv_memory(SimpleNamespace(channels_last=True), copy.deepcopy(ae))
    assert ae_cl.dec_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert ae_cl.dec_in.weight.stride() != ae.dec_in.weight.stride()
    x = torch.rand(2, 9, 3, 64, 32, dtype=torch.float64) * 2 - 1
    outs = []
    for net in (ae, ae_cl):
        z = net.encode(x)
        first, mem = net.decode(z[:, :2])
        later, _ = net.decode(z[:, 2:], mem)
        (torch.cat([first, later], 1) * torch.linspace(-1, 1, x.numel(), dtype=x.dtype).view(x.shape)).sum().backward()
        outs.append((z, first, later, net.dec_mem[0].conv1.weight.grad))
    for a, b, what in zip(*outs, ("latents", "first decoded chunk", "streamed chunk", "a gradient")):
        assert_close(b, a, 1e-10, what)
    frames = torch.rand(4, 5, 3, 64, 64) * 2 - 1
    for net in (L.SyncNet(L.SyncNetConfig()).eval(), L.MouthNet(L.MouthNetConfig()).eval()):
        twin = train.conv_memory(SimpleNamespace(channels_last=True), copy.deepcopy(net))
        embed = (lambda n: n.embed_video(frames)) if isinstance(net, L.SyncNet) else (lambda n: n(frames[:, 0]))
        with torch.no_grad():
            assert_close(embed(twin), embed(net), 1e-5, type(net).__name__)
    L.save_checkpoint(tmp_path / "ae.safetensors", ae_cl.float(), ae_cl.cfg)
    back = L.load_checkpoint(tmp_path / "ae.safetensors", L.AEConfig, L.VideoAE)[0]
    assert back.dec_in.weight.is_contiguous()
    assert torch.equal(back.dec_in.weight, ae.dec_in.weight.float())


def test_checkpoint_round_trip(tmp_path):
    """A checkpoint rebuilds its model from the config stored inside it, with identical outputs."""
    cfg = L.AEConfig(width=16, seed=3, latent_mean=tuple((0.1 * torch.arange(16.)).tolist()), latent_std=(0.5,) * 16)
    ae = L.VideoAE(cfg).eval()
    p = tmp_path / "ae.safetensors"
    L.save_checkpoint(p, ae, cfg, extra={"psnr": 1.5})
    mask = os.umask(0)
    os.umask(mask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~mask           # readable by others as any file the user makes
    ae2, cfg2, extra = L.load_checkpoint(p, L.AEConfig, L.VideoAE)
    assert cfg2 == cfg and extra == {"psnr": 1.5}
    x = torch.rand(1, 5, 3, 32, 32)
    assert torch.equal(ae(x), ae2(x)) and torch.equal(ae.encode(x), ae2.encode(x))
    # the stored latent statistics are applied: encode = (raw encoder output - mean) / std
    raw = L.VideoAE(L.AEConfig(width=16, seed=3)).eval()
    raw.load_state_dict(ae.state_dict())
    assert_close(ae.encode(x), (raw.encode(x) - 0.1 * torch.arange(16.).view(16, 1, 1)) / 0.5, 1e-5)
    with pytest.raises(ValueError):
        L.load_checkpoint(p, L.SyncNetConfig, L.SyncNet)


def test_a_checkpoint_older_than_a_config_field_loads_with_the_behaviour_it_was_trained_with(tmp_path):
    """A checkpoint written before DiTConfig.audio_adaln existed (the committed students among
    them) has no such key; it loads with the field's default, which must be the behaviour it was
    trained with: no audio in the modulation, the same outputs as before the field."""
    from safetensors.torch import load_file, save_file
    model = bitey_dit().float()
    p = tmp_path / "dit.safetensors"
    L.save_checkpoint(p, model, model.cfg)
    stored = {k: v for k, v in dataclasses.asdict(model.cfg).items() if k != "audio_adaln"}
    save_file(load_file(p), p, metadata={"config": json.dumps(stored), "config_class": "DiTConfig"})
    old, cfg, _ = L.load_checkpoint(p, L.DiTConfig, L.DiT)
    assert not cfg.audio_adaln
    x, t, cond, audio = dit_inputs(B=1, Fr=3, hw=4)
    assert torch.equal(old(x, t, cond, audio), model(x, t, cond, audio))


def test_a_checkpoint_of_other_feature_widths_names_the_mismatch(tmp_path, monkeypatch):
    """A DiT saved by code with other audio features (a fork's N_MELS) cannot be rebuilt: the one
    line says which weight does not fit, not only load_state_dict's "Error(s) in loading ..." head."""
    model = L.DiT(L.DiTConfig(**TINY))
    p = tmp_path / "dit.safetensors"
    L.save_checkpoint(p, model, model.cfg)
    monkeypatch.setattr(L, "N_MELS", 2 * L.N_MELS)
    with pytest.raises(L.CheckpointError, match=r"cannot rebuild its DiTConfig model \(Error\(s\) in loading state_dict "
                                                r"for DiT: size mismatch for audio_embed\.0\.weight: .*\)$"):
        L.load_checkpoint(p, L.DiTConfig, L.DiT)


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


@pytest.mark.parametrize("shift", [0, 4, -7, 15, -15])
def test_sync_scores_match_the_published_algorithm(shift):
    """sync_scores equals the numpy port of syncnet_python on random embeddings, and recovers a
    planted offset: audio embeddings that match the video `shift` frames later give av_offset -shift,
    up to the ends of the search (+-15). Also where the zero-padded offsets score worst (embeddings
    far from 0), which moves the median."""
    rng = np.random.default_rng(shift + 20)
    N, D = 120, 32
    v = rng.normal(size=(N, D)).astype(np.float32)
    a = np.roll(v, shift, axis=0) + 0.3 * rng.normal(size=(N, D)).astype(np.float32)
    ours = L.sync_scores(torch.from_numpy(v), torch.from_numpy(a), vshift=15)
    ref = syncnet_python_scores(v.astype(np.float64), a.astype(np.float64), 15)
    assert ours[0] == ref[0] == -shift
    assert abs(ours[1] - ref[1]) < 1e-4 and abs(ours[2] - ref[2]) < 1e-4
    # and on unrelated embeddings (no planted offset) they still agree
    b = rng.normal(size=(N, D)).astype(np.float32)
    for x, y in ((v, b), (v + 3, a + 3)):
        ours, ref = L.sync_scores(torch.from_numpy(x), torch.from_numpy(y)), syncnet_python_scores(x, y, 15)
        assert ours[0] == ref[0] and abs(ours[1] - ref[1]) < 1e-4 and abs(ours[2] - ref[2]) < 1e-4


def test_the_committed_eval_syncnet_finds_a_clips_own_audio_in_sync_and_a_delay_at_its_offset():
    """End to end (corpus, mels, SyncNet, the offset search): a SynthTalk test clip with its own
    audio is at AV offset 0; its audio delayed by k frames is found at -k (syncnet_python's sign,
    as the planted embeddings above), early by k at +k."""
    net = L.load_checkpoint(os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors"), L.SyncNetConfig, L.SyncNet)[0]
    clip = L.synthtalk_clip("test", 0, 4.0)
    for k in (0, 3, -3):
        res = L.evaluate_sync(net, [clip.frames], [np.roll(clip.audio, k * SAMPLES_PER_FRAME)])
        assert res["offsets"] == [-k] and res["sync_c"] > 10, (k, res)


def test_sync_embeddings_window_count():
    """syncnet_python evaluates T - 5 windows of a T-frame clip; so do we."""
    net = L.SyncNet(L.SyncNetConfig()).eval()
    v, a = L.sync_embeddings(net, torch.rand(30, 3, 64, 64) * 2 - 1, np.zeros(30 * SAMPLES_PER_FRAME, np.float32))
    assert v.shape == a.shape == (25, net.cfg.embed)


def test_sync_metric_is_fp32_under_a_callers_autocast_and_refuses_a_clip_too_short():
    """The stream and the DiT stages run under bf16 autocast on a GPU; Sync-C computed inside it
    must still be the fp32 metric (CPU autocast stands in for CUDA's here). A clip of 5 frames has
    no window to score: a one-line ValueError, not an error deep in torch.cat."""
    torch.manual_seed(0)
    net = L.SyncNet(L.SyncNetConfig()).eval()
    frames = torch.rand(12, 3, 64, 64) * 2 - 1
    audio = np.random.default_rng(0).standard_normal(12 * SAMPLES_PER_FRAME).astype(np.float32) * 0.1
    plain = L.sync_embeddings(net, frames, audio)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert net.embed_audio(torch.zeros(1, 20, L.N_MELS)).dtype == torch.bfloat16   # autocast is on
        inside = L.sync_embeddings(net, frames, audio)
    for p, q in zip(plain, inside):
        assert q.dtype == torch.float32 and torch.equal(p, q)
    with pytest.raises(ValueError, match="more than 5 frames"):
        L.sync_embeddings(net, frames[:5], audio)


def test_sync_embeddings_pair_each_video_window_with_its_own_audio(monkeypatch):
    """Window s pairs video frames s .. s+4 with mel rows 4s .. 4s+19 (the same 5 frames' audio),
    read through a stub net whose embeddings are the first frame's and the first mel row's index."""
    T = 12
    monkeypatch.setattr(L, "log_mel", lambda a: torch.arange(4 * T, dtype=torch.float32)[:, None].repeat(1, L.N_MELS))
    net = SimpleNamespace(cfg=SimpleNamespace(frames=5), parameters=lambda: iter([torch.zeros(1)]),
                          embed_video=lambda w: w[:, 0, 0, :1, 0], embed_audio=lambda m: m[:, 0, :1])
    frames = torch.arange(T, dtype=torch.float32)[:, None, None, None].expand(T, 3, 4, 4)
    v, a = L.sync_embeddings(net, frames, np.zeros(T * SAMPLES_PER_FRAME, np.float32))
    assert v[:, 0].tolist() == list(range(T - 5)) and a[:, 0].tolist() == [4 * s for s in range(T - 5)]


def test_log_mel_equals_a_numpy_stft():
    """log_mel: 400-sample periodic-Hann frames every 160 samples over the waveform zero-padded by
    120 on each side, a 512-point power spectrum, the mel filterbank, log(. + 1e-6), written in numpy."""
    x = np.random.default_rng(0).standard_normal(3 * SAMPLES_PER_FRAME).astype(np.float32) * 0.1
    padded = np.pad(x.astype(np.float64), 120)
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 400)
    frames = np.stack([padded[160 * m:160 * m + 400] * window for m in range(12)])
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2
    ref = np.log(power @ L.mel_filterbank().numpy().astype(np.float64) + 1e-6)
    assert_close(L.log_mel(torch.from_numpy(x)).double(), torch.from_numpy(ref), 1e-3)


def test_psnr_reference():
    """PSNR of uint8 images: 10 log10(255^2 / MSE); one grey level off everywhere is 48.13 dB."""
    a = np.zeros((2, 4, 4, 3), np.uint8)
    assert L.psnr(a, a + 1) == pytest.approx(10 * np.log10(255.0 ** 2), abs=1e-9)
    b = a.copy()
    b[0, 0, 0, 0] = 255                                   # MSE = 255^2 / 96
    assert L.psnr(a, b) == pytest.approx(10 * np.log10(96), abs=1e-9)


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


def test_a_folder_clip_of_any_length_is_read_and_each_stage_leaves_out_the_too_short(tmp_path, capsys):
    """folder_pool reads a clip of a few frames as any other (no floor of its own); the stage that
    draws longer windows than it holds leaves it out with a note, the one whose windows fit trains on it.
    An m4v is a clip too, and one that is not square is squeezed with a note."""
    for name, seconds in (("short", 0.4), ("long", 1.6)):
        c = L.synthtalk_clip("train", 0, seconds, 32)
        write_video(tmp_path / f"{name}.mp4", c.frames, c.audio)
    assert sorted(len(c.frames) for c in L.folder_pool(tmp_path, 32, progress=False)) == [10, 40]
    assert "not square" not in capsys.readouterr().out
    wide = L.synthtalk_clip("train", 1, 0.4, 32)
    write_video(tmp_path / "sub" / "wide.m4v", np.concatenate([wide.frames, wide.frames[:, :, :16]], axis=2), wide.audio)
    pool = L.folder_pool(tmp_path, 32)                           # with its progress: the notes too
    assert [c.name for c in pool] == ["long", "short", "sub/wide"] and pool[2].frames.shape == (10, 32, 32, 3)
    assert "note: 1 of 3 clips in" in capsys.readouterr().out
    (tmp_path / "sub" / "wide.m4v").unlink()
    args = train.get_args(["teacher", "--data", str(tmp_path), "--size", "32"])
    assert sorted(len(c.frames) for c in train.train_pool(args, 1, 1.0, "vae", need=9)) == [10, 40]
    assert [len(c.frames) for c in train.dit_pool(args, 9, "teacher")] == [40]
    assert "teacher: 1 of 2 clips are shorter than 37 frames" in capsys.readouterr().out


def test_dit_stages_leave_out_clips_too_short_for_a_window_and_its_reference(monkeypatch, capsys):
    """A window of n latent frames and a reference frame outside it, on the 4-frame grid, take
    4 n + 1 frames. dit_pool leaves out shorter --data clips (where no reference frame exists),
    says so, and with none left stops with one line that says what to do; at exactly 4 n + 1
    frames every window start has a reference. Every stage's pool does the same for what it draws
    (the autoencoder's 9-frame windows, the SyncNet's 5 frames at 16 starts), and a SynthTalk
    --seconds too short is refused before a clip is made."""
    clip = lambda T: SimpleNamespace(frames=np.zeros((T, 1)))
    monkeypatch.setattr(L, "folder_pool", lambda folder, size, progress: [clip(36), clip(37), clip(40)])
    args = train.get_args(["teacher", "--data", "clips"])
    assert [len(c.frames) for c in train.dit_pool(args, 9, "teacher")] == [37, 40]
    assert "teacher: 1 of 3 clips are shorter than 37 frames (1.48 s at 25 fps)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"df: every clip in clips is shorter than 49 frames .* smaller --latent-frames"):
        train.dit_pool(args, 12, "df")
    monkeypatch.setattr(L, "synthtalk_pool", lambda *a, **kw: pytest.fail("clips made"))
    for argv, words in ((["vae", "--seconds", "0.3"], "vae: --seconds 0.3 makes clips shorter than 9 frames"),
                        (["syncnet", "--seconds", "0.7"], "syncnet: --seconds 0.7 makes clips shorter than 20 frames"),
                        (["mouthnet", "--seconds", "0.001"], "pass --seconds 0.04 or more"),
                        (["teacher", "--seconds", "1"], "teacher: --seconds 1 makes clips shorter than 37 frames")):
        with pytest.raises(SystemExit):
            train.main(argv)
        assert words in capsys.readouterr().err, argv
    with pytest.raises(pytest.fail.Exception, match="clips made"):
        train.main(["vae", "--seconds", "0.36"])                         # exactly 9 frames: made
    capsys.readouterr()
    monkeypatch.setattr(L, "synthtalk_pool", lambda *a, **kw: [clip(20) for _ in range(3)])   # the eval role: 1 clip
    with pytest.raises(SystemExit):
        train.main(["syncnet", "--role", "eval", "--clips", "3"])
    assert "syncnet --role eval: trains on every other clip of the pool" in capsys.readouterr().err
    rng = np.random.default_rng(0)                         # the two 33-frame windows of a 37-frame clip:
    assert train.random_ref(rng, 37, 0, 33) == 36 and train.random_ref(rng, 37, 4, 33) == 0   # one reference each


def test_the_teachers_evaluation_windows_take_their_reference_outside_them():
    """Evaluation and the analysis generate a clip in 33-frame windows, each given the reference
    frame half a clip away. In a clip shorter than two windows (the analysis's 2.6 s, 65 frames)
    that frame falls inside the window, a ground-truth frame training never shows; window_ref
    then takes the nearest grid frame outside. Where half a clip away is outside (the 10 s test
    clips) it is kept, so those evaluations are unchanged."""
    for T in range(37, 260):
        for s in train.segment_starts(T):
            r = train.window_ref(s, T)
            half = 4 * (((s + T // 2) % T) // 4)
            assert r % 4 == 0 and 0 <= r < T and not s <= r < s + 33, (T, s, r)
            assert r == half or s <= half < s + 33, (T, s, r, half)
    assert [train.window_ref(s, 65) for s in train.segment_starts(65)] == [36, 28]
    assert [train.window_ref(s, 250) for s in train.segment_starts(250)] == [124, 156, 188, 220, 0, 32, 64]


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


def cut_short(path, fmt="mp4"):
    """A 4 s clip with video and audio, its index at the front (mp4 +faststart, or webm), cut to its
    first half: a partial download, whose first ~2 s ffmpeg decodes and exits 0."""
    whole = path.with_name("whole." + fmt)
    codecs = ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-c:a", "aac", "-movflags", "+faststart"] \
        if fmt == "mp4" else ["-c:v", "libvpx", "-c:a", "libopus"]
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x32:rate=25:duration=4", "-f", "lavfi", "-i",
           "sine=f=440:d=4", *codecs, whole)
    data = whole.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return whole


def test_garbled_media_in_an_intact_container_is_refused(tmp_path):
    """Bytes garbled inside a file whose container is whole pass the demuxer's checks, and ffmpeg's
    decoders hide the damage and exit 0: the run would go on with broken frames or audio gaps.
    read_video and read_audio decode the stream once with -xerror and refuse it in one line."""
    video, audio = tmp_path / "v.mp4", tmp_path / "a.m4a"
    ffmpeg("-f", "lavfi", "-i", "testsrc2=size=64x64:rate=25:duration=2", "-c:v", "libx264", "-g", "1",
           "-pix_fmt", "yuv420p", "-movflags", "+faststart", video)          # every frame an I-frame
    ffmpeg("-f", "lavfi", "-i", "sine=f=440:d=2", "-c:a", "aac", "-movflags", "+faststart", audio)
    assert len(read_video(video)[0]) == 50 and len(read_audio(audio)) == 2 * SAMPLE_RATE
    rng = np.random.default_rng(0)
    for fn, path in ((read_video, video), (read_audio, audio)):
        for at in (0.5, 0.7):                                     # inside the media data, past the index
            data = bytearray(path.read_bytes())
            pos = int(len(data) * at)
            data[pos:pos + 32] = rng.integers(0, 256, 32, dtype=np.uint8).tobytes()
            bad = tmp_path / f"garbled{at}{path.suffix}"
            bad.write_bytes(bytes(data))
            with pytest.raises(MediaError) as e:
                fn(bad)
            msg = str(e.value)
            assert str(bad) in msg and "does not decode" in msg and "re-encode" in msg and "\n" not in msg, msg


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


def test_read_video_follows_timestamps(tmp_path):
    """Frames are placed by their timestamps, not their count: a variable-frame-rate clip (10 fps for
    a second, then 50 fps) and a video stream that starts 0.5 s after its audio give, at every
    output time i / 25, the source frame on screen then (the first one before the video starts), and
    as many frames as fit whole in the stream; a raw stream without timestamps, all its frames."""
    raw = tmp_path / "frames.rgb"
    levels = 10 + 6 * np.arange(39)                                      # each frame's brightness is its index
    raw.write_bytes(np.broadcast_to(levels[:, None, None, None], (39, 32, 32, 3)).astype(np.uint8).tobytes())
    clips = {"vfr": [0.1 * j if j < 10 else 1 + 0.02 * (j - 10) for j in range(39)],
             "late": [0.5 + 0.03 * j for j in range(20)]}
    for name, pts in clips.items():
        expr = "if(lt(N,10),10*N,100+2*(N-10))" if name == "vfr" else "50+3*N"   # in ticks of 1/100 s
        p = tmp_path / f"{name}.mkv"
        ffmpeg("-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "32x32", "-r", "100", "-i", str(raw),
               "-f", "lavfi", "-i", "sine=d=3:sample_rate=16000", "-frames:v", str(len(pts)),
               "-vf", f"setpts='{expr}'", "-fps_mode", "passthrough", "-map", "0:v", "-map", "1:a",
               "-c:v", "libx264", "-qp", "0", "-c:a", "pcm_s16le", str(p))
        back = read_video(p)[0]
        n = math.floor((pts[-1] + 0.01) * FPS + 1e-6)                    # the last frame lasts one tick
        want = [levels[max([j for j, t in enumerate(pts) if t <= i / FPS + 1e-9], default=0)] for i in range(n)]
        assert len(back) == n, name
        assert np.abs(back.reshape(n, -1).mean(1) - want).max() < 1.5, name
    # a raw H.264 stream has no timestamps at all: ffmpeg's own, one frame each, keep every frame
    mp4, h264 = tmp_path / "v.mp4", tmp_path / "v.h264"
    write_video(mp4, synthetic_frames(10))
    ffmpeg("-i", str(mp4), "-c", "copy", "-bsf:v", "h264_mp4toannexb", str(h264))
    assert len(read_video(h264)[0]) == 10


def test_bad_inputs_raise_media_error_with_path(tmp_path, silent_mp4):
    """Every bad input raises a one-line MediaError that names the file."""
    corrupt = tmp_path / "x.mp4"
    corrupt.write_bytes(np.random.default_rng(0).bytes(5000))
    wav = tmp_path / "a.wav"
    sf.write(wav, tone(0.5, SAMPLE_RATE), SAMPLE_RATE)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, np.float32), SAMPLE_RATE)
    zero = tmp_path / "zero.mp4"
    zero.write_bytes(b"")
    fifo = tmp_path / "fifo.wav"                                         # what bash's <(...) hands over
    os.mkfifo(fifo)
    cut_mp4, cut_webm = tmp_path / "cut.mp4", tmp_path / "cut.webm"
    whole = [cut_short(cut_mp4), cut_short(cut_webm, "webm")]
    assert [len(read_video(p)[0]) for p in whole] == [100, 100]      # the whole files are fine
    # wav and flac cut in half: libsndfile reads the wav's first half without a word, and fails on
    # the flac, whose first part ffmpeg then decodes and exits 0. Their headers state the full 4 s.
    four_s = tone(4.0, SAMPLE_RATE)
    for ext in ("wav", "flac"):
        sf.write(tmp_path / f"whole.{ext}", four_s, SAMPLE_RATE)
        data = (tmp_path / f"whole.{ext}").read_bytes()
        (tmp_path / f"cut.{ext}").write_bytes(data[:len(data) // 2])
        assert len(read_audio(tmp_path / f"whole.{ext}")) == len(four_s)
    # a wav streamed through a pipe states no length (data size 0xFFFFFFFF): not an error
    piped = tmp_path / "piped.wav"
    data = bytearray((tmp_path / "whole.wav").read_bytes())
    assert data[36:40] == b"data"
    data[40:44] = b"\xff" * 4
    piped.write_bytes(bytes(data))
    assert len(read_audio(piped)) == len(four_s)
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
        (read_video, zero, "is empty (0 bytes)"),
        (read_audio, zero, "is empty (0 bytes)"),
        (read_video, cut_mp4, "cut short (stream 0"),
        (read_audio, cut_mp4, "cut short (stream 1"),
        (read_video, cut_webm, "cut short (File ended prematurely)"),
        (read_audio, cut_webm, "cut short"),
        (read_audio, tmp_path / "cut.wav", "cut short (its header says 4.00 s, it holds 2.00 s)"),
        (read_audio, tmp_path / "cut.flac", "cut short (its header says 4.00 s"),
        (read_audio, fifo, "is a pipe or device, not a file: save it to a file first"),
        (read_video, fifo, "is a pipe or device"),
    ]
    for fn, path, what in cases:
        with pytest.raises(MediaError) as e:
            fn(path)
        msg = str(e.value)
        assert str(path) in msg and what in msg and "\n" not in msg, (fn.__name__, msg)
    assert not has_audio(silent_mp4) and not has_audio(corrupt) and has_audio(wav)
    with pytest.raises(L.NoAudioTrack):                          # a reader that knows why it wanted sound words it:
        read_audio(silent_mp4)
    (tmp_path / "data").mkdir()
    write_video(tmp_path / "data" / "clip.mp4", synthetic_frames(20))    # long enough, no sound
    with pytest.raises(MediaError, match="has no audio track: a --data clip carries the speech its mouth follows"):
        L.folder_pool(tmp_path / "data", 32, progress=False)    # training data
    assert L.check_file(zero, pipe_ok=True) == zero             # a stream's raw PCM file may start empty
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
    calls.clear()                                        # nor the folders it made for the output
    with pytest.raises(RuntimeError, match="boom"):
        write_video(tmp_path / "new" / "deeper" / "out.mp4", synthetic_frames(20))
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()

    out.write_bytes(b"old")
    monkeypatch.setattr(sf, "write", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
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
    return L.DiT(L.DiTConfig(**{"dim": 64, "depth": 2, "heads": 4, "ffn": 128, **kw}))


def dit_inputs(B=2, Fr=3, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = L.DiTConfig()
    A = cfg.audio_channels
    return (torch.randn(B, Fr, 16, hw, hw, generator=g), torch.rand(B, Fr, generator=g),
            torch.randn(B, Fr, cfg.cond_channels, hw, hw, generator=g), torch.randn(B, Fr, A, generator=g))


def test_under_bf16_autocast_the_residual_stream_and_the_output_stay_fp32():
    """On a GPU the DiT runs under bf16 autocast: its blocks' matrix products go to bf16, but the
    residual stream the blocks add into and the output layer stay fp32, as Wan's do (CFG scales the
    rounding of the output by 4.5). CPU autocast stands in for CUDA's."""
    torch.manual_seed(0)
    model = tiny_dit()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    x, t, cond, audio = dit_inputs()
    dtypes = []
    for blk in model.blocks:
        blk.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype))
    ref = model(x, t, cond, audio)
    dtypes.clear()
    with torch.autocast("cpu", torch.bfloat16):
        out = model(x, t, cond, audio)
        assert model.blocks[0].attn.qkv(x.new_zeros(1, 64)).dtype == torch.bfloat16      # autocast is on
    assert dtypes == [torch.float32] * len(model.blocks) and out.dtype == torch.float32
    assert 0 < (out - ref).norm() / ref.norm() < 0.02


@pytest.mark.parametrize("audio_adaln", [False, True])
def test_fresh_dit_outputs_zero_and_blocks_are_identity(audio_adaln):
    """adaLN-Zero: a fresh model predicts exactly 0, and every block returns its input unchanged
    (also with the audio in the modulation)."""
    model = tiny_dit(audio_adaln=audio_adaln)
    x, t, cond, audio = dit_inputs()
    assert torch.equal(model(x, t, cond, audio), torch.zeros_like(x))
    tok = torch.randn(2, 3, 4, 64)
    c, a = torch.randn(2, 3, 64), torch.randn(2, 3, 64)
    rope = rope_at(model.freqs, range(3))
    for blk in model.blocks:
        assert torch.equal(blk(tok, c, a, rope), tok)


def test_dit_block_is_the_adaln_zero_formula():
    """With the modulation set by hand (ada's bias; weight 0), a block computes
    x + g1 attn(LN(x)(1 + sc1) + s1), then + g2 mlp(LN(.)(1 + sc2) + s2): each of the six vectors in its place."""
    torch.manual_seed(0)
    blk = tiny_dit().blocks[0]
    D = 64
    s1, sc1, g1, s2, sc2, g2 = (torch.randn(D) for _ in range(6))
    with torch.no_grad():
        blk.ada[-1].weight.zero_()
        blk.ada[-1].bias.copy_(torch.cat([s1, sc1, g1, s2, sc2, g2]))
        for p in list(blk.attn.parameters()) + list(blk.mlp.parameters()):
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(1, 2, 4, D)
    rope = rope_at(tiny_dit().freqs, range(2))
    ln = lambda z: F.layer_norm(z, (D,), eps=1e-6)
    h = x + g1 * blk.attn((ln(x) * (1 + sc1) + s1).reshape(1, 8, D), rope).view(1, 2, 4, D)
    ref = h + g2 * blk.mlp(ln(h) * (1 + sc2) + s2)
    assert_close(blk(x, torch.randn(1, 2, D), None, rope), ref, 1e-5)


def test_audio_adaln_adds_the_audio_to_every_blocks_modulation(monkeypatch):
    """audio_adaln: every block's adaLN input is the timestep embedding plus the audio embedding
    (the final layer's stays the timestep's), against the same weights without it whose blocks are
    handed c + a by hand. With the blocks' token projections of the audio at zero the output still
    follows the audio, which it does not without the option."""
    on = bitey_dit(audio_adaln=True)
    off = copy.deepcopy(on)
    off.cfg = dataclasses.replace(on.cfg, audio_adaln=False)
    x, t, cond, audio = (v.double() for v in dit_inputs())
    with torch.no_grad():
        y = on(x, t, cond, audio)
        assert not torch.equal(y, off(x, t, cond, audio))
        block_forward = L.DiTBlock.forward
        monkeypatch.setattr(L.DiTBlock, "forward", lambda blk, tok, c, a, *rest, **kw: block_forward(blk, tok, c + a, a, *rest, **kw))
        assert torch.equal(y, off(x, t, cond, audio))
        monkeypatch.undo()
        for m in (on, off):
            for blk in m.blocks:
                blk.audio.weight.zero_(), blk.audio.bias.zero_()
        silent = torch.zeros_like(audio)
        assert torch.equal(off(x, t, cond, audio), off(x, t, cond, silent))
        assert (on(x, t, cond, audio) - on(x, t, cond, silent)).abs().max() > 1e-3


def test_timestep_embedding_and_rope_angles_reference():
    """timestep_embedding is [cos, sin](1000 t f_k), f_k = 10000^(-k / half); rope_angles gives the
    token at (frame f, row r, column c) of a non-square grid the angles [f ft, r fh, c fw]."""
    t = torch.tensor([0.0, 0.3, 0.999])
    k = torch.arange(8, dtype=torch.float64)
    args = 1000 * t.double()[:, None] * 10000.0 ** (-k / 8)
    assert_close(L.timestep_embedding(t, 16), torch.cat([args.cos(), args.sin()], -1).float(), 1e-4)   # fp32 at 1000 t
    ft, fh, fw = L.rope_freqs(24, 10000.0)
    angles = L.rope_angles((ft, fh, fw), torch.tensor([2, 5]), 3, 2)           # 2 frames of 3 rows x 2 columns
    ref = torch.stack([torch.cat([f * ft, r * fh, c * fw]) for f in (2, 5) for r in range(3) for c in range(2)])
    assert torch.equal(angles, ref)


def rope_at(freqs, pos, dtype=torch.float32):
    """The DiT's RoPE factors for latent frames at positions pos on a 2 x 2 token grid."""
    return L.rope_factors(L.rope_angles(freqs, torch.as_tensor(pos), 2, 2), dtype)


def wan_rope(x, angles):
    """RoPE as Wan computes it, by hand: the channel pairs of x as complex numbers times e^(j angle)."""
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(pairs * torch.polar(torch.ones_like(angles), angles)).flatten(-2)


def test_rope_is_wans():
    """A straight port of Wan2.1's RoPE at its head dim 128: the split (t gets d - 4 (d // 6), h and w
    2 (d // 6) each), each part's frequencies from rope_params (theta^(-2k / part)), and the
    rotation as a complex multiply of channel pairs (x_2i + j x_2i+1) e^(j angle)."""
    d, theta = 128, 10000.0
    rope_params = lambda dim: 1.0 / torch.pow(theta, torch.arange(0, dim, 2).to(torch.float64).div(dim))
    freqs = L.rope_freqs(d, theta)
    assert len(freqs) == 3
    for got, part in zip(freqs, (d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6))):
        assert torch.equal(got, rope_params(part))
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64)                     # (B, H, N, Dh)
    angles = torch.rand(5, 4, dtype=torch.float64) * 6
    assert_close(L.apply_rope(x, L.rope_factors(angles, torch.float64)), wan_rope(x, angles), 1e-12)


def test_audio_every_sets_the_blocks_that_take_audio():
    """audio_every = k: blocks 0, k, 2k, ... add the audio (OmniAvatar-style), the others have no audio layer."""
    m = L.DiT(L.DiTConfig(dim=64, depth=6, heads=4, ffn=128, audio_every=2))
    assert [b.audio is not None for b in m.blocks] == [True, False, True, False, True, False]


def saved_bytes_and_grads(model, fn):
    """Run fn() -> a tensor with gradient, backward its sum: (bytes autograd kept in the forward
    pass, as seen by a saved_tensors_hooks around it; {name: grad})."""
    kept = []
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
        y = fn()
    y.sum().backward()
    return sum(kept), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_the_gradients_and_keeps_fewer_activations():
    """DiT.checkpointing (train.py --grad-ckpt): the bidirectional and the block-causal forward give
    the plain forward's gradients while autograd keeps under half the bytes. A Self-Forcing rollout
    (KV cache, rewritten after each chunk's exit pass) is never checkpointed: its gradients too
    equal the plain ones, where recomputing a block in backward would read the rewritten cache."""
    torch.manual_seed(0)
    for causal in (False, True):
        model = tiny_dit(causal=causal)
        with torch.no_grad():                               # past adaLN-Zero, so every weight has a gradient
            for p in model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x, t, cond, audio = dit_inputs(Fr=6)
        mask = L.block_causal_mask(6, 4, model.cfg.chunk) if causal else None
        plain = saved_bytes_and_grads(model, lambda: model(x, t, cond, audio, mask=mask))
        model.checkpointing = True
        ckpt = saved_bytes_and_grads(model, lambda: model(x, t, cond, audio, mask=mask))
        assert ckpt[0] < plain[0] / 2
        assert plain[1].keys() == ckpt[1].keys() and len(plain[1]) == len(list(model.parameters()))
        for name in plain[1]:
            assert_close(ckpt[1][name], plain[1][name], 1e-5, name)
        model.checkpointing = False
    noises = torch.randn(2, 2, 6, 16, 4, 4)
    rollout = lambda: L.self_forcing_rollout(model, cond, audio, noises, exit_step=1)
    plain = saved_bytes_and_grads(model, rollout)
    model.checkpointing = True
    ckpt = saved_bytes_and_grads(model, rollout)
    assert ckpt[0] == plain[0] and all(torch.equal(ckpt[1][n], plain[1][n]) for n in plain[1])


def test_rope_is_relative():
    """With 3D RoPE, attention scores depend only on position differences: shifting every frame
    position by the same amount leaves the attention output unchanged."""
    torch.manual_seed(0)
    attn = L.Attention(64, 4)
    freqs = L.rope_freqs(16, 10000.0)
    x = torch.randn(1, 3 * 4, 64)
    a0 = attn(x, rope_at(freqs, range(3)))
    a7 = attn(x, rope_at(freqs, range(7, 10)))
    assert_close(a7, a0, 1e-5, "shifted positions")
    swapped = attn(x, rope_at(freqs, [0, 2, 1]))
    assert (swapped - a0).abs().max() > 1e-3          # but the order does matter


def test_qk_norm_runs_in_fp32_under_bf16_autocast():
    """Under bf16 autocast the attention's q and k reach their RMS norms in fp32, the dtype of the
    norms' weights (a bf16 input would take the unfused kernel, with a warning), and the attention
    still returns bf16 and stays near its fp32 output."""
    torch.manual_seed(0)
    attn = L.Attention(64, 4)
    x = torch.randn(1, 3 * 4, 64)
    rope = rope_at(L.rope_freqs(16, 10000.0), range(3))
    seen = []
    for norm in (attn.q_norm, attn.k_norm):
        norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = attn(x, rope)
    assert seen == [torch.float32, torch.float32] and y.dtype == torch.bfloat16
    assert (y.float() - attn(x, rope)).abs().max() < 0.05


def test_the_flow_matching_target_is_the_velocity_the_sampler_integrates():
    """For data that is one point x0, the true velocity at x_t is (x_t - x0) / t. On add_noise's
    pairs it is the loss's target exactly (loss 0; its negative is not), and the 50-step Euler
    sampler driven by it from eps stays on add_noise's straight path at every step and lands on x0:
    the noising, the v target and the sampler's direction are one flow."""
    x0, eps = dit_inputs(B=2, Fr=3, seed=3)[0], dit_inputs(B=2, Fr=3, seed=4)[0]
    oracle = lambda x, t, cond, audio: (x - x0) / t[..., None, None, None]
    t = torch.tensor([[0.9, 0.5, 0.1], [0.3, 0.7, 0.999]])
    v = oracle(L.add_noise(x0, eps, t), t, None, None)
    assert L.flow_matching_loss(v, x0, eps).max() < 1e-10 and L.flow_matching_loss(-v, x0, eps).min() > 1
    for j, t_j, x, _ in L.ode_trajectory(oracle, None, None, eps, cfg=1.0):     # on the straight path all along
        assert_close(x, L.add_noise(x0, eps, torch.full((2, 3), t_j)), 1e-5, f"ODE step {j}")
    assert_close(L.sample_ode(oracle, None, None, eps, cfg=1.0), x0, 1e-5, "sample of the one-point flow")


def test_ode_schedule_landmarks():
    """The teacher's shifted 50-step ODE: t_20 = 0.882, t_30 = 0.769, t_40 = 0.556 (the paper's); the
    student's two steps sit at t = 0.999 and at the teacher's step 30."""
    assert round(L.ode_t(20), 3) == 0.882 and round(L.ode_t(30), 3) == 0.769 and round(L.ode_t(40), 3) == 0.556
    assert L.ode_t(0) == 1.0 and L.ode_t(50) == 0.0
    assert L.STUDENT_STEPS == (0.999, L.ode_t(30))


def test_mouth_weighted_loss_counts_the_mouth_box_again_and_keeps_the_minimiser():
    """flow_matching_loss: the plain per-sample MSE at weight 0; at weight w, plus w times the MSE
    over the mouth box, which on the 8 x 8 latent grid of 64 px frames is rows 4..6 and columns
    2..4 (written out here by hand). Its gradient in v still vanishes at v = eps - x0."""
    g = torch.Generator().manual_seed(0)
    v, x0, eps = (torch.randn(3, 2, 16, 8, 8, generator=g) for _ in range(3))
    err = (v - (eps - x0)) ** 2
    assert torch.equal(L.flow_matching_loss(v, x0, eps), err.mean((1, 2, 3, 4)))
    ref = err.mean((1, 2, 3, 4)) + 2.5 * err[..., 4:7, 2:5].mean((1, 2, 3, 4))
    assert_close(L.flow_matching_loss(v, x0, eps, 2.5), ref, 1e-6, "mouth-weighted loss")
    target = (eps - x0).requires_grad_(True)
    L.flow_matching_loss(target, x0, eps, 2.5).sum().backward()
    assert target.grad.abs().max() == 0


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
    v_all = model(x, t, torch.zeros_like(cond), torch.zeros_like(audio))    # mode "all": every condition dropped
    assert_close(L.guided_velocity(model, x, t, cond, audio, 4.5, mode="all"), v_all + 4.5 * (v_c - v_all), 1e-4)
    drop = torch.tensor([True, False])
    for mode, cond_kept in (("audio", True), ("all", False)):
        c2, a2 = L.drop_conditions(cond, audio, drop, mode)
        assert (a2[0] == 0).all() and torch.equal(a2[1], audio[1]) and torch.equal(c2[1], cond[1])
        assert torch.equal(c2[0], cond[0]) if cond_kept else (c2[0] == 0).all()


def test_cfg_schedule_sets_the_scale_of_each_ode_step():
    """sample_ode with cfg_schedule(j) -> scale: the schedule overrides cfg (all 1 with cfg 4.5 is
    no CFG); a windowed schedule equals the Euler loop written out with that scale per step."""
    torch.manual_seed(0)
    model = tiny_dit()
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    _, _, cond, audio = dit_inputs()
    noise = torch.randn(2, 3, 16, 4, 4)
    steps = 6
    assert torch.equal(L.sample_ode(model, cond, audio, noise, steps, cfg=4.5, cfg_schedule=lambda j: 1.0),
                       L.sample_ode(model, cond, audio, noise, steps, cfg=1.0))
    window = lambda j: 4.5 if 2 <= j <= 4 else 1.0
    x = noise
    for j in range(steps):
        t = L.ode_t(j, steps)
        v = L.velocity(model, x, torch.full((2, 3), t), cond, audio, window(j))
        x = x + (L.ode_t(j + 1, steps) - t) * v
    assert_close(L.sample_ode(model, cond, audio, noise, steps, cfg_schedule=window), x, 1e-5)
    assert (x - L.sample_ode(model, cond, audio, noise, steps, cfg=1.0)).abs().max() > 1e-4


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


def test_ema_decay_is_the_warm_up_until_it_reaches_the_cap():
    """ema_update's decay is (1 + step) / (10 + step) until it reaches `decay`, from step
    (10 decay - 1) / (1 - decay) on (8 for 0.5): a weight held at 1, its EMA from 0, leaves
    the product of the decays so far."""
    model, ema = torch.nn.Linear(1, 1, bias=False), torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.ones_(model.weight), torch.nn.init.zeros_(ema.weight)
    left = 1.0
    for step in range(20):
        train.ema_update(ema, model, step, 0.5)
        left *= 0.5 if step >= 8 else (1 + step) / (10 + step)
        assert ema.weight.item() == pytest.approx(1 - left, abs=1e-6)


def test_training_resumes_identically(tmp_path, monkeypatch, capsys):
    """A teacher run stopped after 3 steps and resumed gives the same losses as one uninterrupted run,
    even when another run (another --out, so another training-state file) ran in between. A finished
    run, another model's state or another frame size is not resumed; other changed options are, with
    a note."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    base = ["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "6",
            "--batch", "2", "--latent-frames", "3", "--preset", "tiny"]
    first = train.main(base + ["--stop-after", "3", "--out", str(tmp_path / "b.safetensors")])[1]
    extra = L.load_checkpoint(tmp_path / "b.safetensors", L.DiTConfig, L.DiT)[2]
    assert (extra["steps"], extra["schedule_steps"]) == (3, 6)          # what it trained, and its schedule's length
    whole = train.main(base + ["--out", str(tmp_path / "a.safetensors")])[1]
    rest = train.main(base + ["--resume", "--out", str(tmp_path / "b.safetensors")])[1]
    assert (tmp_path / "a.state.safetensors").is_file() and (tmp_path / "b.state.safetensors").is_file()
    assert len(first) == 3 and len(rest) == 3
    assert first + rest == whole
    a, _, extra = L.load_checkpoint(tmp_path / "a.safetensors", L.DiTConfig, L.DiT)
    b = L.load_checkpoint(tmp_path / "b.safetensors", L.DiTConfig, L.DiT)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    assert extra["steps"] == 6 and "schedule_steps" not in extra
    # resuming a finished run, a run of another shape or another frame size is one line; the
    # finished checkpoint stays. Other options may change, with a note
    for more, words in (([], "is at step 6, and this run ends at step 6: nothing to train"),
                        (["--depth", "2", "--steps", "9"], "holds a run started with no --depth: it cannot go on with "
                                                           "--depth 2")):
        with pytest.raises(SystemExit, match=words) as e, monkeypatch.context() as m:
            if not more:                                            # known from the state's header: no pool made
                m.setattr(train, "dit_pool", lambda *a: pytest.fail("the pool was made first"))
            train.main(base + more + ["--resume", "--out", str(tmp_path / "b.safetensors")])
        assert e.value.code == 2
    b = L.load_checkpoint(tmp_path / "b.safetensors", L.DiTConfig, L.DiT)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    with pytest.raises(SystemExit, match="started with --size 64: it cannot go on with --size 48"):
        train.main(base + ["--size", "48", "--steps", "9", "--resume", "--out", str(tmp_path / "b.safetensors")])
    capsys.readouterr()
    assert len(train.main(base + ["--steps", "8", "--lr", "1e-3", "--resume", "--out", str(tmp_path / "b.safetensors")])[1]) == 2
    assert ("teacher: resuming with --steps 8 (it started with 6), --lr 0.001 (it started with the default): "
            "not the run it would have been") in capsys.readouterr().out


def test_teacher_step_draws_shifted_times_and_drops_the_audio_at_the_cfg_rate(tmp_path, monkeypatch):
    """A teacher step feeds the DiT t = shift_t(u) per sample (the same for every frame), and
    zeroes the audio of the samples CFG dropout picks: none at --cfg-drop 0, every one at 1."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    shifted, seen = [], []
    shift_t, forward = L.shift_t, L.DiT.forward
    monkeypatch.setattr(L, "shift_t", lambda t, *a: shifted.append(shift_t(t, *a)) or shifted[-1])
    monkeypatch.setattr(L.DiT, "forward", lambda self, x, t, cond, audio, **kw: seen.append((t, audio)) or
                        forward(self, x, t, cond, audio, **kw))
    for drop in (0, 1):
        shifted.clear(), seen.clear()
        train.main(["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "2",
                    "--batch", "2", "--latent-frames", "3", "--cfg-drop", str(drop), "--out", str(tmp_path / "t.safetensors")])
        assert len(seen) == 2 and len(shifted) == 2
        for (t, audio), ts in zip(seen, shifted):
            assert torch.equal(t, ts[:, None].expand(-1, 3))
            assert (audio.flatten(1).abs().amax(1) == 0).tolist() == [bool(drop)] * 2


def test_teacher_shape_options_reach_its_checkpoint(tmp_path, monkeypatch):
    """`train.py teacher --patch 1 --depth 2 --dim 64 --cfg-drop 0.25 --audio-adaln` trains and saves a
    DiT of 1x1 patches (64 tokens per 8x8 latent frame), 2 blocks and width 64 (2 heads of the preset's
    32, FFN 192) trained with that CFG dropout and the audio in its modulation, its config in the
    checkpoint with the weights_digest of the autoencoder it read; without them the preset's shape,
    Wan's 2x2 patches, the config's dropout and the audio in the tokens only."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    train.main(["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "1",
                "--batch", "2", "--latent-frames", "3", "--patch", "1", "--depth", "2", "--dim", "64", "--cfg-drop", "0.25",
                "--audio-adaln"])
    model, cfg, extra = L.load_checkpoint(tmp_path / "teacher.safetensors", L.DiTConfig, L.DiT)
    assert extra["autoencoder"] == L.weights_digest(L.load_checkpoint(tmp_path / "vae.safetensors", L.AEConfig, L.VideoAE)[0])
    assert cfg.patch == 1 and model.patch_in.in_features == cfg.latent_channels + cfg.cond_channels
    assert cfg.depth == 2 and len(model.blocks) == 2
    assert (cfg.dim, cfg.heads, cfg.ffn) == (64, 2, 192) and model.blocks[0].mlp[0].weight.shape == (192, 64)
    assert cfg.cfg_drop == 0.25 and cfg.audio_adaln
    args = train.get_args(["teacher"])
    assert args.patch is None and L.DiTConfig().patch == 2 and args.depth is None and args.dim is None
    assert args.cfg_drop == L.DiTConfig().cfg_drop == 0.1
    assert not args.audio_adaln and not L.DiTConfig().audio_adaln


def test_preset_config_dim_keeps_the_presets_head_width_and_ffn_ratio():
    """--dim changes a preset's width only: heads of the preset's width (tiny 32, wan1.3b 128) and its
    FFN ratio rounded up to a multiple of 32; the preset's own width gives the preset."""
    shape = lambda cfg: (cfg.dim, cfg.heads, cfg.ffn, cfg.depth)
    assert shape(L.preset_config("tiny", dim=192)) == shape(L.preset_config("tiny")) == (192, 6, 512, 6)
    assert shape(L.preset_config("tiny", dim=256)) == (256, 8, 704, 6)           # 256 x 512 / 192 = 682.7
    assert shape(L.preset_config("tiny", dim=320, depth=3)) == (320, 10, 864, 3)
    assert shape(L.preset_config("wan1.3b", dim=1024)) == (1024, 8, 5984, 30)    # 1024 x 8960 / 1536 = 5973.3
    with pytest.raises(ValueError, match="heads are 128 wide"):
        L.preset_config("wan1.3b", dim=1000)


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


@pytest.mark.parametrize("patch, audio_adaln", [(2, False), (1, False), (2, True)])
def test_streaming_with_cache_equals_block_causal_forward(patch, audio_adaln):
    """(a) While the stream fits the window, running chunk after chunk with the KV cache (each
    pass writing its keys) equals one block-causal forward over the whole sequence, to 1e-5; at
    Wan's patch 2, at patch 1 (`train.py teacher --patch 1`) and with `--audio-adaln`."""
    model = bitey_dit(patch=patch, audio_adaln=audio_adaln)
    chunk, n_chunks = 3, 4
    x, t, cond, audio = stream_inputs(chunk * n_chunks)
    N = (4 // patch) ** 2                                         # tokens per latent frame (4x4 latent)
    full = model(x, t, cond, audio, mask=L.block_causal_mask(x.shape[1], N, chunk))
    cache = L.KVCache(len(model.blocks), sink=1, window=chunk * n_chunks, chunk=chunk)
    parts = []
    for c in range(n_chunks):
        sl = slice(c * chunk, (c + 1) * chunk)
        parts.append(model(x[:, sl], t[:, sl], cond[:, sl], audio[:, sl], cache=cache, update_cache=True))
    assert_close(torch.cat(parts, 1), full, 1e-5, "streamed vs block-causal")
    bidirectional = model(x, t, cond, audio)
    assert (bidirectional - full)[:, :-chunk].abs().max() > 1e-3    # the mask really changes the result


def random_syncnet(seed=0):
    """A SyncNet in evaluation mode with random weights and BatchNorm statistics (none at their init)."""
    torch.manual_seed(seed)
    net = L.SyncNet(L.SyncNetConfig()).eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(), m.running_var.uniform_(0.5, 2.0)
    return net


def test_audio_encoder_is_the_syncnet_audio_stream_on_each_frames_window():
    """With an AudioEncoder, a clip's features (audio_frame_features) are SyncNet.embed_audio, as
    sync_embeddings calls it on the whole clip's raw log-mel, of the 5-frame window centred on
    each video frame (scaled by AUDIO_EMBED_STD); frames whose window leaves the clip hear silence
    there; a range of frames from a piece of the audio (as a stream computes them) equals the
    same rows of the whole clip's."""
    net = random_syncnet()
    enc = L.AudioEncoder()
    enc.load_syncnet_audio(net)
    clip = L.synthtalk_clip("test", 0, seconds=2)
    ctx, spf = 2, L.MELS_PER_FRAME
    feats = L.audio_frame_features(clip.audio, ctx, enc)                  # row i: frame i - 3 - ctx
    T = len(clip.audio) // L.SAMPLES_PER_FRAME
    assert feats.shape == (T + 3 + 2 * ctx, L.SyncNetConfig.embed)
    mel = L.log_mel(torch.as_tensor(clip.audio).float())                      # (4 T, 40), unnormalised
    with torch.no_grad():
        for v in (2, 3, 17, T - 3):                                           # windows inside the clip
            ref = net.embed_audio(mel[(v - 2) * spf:(v + 3) * spf][None])[0] / L.AUDIO_EMBED_STD
            assert_close(feats[v + 3 + ctx], ref, 1e-5, f"frame {v}")
        silent = torch.cat([torch.zeros(2 * L.SAMPLES_PER_FRAME), torch.as_tensor(clip.audio[:3 * L.SAMPLES_PER_FRAME])])
        ref = net.embed_audio(L.log_mel(silent)[None, :5 * spf])[0] / L.AUDIO_EMBED_STD
        assert_close(feats[3 + ctx], ref, 5e-5, "frame 0, two frames of silence before it")
    v0, offset = 20, 14 * L.SAMPLES_PER_FRAME + 100
    piece = L.frame_features(clip.audio[offset:offset + 16 * L.SAMPLES_PER_FRAME], v0, v0 + 8, offset, enc)
    assert_close(piece, feats[v0 + 3 + ctx:v0 + 11 + ctx], 1e-5, "a piece of the audio")
    assert (feats - L.audio_frame_features(clip.audio, ctx, L.AudioEncoder())).abs().max() > 1e-2   # the weights count


def test_audio_encoder_is_frozen_and_saved_with_the_dit(tmp_path):
    """A DiT with audio_encoder reads (4 + 2c) embeddings per latent frame; the encoder's weights
    are buffers, in the checkpoint but not in parameters(), so training mode, requires_grad_ and an
    optimiser step leave them and the features unchanged (BatchNorm's running statistics), and a
    saved and loaded DiT makes the same features."""
    model = tiny_dit(audio_encoder=True)
    assert model.audio_embed[0].in_features == model.cfg.audio_channels == (4 + 2 * 2) * L.SyncNetConfig.embed
    model.audio_encoder.load_syncnet_audio(random_syncnet())
    names = {f"audio_encoder.{k}" for k, _ in model.audio_encoder.named_buffers()}
    assert names and names <= set(model.state_dict()) and not names & {k for k, _ in model.named_parameters()}
    audio = L.synthtalk_clip("test", 0, seconds=1).audio
    feats = L.audio_frame_features(audio, 2, model.audio_encoder)
    before = copy.deepcopy(model.audio_encoder.state_dict())
    model.train().requires_grad_(True)
    x, t, cond, a = dit_inputs(B=2, Fr=3, hw=4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    model(x, t, cond, torch.randn(2, 3, model.cfg.audio_channels)).square().mean().backward()
    opt.step()
    assert all(torch.equal(v, before[k]) for k, v in model.audio_encoder.state_dict().items())
    assert torch.equal(L.audio_frame_features(audio, 2, model.audio_encoder), feats)
    L.save_checkpoint(tmp_path / "t.safetensors", model, model.cfg)
    loaded = L.load_checkpoint(tmp_path / "t.safetensors", L.DiTConfig, L.DiT)[0]
    assert torch.equal(L.audio_frame_features(audio, 2, loaded.audio_encoder), feats)


def test_a_student_run_without_a_cache_attends_block_causally():
    """cfg.causal is what makes a DiT a student: run without a cache or a mask (a whole window at
    once, as analyze.py runs a checkpoint), it takes block_causal_mask itself, so a chunk never
    sees the chunks after it, and a frame sees every frame of its own chunk; the teacher's config
    (causal=False) stays bidirectional."""
    x, t, cond, audio = stream_inputs(9)
    student = bitey_dit(causal=True)
    own = student(x, t, cond, audio)
    assert_close(own, student(x, t, cond, audio, mask=L.block_causal_mask(9, 4, 3)), 1e-12, "own mask vs explicit")
    later = x.clone()
    later[:, 3:] += 1.0                                            # change every chunk after the first
    assert_close(student(later, t, cond, audio)[:, :3], own[:, :3], 1e-12, "first chunk, later chunks changed")
    within = x.clone()
    within[:, 2] += 1.0                                            # the first chunk's last frame: its own chunk sees it
    assert (student(within, t, cond, audio) - own)[:, 0].abs().max() > 1e-3
    teacher = bitey_dit(causal=False)
    assert (teacher(later, t, cond, audio) - teacher(x, t, cond, audio))[:, :3].abs().max() > 1e-3


@pytest.mark.parametrize("window, sink", train.DF_CACHES)
def test_rolling_cache_attention_equals_explicit_slicing(window, sink):
    """(b) With rolling, each chunk attends exactly [the first `sink` frames | the last
    window - chunk - sink cached frames | itself], rotated by place: one attention layer fed chunk
    by chunk equals a reference that assembles those keys by hand from all frames' projections.
    Every (window, sink) that df trains with, the default (7, 1) first."""
    torch.manual_seed(0)
    D, H, N, chunk, n_chunks = 32, 4, 4, 3, 7
    attn = L.Attention(D, H).double()
    freqs = L.rope_freqs(D // H, 10000.0)
    cache = L.KVCache(1, sink=sink, window=window, chunk=chunk)
    xs = torch.randn(1, n_chunks * chunk * N, D, dtype=torch.float64)   # chunks of 3 frames of N tokens
    q_all, k_all, v_all = attn.qkv(xs).view(1, -1, 3, H, D // H).permute(2, 0, 3, 1, 4)
    k_all, recent = attn.k_norm(k_all), window - chunk - sink
    for c in range(n_chunks):
        x = xs[:, c * chunk * N:(c + 1) * chunk * N]
        past = cache.cached_frames
        rope = rope_at(freqs, range(past + chunk), torch.float64)
        out = attn(x, rope, kv=cache.layers[0], tokens_per_frame=N)
        cache.update = True                                               # the refresh pass writes
        attn(x, rope, kv=cache.layers[0], tokens_per_frame=N)
        cache.update = False
        cache.frames += chunk
        # reference: the sink frames + the `recent` frames before this chunk (or all, while they fit)
        prev = list(range(c * chunk))
        keep = prev if len(prev) <= sink + recent else prev[:sink] + prev[len(prev) - recent:]
        frames = keep + list(range(c * chunk, (c + 1) * chunk))
        tok = torch.cat([torch.arange(f * N, (f + 1) * N) for f in frames])
        ang = L.rope_angles(freqs, torch.arange(len(frames)), 2, 2)
        q = wan_rope(attn.q_norm(q_all[:, :, c * chunk * N:(c + 1) * chunk * N]), ang[-chunk * N:])
        k = wan_rope(k_all[:, :, tok], ang)
        ref = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), -1) @ v_all[:, :, tok]
        ref = attn.proj(ref.transpose(1, 2).reshape(1, -1, D))
        assert_close(out, ref, 1e-10, f"chunk {c}")
    assert cache.cached_frames == sink + recent and cache.layers[0].k.shape[2] == (sink + recent) * N


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


def test_a_rolled_chunk_equals_a_fresh_forward_over_the_frames_its_cache_holds():
    """Dynamic RoPE against a reference with no cache: in a one-block DiT a cached frame's keys
    depend on that frame alone, so chunk 6 of a stream (rolled: the sink, frame 0, and the 3 frames
    before it) must equal a fresh forward over just those 7 frames, at positions 0-6, each frame
    with its own input and audio. Queries placed by stream position instead (15-17) fail it."""
    model = bitey_dit(depth=1, causal=True)
    chunk, sink, window = 3, 1, 7
    x, t, cond, audio = stream_inputs(6 * chunk)                 # 6 chunks, all different
    cache = L.KVCache(1, sink=sink, window=window, chunk=chunk)
    with torch.no_grad():
        for c in range(6):
            part = [v[:, c * chunk:(c + 1) * chunk] for v in (x, t, cond, audio)]
            out = model(*part, cache=cache)
            model(*part, cache=cache, update_cache=True)
        held = [0, 12, 13, 14, 15, 16, 17]                       # sink | recent | the chunk
        fresh = model(*[v[:, held] for v in (x, t, cond, audio)], mask=torch.ones(7 * 4, 7 * 4, dtype=torch.bool))
    assert_close(out, fresh[:, -chunk:], 1e-10, "rolled chunk vs fresh forward over the held frames")
    assert (out - model(*[v[:, 12:18] for v in (x, t, cond, audio)])[:, -chunk:]).abs().max() > 1e-4   # the sink counts


def test_compiled_blocks_stream_as_eager_with_graphs_independent_of_depth():
    """compile_blocks (regional torch.compile) streams the same outputs as the eager model, and
    compiles the same number of graphs for 1 block as for 3, fewer than dynamo's recompile limit
    (past it, a block falls back to eager): each block gets its own KVSlot, so the one compiled
    block code serves every block (a block number as argument would specialise it, one set of
    graphs per block). The eager backend keeps it fast: graphs are a dynamo matter."""
    def stream(model):
        x, t, cond, audio = stream_inputs(3)
        cache, outs = L.KVCache(model.cfg.depth, sink=1, window=7, chunk=3), []
        with torch.no_grad():
            for c in range(5):                    # cache: empty, 3 frames, then rolled to 4 (sink + recent)
                outs.append(model(x + c, t, cond, audio, cache=cache))
                model(x + c, t, cond, audio, cache=cache, update_cache=True)
        return torch.stack(outs)

    graphs = {}
    for depth in (1, 3):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        model = bitey_dit(depth=depth, causal=True)
        eager = stream(model)
        streamed = stream(L.compile_blocks(model, backend="eager"))
        assert_close(streamed, eager, 1e-12, f"depth {depth}")
        graphs[depth] = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert 0 < graphs[1] == graphs[3] < torch._dynamo.config.recompile_limit, graphs


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


# -----------------------------------------------------------------------------
# the two-step sampler and the live stream


def test_two_step_chunks_with_kv_refresh_equal_a_block_causal_reference():
    """sample_chunk run chunk after chunk with a cache (two passes, then the KV refresh at t = 0)
    equals a reference without any cache: each pass is one block-causal forward over the earlier
    chunks' clean outputs at t = 0 followed by the current chunk, of which the last chunk is kept."""
    model = bitey_dit()
    chunk, n_chunks = 3, 3
    _, _, cond, audio = stream_inputs(chunk * n_chunks)
    g = torch.Generator().manual_seed(5)
    noises = torch.randn(len(L.STUDENT_STEPS), 1, chunk * n_chunks, 16, 4, 4, generator=g).double()
    cache = L.KVCache(len(model.blocks), sink=1, window=chunk * n_chunks, chunk=chunk)
    streamed = [L.sample_chunk(model, cond[:, c * chunk:(c + 1) * chunk], audio[:, c * chunk:(c + 1) * chunk],
                               noises[:, :, c * chunk:(c + 1) * chunk], cache) for c in range(n_chunks)]
    clean = []
    with torch.no_grad():
        for c in range(n_chunks):
            n = (c + 1) * chunk
            mask = L.block_causal_mask(n, 4, chunk)
            x0 = None
            for i, t in enumerate(L.STUDENT_STEPS):
                x = noises[i, :, c * chunk:n] if x0 is None else \
                    (1 - t) * x0 + t * noises[i, :, c * chunk:n]
                seq = torch.cat(clean + [x], 1)
                tt = torch.cat([torch.zeros(1, c * chunk), torch.full((1, chunk), t)], 1).double()
                x0 = x - t * model(seq, tt, cond[:, :n], audio[:, :n], mask=mask)[:, -chunk:]
            clean.append(x0)
            assert_close(streamed[c], x0, 1e-6, f"chunk {c}")
    assert (streamed[2] - streamed[1]).abs().max() > 1e-3


def tiny_stream_models(seed=0, audio_encoder=False):
    """A random autoencoder and a perturbed tiny causal DiT (float32), as the stream runs them;
    with audio_encoder, a random SyncNet's audio stream makes its features."""
    torch.manual_seed(seed)
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    model = tiny_dit(causal=True, audio_encoder=audio_encoder).eval()
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    if audio_encoder:
        model.audio_encoder.load_syncnet_audio(random_syncnet(seed))
    return ae, model


@pytest.mark.parametrize("audio_encoder", [False, True])
def test_stream_output_does_not_depend_on_how_the_input_arrives(audio_encoder):
    """The stream's frames are the same whether the clip is pushed at once or in ragged pieces
    (audio ahead of or behind the frames), one output frame per source frame; frames come out only
    once their chunk's input (9, then 12 frames, plus the audio lookahead) is in; with an audio
    encoder too, whose windows reach 2 frames further."""
    ae, model = tiny_stream_models(audio_encoder=audio_encoder)
    clip = L.synthtalk_clip("test", 1, seconds=2.3, size=32)              # 57 frames: 4 chunks and a partial one
    T = len(clip.frames)
    whole = L.lipsync(model, ae, clip.frames, clip.audio, seed=3)
    assert whole.shape == clip.frames.shape and whole.dtype == np.uint8
    rng = np.random.default_rng(0)
    stream = L.LipSyncStream(model, ae, seed=3)
    out, f, a = [], 0, 0
    audio_for = lambda n: (n + 2 + 2 * audio_encoder) * SAMPLES_PER_FRAME + 120   # frames 0..n-1 need
    while f < T or a < len(clip.audio):
        nf, na = int(rng.integers(0, 7)), int(rng.integers(0, 9 * SAMPLES_PER_FRAME))
        got = stream.push(clip.frames[f:f + nf], clip.audio[a:a + na])
        f, a = min(T, f + nf), min(len(clip.audio), a + na)
        out.append(got)
        done = sum(len(o) for o in out)
        assert done in (0, 9) or (done - 9) % 12 == 0
        # no frame before its chunk's frames and audio are in, and no complete chunk held back
        assert done <= f and (done == 0 or audio_for(done) <= a)
        nxt = 9 if done == 0 else done + 12
        assert nxt > f or audio_for(nxt) > a
    out.append(stream.flush())
    pieces = np.concatenate(out)
    assert np.array_equal(pieces, whole)
    stream = L.LipSyncStream(model, ae, seed=3)                           # the first chunk waits for its last sample
    assert len(stream.push(clip.frames[:9], clip.audio[:audio_for(9) - 1])) == 0
    assert len(stream.push(audio=clip.audio[audio_for(9) - 1:audio_for(9)])) == 9
    # the generated lower face differs from the source, the upper face is the source
    assert np.abs(whole[:, 20:].astype(int) - clip.frames[:, 20:]).mean() > 1
    assert np.array_equal(whole[:, :14], clip.frames[:, :14])


def test_lipsync_of_whole_chunks_only():
    """33 frames (9 + 12 + 12) with audio to spare: every chunk runs during the push, so the flush
    has nothing left, and the output is still one frame per source frame."""
    ae, model = tiny_stream_models()
    clip = L.synthtalk_clip("test", 1, seconds=2.0, size=32)
    frames = clip.frames[:33]
    stream = L.LipSyncStream(model, ae)
    assert len(stream.push(frames, clip.audio)) == 33
    assert stream.flush().shape == (0, 32, 32, 3)
    assert L.lipsync(model, ae, frames, clip.audio).shape == frames.shape


def test_composite_mask_ramps_across_the_middle_row():
    """The paste mask is 0 above the face's middle and 1 below, with an H/16-row linear ramp
    centred on row H/2: at 32 px rows 14..17 read 0, 0.25, 0.75, 1."""
    m = L.composite_mask(32, 20)
    assert m.shape == (32, 20, 1) and (m[:14] == 0).all() and (m[18:] == 1).all()
    assert m[14:18, 0, 0].tolist() == [0.0, 0.25, 0.75, 1.0]


def test_the_regions_are_the_lower_half_and_the_mouth_box():
    """The lip task's regions, row by row: lower_face_mask (what the DiT regenerates) is 1 from row
    H // 2 down and 0 above, at odd heights too; lower_face (what the SyncNets and MouthNet read,
    so every Sync-C, the reward and MouthErr) is that half of the frame, area-resized; mouth_crop's
    numpy branch (mouth PSNR and SSIM) cuts the frames where its torch branch (the loss) does."""
    for H in (8, 9, 64):
        m = L.lower_face_mask(H, 5)
        assert (m[:H // 2] == 0).all() and (m[H // 2:] == 1).all(), H
    x = torch.arange(64.0)[:, None].expand(2, 5, 3, 64, 48)                  # each pixel holds its row
    assert torch.equal(L.lower_face(x, (32, 48)), x[..., 32:, :])
    assert torch.equal(L.lower_face(x, (16, 24)),
                       F.interpolate(x[..., 32:, :].reshape(10, 3, 32, 48), size=(16, 24), mode="area").view(2, 5, 3, 16, 24))
    a = np.random.default_rng(0).integers(0, 256, (2, 64, 48, 3), dtype=np.uint8)
    crop = L.mouth_crop(a)
    assert crop.shape == (2, 21, 21, 3)                                      # rows 35..55, columns 13..33
    assert np.array_equal(crop, L.mouth_crop(torch.from_numpy(a).movedim(-1, -3)).movedim(-3, -1).numpy())


@pytest.mark.parametrize("audio_encoder", [False, True])
def test_stream_flush_repeats_the_last_frame_and_feeds_each_chunk_its_training_inputs(monkeypatch, audio_encoder):
    """A clip that ends mid-chunk streams as the same clip padded by hand with its last frame; every
    chunk gets the conditions (reference latent | lower-face mask | masked source latent) and packed
    audio that latent_window builds for training from the whole (padded) clip (with the DiT's audio
    encoder, if it has one), and fresh noise for each of its steps, drawn from the stream's seeded
    generator."""
    ae, model = tiny_stream_models(audio_encoder=audio_encoder)
    clip = L.synthtalk_clip("test", 1, seconds=2.3, size=32)
    frames = clip.frames[:50]                                              # 9 + 12 + 12 + 12, then 5
    padded = np.concatenate([frames, frames[-1:].repeat(7, 0)])
    fed = []
    sample_chunk = L.sample_chunk
    monkeypatch.setattr(L, "sample_chunk", lambda m, cond, audio, noises, *a: fed.append((cond[0], audio[0], noises))
                        or sample_chunk(m, cond, audio, noises, *a))
    out = L.lipsync(model, ae, frames, clip.audio, seed=2)
    ctx = model.cfg.audio_context
    enc = L.encode_clip(ae, padded, clip.audio, ctx, encoder=model.audio_encoder)
    _, cond, audio = L.latent_window(enc, 0, 15, 0, ctx)                                 # latents 0..14
    assert_close(torch.cat([c for c, _, _ in fed]), cond, 1e-5, "conditions")
    assert_close(torch.cat([a for _, a, _ in fed]), audio, 1e-5, "packed audio")
    gen = torch.Generator().manual_seed(2)
    for _, _, noises in fed:                                               # (steps, 1, F, 16, h, w)
        assert torch.equal(noises, torch.randn(noises.shape, generator=gen))
    monkeypatch.undo()
    assert np.array_equal(out, L.lipsync(model, ae, padded, clip.audio, seed=2)[:50])


def test_stream_memory_is_bounded():
    """Once the window has filled, the stream's state (KV cache, decoder memory, buffered input)
    is the same size after chunk 4 as after chunk 30."""
    ae, model = tiny_stream_models()
    frames = np.zeros((12, 32, 32, 3), np.uint8)
    audio = np.zeros(12 * SAMPLES_PER_FRAME, np.float32)
    stream = L.LipSyncStream(model, ae)
    stream.push(frames[:9], audio[:9 * SAMPLES_PER_FRAME])
    sizes = []
    for c in range(30):
        stream.push(frames, audio)
        sizes.append(stream.nbytes())
    assert sizes[3] == sizes[29] and stream.cache.cached_frames == 4 and stream.done > 300


# -----------------------------------------------------------------------------
# sample.py: the command line

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny causal DiT (zero-init weights perturbed, so the output depends on the audio) that
    records 32 px frames as its training size, and a tiny random autoencoder, saved as
    checkpoints; returns the sample.py options that load them (so --size is the student's 32)."""
    d = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    student = L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128, causal=True))
    for p in student.parameters():
        p.data += 0.05 * torch.randn_like(p)
    ae = L.VideoAE(L.AEConfig(width=8))
    L.save_checkpoint(d / "student.safetensors", student, student.cfg, extra={"size": 32})
    L.save_checkpoint(d / "vae.safetensors", ae, ae.cfg)
    return ["--ckpt", str(d / "student.safetensors"), "--vae", str(d / "vae.safetensors")]


def face_video(path, T, H=48, W=48, fps=25):
    """T frames whose upper half is a flat grey that identifies the frame (levels 40 apart) over a
    reddish lower half; returns the frames as written."""
    frames = np.zeros((T, H, W, 3), np.uint8)
    frames[:] = (20 + 40 * (np.arange(T) % 6)).astype(np.uint8)[:, None, None, None]
    frames[:, H // 2:, :, 0] = 200
    L.write_video(path, frames, fps=fps)
    return frames


def speech(path, n_frames, sr=SAMPLE_RATE, channels=1, silent=False):
    """A noise 'voice' of n_frames video frames (16-bit wav); returns the 16 kHz mono length in samples."""
    n = round(n_frames * SAMPLES_PER_FRAME * sr / SAMPLE_RATE)
    x = np.zeros((n, channels), np.float32) if silent else \
        np.clip(0.2 * np.random.default_rng(0).standard_normal((n, channels)), -1, 1).astype(np.float32)
    sf.write(path, x, sr)
    return round(n * SAMPLE_RATE / sr)


def run(argv, cap):
    """sample.main(argv) in-process -> (exit code, stdout, stderr) as captured by capsys(binary)."""
    try:
        sample.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = cap.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words, prog="sample.py"):
    assert code == 2, (code, err)
    lines = err.strip().splitlines() if isinstance(err, str) else err.decode().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    for w in words:
        assert w in lines[0], (w, lines[0])


class Trickle:
    """A stdin whose reads return the bytes in ragged pieces (odd sizes too, under `most`), as a pipe does."""
    def __init__(self, data, seed=0, most=3000):
        self.data, self.pos, self.rng, self.most = data, 0, np.random.default_rng(seed), most

    def read1(self, n):
        k = min(n, int(self.rng.integers(1, self.most)))
        b, self.pos = self.data[self.pos:self.pos + k], self.pos + k
        return b


def pcm(path):
    """The wav at `path` as the raw s16le bytes ffmpeg -f s16le would send."""
    x, sr = sf.read(path, dtype="int16")
    assert sr == SAMPLE_RATE and x.ndim == 1
    return x.astype("<i2").tobytes()


# -----------------------------------------------------------------------------
# bad input: one line, exit code 2, nothing written


def _missing(tmp):
    return tmp / "missing.mp4", tmp / "a.wav"


def _directory(tmp):
    return tmp, tmp / "a.wav"


def _zero_length_audio(tmp):
    sf.write(tmp / "empty.wav", np.zeros(0, np.float32), SAMPLE_RATE)
    return tmp / "v.mp4", tmp / "empty.wav"


def _audio_as_video(tmp):
    return tmp / "a.wav", tmp / "a.wav"


def _corrupt_video(tmp):
    (tmp / "bad.mp4").write_bytes(np.random.default_rng(0).bytes(5000))
    return tmp / "bad.mp4", tmp / "a.wav"


def _corrupt_audio(tmp):
    (tmp / "bad.m4a").write_bytes(np.random.default_rng(1).bytes(5000))
    return tmp / "v.mp4", tmp / "bad.m4a"


def _cut_short_video(tmp):
    cut_short(tmp / "cut.mp4")
    return tmp / "cut.mp4", tmp / "a.wav"


def _cut_short_audio(tmp):
    data = (tmp / "a.wav").read_bytes()
    (tmp / "cut.wav").write_bytes(data[:len(data) // 2])
    return tmp / "v.mp4", tmp / "cut.wav"


@pytest.mark.parametrize("make, words", [
    (_missing, ("missing.mp4", "does not exist")),
    (_directory, ("is a directory",)),
    (_zero_length_audio, ("empty.wav", "no audio samples")),
    (_audio_as_video, ("a.wav", "no video stream")),
    (_corrupt_video, ("bad.mp4", "could not be decoded")),
    (_corrupt_audio, ("bad.m4a", "could not be decoded")),
    (_cut_short_video, ("cut.mp4", "cut short", "re-download")),
    (_cut_short_audio, ("cut.wav", "cut short", "re-download")),
])
def test_bad_media_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, ckpt, make, words):
    """Every bad media input ends with one line `sample.py: error: <what, what to do>`, exit code 2,
    and nothing at --out (not even its folder, nor a temp file)."""
    face_video(tmp_path / "v.mp4", 12)
    speech(tmp_path / "a.wav", 12)
    video, audio = make(tmp_path)
    out = tmp_path / "o" / "x.mp4"
    code, _, err = run(["--video", video, "--audio", audio, "--out", out, *ckpt], capsys)
    assert_one_line_error(code, err, *words)
    assert not out.parent.exists()


@pytest.mark.parametrize("argv, words", [
    (["--steps", "3"], ("--steps 3", "1 or 2")),
    (["--out", "x.txt"], ("x.txt", ".mp4")),
    (["--size", "40"], ("multiple of 16",)),
    (["--bogus"], ("unrecognized arguments: --bogus",)),
    (["--stream", "--out", "-", "--benchmark"], ("pick one",)),
    (["--patch", "1"], ("--patch", "--benchmark --shape")),
    (["--depth", "30"], ("--depth", "--benchmark --shape")),
    (["--dim", "64"], ("--dim", "--benchmark --shape")),
    (["--device", "bogus"], ("--device bogus", "not a device")),
    (["--device", "meta"], ("--device meta", "cpu or cuda")),
])
def test_bad_arguments_are_one_line_exit_2(tmp_path, capsys, ckpt, argv, words):
    """Bad options fail before any work with one line and exit code 2 (argparse's usage block too)."""
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", *ckpt, *argv], capsys)
    assert_one_line_error(code, err, *words)


def test_the_frame_size_is_the_students_own_and_another_is_refused_outside_the_benchmark(tmp_path, capsys, ckpt):
    """sample.py's --size defaults to the size recorded in the student's checkpoint (L.FRAME_SIZE
    where none is), and a size the student did not train at is refused, one line, before any media
    is read, except by --benchmark, which only times it."""
    recorded = {"size": 32}
    args = lambda **kw: SimpleNamespace(**{"size": None, "benchmark": False, **kw})
    assert sample.student_size(args(), "s", recorded) == 32 and sample.student_size(args(), "s", {}) == L.FRAME_SIZE
    assert sample.student_size(args(size=48), "s", {}) == 48 and sample.student_size(args(size=32), "s", recorded) == 32
    assert sample.student_size(args(size=48, benchmark=True), "s", recorded) == 48
    face_video(tmp_path / "v.mp4", 12)
    speech(tmp_path / "a.wav", 12)
    for size in ("64", "48"):                                   # the fixture's student records 32
        code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                            *ckpt, "--size", size], capsys)
        assert_one_line_error(code, err, f"--size {size}", "trained on 32 px frames")
        assert not (tmp_path / "o.mp4").exists()
    (tmp_path / "broken.mp4").write_bytes(b"not a video")       # refused before the media is read, so before this
    code, _, err = run(["--video", tmp_path / "broken.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt, "--size", "48"], capsys)
    assert_one_line_error(code, err, "--size 48", "trained on 32 px frames")
    assert sample.recorded_extra(tmp_path / "broken.mp4") == {} == sample.recorded_extra(tmp_path / "none")
    from safetensors.torch import save_file
    odd = {"config_class": "DiTConfig", "config": "{}", "extra": "{not json"}
    save_file({"w": torch.zeros(2)}, tmp_path / "odd.safetensors", metadata=odd)
    assert sample.recorded_extra(tmp_path / "odd.safetensors") == {}
    assert L.read_safetensors(tmp_path / "odd.safetensors", tensors=False) == ({}, odd)
    with pytest.raises(L.CheckpointError, match="its header's config cannot be read"):
        L.checkpoint_header(tmp_path / "odd.safetensors", L.DiTConfig)


def test_the_output_carries_the_driving_audio_at_its_own_rate_and_channels(tmp_path, capsys, ckpt):
    """File mode muxes the --audio track itself (44.1 kHz stereo stays so), in time with the 16 kHz
    mono the model heard, cut or padded to the frames (here 12.5 frames of audio -> 13 frames)."""
    face_video(tmp_path / "v.mp4", 12)
    seconds = 12.5 / FPS
    left, right = tone(seconds, 44100, 330.0, onset=0.1), tone(seconds, 44100, 1250.0)   # a voice-band pair
    sf.write(tmp_path / "a.wav", np.stack([left, right], 1), 44100)
    n = round(seconds * SAMPLE_RATE)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt], capsys)
    assert code == 0, err
    assert re.search(r"Audio: aac.*44100 Hz, stereo", L._probe(tmp_path / "o.mp4"))
    heard, out = L.read_audio(tmp_path / "a.wav"), L.read_audio(tmp_path / "o.mp4")
    assert len(heard) == n and len(out) == 13 * SAMPLES_PER_FRAME
    assert np.corrcoef(heard, out[:n])[0, 1] > 0.99 and np.abs(out[n + 200:]).max() < 1e-2   # then silence
    # write_video itself: a track that starts 0.4 s late keeps its place, one longer than the frames is cut
    late = tmp_path / "late.mkv"
    ffmpeg("-i", tmp_path / "v.mp4", "-itsoffset", "0.4", "-i", tmp_path / "a.wav", "-map", "0:v", "-map", "1:a",
           "-c:v", "copy", "-c:a", "pcm_s16le", late)
    frames = np.zeros((25, 32, 32, 3), np.uint8)
    L.write_video(tmp_path / "late.mp4", frames, audio_file=late)
    got, want = L.read_audio(tmp_path / "late.mp4"), L.read_audio(late)
    assert len(got) == 25 * SAMPLES_PER_FRAME and np.abs(got[:int(0.38 * SAMPLE_RATE)]).max() < 1e-2
    assert np.corrcoef(got[:len(want)], want[:len(got)])[0, 1] > 0.99
    L.write_video(tmp_path / "cut.mp4", frames[:5], audio_file=tmp_path / "a.wav")
    assert len(L.read_audio(tmp_path / "cut.mp4")) == 5 * SAMPLES_PER_FRAME and len(L.read_video(tmp_path / "cut.mp4")[0]) == 5
    with pytest.raises(ValueError, match="not both"):
        L.write_video(tmp_path / "x.mp4", frames, audio=heard, audio_file=late)


def test_frames_that_are_not_square_are_dubbed_with_a_note(tmp_path, capsys, ckpt):
    """A non-square video is squeezed to the model's square frames: the run says so on stdout and
    goes on; a square one gets no note."""
    speech(tmp_path / "a.wav", 12)
    for (H, W), note in (((48, 64), "64x48"), ((64, 48), "48x64"), ((48, 48), None)):
        face_video(tmp_path / "v.mp4", 12, H, W)
        code, out, _ = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                            *ckpt], capsys)
        assert code == 0 and ("squeezed" in out) == (note is not None), out
        assert note is None or f"the {note} frames are squeezed to 32x32" in out


@pytest.mark.parametrize("argv, words", [
    (["--seconds", "nan"], ("--seconds nan", "positive number of seconds")),
    (["--seed", str(2 ** 64)], ("--seed", "2**63 - 1")),
    (["--benchmark", "--out", "{tmp}/x.mp4"], ("--out is read by", "not by --benchmark")),
    (["--benchmark", "--seed", "3"], ("--seed is read by", "not by --benchmark")),
    (["--flops"], ("--flops is read by --benchmark", "not by demo")),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--seconds", "2"], ("--seconds is read by", "not by files")),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--teacher", "t.safetensors"], ("--teacher", "not by files")),
    (["--video", "{tmp}/v.mp4", "--audio", "-"], ("--audio -", "is for --stream")),
    (["--video", "", "--audio", "{tmp}/a.wav"], ("take a path, not an empty string",)),
    (["--stream", "--video", "{tmp}/v.mp4", "--audio", "{tmp}/gone.pcm", "--out", "-"], ("gone.pcm", "does not exist")),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--out", "{tmp}/a.wav/x.mp4"], ("a.wav is a file, not a folder",)),
    (["--benchmark", "--results", "{tmp}/a.wav"], ("a.wav is a file", "folder")),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--out", "{tmp}/./v.mp4"], ("v.mp4 is the --video file",)),
    (["--video", "{tmp}/a.mp4", "--audio", "{tmp}/a.mp4", "--out", "{tmp}/a.mp4"], ("a.mp4 is the --video file",)),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.mp4", "--out", "{tmp}/a.mp4"], ("a.mp4 is the --audio file",)),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--out", "{tmp}/link.mp4"], ("link.mp4 is the --video file",)),
    (["--video", "{tmp}/v.mp4", "--audio", "{tmp}/a.wav", "--out", "{tmp}/hard.mp4"], ("hard.mp4 is the --video file",)),
    (["--benchmark", "--teacher", "{tmp}/gone.safetensors"], ("--teacher", "gone.safetensors: not found")),
    (["--benchmark", "--vae", "{tmp}"], ("--vae", "a folder")),
    (["--benchmark", "--shape", "tiny", "--ckpt", "s.safetensors"], ("--shape times random-init models",)),
    (["--benchmark", "--shape", "tiny", "--dim", "100"], ("--dim 100", "heads are 32 wide", "multiple of 32")),
])
def test_options_a_mode_does_not_read_and_unwritable_outputs_fail_first(tmp_path, capsys, argv, words):
    """Every mode refuses the options it would ignore, and a path under a file (--out, --results),
    out-of-range numbers and a missing stream source fail before any model loads: one line, exit 2."""
    speech(tmp_path / "a.wav", 3)
    for name in ("v.mp4", "a.mp4"):                          # inputs that --out must not replace
        (tmp_path / name).write_bytes(b"\0")
    (tmp_path / "link.mp4").symlink_to(tmp_path / "v.mp4")
    os.link(tmp_path / "v.mp4", tmp_path / "hard.mp4")                # the same file under another name
    code, _, err = run([a.format(tmp=tmp_path) for a in argv], capsys)
    assert_one_line_error(code, err, *words)


def test_stream_refuses_a_container_file_as_raw_pcm(tmp_path, capsys, monkeypatch):
    """--stream reads raw PCM: an mp3 (ID3-tagged), flac, ogg, wav, mp4, webm/mkv, aiff or au, or
    a text file, fed to it is refused in one line, not played as noise driving the lips, also when
    the pipe hands over its first bytes a few at a time; raw PCM, however it arrives, comes out
    whole, a loud clip of speech included."""
    heads = (b"ID3\x04\x00", b"fLaC\x00\x00", b"OggS\x00\x02", b"RIFF$\x00\x00", b"\x00\x00\x00\x18ftypM4A ",
             b"\x1aE\xdf\xa3\x9fB\x86", b"FORM\x00\x00\x10\x00AIFF", b".snd\x00\x00\x00\x18")
    for head in heads:
        for most in (1 << 16, 4):                                            # ragged, or 1-3 bytes per read
            monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(head + bytes(4000), most=most)))
            with pytest.raises(SystemExit) as e:
                list(sample.pcm_pieces("-"))
            assert e.value.code == 2 and "reads raw PCM" in capsys.readouterr().err, (head, most)
    for text in (b"speech.wav\n" * 20, b"0.1\t-0.2\r\n"):                         # a list of names; a short table
        (tmp_path / "in").write_bytes(text)
        with pytest.raises(SystemExit) as e:
            list(sample.pcm_pieces(str(tmp_path / "in")))
        assert e.value.code == 2 and "in is text" in capsys.readouterr().err, text
    for i in range(4):                                                       # speech at full scale is not text
        audio = L.synthtalk_clip("test", i, seconds=2).audio
        pcm = (audio / np.abs(audio).max() * 32767).astype("<i2")
        for at in range(0, len(pcm) - 32, 16):
            assert not all(32 <= b < 127 or b in b"\t\n\r" for b in pcm[at:at + 32].tobytes()), (i, at)
    samples = (np.arange(-7, 8) * 1000).astype("<i2")                        # 15 samples, 30 bytes
    for most in (1 << 16, 4, 2):                                             # 2: one byte per read
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(samples.tobytes(), most=most)))
        assert np.array_equal(np.concatenate(list(sample.pcm_pieces("-"))) * 32768, samples)
    (tmp_path / "in").write_bytes(bytes(4000))                               # silence is fine, from a file too
    assert sum(len(p) for p in sample.pcm_pieces(str(tmp_path / "in"))) == 2000
    (tmp_path / "in").write_bytes(samples[:4].tobytes())                      # shorter than any container's head
    assert np.array_equal(np.concatenate(list(sample.pcm_pieces(str(tmp_path / "in")))) * 32768, samples[:4])


def test_stream_refuses_a_container_file_before_loading_or_compiling(tmp_path, capsys, monkeypatch):
    """A wav file given to --stream is refused by its head before any model loads, so --compile
    does not spend its warm-up first; a raw PCM file gets as far as loading."""
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    (tmp_path / "a.pcm").write_bytes(bytes(4000))
    loaded = []
    monkeypatch.setattr(sample, "load_student", lambda args: loaded.append(args) or sample.fail("stop here"))
    argv = ["--stream", "--compile", "--video", tmp_path / "v.mp4", "--out", tmp_path / "o.mp4", "--audio"]
    code, _, err = run([*argv, tmp_path / "a.wav"], capsys)
    assert_one_line_error(code, err, "--stream reads raw PCM", "a.wav is a wav", "ffmpeg")
    assert not loaded
    code, _, err = run([*argv, tmp_path / "a.pcm"], capsys)
    assert_one_line_error(code, err, "stop here")
    assert len(loaded) == 1
    real_open = open

    def refuse(path, *a, **kw):                                    # a file we may not read: one line, not a traceback
        if str(path) == str(tmp_path / "a.pcm"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)
    monkeypatch.setattr("builtins.open", refuse)
    code, _, err = run([*argv, tmp_path / "a.pcm"], capsys)
    assert_one_line_error(code, err, "a.pcm: Permission denied")
    assert len(loaded) == 1


def test_stream_mp4_audio_lasts_as_long_as_its_frames(tmp_path):
    """Mp4Writer pads the audio with silence to the end of the last frame, as write_video does."""
    w = sample.Mp4Writer(tmp_path / "x.mp4", 64, 64)
    w.write(np.zeros((3, 64, 64, 3), np.uint8))
    w.wav.write(np.zeros(10, np.float32))
    w.finish()
    w.close()
    assert len(L.read_audio(tmp_path / "x.mp4")) == 3 * SAMPLES_PER_FRAME


def test_audio_with_nan_samples_is_bad_input(tmp_path):
    x = np.zeros(1600, np.float32)
    x[5] = np.nan
    sf.write(tmp_path / "nan.wav", x, SAMPLE_RATE, subtype="FLOAT")
    with pytest.raises(MediaError, match="NaN or infinite samples"):
        L.read_audio(tmp_path / "nan.wav")


def test_missing_student_says_how_to_train_it(tmp_path, capsys, monkeypatch):
    """With no student checkpoint the demo fails in one line naming the command that trains one and
    the folder the default paths were looked for in; a path the user named gets no such hint."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sample, "REPO", str(tmp_path / "repo"))              # a sample.py with no checkpoints beside it
    code, _, err = run([], capsys)
    assert_one_line_error(code, err, "python train.py df", f"in {tmp_path} or beside sample.py in {tmp_path / 'repo'}")
    assert not (tmp_path / "out").exists()
    student = L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128, causal=True))
    L.save_checkpoint(tmp_path / "s.safetensors", student, student.cfg)
    for vae, hint in (("my_vae.safetensors", False), (sample.VAE_CKPT, True)):
        code, _, err = run(["--ckpt", "s.safetensors", "--vae", vae], capsys)
        assert_one_line_error(code, err, f"{vae} not found")
        assert ("beside sample.py" in err) == hint, err


def test_default_checkpoints_are_found_from_any_folder_own_ones_first(tmp_path, monkeypatch):
    """Run from another folder, the default checkpoints are the ones committed beside sample.py; a
    student trained into ./checkpoints there (even only the DF init) comes before them, and a path
    the user names is kept as given."""
    monkeypatch.chdir(tmp_path)
    args = lambda *argv: (a := sample.get_args(["--benchmark", *argv]), sample.check_args(a))[0]
    a = args()
    assert a.vae == os.path.join(HERE, sample.VAE_CKPT) and os.path.isfile(a.vae)
    assert a.teacher == sample.MODE_DEFAULTS["teacher"] or a.teacher.startswith(HERE)   # not committed: either place
    assert sample.student_path(a) == os.path.join(HERE, sample.STUDENT_CKPTS[0])
    os.makedirs("checkpoints")
    open(sample.STUDENT_CKPTS[1], "wb").close()                            # this folder's own DF-init student
    assert sample.student_path(a) == sample.STUDENT_CKPTS[1]
    os.symlink(a.vae, "mine.safetensors")
    assert args("--vae", "mine.safetensors").vae == "mine.safetensors"
    monkeypatch.chdir(HERE)                                                  # in the repository: as given
    assert args().vae == sample.VAE_CKPT and sample.student_path(args()) == sample.STUDENT_CKPTS[0]


def test_a_teacher_checkpoint_is_refused_as_the_student(tmp_path, capsys, ckpt):
    """A bidirectional checkpoint passed as --ckpt is an error (one line), not a silent wrong model;
    it names the student beside that teacher where its run left one."""
    teacher = L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128))
    L.save_checkpoint(tmp_path / "t.safetensors", teacher, teacher.cfg)
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    argv = ["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4", *ckpt,
            "--ckpt", tmp_path / "t.safetensors"]
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "bidirectional", "or leave out --ckpt for the default student")
    assert not (tmp_path / "o.mp4").exists()
    (tmp_path / "student_df.safetensors").write_bytes(b"")       # its run's student, beside it: that is the advice
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, "bidirectional", f"pass --ckpt {tmp_path / 'student_df.safetensors'}")


def test_a_dit_trained_on_another_autoencoder_is_refused_everywhere_it_is_read(tmp_path, capsys, ckpt):
    """The DiT stages record their autoencoder's weights_digest; sample.py, the training stages that
    read a DiT and analyze.py refuse (one line) a DiT recorded with another autoencoder than the
    one they would run it on, and run one recorded with theirs. weights_digest sees one weight or
    the latent statistics change, and not a save and reload, nor a config field added at its default."""
    ae = L.load_checkpoint(ckpt[ckpt.index("--vae") + 1], L.AEConfig, L.VideoAE)[0]
    L.save_checkpoint(tmp_path / "vae.safetensors", ae, ae.cfg)
    same = L.load_checkpoint(tmp_path / "vae.safetensors", L.AEConfig, L.VideoAE)[0]
    assert L.weights_digest(same) == L.weights_digest(ae)
    other = L.VideoAE(dataclasses.replace(ae.cfg, latent_mean=(0.5,) * ae.cfg.latent_channels))
    other.load_state_dict(ae.state_dict())
    nudged = L.VideoAE(ae.cfg)
    nudged.load_state_dict(ae.state_dict())
    next(nudged.parameters()).data.view(-1)[0] += 1e-6
    assert len({L.weights_digest(m) for m in (ae, other, nudged)}) == 3
    grown = L.VideoAE(dataclasses.make_dataclass("Grown", [("new_field", int, 0)], bases=(L.AEConfig,))(
        **dataclasses.asdict(ae.cfg)))                         # a field added to the class later, at its default
    grown.load_state_dict(ae.state_dict())
    assert L.weights_digest(grown) == L.weights_digest(ae)
    student = L.load_checkpoint(ckpt[ckpt.index("--ckpt") + 1], L.DiTConfig, L.DiT)[0]
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    teacher = L.DiT(dataclasses.replace(student.cfg, causal=False))
    for name, digest in (("mine", L.weights_digest(ae)), ("theirs", L.weights_digest(other))):
        L.save_checkpoint(tmp_path / f"{name}.safetensors", student, student.cfg, extra={"size": 32, "autoencoder": digest})
        L.save_checkpoint(tmp_path / f"t_{name}.safetensors", teacher, teacher.cfg, extra={"size": 32, "autoencoder": digest})
        code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / f"{name}.mp4",
                            "--vae", tmp_path / "vae.safetensors", "--ckpt", tmp_path / f"{name}.safetensors"], capsys)
        if name == "mine":
            assert code == 0, err
            continue
        assert_one_line_error(code, err, "theirs.safetensors was trained on the latents of another autoencoder than",
                              "vae.safetensors", "--vae")
        assert not (tmp_path / "theirs.mp4").exists()
    args = train.get_args(["eval-student", "--size", "32", "--ckpt-dir", str(tmp_path)])
    assert train.load_dit(args, tmp_path / "mine.safetensors", True, "eval-student", ae)[2]["autoencoder"]
    with pytest.raises(L.CheckpointError, match="theirs.safetensors was trained on the latents of another autoencoder"):
        train.load_dit(args, tmp_path / "theirs.safetensors", True, "eval-student", ae)
    with pytest.raises(SystemExit) as e:
        A.main(["--teacher", str(tmp_path / "t_mine.safetensors"), "--teacher", str(tmp_path / "t_theirs.safetensors"),
                "--ckpt-dir", str(tmp_path), "--vae", str(tmp_path / "vae.safetensors"), "--clips", "1", "--size", "32",
                "--out", str(tmp_path / "analysis")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "t_theirs.safetensors was trained on the latents of "
                          "another autoencoder", prog="analyze.py")
    assert not (tmp_path / "analysis").exists()


def test_models_that_do_not_fit_together_are_refused(tmp_path, capsys, ckpt):
    """A student that reads other latents than the autoencoder makes, and a causal student passed
    to the benchmark as --teacher, are errors in one line, not a traceback from inside the DiT nor
    a benchmark of the wrong model."""
    other = L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128, causal=True, latent_channels=8))
    L.save_checkpoint(tmp_path / "s8.safetensors", other, other.cfg)
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt, "--ckpt", tmp_path / "s8.safetensors"], capsys)
    assert_one_line_error(code, err, "s8.safetensors reads 8-channel latents", "makes 16", "--vae")
    student = ckpt[ckpt.index("--ckpt") + 1]
    code, _, err = run(["--benchmark", "--seconds", "1.4", *ckpt, "--teacher", student, "--results", tmp_path], capsys)
    assert_one_line_error(code, err, "--teacher", "is a causal student")
    assert not (tmp_path / "o.mp4").exists() and not (tmp_path / "benchmark.json").exists()


def test_real_process_exit_code_and_no_traceback(tmp_path):
    """Run as a program, a missing input exits with status 2 and prints exactly one stderr line."""
    speech(tmp_path / "a.wav", 3)
    p = subprocess.run([sys.executable, os.path.join(HERE, "sample.py"), "--video", tmp_path / "nope.mp4",
                        "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4"], capture_output=True, text=True)
    assert_one_line_error(p.returncode, p.stderr, "nope.mp4", "does not exist")
    assert not (tmp_path / "o.mp4").exists() and p.stdout == ""


# -----------------------------------------------------------------------------
# awkward but valid input: defined behaviour


def _silent(tmp):
    return face_video(tmp / "v.mp4", 12), speech(tmp / "a.wav", 20, silent=True), tmp / "v.mp4", tmp / "a.wav"


def _one_frame(tmp):
    return face_video(tmp / "v.mp4", 1), speech(tmp / "a.wav", 20), tmp / "v.mp4", tmp / "a.wav"


def _odd_size(tmp):
    return face_video(tmp / "v.mp4", 12, H=77, W=123), speech(tmp / "a.wav", 20), tmp / "v.mp4", tmp / "a.wav"


def _8k_stereo(tmp):
    return face_video(tmp / "v.mp4", 30), speech(tmp / "a.wav", 19.5, sr=8000, channels=2), tmp / "v.mp4", tmp / "a.wav"


def _60fps(tmp):
    frames = face_video(tmp / "v.mp4", 60, fps=60)                      # 1 s at 60 fps = 25 frames at 25 fps
    return frames[:25], speech(tmp / "a.wav", 20), tmp / "v.mp4", tmp / "a.wav"


def _shorter_than_a_chunk(tmp):
    return face_video(tmp / "v.mp4", 4), speech(tmp / "a.wav", 6), tmp / "v.mp4", tmp / "a.wav"


@pytest.mark.parametrize("make", [_silent, _one_frame, _odd_size, _8k_stereo, _60fps, _shorter_than_a_chunk])
def test_awkward_input_runs(tmp_path, capsys, ckpt, make):
    """Silent audio, a 1-frame video, odd sizes (123x77), 8 kHz stereo audio, 60 fps video and a
    video shorter than one chunk all run: the output has ceil(samples / 640) frames at the source's
    size (padded to even as write_video does), an audio track, and lands in a folder made for it."""
    _, n_samples, video, audio = make(tmp_path)
    src = L.read_video(video)[0]
    out = tmp_path / "new" / "folder" / "out.mp4"
    code, said, err = run(["--video", video, "--audio", audio, "--out", out, *ckpt], capsys)
    assert code == 0, err
    assert f": {len(src)} frame{'' if len(src) == 1 else 's'} " in said      # "1 frame", "12 frames"
    got = L.read_video(out)[0]
    H, W = src.shape[1:3]
    assert got.shape == (math.ceil(n_samples / SAMPLES_PER_FRAME), H + H % 2, W + W % 2, 3)
    assert L.has_audio(out)
    assert os.listdir(out.parent) == ["out.mp4"]                        # no temp file left beside it


@pytest.mark.parametrize("n_video, n_audio", [(5, 13), (20, 7.5)])
def test_length_follows_the_audio_with_ping_pong(tmp_path, capsys, ckpt, n_video, n_audio):
    """Output frames = ceil(audio samples / 640); output frame i shows source frame pingpong(i):
    0, 1, .., T-1, T-2, .., 0, 1, .. when the audio is longer, the first frames when it is shorter."""
    src = face_video(tmp_path / "v.mp4", n_video)
    n = speech(tmp_path / "a.wav", n_audio)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt], capsys)
    assert code == 0, err
    got = L.read_video(tmp_path / "o.mp4")[0]
    assert len(got) == math.ceil(n / SAMPLES_PER_FRAME)
    # which source frame each output frame shows, by its upper face (grey levels 40 apart)
    top = lambda f: f[:, :12].reshape(len(f), -1).astype(float).mean(1)
    shown = np.abs(top(got)[:, None] - top(src[:6])[None, :]).argmin(1)       # the levels repeat every 6 frames
    expect = [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4] if n_video == 5 else list(range(8))
    assert list(shown) == [e % 6 for e in expect]
    assert [sample.pingpong(i, n_video) for i in range(len(got))] == expect


# -----------------------------------------------------------------------------
# the stream


def test_stream_equals_offline_and_keeps_the_upper_face(tmp_path, capsysbinary, ckpt, monkeypatch):
    """--stream with the audio piped in ragged pieces writes (raw, on stdout) exactly the frames the
    offline path hands to write_video for the same inputs; those frames are the source, pixel for
    pixel, wherever the composite mask is 0 (the upper face), at the source's odd size, and differ
    from it in the lower face."""
    src = face_video(tmp_path / "v.mp4", 7, H=45, W=38)
    n = speech(tmp_path / "a.wav", 57.5)                                   # 4 chunks, a partial one, the cache rolls
    written, write = [], L.write_video

    def spy(path, frames, shape=None, **kw):             # the batches files() hands to write_video
        write(path, (written.append(f) or f for f in frames), shape=shape, **kw)

    monkeypatch.setattr(L, "write_video", spy)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt], capsysbinary)
    assert code == 0, err
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(pcm(tmp_path / "a.wav"))))
    code, raw, err = run(["--stream", "--video", tmp_path / "v.mp4", "--audio", "-", "--out", "-", *ckpt], capsysbinary)
    assert code == 0, err
    assert b"TTFF" in err                                                  # stderr: stdout carries the frames
    src = L.read_video(tmp_path / "v.mp4")[0]
    H, W = src.shape[1:3]
    live = np.frombuffer(raw, np.uint8).reshape(-1, H, W, 3)
    assert len(live) == math.ceil(n / SAMPLES_PER_FRAME)
    assert np.array_equal(live, np.concatenate(written))
    same = L.composite_mask(H, W)[:, 0, 0] == 0                           # rows the generated face never touches
    ping = src[[sample.pingpong(i, len(src)) for i in range(len(live))]]
    assert np.array_equal(live[:, same], ping[:, same])
    assert np.abs(live[:, H * 3 // 4:].astype(int) - ping[:, H * 3 // 4:]).mean() > 1

def test_stream_to_mp4_from_a_growing_file(tmp_path, capsysbinary, ckpt, monkeypatch):
    """--stream from a raw PCM file (read as it grows, ended after GROW_IDLE s of quiet) to an mp4:
    finalised with the audio, the same frames as --out - (up to H.264), one per 640 samples."""
    monkeypatch.setattr(sample, "GROW_IDLE", 0.1)
    face_video(tmp_path / "v.mp4", 6)
    n = speech(tmp_path / "a.wav", 22)
    (tmp_path / "a.pcm").write_bytes(pcm(tmp_path / "a.wav"))
    args = ["--stream", "--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.pcm", *ckpt]
    code, _, err = run(args + ["--out", tmp_path / "live" / "o.mp4"], capsysbinary)
    assert code == 0, err
    code, raw, err = run(args + ["--out", "-"], capsysbinary)
    assert code == 0, err
    got, ref = L.read_video(tmp_path / "live" / "o.mp4")[0], np.frombuffer(raw, np.uint8).reshape(-1, 48, 48, 3)
    assert len(got) == len(ref) == math.ceil(n / SAMPLES_PER_FRAME)
    assert np.abs(got.astype(int) - ref).mean() < 3 and L.has_audio(tmp_path / "live" / "o.mp4")
    assert os.listdir(tmp_path / "live") == ["o.mp4"]


@pytest.mark.parametrize("data, words", [(b"", "no audio arrived"), (b"RIFF\x24\x00\x00\x00WAVEfmt ", "wav")])
def test_stream_without_usable_audio_fails_cleanly(tmp_path, capsysbinary, ckpt, monkeypatch, data, words):
    """--stream with nothing on stdin, or a wav instead of raw PCM: one line, exit 2, no mp4 left."""
    face_video(tmp_path / "v.mp4", 3)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(data)))
    code, _, err = run(["--stream", "--video", tmp_path / "v.mp4", "--audio", "-", "--out", tmp_path / "o.mp4",
                        *ckpt], capsysbinary)
    assert_one_line_error(code, err, words)
    assert os.listdir(tmp_path) == ["v.mp4"]


def test_steps_one_differs_from_two_and_the_schedule_is_restored(tmp_path, capsysbinary, ckpt, monkeypatch):
    """--steps 1 samples a different (one-pass) chunk than --steps 2, and the library's schedule
    is the two-step one again afterwards."""
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 9)
    outs = []
    for steps in ("1", "2"):
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(pcm(tmp_path / "a.wav"))))
        code, raw, err = run(["--stream", "--video", tmp_path / "v.mp4", "--audio", "-", "--out", "-", *ckpt,
                              "--steps", steps], capsysbinary)
        assert code == 0, err
        outs.append(np.frombuffer(raw, np.uint8))
    assert len(outs[0]) == len(outs[1]) == 9 * 48 * 48 * 3 and not np.array_equal(*outs)
    assert len(L.STUDENT_STEPS) == 2 and L.sample_chunk.__name__ == "sample_chunk"


def test_student_input_wait_is_what_the_stream_needs(ckpt):
    """The input wait sample.py reports for the student (live TTFF = wait + compute) is exactly the
    input LipSyncStream waits for: 9 frames and one sample less give nothing, one more sample the chunk."""
    student = L.load_checkpoint(ckpt[1], L.DiTConfig, L.DiT)[0]
    ae = L.load_checkpoint(ckpt[3], L.AEConfig, L.VideoAE)[0]
    need = round(sample.student_wait(ae, student.cfg) * SAMPLE_RATE)
    assert need == 11 * SAMPLES_PER_FRAME + 120                            # frames 0-8, 2 frames of context, 120
    stream = L.LipSyncStream(student, ae)
    frames = np.zeros((9, 32, 32, 3), np.uint8)
    assert len(stream.push(frames, np.zeros(need - 1, np.float32))) == 0
    assert len(stream.push(audio=np.zeros(1, np.float32))) == 9


# -----------------------------------------------------------------------------
# demo, benchmark, long stream (smoke tests at toy size)


def test_demo_writes_side_by_side_and_reports(tmp_path, capsys, ckpt):
    """The demo writes source | dubbed | the dub's true video (three times the width) with the dub
    audio and prints FPS, TTFF, the mouth PSNR against the true video and both Sync-C numbers."""
    syncnet = os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors")
    code, out, err = run([*ckpt, "--seconds", "1", "--syncnet", syncnet,
                          "--out", tmp_path / "demo.mp4"], capsys)
    assert code == 0, err
    video = L.read_video(tmp_path / "demo.mp4")[0]
    assert video.shape == (25, 32, 96, 3)
    truth = L.synthtalk_render("test", 0, L.synthtalk_clip("test", 0, 1.0, 32).dub_mouth, 32)
    assert np.abs(video[:, :, 64:].astype(int) - truth).mean() < 8      # the third panel, through H.264
    assert "FPS" in out and "TTFF" in out and "mouth PSNR against the dub's true video" in out and out.count("Sync-C") == 1 and "source vs its own audio" in out


def test_benchmark_smoke(tmp_path, capsys, ckpt, monkeypatch):
    """--benchmark at a toy size prints the markdown table and writes results/benchmark.json with
    positive speeds for both models, the teacher stitched from 33-frame windows (random init where
    the default teacher checkpoint is missing); --flops adds FLOPs per frame and their ratios, the
    end-to-end one below the DiT's (the autoencoder is a larger share of the student's work)."""
    monkeypatch.setitem(sample.MODE_DEFAULTS, "teacher", str(tmp_path / "none.safetensors"))
    code, out, err = run(["--benchmark", *ckpt, "--seconds", "1.4", "--flops", "--results", tmp_path / "res"], capsys)
    assert code == 0, err
    assert "| FPS, end to end |" in out and "live TTFF" in out and "teacher random init" in out
    res = json.loads((tmp_path / "res" / "benchmark.json").read_text())
    s, t = res["student"], res["teacher"]
    assert s["frames"] == 35 and t["frames"] == 33 and res["setup"]["size"] == 32     # the student's own size
    assert min(s["fps"], s["dit_fps"], t["fps"], t["dit_fps"], res["throughput_ratio"]) > 0
    assert s["live_ttff_ms"] == pytest.approx(s["input_wait_ms"] + s["ttff_compute_ms"])
    assert t["input_wait_ms"] > s["input_wait_ms"] and s["chunk_p95_ms"] >= s["chunk_p50_ms"] > 0
    for r in (s, t):
        assert r["gflop_per_frame"] > r["dit_gflop_per_frame"] > 0 and "dit_flops" not in r
    ratio = res["flop_ratio"]
    assert ratio["end_to_end"] == pytest.approx(t["gflop_per_frame"] / s["gflop_per_frame"])
    assert ratio["dit_only"] == pytest.approx(t["dit_gflop_per_frame"] / s["dit_gflop_per_frame"])
    assert ratio["dit_only"] > ratio["end_to_end"] > 1 and "| GFLOP per frame, DiT only |" in out
    assert f"{ratio['end_to_end']:.1f}x end to end, {ratio['dit_only']:.1f}x DiT only" in out


def dit_pass_flops(cfg, B, Fr, N, past=0):
    """A DiT forward pass's FLOPs by hand (2 a multiply-add): every nn.Linear on its rows (tokens or
    frames) and attention's two products over the (past + Fr) N keys."""
    D, P = cfg.dim, cfg.patch ** 2
    T, R, keys = B * Fr * N, B * Fr, (past + Fr) * N                       # tokens, frame rows, keys per query
    per_token = (cfg.latent_channels + cfg.cond_channels) * P * D + cfg.depth * (4 * D * D + 2 * D * cfg.ffn) + D * cfg.latent_channels * P
    audio_blocks = len(range(0, cfg.depth, cfg.audio_every))
    per_row = 256 * D + D * D + cfg.audio_channels * D + D * D + cfg.depth * 6 * D * D + audio_blocks * D * D + 2 * D * D
    attention = cfg.depth * 2 * T * keys * D                                # Q K^T and A V, all heads
    return 2 * (T * per_token + R * per_row + attention)


def test_the_benchmarks_flop_count_is_the_hand_count_attention_included():
    """sample.count_flops, as the benchmark's --flops counts a DiT pass (filed under Timed): equal
    to the hand count for the teacher's bidirectional pass and for a student's pass on a KV cache,
    attention included, whose CPU kernel torch's FlopCounterMode does not count by itself."""
    torch.manual_seed(0)
    x = lambda *shape: torch.randn(*shape)
    for causal, past in ((False, 0), (True, 3)):
        cfg = L.DiTConfig(dim=64, depth=3, heads=2, ffn=96, causal=causal, audio_every=2)
        model = L.DiT(cfg).eval()
        counted = sample.Timed(model)
        cache = L.KVCache(cfg.depth, cfg.sink, cfg.window, cfg.chunk) if causal else None
        B, Fr, h = (1, 3, 4) if causal else (2, 5, 4)
        with torch.inference_mode():
            if past:
                model(x(B, past, 16, h, h), torch.zeros(B, past), x(B, past, cfg.cond_channels, h, h),
                      x(B, past, cfg.audio_channels), cache=cache, update_cache=True)
            with sample.count_flops() as counter:
                counted(x(B, Fr, 16, h, h), torch.rand(B, Fr), x(B, Fr, cfg.cond_channels, h, h),
                        x(B, Fr, cfg.audio_channels), cache=cache)
        flops = sum(counter.get_flop_counts()["Timed"].values())
        assert flops == dit_pass_flops(cfg, B, Fr, (h // cfg.patch) ** 2, past), causal


def test_the_benchmark_and_training_need_no_media_libraries(tmp_path):
    """The GPU machines this is benchmarked on may lack soundfile and imageio-ffmpeg: lipforcing,
    sample and train import them only where media is read or written, so `--benchmark` (here at
    random init, one block 64 wide) and the teacher's training on SynthTalk (`--state none`, as README's
    GPU command) run in a process where importing either fails."""
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    code = f"""
import sys
sys.modules["soundfile"] = sys.modules["imageio_ffmpeg"] = None      # import fails, as if not installed
import lipforcing, train, sample
sample.main(["--benchmark", "--shape", "tiny", "--depth", "1", "--dim", "64", "--seconds", "1.4", "--results", {str(tmp_path)!r}])
train.main(["teacher", "--ckpt-dir", {str(tmp_path)!r}, "--depth", "1", "--clips", "2", "--seconds", "1.4", "--steps", "2",
            "--batch", "2", "--latent-frames", "3", "--state", "none", "--out", {str(tmp_path / "t.safetensors")!r}])
"""
    env = {**os.environ, "LIPFORCING_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-c", code], cwd=HERE, capture_output=True, text=True, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "t.safetensors").is_file() and not list(tmp_path.glob("t.state*"))
    res = json.loads((tmp_path / "benchmark.json").read_text())
    assert res["setup"]["dit"]["depth"] == 1 and not res["setup"]["compile"] and "depth 1" in res["setup"]["weights"]
    assert (res["setup"]["dit"]["dim"], res["setup"]["dit"]["heads"]) == (64, 2) and "DiT dim 64," in p.stdout
    assert res["student"]["warm_up_s"] > 0 and "| warm-up, untimed (s) |" in p.stdout


def test_long_stream_smoke(tmp_path, capsys, ckpt):
    """--long-stream at a toy length writes results/long_stream.json with the stream's state size,
    memory and Sync-C of the first and last stretch."""
    syncnet = os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors")
    code, out, err = run(["--long-stream", "1.5", *ckpt, "--syncnet", syncnet, "--results", tmp_path], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "long_stream.json").read_text())
    assert res["frames"] == 38 and res["memory"]["end"]["state_bytes"] > 0
    assert np.isfinite([res["sync_c_first_30s"], res["sync_c_last_30s"]]).all() and "| stream state" in out


# -----------------------------------------------------------------------------
# analyze.py: the teacher-trajectory analysis

def tiny_teacher(drop_mode="audio", seed=0):
    """A small DiT nudged away from adaLN-Zero's all-zero output, so its predictions depend on the
    inputs (and on the audio, so CFG does something)."""
    torch.manual_seed(seed)
    model = L.DiT(L.DiTConfig(dim=64, depth=2, heads=4, ffn=128, drop_mode=drop_mode))
    for p in model.parameters():
        p.data += 0.02 * torch.randn_like(p)
    return model.eval()


def tiny_batch(model, B=2, Fr=3, hw=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A_dim = model.cfg.audio_channels
    return A.Batch(cond=torch.randn(B, Fr, model.cfg.cond_channels, hw, hw, generator=g),
                   audio=torch.randn(B, Fr, A_dim, generator=g),
                   noise=torch.randn(B, Fr, 16, hw, hw, generator=g), fresh=torch.randn(B, Fr, 16, hw, hw, generator=g))


def test_analysed_predictions_are_the_samplers():
    """For either drop mode: the trajectory's last x0 prediction is L.sample_ode's final sample (same
    noise, scale, mode); the factorial landing at j1 = 1 with s0 = s1 = s is the s-run's x0
    prediction at step 1 (one Euler step is the ODE's first step); the mixed cells (s0 != s1) equal
    an Euler jump and landing with CFG written out by hand; the two-step operating point is
    x0 at t = 0.999, re-noised with the fresh noise to ode_t(30), x0 again."""
    steps = 6
    for mode in ("audio", "all"):
        model = tiny_teacher(mode)
        b = tiny_batch(model)
        for s in (A.NO_CFG, A.CFG):
            preds = [x0 for _, x0 in A.trajectory(model, b, s, steps)]
            final = L.sample_ode(model, b.cond, b.audio, b.noise, steps=steps, cfg=s, mode=mode)
            assert_close(preds[-1], final, 1e-5, f"{mode} CFG {s}: last prediction vs sampler")
            landed = {(s0, s1): x0 for s0, s1, j1, x0 in A.factorial(model, b, [1], steps)}
            assert_close(landed[s, s], preds[1], 1e-5, f"{mode} CFG {s}: factorial j1 = 1 vs step 1")
        assert (landed[A.CFG, A.CFG] - landed[A.NO_CFG, A.NO_CFG]).abs().max() > 1e-4   # CFG changes something
        # the mixed cells, where the jump's scale s0 and the landing's s1 differ, against CFG by hand
        mixed = {(s0, s1): x0 for s0, s1, j1, x0 in A.factorial(model, b, [2], steps) if s0 != s1}
        with torch.no_grad():
            tt = lambda t: torch.full(b.noise.shape[:2], t)
            negative = L.drop_conditions(b.cond, b.audio, torch.ones(len(b.noise), dtype=torch.bool), mode)
            v = lambda x, t, s: (lambda c, u: u + s * (c - u))(model(x, tt(t), b.cond, b.audio), model(x, tt(t), *negative))
            t0, t2 = L.ode_t(0, steps), L.ode_t(2, steps)
            for s0, s1 in mixed:
                x = b.noise + (t2 - t0) * v(b.noise, t0, s0)
                assert_close(mixed[s0, s1], x - t2 * v(x, t2, s1), 1e-5, f"{mode}: factorial ({s0}, {s1}) by hand")
        assert (mixed[A.NO_CFG, A.CFG] - mixed[A.CFG, A.NO_CFG]).abs().max() > 1e-4
        with torch.no_grad():
            t0, t1 = 0.999, L.ode_t(30)
            tt = lambda t: torch.full(b.noise.shape[:2], t)
            x0 = b.noise - t0 * model(b.noise, tt(t0), b.cond, b.audio)
            x = (1 - t1) * x0 + t1 * b.fresh
            ref = x - t1 * model(x, tt(t1), b.cond, b.audio)
        assert_close(A.two_step(model, b), ref, 1e-5, f"{mode}: two-step operating point")


@pytest.mark.parametrize("argv, words", [
    (["--out", os.path.join(os.path.abspath(__file__), "a")], "is a file, not a folder"),
    (["--out", "/proc/lipforcing-test"], "cannot write in /proc/lipforcing-test"),
    (["--steps", "1"], "--steps 1: the factorial lands between the ODE's first and last step"),
    (["--teacher", "checkpoints/vae.safetensors", "--teacher", "./checkpoints/vae.safetensors"], "pass each teacher once"),
])
def test_analysis_refuses_bad_arguments_before_any_work(capsys, argv, words):
    """analyze.py refuses an --out it cannot write, a one-step ODE and a teacher given twice in one
    line, before any model is loaded; landing steps are sorted and counted once."""
    with pytest.raises(SystemExit) as e:
        A.get_args(argv)
    assert_one_line_error(e.value.code, capsys.readouterr().err, words, prog="analyze.py")
    assert A.get_args(["--landing-steps", "4", "2", "4", "--out", "/tmp/lipforcing-test-a"]).landing_steps == [2, 4]


@pytest.mark.parametrize("writing, error, code, said", [
    (False, KeyboardInterrupt(), 130, "analyze.py: interrupted before writing: --out is as it was"),
    (True, KeyboardInterrupt(), 130, "analyze.py: interrupted while writing: each file in --out is whole"),
    (True, OSError(28, "No space left on device", "a/summary.txt"), 2,
     "analyze.py: error: No space left on device: a/summary.txt"),
])
def test_analysis_interrupted_or_out_of_disk_says_what_it_wrote(tmp_path, capsys, monkeypatch, writing, error, code,
                                                                said):
    """Ctrl-C says whether --out was touched; a disk error is one line (exit 2), not a traceback."""
    def stopped(args):
        args.writing = writing
        raise error
    monkeypatch.setattr(A, "analyze", stopped)
    with pytest.raises(SystemExit) as e:
        A.main(["--out", str(tmp_path / "a")])
    assert e.value.code == code
    assert capsys.readouterr().err.strip().startswith(said)


def test_window_and_landing_rules():
    """The CFG window is the contiguous run around the largest Sync-C advantage that stays >= half of
    it (none if CFG never helps); the landing step maximises a mixed schedule's share of the CFG
    sync gap, skipping landings where the gap is under half its max (there a share is noise)."""
    assert A.cfg_window(np.array([0.0, 1.0, 3.0, 4.0, 2.5, 1.0, 3.0])) == (2, 4)   # the late 3.0 is not contiguous
    assert A.cfg_window(np.array([-1.0, -0.5, 0.0])) is None
    j1s = [1, 10, 20, 30, 40]
    none = [1.0, 1.0, 1.0, 1.0, 1.0]
    full = [1.1, 3.0, 3.0, 3.0, 3.0]          # the gap at j1 = 1 is tiny ...
    mixed = [1.2, 1.5, 2.0, 2.8, 2.2]         # ... so its share (200%) must not win: j1 = 30 (90%)
    other = [1.0, 1.2, 1.2, 1.2, 1.2]
    rows = [{"j1": j, "s0": s0, "s1": s1, "sync_c": c} for k, j in enumerate(j1s) for (s0, s1), c in
            (((1.0, 1.0), none[k]), ((4.5, 4.5), full[k]), ((1.0, 4.5), mixed[k]), ((4.5, 1.0), other[k]))]
    A.add_gap_shares(rows)
    j1, s0, s1, share, gap = A.best_landing(rows)
    assert (j1, s0, s1) == (30, 1.0, 4.5) and math.isclose(share, 0.9) and math.isclose(gap, 2.0)
    tr = [{"step": j, "scale": sc, "sync_c": 1.0 + (sc > 1)} for j in range(3) for sc in (1.0, 4.5)]
    assert "landing step: j1 = 30 of 50" in A.suggestions({"trajectory": tr, "factorial": rows}, 50)[1]
    for r in rows:                          # mixed schedules that sync worse than no CFG: no landing step
        if r["s0"] != r["s1"]:
            r["sync_c"] = 0.5
    A.add_gap_shares(rows)
    assert A.best_landing(rows)[3] < 0
    assert A.suggestions({"trajectory": tr, "factorial": rows}, 50)[1].startswith("landing step: none (no mixed")


def analysis_checkpoints(ckpt_dir, teachers):
    """What analyze.py reads from --ckpt-dir, tiny: an autoencoder, the eval SyncNet and a teacher
    per {name: drop mode}, drawn from seed 0."""
    torch.manual_seed(0)
    L.save_checkpoint(ckpt_dir / "vae.safetensors", L.VideoAE(L.AEConfig(width=8)), L.AEConfig(width=8))
    L.save_checkpoint(ckpt_dir / "syncnet_eval.safetensors", L.SyncNet(L.SyncNetConfig(width=4)), L.SyncNetConfig(width=4))
    for name, mode in teachers.items():
        m = tiny_teacher(mode)
        L.save_checkpoint(ckpt_dir / f"{name}.safetensors", m, m.cfg)


def test_analysis_writes_tidy_finite_csvs(tmp_path, monkeypatch):
    """analyze.main on tiny models (a teacher per drop mode, found by default in --ckpt-dir) writes
    one tidy CSV per part with the documented columns, one row per (teacher, scale, step), per
    (teacher, s0, s1, j1) and per (teacher, endpoint), every mean and SE finite, both modes labelled;
    without matplotlib the plots are skipped, not crashed."""
    analysis_checkpoints(tmp_path, {"teacher": "audio", "teacher_all": "all"})
    out = tmp_path / "out"
    steps, landing = 4, [1, 3]
    A.main(["--ckpt-dir", str(tmp_path), "--out", str(out), "--clips", "2", "--seconds", "1.32",
            "--steps", str(steps), "--landing-steps", *map(str, landing), "--device", "cpu"])
    metrics = [c for m in A.METRICS for c in (m, f"{m}_se")]
    head = ["part", "teacher", "drop_mode"]
    expect = {"trajectory": (head + ["scale", "step", "t", "n"] + metrics, 2 * 2 * steps),
              "factorial": (head + ["s0", "s1", "j1", "t", "n"] + metrics + ["sync_gap_share"], 2 * 4 * len(landing)),
              "endpoints": (head + ["schedule", "scale", "nfe", "n"] + metrics, 2 * (len(A.ENDPOINT_SCALES) + 1))}
    for part, (columns, n_rows) in expect.items():
        with open(out / f"{part}.csv") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
        assert reader.fieldnames == columns, part
        assert len(rows) == n_rows, part
        assert {r["drop_mode"] for r in rows} == {"audio", "all"}
        assert all(r["n"] == "2" and all(math.isfinite(float(r[c])) for c in metrics) for r in rows), part
    traj = list(csv.DictReader(open(out / "trajectory.csv")))
    assert sorted({int(r["step"]) for r in traj}) == list(range(steps))
    summary = (out / "summary.txt").read_text()
    assert "drop modes analysed: all, audio" in summary
    ends = list(csv.DictReader(open(out / "endpoints.csv")))
    assert f"Sync-C {float(ends[0]['sync_c']):.2f} +- {float(ends[0]['sync_c_se']):.2f}, " in summary
    one = A.mean_se([{m: 1.0 for m in A.METRICS}])                    # one clip: its SE is nan, not printed
    line = A.endpoint_line({**one, "schedule": "ode", "scale": 4.5, "nfe": 100})
    assert "Sync-C 1.00 (one clip: no SE), Sync-D 1.00" in line and "nan" not in line
    monkeypatch.setitem(sys.modules, "matplotlib", None)       # `import matplotlib` now raises ImportError
    assert A.plot(str(tmp_path / "no_plots"), {}, []) is False and not (tmp_path / "no_plots").exists()


def factorial_rows(j1s, cells):
    """Factorial rows from {(s0, s1): [sync_c per j1]}."""
    return [{"j1": j, "s0": s0, "s1": s1, "sync_c": c[k]} for k, j in enumerate(j1s) for (s0, s1), c in cells.items()]


def test_landing_rule_weighs_both_mixed_orders():
    """The landing step is the largest share over BOTH mixed schedules, s0 = 1 -> s1 = 4.5 and
    s0 = 4.5 -> s1 = 1: when the CFG-jump-then-no-CFG order recovers more of the sync gap, it is the
    one reported (a rule that only looked at the first order would miss it)."""
    rows = factorial_rows([10, 20, 30], {(1.0, 1.0): [1.0, 1.0, 1.0], (4.5, 4.5): [3.0, 3.0, 3.0],
                                (1.0, 4.5): [1.5, 1.6, 1.4], (4.5, 1.0): [1.2, 2.6, 1.8]})
    A.add_gap_shares(rows)
    j1, s0, s1, share, gap = A.best_landing(rows)
    assert (j1, s0, s1) == (20, 4.5, 1.0) and math.isclose(share, 0.8) and math.isclose(gap, 2.0)


def test_landing_rule_edges():
    """Edges of the landing rule: a j1 where CFG syncs worse than no CFG has no share (nan, not a
    sign-flipped ratio); a landing whose gap is exactly the floor (half its max) counts; a best share
    of exactly 0 is no landing step; no gap anywhere (full CFG == no CFG) is None, not a crash."""
    rows = factorial_rows([10, 20, 30], {(1.0, 1.0): [1.0, 1.0, 2.0], (4.5, 4.5): [3.0, 2.0, 1.0],
                                (1.0, 4.5): [1.2, 1.9, 1.5], (4.5, 1.0): [1.0, 1.0, 1.5]})
    A.add_gap_shares(rows)
    assert all(math.isnan(r["sync_gap_share"]) for r in rows if r["j1"] == 30)     # CFG worse: no gap
    assert A.best_landing(rows)[:3] == (20, 1.0, 4.5)        # gap 1.0 == 0.5 * max 2.0: in the running
    for r in rows:
        if r["s0"] != r["s1"]:
            r["sync_c"] = 1.0 if r["j1"] != 30 else r["sync_c"]   # mixed = no CFG: share exactly 0
    A.add_gap_shares(rows)
    tr = [{"step": j, "scale": sc, "sync_c": 1.0} for j in range(3) for sc in (1.0, 4.5)]
    assert A.best_landing(rows)[3] == 0
    assert A.suggestions({"trajectory": tr, "factorial": rows}, 50)[1].startswith("landing step: none (no mixed")
    flat = factorial_rows([10, 20], {(1.0, 1.0): [1.0, 1.0], (4.5, 4.5): [1.0, 1.0], (1.0, 4.5): [1.0, 1.0],
                            (4.5, 1.0): [1.0, 1.0]})
    A.add_gap_shares(flat)
    assert A.best_landing(flat) is None


def test_cfg_window_sign_bounds_and_text():
    """The window is where CFG's Sync-C advantage over no CFG (CFG minus no-CFG, not the reverse) is
    >= half its max, reaching the first and last step when they qualify (a value exactly at half
    counts); the summary prints its steps and t range [t(last), t(first)]."""
    assert A.cfg_window(np.array([2.0, 4.0, 2.0])) == (0, 2)
    sync = {1.0: [1.0, 1.0, 1.0, 1.0, 1.0], 4.5: [1.0, 2.0, 3.0, 2.5, 1.2]}
    tr = [{"step": j, "scale": s, "sync_c": sync[s][j]} for j in range(5) for s in (1.0, 4.5)]
    rows = factorial_rows([10], {(1.0, 1.0): [1.0], (4.5, 4.5): [2.0], (1.0, 4.5): [1.5], (4.5, 1.0): [1.2]})
    A.add_gap_shares(rows)
    line = A.suggestions({"trajectory": tr, "factorial": rows}, 50)[0]
    assert line.startswith("CFG window: ODE steps 1..3 of 50, "), line
    assert f"t in [{L.ode_t(3, 50):.3f}, {L.ode_t(1, 50):.3f}]" in line, line


def test_mean_se_is_the_standard_error_over_clips():
    """mean_se: the mean over clips and its standard error, sample SD (ddof = 1) over sqrt(n)."""
    r = A.mean_se([{m: v for m in A.METRICS} for v in (1.0, 2.0, 3.0, 6.0)])
    assert r["n"] == 4
    for m in A.METRICS:
        assert math.isclose(r[m], 3.0)
        assert math.isclose(r[f"{m}_se"], np.std([1.0, 2.0, 3.0, 6.0], ddof=1) / 2)


def test_analysis_batch_noise_and_scores_are_per_clip():
    """make_batch draws clip i's pure noise first and its re-noising noise second from seed i (the
    noise eval-teacher samples clip i from); score stitches each clip's own windows (clip-major, S
    per clip) and scores them alone, with mouth L1 in [0, 1] units."""
    torch.manual_seed(0)
    model = tiny_teacher("audio")
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    net = L.SyncNet(L.SyncNetConfig(width=4)).eval()
    clips = [L.synthtalk_clip("test", i, 2.6) for i in range(2)]
    b = A.make_batch(model, ae, clips, "cpu")
    S = len(b.noise) // 2
    assert S == 2
    for i in range(2):
        g = torch.Generator().manual_seed(i)
        shape = b.noise[i * S:(i + 1) * S].shape
        assert torch.equal(b.noise[i * S:(i + 1) * S], torch.randn(shape, generator=g))
        assert torch.equal(b.fresh[i * S:(i + 1) * S], torch.randn(shape, generator=g))
    z = torch.randn(b.noise.shape, generator=torch.Generator().manual_seed(5))
    both = A.score(z, ae, net, clips)
    for i in range(2):
        alone = A.score(z[i * S:(i + 1) * S], ae, net, [clips[i]])[0]
        assert both[i] == pytest.approx(alone, rel=1e-5, abs=1e-6), i
        assert 0 <= both[i]["mouth_l1"] <= 1


def test_analysis_csv_labels_t_and_nfe(tmp_path):
    """The CSVs label each row with the t of its step in the --steps ODE (not the 50-step one), the
    ODE endpoints with NFE = steps without CFG and 2 steps with it, and the two-step endpoint as the
    no-CFG (scale 1) 2-NFE schedule; the default landing steps are 1, 2, 4, .., steps - 1."""
    assert A.get_args(["--out", str(tmp_path / "x"), "--steps", "10"]).landing_steps == [1, 2, 4, 6, 8, 9]
    analysis_checkpoints(tmp_path, {"teacher": "audio"})
    out, steps = tmp_path / "out", 3
    A.main(["--ckpt-dir", str(tmp_path), "--out", str(out), "--clips", "1", "--seconds", "1.32",
            "--steps", str(steps), "--landing-steps", "1", "2", "--device", "cpu"])
    read = lambda part: list(csv.DictReader(open(out / f"{part}.csv")))
    for r in read("trajectory"):
        assert math.isclose(float(r["t"]), L.ode_t(int(r["step"]), steps), rel_tol=1e-5)
    for r in read("factorial"):
        assert math.isclose(float(r["t"]), L.ode_t(int(r["j1"]), steps), rel_tol=1e-5)
    ends = {(r["schedule"], float(r["scale"])): int(r["nfe"]) for r in read("endpoints")}
    assert ends == {**{(f"{steps}-step ODE", s): steps * (1 if s == 1 else 2) for s in A.ENDPOINT_SCALES},
                    (A.TWO_STEP, 1.0): 2}


# -----------------------------------------------------------------------------
# distillation: Self-Forcing rollout, Sync-Window DMD, SyncNet reward

TINY = dict(dim=64, depth=2, heads=4, ffn=128)


def dmd_dit(seed=0, **kw):
    """A tiny DiT whose zero-initialised layers are perturbed, so every path carries signal."""
    torch.manual_seed(seed)
    model = L.DiT(L.DiTConfig(**{**TINY, **kw}))
    for p in model.parameters():
        p.data += 0.05 * torch.randn_like(p)
    return model


def dmd_inputs(B, Fr, hw=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    A = L.DiTConfig().audio_channels
    cond = torch.randn(B, Fr, L.DiTConfig().cond_channels, hw, hw, generator=g)
    noises = torch.randn(len(L.STUDENT_STEPS), B, Fr, 16, hw, hw, generator=g)
    return cond, torch.randn(B, Fr, A, generator=g), noises


# -----------------------------------------------------------------------------
# DMD on a Gaussian with exact scores


def gaussian_x0(x_t, t, mean, std):
    """E[x0 | x_t] for x0 ~ N(mean, std^2) per dimension and x_t = (1 - t) x0 + t eps: exact."""
    var_t = (1 - t) ** 2 * std ** 2 + t ** 2
    return mean + (1 - t) * std ** 2 / var_t * (x_t - (1 - t) * mean)


def test_dmd_moves_a_gaussian_student_to_the_teacher():
    """A generator x = a + b z trained by dmd_loss alone, with the teacher's exact x0 prediction as
    `real` and the exact x0 prediction of the generator's own current Gaussian as `fake` (a perfect
    critic), moves from N(0, 1) to the teacher's N(mu, s^2): mean and scale both within 0.1."""
    torch.manual_seed(0)
    mu, s = torch.tensor([2.0, -1.0]), torch.tensor([0.5, 1.5])
    a, b = torch.zeros(2, requires_grad=True), torch.ones(2, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=0.02, betas=(0.0, 0.999))
    for _ in range(400):
        x = a + b * torch.randn(256, 2)                                        # (B, 2)
        t = L.dmd_timesteps(256)[:, None]
        x_t = (1 - t) * x.detach() + t * torch.randn_like(x)
        real = gaussian_x0(x_t, t, mu, s)
        fake = gaussian_x0(x_t, t, a.detach(), b.detach().abs())
        loss = L.dmd_loss(x, real, fake).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    assert_close(a.detach(), mu, 0.1, "mean")
    assert_close(b.detach().abs(), s, 0.1, "scale")


def test_dmd_loss_gradient_is_the_normalised_score_difference():
    """d(dmd_loss_i)/dx_i = (fake_i - real_i) / mean|x_i - real_i| / numel per sample, and the loss
    is 0.5 mean(grad^2); real and fake receive no gradient."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 4, requires_grad=True)
    real, fake = torch.randn(3, 2, 4, requires_grad=True), torch.randn(3, 2, 4, requires_grad=True)
    loss = L.dmd_loss(x, real, fake)
    norm = (x - real).abs().mean((1, 2), keepdim=True).detach()
    grad = (fake - real).detach() / norm
    assert_close(loss, 0.5 * grad.pow(2).mean((1, 2)), 1e-6, "loss")
    loss.sum().backward()
    assert_close(x.grad, grad / 8, 1e-6, "dL/dx")
    assert real.grad is None and fake.grad is None


def test_dmd_loss_of_a_sample_already_where_both_scores_agree_is_zero_not_nan():
    """A sample equal to the teacher's and the critic's x0 prediction (0 / 0 in the normalised
    score difference) gets loss 0 and a zero gradient, not nan that would poison the batch."""
    x = torch.randn(2, 3, 4, requires_grad=True)
    real = x.detach().clone()
    real[1] += 1
    loss = L.dmd_loss(x, real, real)
    loss.sum().backward()
    assert loss[0] == 0 and torch.isfinite(loss).all() and torch.isfinite(x.grad).all() and not x.grad[0].any()


# -----------------------------------------------------------------------------
# Sync-Window CFG


def test_dmd_timesteps_are_shifted_uniform():
    """DMD's re-noise t = shift_t(u), u ~ U[0.02, 0.98]: shift_t is monotone, so the median is
    shift_t(0.5) = 0.833 (an unshifted draw would put it at 0.5) and the range [shift_t(0.02), shift_t(0.98)]."""
    torch.manual_seed(0)
    t = L.dmd_timesteps(20000)
    lo, hi = L.DMD_T_RANGE
    assert abs(t.median().item() - L.shift_t(0.5)) < 0.01
    assert t.min() >= L.shift_t(lo) and t.max() <= L.shift_t(hi)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sync_window_gates_exactly_at_its_bounds(dtype):
    """The teacher's scale is 4.5 at t = ode_t(40) = 0.556 and t = ode_t(20) = 0.882 (bounds
    included) and inside, 1.0 one float step outside either bound and far away; per sample."""
    lo, hi = (torch.tensor(v, dtype=dtype) for v in (L.ode_t(40), L.ode_t(20)))
    t = torch.stack([lo, hi, torch.nextafter(lo, torch.tensor(0, dtype=dtype)),
                     torch.nextafter(hi, torch.tensor(1, dtype=dtype)), torch.tensor(0.7, dtype=dtype),
                     torch.tensor(0.1, dtype=dtype), torch.tensor(0.99, dtype=dtype)])
    assert L.sync_window_cfg(t).tolist() == [4.5, 4.5, 1.0, 1.0, 4.5, 1.0, 1.0]
    assert round(float(lo), 3) == 0.556 and round(float(hi), 3) == 0.882
    # the ablation switches: fixed CFG everywhere, and none
    assert L.sync_window_cfg(t, 4.5, (0.0, 1.0)).tolist() == [4.5] * 7     # --teacher-cfg fixed
    assert L.sync_window_cfg(t, 1.0).tolist() == [1.0] * 7                  # --teacher-cfg none


def test_predict_x0_guides_each_sample_at_its_own_scale():
    """predict_x0 with per-sample scales equals, sample by sample, x_t - t (v_u + s (v_c - v_u)) with
    the audio dropped for v_u; with every scale 1 it is the plain conditional prediction."""
    model = dmd_dit().double()
    cond, audio, noises = (z.double() for z in dmd_inputs(2, 3))
    x, t = noises[0], torch.tensor([[0.6] * 3, [0.3] * 3], dtype=torch.float64)
    got = L.predict_x0(model, x, t, cond, audio, torch.tensor([4.5, 1.0]))
    v_c, v_u = model(x, t, cond, audio), model(x, t, cond, torch.zeros_like(audio))
    want = x - t[..., None, None, None] * (v_u + torch.tensor([4.5, 1.0]).double().view(-1, 1, 1, 1, 1) * (v_c - v_u))
    assert_close(got, want, 1e-10)
    assert_close(L.predict_x0(model, x, t, cond, audio), x - t[..., None, None, None] * v_c, 1e-12)
    assert (v_c - v_u).abs().max() > 1e-3                      # the guidance does something


# -----------------------------------------------------------------------------
# SyncNet reward


def test_reward_weight_is_exp_beta_r_without_gradient_through_r():
    """reward_weights is exp(beta R) per sample (float64, exact); reward_weighted_mean is
    sum_i w_i L_i / sum_i w_i: finite at Sync-C 30 and 300 where exp(2 R) leaves float32, each
    loss's gradient is w_i / sum w, R gets no gradient, and beta = 0 is the plain mean."""
    R = torch.tensor([1.0, 2.5, 4.0], requires_grad=True)
    assert_close(L.reward_weights(R, 2.0), torch.exp(2.0 * R.detach().double()), 1e-12)
    assert L.reward_weights(R, 2.0).dtype == torch.float64 and not L.reward_weights(R, 2.0).requires_grad
    assert_close(L.reward_weights(R, 2.0, scale=4.0), torch.exp(0.5 * R.detach().double()), 1e-12)
    losses = torch.tensor([0.3, 0.1, 0.2], requires_grad=True)
    loss = L.reward_weighted_mean(losses, R, beta=2.0)
    w = torch.exp(2.0 * R.detach().double())
    assert_close(loss.detach().double(), (w * losses.detach().double()).sum() / w.sum(), 1e-7)
    loss.backward()
    assert R.grad is None
    assert_close(losses.grad.double(), w / w.sum(), 1e-7, "dloss/dL_i")
    for big in (30.0, 300.0):                               # our SyncNets' scale, and worse
        Rb = torch.tensor([big, big - 5, big + 1])
        lb = L.reward_weighted_mean(losses.detach(), Rb, beta=2.0)
        assert torch.isfinite(lb)
        assert_close(lb.double(), (torch.softmax(2 * Rb.double(), 0) * losses.detach().double()).sum(), 1e-7)
    assert_close(L.reward_weighted_mean(losses.detach(), R, beta=0.0), losses.detach().mean(), 1e-7, "beta 0")
    assert L.effective_batch(R, 0.0) == pytest.approx(3) and L.effective_batch(torch.tensor([0., 0, 50]), 2.0) < 1.01
    share = torch.softmax(2.0 * R.detach().double() / 4.0, 0)                 # R in units of 4: w = exp(2 R / 4)
    assert_close(L.reward_weighted_mean(losses.detach(), R, 2.0, scale=4.0).double(),
                 (share * losses.detach().double()).sum(), 1e-7, "scale 4")
    assert L.effective_batch(R, 2.0, scale=4.0) == pytest.approx(float(1 / share.pow(2).sum()))


def test_encoded_pool_is_cached_for_exactly_its_inputs(tmp_path):
    """encode_pool writes one cache file and reads it back equal to a fresh encode_clip of every
    clip; another autoencoder, another audio context or another clip is a new file, not a hit."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    clips = [L.synthtalk_clip("train", i, 1.4, size=32) for i in range(2)]
    c = L.DiTConfig().audio_context
    first = L.encode_pool(ae, clips, c, tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 1
    again = L.encode_pool(ae, clips, c, tmp_path, progress=False)
    for k, fresh in enumerate(L.encode_clip(ae, x.frames, x.audio, c) for x in clips):
        for name in ("single", "groups", "m_single", "m_groups", "feats"):
            assert torch.equal(getattr(first[k], name), getattr(fresh, name)), name
            assert torch.equal(getattr(again[k], name), getattr(fresh, name)), name
    with torch.no_grad():
        ae.dec_in.bias[0] += 1                       # even a decoder-only change is another autoencoder
    L.encode_pool(ae, clips, c, tmp_path, progress=False)
    L.encode_pool(ae, clips, c + 1, tmp_path, progress=False)
    L.encode_pool(ae, clips[:1] + [L.synthtalk_clip("train", 5, 1.4, size=32)], c, tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 4
    # the same weights with other latent statistics (buffers outside the state dict) are another encoder too
    stats = L.VideoAE(dataclasses.replace(ae.cfg, latent_mean=(0.5,) * 16, latent_std=(2.0,) * 16)).eval()
    stats.load_state_dict(ae.state_dict())
    shifted = L.encode_pool(stats, clips, c, tmp_path, progress=False)
    assert len(list(tmp_path.iterdir())) == 5 and not torch.equal(shifted[0].groups, first[0].groups)


def test_encoded_pool_cache_of_other_encoding_code_is_encoded_again(tmp_path, monkeypatch, capsys):
    """The cache's name does not hold the code that encodes: a fork that regenerates another region
    (lower_face_mask) or writes other EncodedClip fields would read the old task's latents from it.
    A cache whose first clip differs from that clip encoded afresh is encoded again, said, and
    replaced; the next run reads the new one without a word."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    clips = [L.synthtalk_clip("train", i, 1.4, size=32) for i in range(2)]
    c = L.DiTConfig().audio_context
    lower = L.encode_pool(ae, clips, c, tmp_path, progress=False)
    lower_mask = L.lower_face_mask
    monkeypatch.setattr(L, "lower_face_mask", lambda h, w, device=None: lower_mask(h, w, device).flip(0))  # the upper face
    capsys.readouterr()
    upper = L.encode_pool(ae, clips, c, tmp_path, progress=False)
    assert "encoding the clips again" in capsys.readouterr().out
    fresh = L.encode_clip(ae, clips[1].frames, clips[1].audio, c)
    assert torch.equal(upper[1].m_groups, fresh.m_groups) and not torch.equal(upper[1].m_groups, lower[1].m_groups)
    assert torch.equal(L.encode_pool(ae, clips, c, tmp_path, progress=False)[1].m_groups, fresh.m_groups)
    assert capsys.readouterr().out == "" and len(list(tmp_path.iterdir())) == 1
    from safetensors.torch import load_file, save_file
    (path,) = tmp_path.iterdir()                                     # a cache written without one of the fields
    save_file({k: v for k, v in load_file(path).items() if not k.endswith(".feats")}, path)
    assert torch.equal(L.encode_pool(ae, clips, c, tmp_path, progress=False)[0].feats, upper[0].feats)
    assert "encoding the clips again" in capsys.readouterr().out


def test_encode_clip_in_batches_equals_one_pass():
    """encode_clip sends at most `batch` frames or 4-frame groups through the encoder at a time
    (bounded memory for long clips); the latents are those of one pass over the clip."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    clip = L.synthtalk_clip("train", 0, 2.0, size=32)                    # 50 frames: 13 singles, 12 groups
    whole, parts = (L.encode_clip(ae, clip.frames, clip.audio, 2, batch=b) for b in (64, 5))
    for name in ("single", "groups", "m_single", "m_groups"):
        assert getattr(whole, name).shape == getattr(parts, name).shape
        assert torch.allclose(getattr(whole, name), getattr(parts, name), atol=1e-5), name


def test_teacher_batch_returns_the_windows_audio():
    """teacher_batch with the clips' waveforms draws the same windows as without (same latents, conditions, packed audio),
    and its raw audio is each window's: log-mel features recomputed from it equal the rows of
    the clip's features for the window's frames (one frame of margin at each end)."""
    torch.manual_seed(0)
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    clips = [L.synthtalk_clip("train", i, 2.0, size=32) for i in range(2)]
    c = L.DiTConfig().audio_context
    enc = [L.encode_clip(ae, k.frames, k.audio, c) for k in clips]
    n_latent, n_frames = 6, 21
    ref = train.teacher_batch(enc, 4, n_latent, np.random.default_rng(3), c, "cpu")
    got = train.teacher_batch(enc, 4, n_latent, np.random.default_rng(3), c, "cpu", [k.audio for k in clips])
    for a, b in zip(ref, got[:3]):
        assert torch.equal(a, b)
    raw = got[3]
    assert raw.shape == (4, n_frames * L.SAMPLES_PER_FRAME)
    # recover each window's clip and start from its latents, then compare the audio features
    for i in range(4):
        k, start = next((k, 4 * m) for k, e in enumerate(enc) for m in range(len(e.single))
                        if torch.equal(e.single[m], got[0][i, 0]) and m + n_latent - 1 <= len(e.groups))
        feats = L.frame_features(raw[i].numpy(), 1, n_frames - 1)
        rows = enc[k].feats[start + 3 + c + 1:start + 3 + c + n_frames - 1]
        assert_close(feats, rows, 1e-4, f"window {i}")


# -----------------------------------------------------------------------------
# the Self-Forcing rollout


def test_rollout_to_the_last_step_is_the_stream():
    """With the exit at the last step (or at the first, with a one-step schedule) the rollout is
    exactly what the stream computes: sample_chunk chunk after chunk with the KV cache."""
    model = dmd_dit(causal=True, sink=1, window=7).double().eval()
    cond, audio, noises = (z.double() for z in dmd_inputs(2, 12))
    for steps in (L.STUDENT_STEPS, L.STUDENT_STEPS[:1]):
        cache = L.KVCache(model.cfg.depth, 1, 7, 3)
        stream = torch.cat([L.sample_chunk(model, cond[:, s:s + 3], audio[:, s:s + 3], noises[:len(steps), :, s:s + 3],
                                           cache, steps) for s in range(0, 12, 3)], 1)
        with torch.no_grad():
            got = L.self_forcing_rollout(model, cond, audio, noises[:len(steps)], len(steps) - 1, steps)
        assert_close(got, stream, 1e-12, f"{len(steps)} steps")


@pytest.mark.parametrize("exit_step", [0, 1])
def test_rollout_gradient_flows_only_through_the_exit_step(exit_step):
    """Gradient reaches the weights only through each chunk's exit pass: (a) per chunk the passes
    before the exit and the KV refresh (every chunk's but the last) run without grad, the exit pass
    with it; (b) unused and pre-exit noise get zero gradient, and so do an earlier chunk's
    conditions although they change the output (no gradient crosses chunks); (c) the weight
    gradient equals a reference in which a frozen copy of the model runs every pass but the exit ones."""
    model = dmd_dit(causal=True, sink=1, window=7).double()
    cond, audio, noises = (z.double() for z in dmd_inputs(1, 9))
    steps = L.STUDENT_STEPS
    calls = []
    hook = model.register_forward_hook(
        lambda m, args, kw, out: calls.append((torch.is_grad_enabled(), round(float(args[1][0, 0]), 3),
                                               kw.get("update_cache", False))), with_kwargs=True)
    noises.requires_grad_(True), cond.requires_grad_(True)
    x = L.self_forcing_rollout(model, cond, audio, noises, exit_step)
    hook.remove()
    t_exit = round(steps[exit_step], 3)
    per_chunk = [(False, round(t, 3), False) for t in steps[:exit_step]] + [(True, t_exit, False), (False, 0.0, True)]
    assert calls == per_chunk * 2 + per_chunk[:-1]        # (a); the last chunk's cache is not read: no refresh
    g = torch.randn_like(x)
    (x[:, 3:6] * g[:, 3:6]).sum().backward(retain_graph=True)               # chunk 1's output only
    assert cond.grad[:, :3].abs().max() == 0 and cond.grad[:, 3:6].abs().max() > 0
    with torch.no_grad():                                                    # ... yet chunk 0's conditions matter
        bumped = cond.detach().clone()
        bumped[:, :3] += 1.0
        y = L.self_forcing_rollout(model, bumped, audio, noises, exit_step)
    assert (y[:, 3:6] - x[:, 3:6]).abs().max() > 1e-4
    noises.grad = None
    model.zero_grad()
    (x * g).sum().backward()
    used = noises.grad[exit_step].abs().max()
    others = [noises.grad[i].abs().max() for i in range(len(steps)) if i != exit_step]
    assert used > 0 and all(o == 0 for o in others)                          # (b)
    frozen = copy.deepcopy(model).requires_grad_(False)
    ref_model = copy.deepcopy(model)
    ref_model.zero_grad()
    cache, ref = L.KVCache(model.cfg.depth, 1, 7, 3), []
    for s in range(0, 9, 3):
        x0 = None
        for i, t in enumerate(steps[:exit_step + 1]):
            tt = torch.full((1, 3), t)                                       # float32, as the stream's
            xi = noises.detach()[0, :, s:s + 3] if x0 is None else L.add_noise(x0, noises.detach()[i, :, s:s + 3], tt)
            m = ref_model if i == exit_step else frozen
            x0 = xi - t * m(xi, tt, cond.detach()[:, s:s + 3], audio[:, s:s + 3], cache=cache)
        frozen(x0.detach(), torch.zeros(1, 3, dtype=torch.float64), cond.detach()[:, s:s + 3], audio[:, s:s + 3],
               cache=cache, update_cache=True)
        ref.append(x0)
    (torch.cat(ref, 1) * g).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
        assert_close(p.grad, q.grad, 1e-9, name)                             # (c)


# -----------------------------------------------------------------------------
# the stage end to end


def test_dmd_stage_runs_and_saves_a_causal_student(tmp_path, monkeypatch):
    """`dmd` on tiny checkpoints: two steps run with finite losses, and the saved student (EMA weights) rebuilds as a causal DiT that differs from its init, its recipe in the checkpoint."""
    dmd_run_options(tmp_path, monkeypatch)                 # the teacher, autoencoder and reward SyncNet
    teacher = L.load_checkpoint(tmp_path / "teacher.safetensors", L.DiTConfig, L.DiT)[0]
    student = L.DiT(L.DiTConfig(**TINY, causal=True))
    student.load_state_dict(teacher.state_dict())
    L.save_checkpoint(tmp_path / "student_df.safetensors", student, student.cfg)
    _, log = train.main(["dmd", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--size", "32",
                         "--steps", "2", "--batch", "2", "--critic-steps", "2", "--lr", "1e-3", "--critic-lr", "1e-3"])
    assert len(log["dmd"]) == 2 and len(log["critic"]) == 4
    assert all(np.isfinite(v) for k in ("dmd", "critic", "sync_c") for v in log[k])
    out, cfg, extra = L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT)
    assert cfg.causal and (cfg.sink, cfg.window) == (1, 7) and extra["teacher_cfg"] == "window"
    assert extra["mouth_weight"] == train.MOUTH_WEIGHT and extra["beta"] == 2.0        # the recipe is recorded
    assert extra["size"] == 32                                                        # and the frame size (sample.py's default)
    rounded = lambda q: q.to(train.STUDENT_DTYPE).float()          # the student is stored in STUDENT_DTYPE
    assert any((p - rounded(q)).abs().max() > 0 for p, q in zip(out.parameters(), student.parameters()))


def test_eval_student_val_split_streams_unseen_test_length_clips_without_a_dub_row(tmp_path, monkeypatch):
    """`eval-student --split val` grades the student on val_clips as long as the test clips (never
    the test split), streams only their own audio (they have no dub track), and writes
    <stem>_val.json beside the test split's <stem>.json, counting its clips as val_clips."""
    torch.manual_seed(0)
    student = dmd_dit(causal=True)
    L.save_checkpoint(tmp_path / "s.safetensors", student, student.cfg)
    nets = (L.VideoAE(L.AEConfig(width=8)), L.SyncNet(L.SyncNetConfig(width=4)).eval(), None, L.MouthNet(L.MouthNetConfig()))
    monkeypatch.setattr(train, "load_foundation", lambda ckpt_dir, device="cpu": nets)
    monkeypatch.setattr(train, "test_pool", lambda args: pytest.fail("the test split was read"))
    asked = []
    monkeypatch.setattr(train, "val_clips", lambda args, n=16, seconds=4.0: asked.append(seconds) or
                        [L.synthtalk_clip("train", 100_000 + i, 1.0, 32) for i in range(2)])
    train.main(["eval-student", "--split", "val", "--ckpt", str(tmp_path / "s.safetensors"),
                "--results", str(tmp_path), "--size", "32"])
    assert asked == [L.TEST_SECONDS]
    with open(tmp_path / "s_val.json") as f:
        res = json.load(f)
    rows = [k for k, v in res.items() if isinstance(v, dict)]
    assert rows == ["ground truth", "autoencoder reconstruction", "student s, 2 steps, recon"]
    assert res["val_clips"] == 2 and "test_clips" not in res
    assert not (tmp_path / "s.json").exists()


def test_df_refreshes_the_cache_with_each_clean_chunk_at_t_0():
    """df_loss runs each chunk once at its own noise level (reading the cache), then once clean at
    t = 0 writing the cache (the KV refresh; not after the last chunk, whose cache no one reads),
    and returns each chunk's flow-matching loss."""
    model = dmd_dit(causal=True)
    passes, forward = [], model.forward
    model.forward = lambda x, t, cond, audio, cache=None, update_cache=False: \
        passes.append((x, t, update_cache)) or forward(x, t, cond, audio, cache=cache, update_cache=update_cache)
    x0, _, cond, audio = dit_inputs(Fr=6)
    eps, levels = torch.randn_like(x0), torch.tensor([[0, 1], [1, 1]])
    losses = train.df_loss(model, x0, cond, audio, levels, eps, window=7, sink=1)
    assert [p[2] for p in passes] == [False, True, False]
    steps = torch.tensor(L.STUDENT_STEPS)
    for k, sl in enumerate((slice(0, 3), slice(3, 6))):
        x, t, _ = passes[2 * k]
        assert torch.equal(t, steps[levels[:, k]][:, None].expand(-1, 3))
        assert torch.equal(x, L.add_noise(x0[:, sl], eps[:, sl], t))
    clean, t0, _ = passes[1]
    assert torch.equal(clean, x0[:, :3]) and (t0 == 0).all()
    # the losses against an independent reference: one block-causal pass over (clean chunk 0 at
    # t = 0, noisy chunk 1 at its level) gives chunk 1 the velocity it gets through the cache
    t1 = steps[levels[:, 1]][:, None].expand(-1, 3)
    seq = torch.cat([x0[:, :3], L.add_noise(x0[:, 3:], eps[:, 3:], t1)], 1)
    with torch.no_grad():
        v0 = forward(passes[0][0], passes[0][1], cond[:, :3], audio[:, :3])
        v1 = forward(seq, torch.cat([torch.zeros(2, 3), t1], 1), cond, audio, mask=L.block_causal_mask(6, 4, 3))[:, 3:]
    assert_close(losses[:, 0], L.flow_matching_loss(v0, x0[:, :3], eps[:, :3]), 1e-5, "chunk 0")
    assert_close(losses[:, 1], L.flow_matching_loss(v1, x0[:, 3:], eps[:, 3:]), 1e-5, "chunk 1 vs block-causal")
    alone = forward(seq[:, 3:], t1, cond[:, 3:], audio[:, 3:])            # chunk 1 with no past
    assert (L.flow_matching_loss(alone, x0[:, 3:], eps[:, 3:]) - losses[:, 1]).abs().max() > 1e-3


def dmd_run_options(tmp_path, monkeypatch):
    """Tiny teacher, autoencoder and reward SyncNet checkpoints in tmp_path, and the dmd options
    that run on them (the student starts from the teacher)."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    teacher = dmd_dit()
    L.save_checkpoint(tmp_path / "teacher.safetensors", teacher, teacher.cfg)
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig(width=8)), L.AEConfig(width=8))
    L.save_checkpoint(tmp_path / "syncnet_reward.safetensors", L.SyncNet(L.SyncNetConfig(width=4)).eval(),
                      L.SyncNetConfig(width=4))
    return ["--ckpt-dir", str(tmp_path), "--init", str(tmp_path / "teacher.safetensors"), "--clips", "2",
            "--seconds", "2", "--size", "32", "--steps", "2", "--batch", "2", "--critic-steps", "1",
            "--latent-frames", "6", "--lr", "1e-3", "--critic-lr", "1e-3"]


def test_dmd_scores_the_teacher_as_real_and_the_critic_as_fake_guided_as_asked(tmp_path, monkeypatch):
    """In a student update dmd_loss gets the frozen teacher's x0 prediction as `real` and the
    critic's as `fake`. The teacher is guided at --cfg-scale for every re-noise t under
    --teacher-cfg fixed, only for t in the sync window under window, never under none; the critic never."""
    base = dmd_run_options(tmp_path, monkeypatch)
    calls, scored = [], []
    predict_x0, dmd_loss = L.predict_x0, L.dmd_loss

    def spy(model, x, t, cond, audio, scale=1.0, mode="audio"):
        out = predict_x0(model, x, t, cond, audio, scale, mode)
        calls.append((not any(p.requires_grad for p in model.parameters()), torch.as_tensor(scale), t[:, 0], out))
        return out
    monkeypatch.setattr(L, "predict_x0", spy)
    monkeypatch.setattr(L, "dmd_loss", lambda x, real, fake: scored.append((real, fake)) or dmd_loss(x, real, fake))
    lo, hi = L.SYNC_WINDOW
    # one re-noise time inside the window and one above it (batch 2), whatever the random draw gives
    monkeypatch.setattr(L, "dmd_timesteps", lambda batch, device=None: torch.tensor([(lo + hi) / 2, (1 + hi) / 2], device=device))
    for mode in ("none", "fixed", "window"):
        calls.clear(), scored.clear()
        train.main(["dmd", *base, "--teacher-cfg", mode, "--steps", "1", "--out", str(tmp_path / f"{mode}.safetensors")])
        (frozen_t, scale_t, t, real), (frozen_c, scale_c, _, fake) = calls
        assert frozen_t and not frozen_c and (scale_c == 1).all()
        assert len(scored) == 1 and torch.equal(scored[0][0], real.float()) and torch.equal(scored[0][1], fake.float())
        inside = (t >= lo) & (t <= hi)
        assert inside.any() and not inside.all(), t     # the draw tells window apart from fixed and none
        expected = {"none": torch.ones_like(t), "fixed": torch.full_like(t, L.CFG_SCALE),
                    "window": torch.where(inside, L.CFG_SCALE, 1.0)}[mode]
        assert torch.equal(scale_t.to(t.dtype).expand_as(t), expected), (mode, t, scale_t)


def test_dmd_distils_a_deeper_teacher_into_a_smaller_student(tmp_path, monkeypatch):
    """The paper's second scale: --init a student with fewer blocks than --teacher. The critic
    starts as the (deeper) teacher, the saved student keeps its own depth, and the student update
    scores the same rollout with both sizes."""
    base = dmd_run_options(tmp_path, monkeypatch)                     # a 2-block teacher
    small = dmd_dit(seed=1, depth=1, causal=True)
    L.save_checkpoint(tmp_path / "small.safetensors", small, small.cfg)
    base[base.index("--init") + 1] = str(tmp_path / "small.safetensors")
    depths, predict_x0 = [], L.predict_x0
    monkeypatch.setattr(L, "predict_x0", lambda model, *a, **kw: depths.append(len(model.blocks)) or predict_x0(model, *a, **kw))
    _, log = train.main(["dmd", *base, "--steps", "1"])
    assert depths == [2, 2] and all(np.isfinite(v) for v in log["dmd"] + log["critic"])   # teacher, then critic
    out, cfg, _ = L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT)
    assert cfg.depth == 1 and cfg.causal and len(out.blocks) == 1
    assert any((p - q.to(train.STUDENT_DTYPE).float()).abs().max() > 0 for p, q in zip(out.parameters(), small.parameters()))


def test_dmd_resumes_identically(tmp_path, monkeypatch):
    """A run stopped after 1 step and resumed (student, EMA, critic, both optimisers, RNGs) saves
    the same student as an uninterrupted 2-step run."""
    base = dmd_run_options(tmp_path, monkeypatch)
    whole = train.main(["dmd"] + base + ["--out", str(tmp_path / "a.safetensors")])[1]
    first = train.main(["dmd"] + base + ["--stop-after", "1", "--out", str(tmp_path / "b.safetensors")])[1]
    rest = train.main(["dmd"] + base + ["--resume", "--out", str(tmp_path / "b.safetensors")])[1]
    assert first["dmd"] + rest["dmd"] == whole["dmd"] and first["critic"] + rest["critic"] == whole["critic"]
    a = L.load_checkpoint(tmp_path / "a.safetensors", L.DiTConfig, L.DiT)[0]
    b = L.load_checkpoint(tmp_path / "b.safetensors", L.DiTConfig, L.DiT)[0]
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    # the student's and the critic's states are two files: a pair at different steps (a run killed
    # between the two writes) is refused in one line, not resumed
    train.main(["dmd"] + base + ["--stop-after", "1", "--out", str(tmp_path / "c.safetensors")])
    shutil.copy(tmp_path / "critic-b.state.safetensors", tmp_path / "critic-c.state.safetensors")  # step 2 by step 1
    with pytest.raises(SystemExit, match="critic-c.state.safetensors is missing or not at step 1 as") as e:
        train.main(["dmd"] + base + ["--resume", "--out", str(tmp_path / "c.safetensors")])
    assert e.value.code == 2
    with pytest.raises(SystemExit, match="b.state.safetensors is at step 2, and this run ends at step 2") as e:
        train.main(["dmd"] + base + ["--resume", "--out", str(tmp_path / "b.safetensors")])   # finished: nothing left
    assert e.value.code == 2


def test_a_non_finite_loss_stops_training():
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    step = lambda i: (model(torch.tensor([[1.0, float("nan") if i == 1 else 0.0]])).sum(), 1)
    with pytest.raises(SystemExit, match="the loss is nan") as e:
        train.fit(model, step, 3, 1e-2, "nan")
    assert e.value.code == 2
    assert not torch.equal(model.weight, before) and model.weight.isfinite().all()    # step 0 ran, step 1 did not


def test_log_line_gives_the_rate_since_the_start_and_since_the_last_line(monkeypatch, capsys):
    """A slow first step (warm-up, compilation) lowers the rate since the start, not the steady rate
    over the steps since the previous log line. A fake clock: the run starts at 0 s, step 0 ends
    at 10 s, step i at 10 + i s; 4 items per step, a log line every 3 steps."""
    now = {"s": 0.0}
    monkeypatch.setattr(train.time, "time", lambda: now["s"])
    model = torch.nn.Linear(2, 1)

    def step(i):
        now["s"] = 10.0 + i
        return model(torch.ones(1, 2)).sum(), 4
    train.fit(model, step, 6, 1e-3, "toy", log_every=3, unit="items")
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("toy step")]
    assert len(lines) == 2
    assert " 1.0 items/s (steps 1-3: 1.0) elapsed 12s" in lines[0]        # 12 items in 12 s, both ways
    assert " 1.6 items/s (steps 4-6: 4.0) elapsed 15s" in lines[1]        # 24 in 15 s; 12 in the last 3 s


def test_syncnet_batch_must_hold_two_clip_groups(tmp_path):
    with pytest.raises(SystemExit, match="--batch 8"):
        train.main(["syncnet", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1", "--batch", "8"])


@pytest.mark.parametrize("main, argv, words", [
    ("train", ["teacher", "--steps", "0"], ("--steps", "0: takes a positive whole number")),
    ("train", ["vae", "--batch", "-4"], ("--batch", "-4: takes a positive whole number")),
    ("train", ["df", "--depth", "2.5"], ("--depth", "2.5: takes a positive whole number")),
    ("train", ["vae", "--size", "40"], ("--size", "40: must be a multiple of 16")),
    ("train", ["teacher", "--size", "16"], ("--size", "16: must be a multiple of 16", "from 32 up")),
    ("analyze", ["--clips", "0"], ("--clips", "0: takes a positive whole number")),
    ("analyze", ["--size", "24"], ("--size", "24: must be a multiple of 16")),
])
def test_counts_and_sizes_are_checked_before_any_work(capsys, main, argv, words):
    """train.py and analyze.py refuse a count below 1, or a frame size off the 16-pixel grid or
    below 32 (where the mouth box has no latent row), with argparse's usage error (exit 2) naming
    the option, before any data or model is touched."""
    with pytest.raises(SystemExit) as e:
        {"train": train.main, "analyze": A.main}[main](argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert e.value.code == 2 and ": error: argument " in err, err
    assert all(w in err for w in words), err


def test_pipeline_dry_run_makes_every_checkpoint(tmp_path, monkeypatch):
    """`pipeline` with every stage cut to 2 steps on a toy pool: each stage finds what the one
    before it wrote, and the options given to pipeline reach every stage (the autoencoder's
    fine-tuning run included, whose own --steps 2000 they override), and --bf16-convs and
    --channels-last reach the convolutional stages, which then train in channels-last memory and in
    bf16, but the eval SyncNet: it trains in fp32."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    seen, real = [], train.conv_autocast     # seen: (stage, role, dtype of a convolution under its conv_autocast)

    def conv_autocast(args):
        with real(args):
            role = args.role if args.stage == "syncnet" else None
            seen.append((args.stage, role, torch.nn.Conv2d(1, 1, 1)(torch.zeros(1, 1, 1, 1)).dtype))
        return real(args)
    monkeypatch.setattr(train, "conv_autocast", conv_autocast)
    layouts, real_memory = [], train.conv_memory   # (stage, whether its first conv weight is channels-last)

    def conv_memory(args, net):
        net = real_memory(args, net)
        conv = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
        layouts.append((args.stage, conv.weight.is_contiguous(memory_format=torch.channels_last)))
        return net
    monkeypatch.setattr(train, "conv_memory", conv_memory)
    times = train.main(["pipeline", "--ckpt-dir", str(tmp_path), "--size", "32",
                        "--clips", "4", "--seconds", "2", "--steps", "2", "--batch", "16", "--test-clips", "1",
                        "--device", "cpu", "--bf16-convs", "--channels-last"])
    assert list(times) == ["foundation", "teacher", "df", "dmd"]
    assert set(seen) == {("vae", None, torch.bfloat16), ("syncnet", "reward", torch.bfloat16),
                         ("syncnet", "eval", torch.float32), ("mouthnet", None, torch.bfloat16)}
    assert layouts == [("vae", True), ("vae", True), ("syncnet", True), ("syncnet", True), ("mouthnet", True)]
    assert not (tmp_path / "foundation.json").exists()          # the foundation table is `train.py eval`:
    train.main(["eval", "--ckpt-dir", str(tmp_path), "--results", str(tmp_path), "--size", "32", "--test-clips", "1",
                "--device", "cpu"])
    assert json.loads((tmp_path / "foundation.json").read_text())["test_clips"] == 1
    for name in ("vae", "syncnet_reward", "syncnet_eval", "mouthnet", "teacher", "student_df", "student"):
        assert (tmp_path / f"{name}.safetensors").is_file(), name
    assert L.load_checkpoint(tmp_path / "teacher.safetensors", L.DiTConfig, L.DiT)[2]["steps"] == 2
    for name in ("teacher", "student_df", "student"):                  # each DiT records its frame size
        assert L.load_checkpoint(tmp_path / f"{name}.safetensors", L.DiTConfig, L.DiT)[2]["size"] == 32, name
    student, cfg, _ = L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT)
    assert cfg.causal and cfg.dim == L.DIT_PRESETS["tiny"]["dim"]
    assert all(p.isfinite().all() for p in student.parameters())
    # the held-out gap of that teacher: one error per ODE step and kind of clip
    monkeypatch.setattr(train, "HELDOUT_CLIPS", 2)
    err = train.main(["heldout", "--ckpt-dir", str(tmp_path), "--results", str(tmp_path), "--size", "32",
                      "--clips", "4", "--seconds", "2", "--device", "cpu"])
    assert list(err) == list(train.HELDOUT_STEPS) and all(0 < v < 10 for e in err.values() for v in e.values())
    assert json.loads((tmp_path / "heldout.json").read_text())["steps"] == 2


def test_audio_probe_reads_the_mouth_from_the_audio_that_made_it(tmp_path, monkeypatch):
    """The world check under the teacher: trained on a few SynthTalk clips, the probe predicts
    the mouth from the DiT's packed audio far better than the mean mouth does, and the test
    clips' other audio track (speech that did not make that mouth) tells it nothing."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "PROBE_CONTEXTS", (2,))
    r = train.main(["audio-probe", "--results", str(tmp_path), "--size", "32", "--clips", "16", "--seconds", "4",
                    "--steps", "300", "--test-clips", "2", "--device", "cpu"])[2]
    assert np.mean(r["test"]) < 0.5 * r["mean mouth"]
    assert r["dub track"] > 0.8 * r["mean mouth"]
    assert json.loads((tmp_path / "audio_probe.json").read_text())["mae"]["2"]["test"] == r["test"]


# -----------------------------------------------------------------------------
# scale-out: torchrun data parallel and FSDP, as 2 CPU processes over gloo


def _torchrun_worker(rank, world, port, argv, out_dir):
    """One process of a torchrun-like launch: the environment torchrun would set, then the stage.
    Writes its final weights (its own shards, with --fsdp) and its loss log to out_dir."""
    from safetensors.torch import save_file
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    model, log = train.main(argv)
    local = lambda v: v.to_local() if hasattr(v, "to_local") else v                   # a DTensor's shard
    weights = {k: local(v).detach().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, os.path.join(out_dir, f"rank{rank}.safetensors"), metadata={"log": json.dumps(log)})


def free_port():
    """A TCP port on localhost that nothing listens on, for a gloo rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(world, argv, out_dir):
    """Launch `world` processes of train.main(argv); returns each rank's (weights, log)."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    torch.multiprocessing.spawn(_torchrun_worker, args=(world, free_port(), argv, str(out_dir)), nprocs=world)
    out = []
    for r in range(world):
        path = os.path.join(out_dir, f"rank{r}.safetensors")
        with safe_open(path, "pt") as f:
            out.append((load_file(path), json.loads(f.metadata()["log"])))
    return out


def flat_losses(log):
    return log if isinstance(log, list) else log["dmd"] + log["critic"]


def distributed_checkpoints(tmp_path):
    """A tiny teacher, student and foundation in tmp_path, for the DiT stages."""
    torch.manual_seed(0)
    teacher = dmd_dit()
    L.save_checkpoint(tmp_path / "teacher.safetensors", teacher, teacher.cfg)
    student = L.DiT(dataclasses.replace(teacher.cfg, causal=True))
    student.load_state_dict(teacher.state_dict())
    L.save_checkpoint(tmp_path / "student_df.safetensors", student, student.cfg)
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig(width=8)), L.AEConfig(width=8))
    L.save_checkpoint(tmp_path / "syncnet_reward.safetensors", L.SyncNet(L.SyncNetConfig(width=4)).eval(),
                      L.SyncNetConfig(width=4))


def saved_dits_match(path_a, path_b, tol=1e-5):
    """Two saved DiT checkpoints hold the same weights, within tol."""
    a = L.load_checkpoint(path_a, L.DiTConfig, L.DiT)[0].state_dict()
    b = L.load_checkpoint(path_b, L.DiTConfig, L.DiT)[0].state_dict()
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < tol for k in a)


DIST_RUNS = {   # stage arguments for a few steps of each training stage at toy size (global batch 4, or 16 for the SyncNet)
    "vae": ["vae", "--clips", "2", "--seconds", "1", "--steps", "3", "--batch", "4"],
    "syncnet": ["syncnet", "--clips", "4", "--seconds", "2", "--steps", "2", "--batch", "16"],
    "teacher": ["teacher", "--clips", "2", "--seconds", "2", "--steps", "3", "--batch", "4", "--latent-frames", "3",
                "--preset", "tiny"],
    "df": ["df", "--clips", "2", "--seconds", "2", "--steps", "2", "--batch", "4", "--latent-frames", "6"],
    "dmd": ["dmd", "--clips", "2", "--seconds", "2", "--steps", "2", "--batch", "4", "--latent-frames", "6",
            "--critic-steps", "1", "--lr", "1e-3", "--critic-lr", "1e-3"],
}


def test_global_batchnorm_matches_batchnorm_in_fp32_and_under_bf16_autocast(monkeypatch):
    """GlobalBatchNorm's own path (statistics summed over the process group; here a group of one)
    gives BatchNorm2d's output, dtype, gradients and running statistics, also under the bf16
    autocast of --bf16-convs."""
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    monkeypatch.setattr(train, "DIST", train.Dist(0, 2))        # past the one-process shortcut
    reduced, apply = [], train.AllReduceSum.apply
    monkeypatch.setattr(train.AllReduceSum, "apply", lambda x: reduced.append(x.shape) or apply(x))
    try:
        for bf16, tol in ((False, 1e-5), (True, 2e-2)):
            torch.manual_seed(0)
            conv, bn = torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)
            gbn = train.global_batchnorm(copy.deepcopy(bn))
            assert type(gbn) is train.GlobalBatchNorm
            x = torch.randn(6, 3, 8, 8) * 3 + 1
            outs = []
            for norm in (bn, gbn):
                conv.zero_grad()
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    y = norm(conv(x))
                (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
                outs.append((y, conv.weight.grad.clone()))
            (y0, g0), (y1, g1) = outs
            assert reduced == [(2 * 4 + 1,)], reduced               # one all-reduce of (sum, sum of squares, count)
            reduced.clear()
            assert y1.dtype == y0.dtype == (torch.bfloat16 if bf16 else torch.float32)
            assert_close(y1.float(), y0.float(), tol, "output")
            assert_close(g1 / g0.abs().max(), g0 / g0.abs().max(), tol, "conv weight gradient, relative")
            for k in ("running_mean", "running_var"):
                assert_close(getattr(gbn, k), getattr(bn, k), 1e-5, k)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("stage", list(DIST_RUNS))
def test_two_processes_match_one(stage, tmp_path, monkeypatch):
    """torchrun with 2 CPU processes (gloo): both ranks end with identical weights, and the
    per-step losses and the weights match a one-process run of the same global batch."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    distributed_checkpoints(tmp_path)
    init = {"df": ["--init", str(tmp_path / "teacher.safetensors")],
            "dmd": ["--init", str(tmp_path / "student_df.safetensors")]}.get(stage, [])
    argv = DIST_RUNS[stage] + init + ["--ckpt-dir", str(tmp_path), "--size", "32", "--test-clips", "1", "--device", "cpu"]
    model, log = train.main(argv + ["--out", str(tmp_path / "one.safetensors")])
    (w0, log0), (w1, log1) = run_processes(2, argv + ["--out", str(tmp_path / "two.safetensors")], tmp_path)
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)              # ranks in sync
    assert log0 == log1
    np.testing.assert_allclose(flat_losses(log0), flat_losses(log), rtol=1e-4, atol=1e-6)
    one = model.state_dict()
    for k in one:
        # Adam's g / sqrt(v) turns float-level differences in a gradient that is itself rounding noise
        # (a sum that cancels) into a step of up to lr, in one element here and there; every other
        # element of every tensor matches to 1e-4
        err = (w0[k] - one[k]).abs().flatten().sort(descending=True).values
        assert err[min(2, len(err) - 1)] <= 1e-4, f"{k}: {(err > 1e-4).sum()} elements off by up to {err[0]:.3g}"
    if stage == "teacher":                                  # the checkpoint rank 0 saved is the one-process one
        assert saved_dits_match(tmp_path / "one.safetensors", tmp_path / "two.safetensors")


def test_fsdp_shards_the_teacher_over_two_processes(tmp_path, monkeypatch):
    """--fsdp (fully_shard over 2 gloo processes): each rank holds only its half of every weight
    (the halves join into the one-process run's weights), and the losses and the saved EMA
    teacher, gathered from the shards, match a one-process run."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    distributed_checkpoints(tmp_path)
    argv = DIST_RUNS["teacher"] + ["--ckpt-dir", str(tmp_path), "--size", "32", "--device", "cpu"]
    model, log = train.main(argv + ["--out", str(tmp_path / "one.safetensors")])
    (w0, log0), (w1, log1) = run_processes(2, argv + ["--fsdp", "--out", str(tmp_path / "two.safetensors")], tmp_path)
    assert log0 == log1
    np.testing.assert_allclose(log0, log, rtol=1e-4, atol=1e-6)
    for k, v in model.state_dict().items():
        assert len(w0[k]) == (len(v) + 1) // 2 and len(w0[k]) + len(w1[k]) == len(v), k
        assert_close(torch.cat([w0[k], w1[k]]), v, 1e-5, k)
    assert saved_dits_match(tmp_path / "one.safetensors", tmp_path / "two.safetensors")


# -----------------------------------------------------------------------------
# train.py: resuming, the options a stage acts on, and train_dmd's wiring


def test_resume_restores_the_training_devices_generator(tmp_path, monkeypatch):
    """On a GPU the noise comes from the device's own generator, which every stage reseeds at its
    start: the training-state file keeps its state too, so a resumed run draws the noise an
    uninterrupted one draws. No GPU here: a CPU generator plays the GPU's, behind torch.cuda's
    get_rng_state / set_rng_state, and fit trains for device "cuda"."""
    gpu = torch.Generator()
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device="cuda": gpu.get_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device="cuda": gpu.set_state(state))

    def run(state, stop_after=None):
        torch.manual_seed(0)
        gpu.manual_seed(0)                    # what torch.manual_seed(seed) does to the GPU's generator
        model = torch.nn.Linear(4, 1)
        step = lambda i: ((model(torch.randn(8, 4, generator=gpu)) - 1).pow(2).mean(), 8)
        return train.fit(model, step, 6, 1e-2, "toy", state=str(state), stop_after=stop_after, device="cuda")
    whole = run(tmp_path / "a.state.safetensors")
    first = run(tmp_path / "b.state.safetensors", stop_after=3)
    rest = run(tmp_path / "b.state.safetensors")
    assert len(first) == 3 and first + rest == whole


@pytest.mark.parametrize("stage, argv", [
    ("vae", ["--clips", "2", "--seconds", "1", "--batch", "2"]),
    ("syncnet", ["--clips", "4", "--seconds", "2", "--batch", "16"]),
    ("mouthnet", ["--clips", "2", "--seconds", "1", "--batch", "4"]),
])
def test_foundation_stages_resume_identically(stage, argv, tmp_path, monkeypatch):
    """vae, syncnet and mouthnet keep a training-state file too: a run stopped after 2 of 4 steps
    and resumed gives the losses and weights (BatchNorm statistics included) of an uninterrupted run."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(train, "eval_syncnet", lambda net, test, val: {})      # the table after training: not
    monkeypatch.setattr(train, "val_clips", lambda args, n=16: [])              # what this test is about
    base = [stage, *argv, "--steps", "4", "--size", "32", "--test-clips", "1", "--ckpt-dir", str(tmp_path)]
    whole_model, whole = train.main(base + ["--out", str(tmp_path / "a.safetensors")])
    first = train.main(base + ["--stop-after", "2", "--out", str(tmp_path / "b.safetensors")])[1]
    model, rest = train.main(base + ["--resume", "--out", str(tmp_path / "b.safetensors")])
    assert (tmp_path / "b.state.safetensors").is_file()
    assert len(first) == 2 and first + rest == whole
    unsaved = train.main(base + ["--state", "none", "--out", str(tmp_path / "c.safetensors")])[1]
    assert unsaved == whole and (tmp_path / "c.safetensors").is_file() and not list(tmp_path.glob("*none*"))
    assert not (tmp_path / "c.state.safetensors").exists()
    a, b = whole_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("argv, words", [
    (["teacher", "--init", "t.safetensors"], "--init does nothing in teacher"),
    (["syncnet", "--init", "s.safetensors"], "--init does nothing in syncnet"),
    (["mouthnet", "--init", "m.safetensors"], "--init does nothing in mouthnet"),
    (["eval", "--resume"], "--resume does nothing in eval"),
    (["eval-student", "--stop-after", "3"], "--stop-after does nothing in eval-student"),
    (["foundation", "--state", "f.state.safetensors"], "--state does nothing in foundation"),
    (["teacher", "--fsdp", "--resume"], "--resume does nothing under --fsdp"),
    (["df", "--fsdp", "--state", "d.state.safetensors"], "--state does nothing under --fsdp"),
    (["dmd", "--fsdp", "--stop-after", "5"], "--stop-after does nothing under --fsdp"),
    (["teacher", "--state", "none", "--resume"], "--resume needs a training-state file; --state none writes none"),
    (["df", "--state", "none", "--stop-after", "5"], "--stop-after needs a training-state file"),
    (["vae", "--compile"], "--compile does nothing in vae"),
    (["syncnet", "--compile"], "--compile does nothing in syncnet"),
    (["df", "--compile"], "--compile does nothing in df"),
    (["dmd", "--compile"], "--compile does nothing in dmd"),
    (["foundation", "--compile"], "--compile does nothing in foundation"),
    (["df", "--grad-ckpt"], "--grad-ckpt does nothing in df"),
    (["eval-student", "--data", "d"], "--data does nothing in eval-student"),
    (["eval", "--split", "val"], "--split does nothing in eval; eval-teacher, eval-student read it, no other stage"),
    (["teacher", "--bf16-convs"], "--bf16-convs does nothing in teacher"),
    (["df", "--channels-last"], "--channels-last does nothing in df"),
    (["df", "--audio-adaln"], "--audio-adaln does nothing in df"),
    (["vae", "--ckpt", "v.safetensors"], "--ckpt does nothing in vae"),
    (["pipeline", "--teacher", "t.safetensors"], "--teacher does nothing in pipeline"),
    (["pipeline", "--results", "r"], "--results does nothing in pipeline"),
    (["teacher", "--results", "results"], "--results does nothing in teacher"),
    (["export", "--ckpt-dir", "checkpoints"], "--ckpt-dir does nothing in export"),
    (["vae", "--critic-lr", "1e-4"], "--critic-lr does nothing in vae"),
    (["eval-student", "--cfg-scale", "3"], "--cfg-scale does nothing in eval-student; dmd, eval-teacher read it, no other stage"),
    (["df", "--beta", "0"], "--beta does nothing in df"),
    (["teacher", "--teacher-cfg", "fixed"], "--teacher-cfg does nothing in teacher"),
    (["df", "--reward-scale", "2"], "--reward-scale does nothing in df"),
    (["eval-student", "--latent-frames", "12"], "--latent-frames does nothing in eval-student"),
    (["teachr"], "invalid choice: 'teachr'"),
    (["teacher", "--steps", "0"], "--steps: 0: takes a positive whole number"),
    (["teacher", "--lr", "-1"], "--lr: -1: takes a positive number"),
    (["teacher", "--lr", "nan"], "--lr: nan: takes a positive number"),
    (["teacher", "--seconds", "0"], "--seconds: 0: takes a positive number"),
    (["teacher", "--cfg-drop", "2"], "--cfg-drop: 2: takes a probability"),
    (["teacher", "--mouth-weight", "-5"], "--mouth-weight: -5: takes a number >= 0"),
    (["dmd", "--beta", "inf"], "--beta: inf: takes a number >= 0"),
    (["vae", "--seed", "-1"], "--seed: -1: takes a whole number from 0 to 2**63 - 1"),
    (["vae", "--device", "tpu"], "--device tpu: not a device"),
    (["vae", "--init", "gone.safetensors"], "--init gone.safetensors: not found"),
    (["eval-teacher", "--ckpt", "."], "--ckpt .: a folder"),
    (["eval-teacher", "--cfg-scale", "2"], "with --cfg-scale writes over results/teacher.json"),
    (["eval-teacher", "--ckpt", "README.md"], "with another teacher writes over results/teacher.json"),
    (["df", "--latent-frames", "10"], "trains on whole chunks; pass a multiple of 3"),
    (["teacher", "--out", "t.mp4"], "--out t.mp4: pass a checkpoint path ending in .safetensors"),
    (["teacher", "--out", "."], "--out .: pass a checkpoint path ending in .safetensors"),
    (["export", "--out", os.path.abspath(__file__)], "is a file; export writes a folder"),
    (["eval-student", "--steps", "3"], "--steps does nothing in eval-student"),
    (["export", "--lr", "1"], "--lr does nothing in export"),
    (["pipeline", "--seed", "3"], "--seed does nothing in pipeline"),
    (["df", "--depth", "2"], "--depth does nothing in df"),
    (["dmd", "--dim", "256"], "--dim does nothing in dmd"),
    (["teacher", "--dim", "100"], "--dim 100: the tiny preset's heads are 32 wide; pass a multiple of 32"),
    (["teacher", "--data", "d", "--clips", "4"], "--clips sizes a SynthTalk pool; --data d trains on every clip"),
    (["vae", "--state", "."], "--state . is a folder"),
    (["vae", "--state", "checkpoints/vae.safetensors"], "is a model checkpoint, which a run would overwrite"),
    (["vae", "--state", "/proc/lipforcing-test/s.state.safetensors"], "s.state.safetensors: cannot write in /proc"),
    (["export", "--out", "/proc/lipforcing-test"], "cannot write in /proc/lipforcing-test"),
    (["export", "--out", "/tmp/lipforcing-never-written", "--seconds", "0.01"], "makes clips shorter than a frame"),
    (["foundation", "--results", "/proc/lipforcing-test"], "--results /proc/lipforcing-test: cannot write"),
    (["teacher", "--out", "checkpoints/vae.safetensors"], "is a file this stage reads"),
    (["dmd", "--out", "checkpoints/syncnet_reward.safetensors"], "is a file this stage reads"),
    (["teacher", "--data", "d", "--seconds", "2"], "--seconds sizes a SynthTalk pool"),
    (["eval", "--batch", "2"], "--batch does nothing in eval"),
    (["eval-teacher", "--log-every", "3"], "--log-every does nothing in eval-teacher"),
    (["df", "--patch", "1"], "--patch does nothing in df"),
    (["dmd", "--teacher-cfg", "none", "--cfg-scale", "3"], "--cfg-scale does nothing with --teacher-cfg none"),
    (["dmd", "--beta", "0", "--reward-scale", "2"], "--reward-scale does nothing with --beta 0"),
    (["vae", "--state", "README.md", "--resume"], "README.md is not a readable safetensors"),
    (["dmd", "--init", "checkpoints/student.safetensors"], "--out checkpoints/student.safetensors (the default) is a file"),
    (["eval-teacher", "--results", "./results", "--cfg-scale", "2"], "with --cfg-scale writes over ./results/teacher.json"),
    (["eval-teacher", "--test-clips", "3"], "with --test-clips writes over"),
    (["eval-teacher", "--ckpt-dir", "/tmp"], "with another --ckpt-dir and another teacher writes over"),
    (["df", "--out", "checkpoints/vae.safetensors"], "--out checkpoints/vae.safetensors is a file this stage reads"),
    (["df", "--init", "checkpoints/student_df.safetensors", "--out", "./checkpoints/student_df.safetensors"],
     "is a file this stage reads"),
    (["vae", "--out", "/tmp/v.safetensors", "--state", "/tmp/v.safetensors"], "--state /tmp/v.safetensors is a file"),
    (["vae", "--out", os.path.join(os.path.abspath(__file__), "v.safetensors")], "is a file, not a folder"),
    (["eval", "--results", os.path.join(os.path.abspath(__file__), "r")], "is a file, not a folder; pick another path"),
])
def test_options_a_stage_would_ignore_and_bad_values_are_refused_before_any_work(capsys, monkeypatch, argv, words):
    """An option the stage does not act on, an out-of-range number, a device this machine lacks, a
    checkpoint named on the command line that is not there, or an --out no checkpoint can be written
    to is one line `train.py: error: ...` and exit 2 (argparse's own errors too: no usage block),
    before the process group is joined or the stage starts; nothing is silently ignored."""
    def work(*a):
        raise AssertionError("work started")
    monkeypatch.setattr(train, "init_distributed", work)
    for stage in train.STAGES:
        monkeypatch.setitem(train.STAGES, stage, work)
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert_one_line_error(e.value.code, capsys.readouterr().err, words, prog="train.py")


def test_a_stages_help_leaves_out_the_options_it_refuses(capsys):
    """`train.py STAGE --help` leaves out the options STAGE refuses (STAGE_OPTIONS); `--help` alone
    lists them all."""
    def help_of(*argv):
        with pytest.raises(SystemExit) as e:
            train.get_args([*argv, "--help"])
        assert e.value.code == 0
        return capsys.readouterr().out
    listed = lambda text, name: re.search(rf"^  {train.option(name)}(?=[ ,\n])", text, re.M) is not None
    every = help_of()
    for stage in ("vae", "dmd", "export", "eval-student"):
        text = help_of(stage)
        for name, stages in train.STAGE_OPTIONS.items():
            assert listed(text, name) == (stage in stages), (stage, name)
            assert listed(every, name), name


@pytest.fixture(scope="module")
def wrong_kinds(tmp_path_factory):
    """A --ckpt-dir of tiny foundation models with a teacher and a student, and a second one whose
    student_df is a teacher."""
    d = tmp_path_factory.mktemp("kinds")
    for name, cfg, cls in (("vae", L.AEConfig(width=8), L.VideoAE), ("syncnet_eval", L.SyncNetConfig(width=4), L.SyncNet),
                           ("syncnet_reward", L.SyncNetConfig(width=4), L.SyncNet),
                           ("mouthnet", L.MouthNetConfig(width=4), L.MouthNet),
                           ("teacher", L.DiTConfig(**TINY), L.DiT), ("student_df", L.DiTConfig(**TINY, causal=True), L.DiT)):
        L.save_checkpoint(d / f"{name}.safetensors", cls(cfg), cfg)
    (d / "swapped").mkdir()
    for name in ("vae", "syncnet_eval", "syncnet_reward", "mouthnet"):
        shutil.copy(d / f"{name}.safetensors", d / "swapped" / f"{name}.safetensors")
    shutil.copy(d / "teacher.safetensors", d / "swapped" / "student_df.safetensors")
    return d


@pytest.mark.parametrize("argv, words", [
    (["eval-teacher", "--ckpt", "{d}/student_df.safetensors"], "causal student; eval-teacher takes a bidirectional"),
    (["heldout", "--ckpt", "{d}/student_df.safetensors"], "causal student; heldout takes a bidirectional"),
    (["eval-student", "--ckpt", "{d}/teacher.safetensors"], "bidirectional teacher; eval-student takes a causal"),
    (["dmd", "--teacher", "{d}/student_df.safetensors"], "causal student; dmd's --teacher takes a bidirectional"),
    (["ablation", "--ckpt-dir", "{d}/swapped", "--test-clips", "1"], "bidirectional teacher; ablation takes a causal"),
])
def test_each_stage_refuses_a_dit_of_the_other_kind(wrong_kinds, tmp_path, capsys, argv, words):
    """Every stage that reads a DiT checks that it is the kind it samples or trains (load_dit):
    a student graded as a teacher would be sampled with a causal mask, silently. (ablation draws
    its test clip first, with a progress bar: the error is the last line.)"""
    with pytest.raises(SystemExit) as e:
        results = [] if argv[0] == "dmd" else ["--results", str(tmp_path)]        # dmd writes no table
        train.main(["--ckpt-dir", str(wrong_kinds), *results] + [a.format(d=wrong_kinds) for a in argv])
    assert_one_line_error(e.value.code, capsys.readouterr().err.strip().splitlines()[-1], words, prog="train.py")


@pytest.mark.parametrize("argv", [
    ["vae", "--init", "checkpoints/vae.safetensors"],                          # fine-tunes in place
    ["dmd", "--init", "checkpoints/student.safetensors", "--out", "checkpoints/student_df.safetensors"],   # not read
    ["eval-teacher", "--cfg-scale", "4.5"],
    ["eval-teacher", "--split", "val", "--cfg-scale", "2"],                     # teacher_val.json
    ["eval-teacher", "--cfg-scale", "2", "--results", "out/cfg2"],
    ["dmd", "--reward-scale", "2"], ["dmd", "--teacher-cfg", "fixed", "--cfg-scale", "3"],
])
def test_what_the_path_checks_let_through(argv):
    """The documented command lines that write near what they read pass check_options and
    check_paths: the autoencoder fine-tuned in place, a dmd --init that leaves student_df unread,
    eval-teacher gradings that do not write over results/teacher.json."""
    args = train.get_args(argv)
    train.check_options(args)
    train.check_paths(args)


def test_an_output_that_is_an_input_by_another_name_is_refused_and_only_rank_0_tests_folders(tmp_path, monkeypatch,
                                                                                            capsys):
    """--out as a link to a checkpoint the stage reads is refused (os.path.samefile), and under
    torchrun only rank 0 makes and removes the test folders (the others would race it)."""
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig(width=8)), L.AEConfig(width=8))
    os.symlink(tmp_path / "vae.safetensors", tmp_path / "link.safetensors")
    monkeypatch.setattr(train, "dit_pool", lambda *a: pytest.fail("the teacher started"))
    with pytest.raises(SystemExit):
        train.main(["teacher", "--ckpt-dir", str(tmp_path), "--out", str(tmp_path / "link.safetensors")])
    assert "link.safetensors is a file this stage reads" in capsys.readouterr().err
    monkeypatch.setenv("RANK", "1")
    train.check_paths(train.get_args(["export", "--out", "/proc/lipforcing-test"]))    # rank 0 says no, not rank 1
    monkeypatch.setattr(L, "folder_problem", lambda folder: pytest.fail("rank 1 tested a folder"))
    train.check_paths(train.get_args(["vae", "--ckpt-dir", str(tmp_path / "new")]))


def test_pipeline_passes_cfg_dropout_and_threads_to_the_stages_that_read_them(monkeypatch):
    """--cfg-drop, --drop-mode and --threads given to pipeline reach the teacher (run_stage)."""
    seen = {}
    monkeypatch.setitem(train.STAGES, "teacher", lambda args: seen.update(vars(args)))
    train.run_stage(train.get_args(["pipeline", "--cfg-drop", "0.2", "--drop-mode", "all", "--threads", "1"]), "teacher")
    assert (seen["cfg_drop"], seen["drop_mode"], seen["threads"]) == (0.2, "all", 1)


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_any_work(monkeypatch):
    """Under torchrun (WORLD_SIZE set) a --batch that is not a multiple of the processes is refused
    by check_options, before the process group is joined or a model is loaded."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit, match=r"--batch 3 must be a multiple of the number of processes \(2\)"):
        train.check_options(train.get_args(["vae", "--batch", "3"]))
    train.check_options(train.get_args(["vae", "--batch", "4"]))
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit, match=r"--batch 16 \(the default\) must be a multiple of the number of processes"):
        train.check_options(train.get_args(["vae"]))


@pytest.mark.parametrize("error, code, words", [(KeyboardInterrupt, 130, "interrupted"), (MemoryError, 2, "out of memory")])
def test_an_interrupted_or_out_of_memory_stage_ends_in_one_line(capsys, monkeypatch, error, code, words):
    """Ctrl-C (or SIGTERM turned into it) and running out of memory end a stage with one line, no traceback."""
    def stage(args):
        raise error()
    monkeypatch.setitem(train.STAGES, "eval", stage)
    with pytest.raises(SystemExit) as e:
        train.main(["eval"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1 and err[0].startswith("train.py: ") and words in err[0], err


def test_a_checkpoint_that_cannot_be_used_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    """load_checkpoint raises CheckpointError, one line, for a missing file, a folder, a truncated
    file, another model's checkpoint and NaN weights; train.py and analyze.py turn it into their
    one-line error with exit 2 (here: a --ckpt-dir without the autoencoder; a student handed to
    the analysis, which reads a bidirectional teacher; a DiT trained at another --size)."""
    ae = L.VideoAE(L.AEConfig(width=8))
    L.save_checkpoint(tmp_path / "vae.safetensors", ae, ae.cfg)
    data = (tmp_path / "vae.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:len(data) // 2])
    nan = next(p for p in ae.parameters() if p.is_floating_point())
    nan.data.view(-1)[0] = float("nan")
    L.save_checkpoint(tmp_path / "nan.safetensors", ae, ae.cfg)
    for name, words in (("gone", "not found"), ("", "is a folder"), ("cut", "not a readable safetensors"),
                        ("nan", "NaN or infinite weights")):
        path = tmp_path / f"{name}.safetensors" if name else tmp_path
        with pytest.raises(L.CheckpointError, match=words) as e:
            L.load_checkpoint(path, L.AEConfig, L.VideoAE)
        assert "\n" not in str(e.value)
    with pytest.raises(L.CheckpointError, match="holds AE weights, not DiT ones"):
        L.load_checkpoint(tmp_path / "vae.safetensors", L.DiTConfig, L.DiT)
    from safetensors.torch import save_file                # a run's training state handed as the checkpoint
    save_file({"model.w": torch.zeros(1)}, tmp_path / "x.state.safetensors", metadata={"step": "3"})
    with pytest.raises(L.CheckpointError, match="not a model checkpoint .* training state; pass the checkpoint beside"):
        L.load_checkpoint(tmp_path / "x.state.safetensors", L.DiTConfig, L.DiT)
    with pytest.raises(SystemExit) as e:
        train.main(["eval-teacher", "--ckpt-dir", str(tmp_path / "empty"), "--results", str(tmp_path)])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "vae.safetensors: checkpoint not found", prog="train.py")
    student = L.DiT(L.DiTConfig(**TINY, causal=True))
    L.save_checkpoint(tmp_path / "student.safetensors", student, student.cfg)
    L.save_checkpoint(tmp_path / "syncnet_eval.safetensors", L.SyncNet(L.SyncNetConfig(width=4)), L.SyncNetConfig(width=4))
    with pytest.raises(SystemExit) as e:
        A.main(["--teacher", str(tmp_path / "student.safetensors"), "--ckpt-dir", str(tmp_path), "--vae",
                str(tmp_path / "vae.safetensors"), "--clips", "1", "--size", "32", "--out", str(tmp_path / "a")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "is a causal student", prog="analyze.py")
    with pytest.raises(SystemExit) as e:
        A.main(["--out", str(tmp_path / "vae.safetensors")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "is a file", prog="analyze.py")
    # a DiT that records the frame size it trained at is refused at another (train.py's default 64 here)
    teacher = L.DiT(L.DiTConfig(**TINY))
    L.save_checkpoint(tmp_path / "t32.safetensors", teacher, teacher.cfg, extra={"size": 32})
    assert L.load_checkpoint(tmp_path / "t32.safetensors", L.DiTConfig, L.DiT, size=32)[2] == {"size": 32}
    assert L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT, size=64)[2] == {}   # none recorded
    with pytest.raises(SystemExit) as e:
        train.main(["df", "--init", str(tmp_path / "t32.safetensors"), "--ckpt-dir", str(tmp_path),
                    "--out", str(tmp_path / "df.safetensors")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "t32.safetensors was trained on 32 px frames, not 64",
                          "pass --size 32", prog="train.py")
    assert not (tmp_path / "df.safetensors").exists()
    with pytest.raises(SystemExit) as e:
        A.main(["--teacher", str(tmp_path / "t32.safetensors"), "--ckpt-dir", str(tmp_path), "--vae",
                str(tmp_path / "vae.safetensors"), "--clips", "1", "--size", "48", "--out", str(tmp_path / "a")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "trained on 32 px frames, not 48", prog="analyze.py")
    monkeypatch.setattr(A, "analyze_teacher", lambda *a: pytest.fail("a teacher analysed before all were checked"))
    with pytest.raises(SystemExit) as e:                  # the second teacher is refused before the first's work
        A.main(["--teacher", str(tmp_path / "t32.safetensors"), "--teacher", str(tmp_path / "student.safetensors"),
                "--ckpt-dir", str(tmp_path), "--vae", str(tmp_path / "vae.safetensors"), "--clips", "1", "--size", "32",
                "--out", str(tmp_path / "a")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "student.safetensors is a causal student", prog="analyze.py")
    with pytest.raises(SystemExit) as e:                   # a student where a teacher is read, and the other way
        train.main(["df", "--init", str(tmp_path / "student.safetensors"), "--ckpt-dir", str(tmp_path),
                    "--out", str(tmp_path / "df.safetensors")])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "student.safetensors is a causal student; df takes a "
                          "bidirectional teacher", prog="train.py")
    with pytest.raises(L.CheckpointError, match="t32.safetensors is a bidirectional teacher; eval-student takes a causal"):
        train.load_dit(train.get_args(["eval-student", "--size", "32"]), tmp_path / "t32.safetensors", True, "eval-student",
                       L.VideoAE(L.AEConfig()))


@pytest.mark.parametrize("stage", ["mouthnet", "heldout", "audio-probe"])
def test_stages_that_need_synthtalk_refuse_data_in_one_line(stage, capsys):
    """MouthNet, heldout and audio-probe need SynthTalk's ground truth: --data is one line saying
    why, exit 2, before any work."""
    with pytest.raises(SystemExit) as e:
        train.main([stage, "--data", "d"])
    assert_one_line_error(e.value.code, capsys.readouterr().err, "SynthTalk", prog="train.py")


def test_pipeline_passes_each_stage_only_the_options_it_takes(tmp_path, monkeypatch):
    """`pipeline --compile --bf16-convs --channels-last --grad-ckpt --data DIR` runs the training
    stages only, and gives each flag to the stages that act on it (compile: the teacher; bf16-convs:
    the convolutional stages but the eval SyncNet; channels-last: all of those; grad-ckpt: the
    teacher and dmd), --data to every stage but MouthNet (it learns SynthTalk's ground-truth mouth);
    `foundation` ends with the foundation table (eval, on the SynthTalk test split); and every stage
    that foundation and pipeline run gets a command line the stage itself accepts."""
    seen = []

    def leaf(args):
        train.check_options(args)
        seen.append((args.stage, args.compile, args.bf16_convs, args.grad_ckpt, args.data, args.channels_last))
    for stage in ("vae", "syncnet", "mouthnet", "eval", "teacher", "df", "dmd"):
        monkeypatch.setitem(train.STAGES, stage, leaf)
    (tmp_path / "vae.safetensors").touch()             # the first vae stage's output, which the second --init's
    train.main(["pipeline", "--compile", "--bf16-convs", "--channels-last", "--grad-ckpt", "--data", str(tmp_path),
                "--ckpt-dir", str(tmp_path)])
    assert [s[0] for s in seen] == ["vae", "vae", "syncnet", "syncnet", "mouthnet", "teacher", "df", "dmd"]
    assert [s[0] for s in seen if s[1]] == ["teacher"]
    assert [s[0] for s in seen if s[2]] == ["vae", "vae", "syncnet", "mouthnet"]      # not the eval SyncNet
    assert [s[0] for s in seen if s[3]] == ["teacher", "dmd"]
    assert [s[0] for s in seen if s[4] is None] == ["mouthnet"]
    assert [s[0] for s in seen if s[5]] == ["vae", "vae", "syncnet", "syncnet", "mouthnet"]
    seen.clear()
    train.main(["foundation", "--bf16-convs", "--channels-last", "--data", str(tmp_path), "--ckpt-dir", str(tmp_path)])
    assert [s[0] for s in seen] == ["vae", "vae", "syncnet", "syncnet", "mouthnet", "eval"]
    assert [s[0] for s in seen if s[4] is None] == ["mouthnet", "eval"]


def test_resume_without_a_state_file_says_it_starts_from_scratch(tmp_path, capsys):
    """--resume where no training state was saved is not an error (a first run may be resumable
    from the start), but it says so rather than look like a continuation."""
    args = SimpleNamespace(state=None, resume=True)
    state = train.fresh_state(args, str(tmp_path / "teacher.safetensors"))
    assert state == str(tmp_path / "teacher.state.safetensors")
    assert f"no training state at {state}; this run starts from scratch" in capsys.readouterr().out


def test_resume_needs_every_process_to_find_the_state(tmp_path, monkeypatch):
    """Processes that disagree on whether the training state exists (nodes without a shared
    filesystem) stop the run rather than resume on some and restart on others; agreeing ones go on."""
    state = tmp_path / "x.state.safetensors"
    state.write_bytes(b"")
    monkeypatch.setattr(train, "DIST", train.Dist(0, 2, False))
    monkeypatch.setattr(train, "summed", lambda x: 2 * x)                  # the other rank agrees with this one
    assert train.resumes_from(str(state)) and not train.resumes_from(str(tmp_path / "none"))
    monkeypatch.setattr(train, "summed", lambda x: x)                      # the other rank does not
    with pytest.raises(SystemExit, match="1 of 2 processes find it"):
        train.resumes_from(str(state))


def test_every_rank_deletes_the_old_training_state_and_waits_for_the_others(tmp_path, monkeypatch):
    """Without --resume, each rank deletes the old training-state files (its node's own copy where
    nodes share no filesystem; one that another rank removed first is no error), then every rank
    meets at a barrier: no rank finds a stale file and resumes from it while the others start afresh."""
    state = tmp_path / "t.state.safetensors"
    at_barrier = []
    monkeypatch.setattr(train.dist, "barrier", lambda: at_barrier.append((train.DIST.rank, state.exists())))
    args = train.get_args(["teacher"])
    for rank, stale in ((1, True), (0, True), (0, False)):             # the last: a file already gone
        if stale:
            state.write_bytes(b"an older run's state")
        monkeypatch.setattr(train, "DIST", train.Dist(rank, 2))
        assert train.fresh_state(args, str(tmp_path / "t.safetensors"), lambda st: [st + ".gone"]) == str(state)
    assert at_barrier == [(1, False), (0, False), (0, False)]


def test_teacher_loss_by_t_covers_the_steps_since_the_last_log_line(tmp_path, monkeypatch, capsys):
    """The teacher's log line bins the loss by t over the steps since the line before (--log-every),
    not over the last 100 steps: with --log-every 2, the line at step 4 holds steps 3 and 4 only."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    ts, per_sample = [], []
    shift_t, flow_matching_loss = L.shift_t, L.flow_matching_loss
    monkeypatch.setattr(L, "shift_t", lambda t, *a: ts.append(shift_t(t, *a)) or ts[-1])
    monkeypatch.setattr(L, "flow_matching_loss", lambda *a: per_sample.append(flow_matching_loss(*a)) or per_sample[-1])
    train.main(["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "4",
                "--batch", "2", "--latent-frames", "3", "--log-every", "2", "--out", str(tmp_path / "t.safetensors")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("teacher step")]

    def binned(steps):                                 # the text an independent binning of those steps gives
        sums, counts = np.zeros(len(train.T_BINS) - 1), np.zeros(len(train.T_BINS) - 1)
        for i in steps:
            for t, loss in zip(ts[i].tolist(), per_sample[i].tolist()):
                k = next(k for k, hi in enumerate(train.T_BINS[1:]) if t < hi or hi == 1.0)
                sums[k], counts[k] = sums[k] + loss, counts[k] + 1
        return "loss by t " + " ".join(f"{lo:.1f}-{hi:.1f}:" + (f"{s / c:.3f}" if c else "-") for lo, hi, s, c in
                                       zip(train.T_BINS[:-1], train.T_BINS[1:], sums, counts))   # -: no sample
    assert len(lines) == 2 and len(ts) == len(per_sample) == 4
    assert lines[0].endswith(binned([0, 1])) and lines[1].endswith(binned([2, 3])), (lines, binned([0, 1, 2, 3]))
    assert binned([2, 3]) != binned([0, 1, 2, 3])     # the test can tell the two apart


def test_teacher_audio_encoder_is_the_reward_syncnets_and_df_inherits_it(tmp_path, monkeypatch):
    """`train.py teacher --audio-encoder` copies <ckpt-dir>/syncnet_reward's audio stream into the
    DiT's AudioEncoder and records its weights_digest; df's student, initialised from that teacher,
    keeps the flag and the same encoder weights."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    net = random_syncnet()
    L.save_checkpoint(tmp_path / "syncnet_reward.safetensors", net, net.cfg)
    common = ["--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--steps", "1", "--batch", "2", "--state", "none"]
    train.main(["teacher", *common, "--latent-frames", "3", "--depth", "2", "--dim", "64", "--audio-encoder"])
    train.main(["df", *common, "--latent-frames", "6", "--out", str(tmp_path / "s.safetensors")])
    expect = {k: v for k, v in net.audio.state_dict().items()}
    for name in ("teacher", "s"):
        model, cfg, _ = L.load_checkpoint(tmp_path / f"{name}.safetensors", L.DiTConfig, L.DiT)
        assert cfg.audio_encoder
        for k, v in expect.items():
            assert_close(getattr(model.audio_encoder, k.replace(".", "_")), v, 1e-3 * (1 + v.abs().max()), k)  # df stores fp16
    assert L.load_checkpoint(tmp_path / "teacher.safetensors", L.DiTConfig, L.DiT)[2]["audio_encoder"] == L.weights_digest(net)


def test_df_loss_by_chunk_covers_the_steps_since_the_last_log_line(tmp_path, monkeypatch, capsys):
    """df's log line gives the loss of each chunk averaged over the steps since the line before, as
    the teacher's loss by t: with --log-every 2, the line at step 4 holds steps 3 and 4 only."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    teacher = L.DiT(L.DiTConfig(dim=64, depth=2, heads=2, ffn=128))
    L.save_checkpoint(tmp_path / "teacher.safetensors", teacher, teacher.cfg, extra={"size": 64})
    per_chunk, df_loss = [], train.df_loss
    monkeypatch.setattr(train, "df_loss", lambda *a: per_chunk.append(df_loss(*a)) or per_chunk[-1])
    train.main(["df", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--steps", "4", "--batch", "2",
                "--latent-frames", "6", "--log-every", "2", "--state", "none", "--out", str(tmp_path / "s.safetensors")])
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("df step")]
    mean = lambda steps: "loss by chunk " + " ".join(f"{v:.3f}" for v in
                                                     torch.stack([per_chunk[i].mean(0) for i in steps]).mean(0).tolist())
    assert len(lines) == 2 and len(per_chunk) == 4 and per_chunk[0].shape == (2, 2)
    assert lines[0].endswith(mean([0, 1])) and lines[1].endswith(mean([2, 3])), (lines, mean([3]))
    assert mean([2, 3]) != mean([3])                 # the test can tell the two apart


def test_a_bad_clip_in_a_data_folder_is_one_line_exit_2(tmp_path, capsys):
    """A --data folder holding a clip ffmpeg cannot read ends the run with one line
    `train.py: error: ...` naming the file, exit code 2, no traceback and no checkpoint."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "broken.mp4").write_bytes(b"not a video at all")
    with pytest.raises(SystemExit) as e:
        train.main(["vae", "--data", str(tmp_path / "data"), "--steps", "1", "--out", str(tmp_path / "v.safetensors")])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]                  # after the progress bar of the folder's reading
    assert e.value.code == 2 and last.startswith("train.py: error: ") and "broken.mp4" in last, err
    assert err.count("train.py: error: ") == 1 and "Traceback" not in err
    assert not (tmp_path / "v.safetensors").exists()


def dmd_spies(monkeypatch):
    """Record what train_dmd hands the lipforcing functions it calls: each re-noise time draw,
    rollout (exit step, output, with gradient?), add_noise, predict_x0 and dmd_loss call, and every
    forward of a bidirectional DiT with gradient (the critic learning)."""
    rec = SimpleNamespace(ts=[], rollouts=[], noised=[], predicted=[], dmd=[], critic=[])
    dmd_timesteps, rollout, add_noise = L.dmd_timesteps, L.self_forcing_rollout, L.add_noise
    predict_x0, dmd_loss, forward = L.predict_x0, L.dmd_loss, L.DiT.forward
    monkeypatch.setattr(L, "dmd_timesteps", lambda *a: rec.ts.append(dmd_timesteps(*a)) or rec.ts[-1])

    def spy_rollout(model, cond, audio, noises, exit_step, *a):
        x = rollout(model, cond, audio, noises, exit_step, *a)
        rec.rollouts.append((exit_step, x, torch.is_grad_enabled()))
        return x

    def spy_add_noise(x0, eps, t):
        rec.noised.append((x0, eps, t, add_noise(x0, eps, t)))
        return rec.noised[-1][-1]

    def spy_forward(self, x, t, *a, **kw):
        if torch.is_grad_enabled() and not self.cfg.causal:
            rec.critic.append((x, t))
        return forward(self, x, t, *a, **kw)
    monkeypatch.setattr(L, "self_forcing_rollout", spy_rollout)
    monkeypatch.setattr(L, "add_noise", spy_add_noise)
    monkeypatch.setattr(L, "predict_x0", lambda model, x, t, *a: rec.predicted.append((model, x, t)) or predict_x0(model, x, t, *a))
    monkeypatch.setattr(L, "dmd_loss", lambda *a: rec.dmd.append(dmd_loss(*a)) or rec.dmd[-1])
    monkeypatch.setattr(L.DiT, "forward", spy_forward)
    return rec


def noised_from(rec, x_t):
    """The add_noise call that made x_t: (x0, eps, t)."""
    return next(n[:3] for n in rec.noised if n[3] is x_t)


def test_dmd_draws_the_exit_step_per_rollout_and_noises_at_the_drawn_t(tmp_path, monkeypatch):
    """Each rollout draws its own exit step (both of the 2-step schedule's turn up); the critic
    learns at the re-noise time t drawn with its rollout, on that rollout noised at t; the teacher
    and critic score the student's rollout noised at the very t they are told, the one drawn with it."""
    base = dmd_run_options(tmp_path, monkeypatch)
    rec = dmd_spies(monkeypatch)
    train.main(["dmd", *base, "--steps", "2", "--critic-steps", "3"])
    F_ = 6                                                              # --latent-frames
    assert len(rec.rollouts) == len(rec.ts) == 8 and len(rec.critic) == 6 and len(rec.predicted) == 4
    assert {e for e, _, _ in rec.rollouts} == set(range(len(L.STUDENT_STEPS)))
    for step in range(2):
        draws = list(range(4 * step, 4 * step + 4))                  # 3 critic updates, then the student's
        for j, (x, t) in zip(draws[:3], rec.critic[3 * step:3 * step + 3]):
            assert torch.equal(t, rec.ts[j][:, None].expand(-1, F_))
            x0, eps, t_noise = noised_from(rec, x)
            assert torch.equal(t_noise, t) and torch.equal(x0, rec.rollouts[j][1])
        (teacher, x_t, tt), (critic, x_t2, tt2) = rec.predicted[2 * step:2 * step + 2]
        exit_step, x, grad = rec.rollouts[draws[3]]
        assert grad and x_t2 is x_t and torch.equal(tt2, tt)
        assert torch.equal(tt, rec.ts[draws[3]][:, None].expand(-1, F_))
        x0, eps, t_noise = noised_from(rec, x_t)
        assert torch.equal(t_noise, tt) and torch.equal(x0, x.detach())
        assert torch.equal(x_t, L.add_noise(x.detach(), eps, tt))


def test_dmd_student_update_is_reward_weighted_uses_self_forcings_adam_and_saves_the_ema(tmp_path, monkeypatch):
    """The student's loss is sum_i w_i L_i / sum_i w_i with w = exp(beta R / scale) (R its Sync-C,
    here fixed per sample; L the per-sample DMD loss), clipped at DMD_CLIP; student and critic use
    Adam with betas (0, 0.999) at --lr and --critic-lr; the checkpoint saved is the student's EMA,
    updated once per student step at DMD_EMA, not the raw student."""
    base = dmd_run_options(tmp_path, monkeypatch)
    rec = dmd_spies(monkeypatch)
    R = torch.tensor([0.0, 5.0], dtype=torch.float64)
    monkeypatch.setattr(train, "sync_rewards", lambda net, ae, x, raw: R.clone())
    adams, steps, emas = [], [], []

    class Adam(torch.optim.Adam):
        def __init__(self, params, **kw):
            params = list(params)
            adams.append((params, kw))
            super().__init__(params, **kw)
    monkeypatch.setattr(torch.optim, "Adam", Adam)
    optimizer_step, ema_update = train.optimizer_step, train.ema_update
    monkeypatch.setattr(train, "optimizer_step", lambda model, opt, loss, clip:
                        steps.append((model, loss.detach().clone(), clip)) or optimizer_step(model, opt, loss, clip))
    monkeypatch.setattr(train, "ema_update", lambda ema, model, step, decay:
                        emas.append((ema, model, step, decay)) or ema_update(ema, model, step, decay))
    student, log = train.main(["dmd", *base, "--steps", "2", "--critic-steps", "1", "--beta", "2",
                               "--reward-scale", "2", "--lr", "1e-3", "--critic-lr", "2e-3"])
    # Adam as Self Forcing: no first moment
    (s_params, s_kw), = [(p, kw) for p, kw in adams if p[0] is next(student.parameters())]
    (c_params, c_kw), = [(p, kw) for p, kw in adams if p[0] is not next(student.parameters())]
    assert s_kw == {"lr": 1e-3, "betas": (0.0, 0.999)} and c_kw == {"lr": 2e-3, "betas": (0.0, 0.999)}
    # the reward weighting, against its formula
    updates = [(loss, clip) for model, loss, clip in steps if model is student]
    assert len(updates) == 2 and len(rec.dmd) == 2 and log["sync_c"] == [2.5, 2.5]
    w = torch.exp(2 * R / 2)
    for (loss, clip), per_sample in zip(updates, rec.dmd):
        L_ = per_sample.detach().double()
        ref = (w * L_).sum() / w.sum()
        assert clip == train.DMD_CLIP and abs(loss.item() - ref.item()) <= 1e-6 * ref.item(), (loss, ref, L_)
        flipped = (L_ / w).sum() / (1 / w).sum()
        assert min(abs(ref - L_.mean()), abs(ref - flipped)) > 1e-3 * ref      # the test tells them apart
    # the EMA is what is saved
    assert [(m is student, step, decay) for _, m, step, decay in emas] == [(True, 0, train.DMD_EMA), (True, 1, train.DMD_EMA)]
    ema = emas[0][0]
    saved = L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT)[0].state_dict()
    half = lambda m: {k: v.to(train.STUDENT_DTYPE).float() for k, v in m.state_dict().items()}
    assert all(torch.equal(saved[k], v) for k, v in half(ema).items())
    assert any(not torch.equal(saved[k], v) for k, v in half(student).items())


# -----------------------------------------------------------------------------
# media I/O and sample.py: late audio, ':' in paths, memory, short lengths, unwritable folders, SIGHUP


def test_audio_that_starts_late_in_its_container_keeps_its_offset(tmp_path):
    """An audio track muxed to start 0.4 s into its container (-itsoffset: PCM in an mkv, AAC in an
    mp4) reads back with that 0.4 s of silence first, in sync with the frames: a tone that starts at
    0.5 s in the wav starts at 0.9 s (within 5 ms). One whose first packet is stamped before 0 is
    read whole, from its first sample."""
    sf.write(tmp_path / "a.wav", tone(1.5, SAMPLE_RATE, onset=0.5), SAMPLE_RATE)
    write_video(tmp_path / "v.mp4", synthetic_frames(50))
    onset = lambda x: int(np.argmax(np.abs(x) > 0.1))
    for name, codec in (("late.mkv", "pcm_s16le"), ("late.mp4", "aac")):
        ffmpeg("-i", tmp_path / "v.mp4", "-itsoffset", "0.4", "-i", tmp_path / "a.wav", "-map", "0:v", "-map", "1:a",
               "-c:v", "copy", "-c:a", codec, tmp_path / name)
        a = read_audio(tmp_path / name)
        assert abs(onset(a) - 0.9 * SAMPLE_RATE) <= 80, (name, onset(a))
    # and one that starts early is not cut: an audio-only opus webm (a browser's recording) has its
    # first packet 13 ms before 0, yet holds the whole wav from its first sample
    ffmpeg("-i", tmp_path / "a.wav", "-c:a", "libopus", tmp_path / "early.webm")
    a = read_audio(tmp_path / "early.webm")
    assert len(a) == round(1.5 * SAMPLE_RATE) and abs(onset(a) - 0.5 * SAMPLE_RATE) <= 80, (len(a), onset(a))


def test_paths_with_a_colon_are_files_not_protocols(tmp_path, monkeypatch):
    """ffmpeg reads `take1:final.mp4` as protocol `take1`; every path reaches it as a file: reading
    (video, audio, the probe), write_video and the stream's Mp4Writer, relative names with a ':'."""
    monkeypatch.chdir(tmp_path)
    frames = synthetic_frames(10)
    write_video("take1:final.mp4", frames, tone(0.4, SAMPLE_RATE))
    assert read_video("take1:final.mp4")[0].shape == frames.shape and has_audio("take1:final.mp4")
    assert len(read_audio("take1:final.mp4")) == 10 * SAMPLES_PER_FRAME
    w = sample.Mp4Writer("live:take.mp4", 64, 64)
    w.write(frames[:3])
    w.finish()
    w.close()
    assert len(read_video("live:take.mp4")[0]) == 3
    assert sorted(os.listdir()) == ["live:take.mp4", "take1:final.mp4"]


def test_resize_frames_holds_a_few_frames_of_floats_at_a_time(monkeypatch):
    """resize_frames converts at most RESIZE_VALUES float values at a time (a long 720p clip is
    never one float copy of 1.7 GB) and gives exactly the whole-clip resize, down (area) and up
    (bilinear)."""
    to_tensor, seen = L.frames_to_tensor, []
    monkeypatch.setattr(L, "frames_to_tensor", lambda f: seen.append(f.size) or to_tensor(f))
    for hw, size, mode in ((40, 32, "area"), (24, 32, "bilinear")):
        frames = np.random.default_rng(0).integers(0, 256, (20, hw, hw, 3), dtype=np.uint8)
        ref = L.tensor_to_frames(F.interpolate(to_tensor(frames), size=(size, size), mode=mode))
        monkeypatch.setattr(L, "RESIZE_VALUES", 3 * hw * hw * 3, raising=False)   # 3 frames at a time
        seen.clear()
        assert np.array_equal(L.resize_frames(frames, size), ref)
        assert max(seen) <= L.RESIZE_VALUES and sum(seen) == frames.size, seen


def test_write_video_from_batches_is_the_whole_array_file(tmp_path):
    """write_video fed batches (as a stream makes them, the clip's shape given up front) writes the
    same file, byte for byte, as from the whole array; batches of another frame size or count are
    refused and leave nothing."""
    frames, audio = synthetic_frames(20, H=45, W=38), tone(0.7, SAMPLE_RATE)
    write_video(tmp_path / "whole.mp4", frames, audio)
    write_video(tmp_path / "batches.mp4", (frames[i:i + 7] for i in range(0, 20, 7)), audio, shape=frames.shape)
    assert (tmp_path / "whole.mp4").read_bytes() == (tmp_path / "batches.mp4").read_bytes()
    for batches, error, words in (([frames[:10]], ValueError, "only 10 frames came, not the 20"),
                                  ([frames, frames[:1]], ValueError, "more than 20 frames came"),
                                  ([frames[:, :40]], MediaError, "cannot write")):
        with pytest.raises(error, match=words):
            write_video(tmp_path / "bad.mp4", iter(batches), audio, shape=frames.shape)
    assert sorted(os.listdir(tmp_path)) == ["batches.mp4", "whole.mp4"]


def test_the_identity_frame_is_the_first_source_frame_unless_chosen(tmp_path, capsys, ckpt, monkeypatch):
    """sample.py hands the stream the frame --reference names as the reference (at the model's
    size), else the first; a frame past the video's end is one line, exit 2."""
    source = face_video(tmp_path / "v.mp4", 5)                     # frames identified by their grey level
    speech(tmp_path / "a.wav", 12)
    stream, refs = L.LipSyncStream, []
    monkeypatch.setattr(L, "LipSyncStream", lambda student, ae, reference=None, **kw:
                        refs.append(reference) or stream(student, ae, reference, **kw))
    base = ["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4", *ckpt]
    for extra, frame in (([], None), (["--reference", "4"], 4), (["--reference", "2"], 2)):
        code, _, err = run(base + extra, capsys)
        assert code == 0, err
        ref = refs[-1]
        if frame is None:
            assert ref is None                                     # the stream takes its first frame
            continue
        assert ref.shape[0] == ref.shape[1] != 48 and abs(int(ref[:len(ref) // 4].mean()) - int(source[frame, 0, 0, 0])) <= 2
    code, _, err = run(base + ["--reference", "5"], capsys)
    assert_one_line_error(code, err, "--reference 5", "5 frames", "0 to 4")


def test_files_writes_each_chunk_as_it_is_made(tmp_path, capsys, ckpt, monkeypatch):
    """Offline lip sync never holds its output clip: each dubbed chunk goes to the encoder as the
    stream makes it, so when a chunk is made no chunk before the previous one is still alive; the
    mp4 holds them all, one frame per 640 samples."""
    import weakref
    face_video(tmp_path / "v.mp4", 5)
    n = speech(tmp_path / "a.wav", 45)                                    # chunks of 9, 12, 12, 12 frames
    dub, refs, held = sample.dub, [], []

    def spy(*args):
        for frames in dub(*args):
            held.append(sum(r() is not None for r in refs[:-1]))        # chunks made before the previous one
            refs.append(weakref.ref(frames))
            yield frames

    write_video, pulled = L.write_video, []

    def writer(path, frames, *args, **kw):                # the encoder takes chunk k when k chunks exist
        assert not isinstance(frames, np.ndarray), "the output clip was gathered before writing"
        def counted():
            for f in frames:
                pulled.append(len(refs))
                yield f
        return write_video(path, counted(), *args, **kw)

    monkeypatch.setattr(sample, "dub", spy)
    monkeypatch.setattr(L, "write_video", writer)
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt], capsys)
    assert code == 0, err
    assert len(held) >= 4 and held == [0] * len(held), held
    assert pulled == list(range(1, len(held) + 1)), pulled
    assert len(read_video(tmp_path / "o.mp4")[0]) == math.ceil(n / SAMPLES_PER_FRAME)


def test_compile_warms_up_before_the_first_real_frame_and_dubs_the_same(tmp_path, capsys, ckpt, monkeypatch):
    """--compile compiles the student's blocks and runs them through a throwaway stream of blank
    input before the clip's first frame, so no compilation falls inside the run; the dubbed clip
    is the one the eager student makes (dynamo's eager backend here: compiling is a matter of
    graphs, inductor would take a minute on 2 cores)."""
    compile_blocks, events = L.compile_blocks, []
    monkeypatch.setattr(L, "compile_blocks", lambda m, **o: (events.append("compiled"), compile_blocks(m, backend="eager"))[1])
    dub, graphs = sample.dub, lambda: torch._dynamo.utils.counters["stats"]["unique_graphs"]
    monkeypatch.setattr(sample, "dub", lambda *a: (events.append(("dub", graphs())), dub(*a))[1])
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    face_video(tmp_path / "v.mp4", 5)
    speech(tmp_path / "a.wav", 30)
    outs = {}
    for flags in ([], ["--compile"]):
        code, out, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out",
                              tmp_path / f"o{len(flags)}.mp4", *ckpt, *flags], capsys)
        assert code == 0, err
        outs[len(flags)] = read_video(tmp_path / f"o{len(flags)}.mp4")[0]
    after = graphs()
    torch._dynamo.reset()
    assert "compiled and warmed up in" in out and np.array_equal(outs[0], outs[1])
    assert events == [("dub", 0), "compiled", ("dub", after)] and after > 0      # none compiled during the clip


@pytest.mark.parametrize("argv, words", [
    (["--seconds", "0.01"], ("--seconds 0.01", "shorter than one frame", "0.04 or more")),
    (["--benchmark", "--seconds", "0.01"], ("--seconds 0.01", "0.04 or more")),
    (["--benchmark", "--seconds", "1.3"], ("--seconds 1.3", "33-frame window", "1.32 or more")),
    (["--long-stream", "0.01"], ("--long-stream 0.01", "0.04 or more")),
])
def test_lengths_too_short_to_run_are_one_line_errors(capsys, argv, words):
    """--seconds and --long-stream shorter than one frame, and a benchmark shorter than the
    teacher's 33-frame window, fail before any work with one line naming the shortest that runs."""
    code, _, err = run(argv, capsys)
    assert_one_line_error(code, err, *words)


def test_shortest_runs_work_and_a_long_stream_too_short_for_sync_c_says_so(tmp_path, capsys, ckpt):
    """The demo at its shortest (--seconds 0.04, one frame) writes its one frame; a --long-stream of
    5 frames, too few for one SyncNet window, streams them and reports Sync-C as not measured (null
    in the json) instead of ending in a traceback."""
    syncnet = os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors")
    code, out, err = run([*ckpt, "--seconds", "0.04", "--syncnet", syncnet, "--out", tmp_path / "demo.mp4"], capsys)
    assert code == 0, err
    assert len(read_video(tmp_path / "demo.mp4")[0]) == 1 and "Sync-C: not measured" in out
    code, out, err = run(["--long-stream", "0.2", *ckpt, "--syncnet", syncnet, "--results", tmp_path], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "long_stream.json").read_text())
    assert res["frames"] == 5 and res["sync_c_first_30s"] is None and res["sync_c_last_30s"] is None
    assert "Sync-C: not measured" in out


@pytest.mark.parametrize("argv, what", [
    (["--video", "{tmp}/missing.mp4", "--audio", "{tmp}/a.wav", "--out", "{locked}/new/o.mp4"], "--out"),
    (["--stream", "--video", "{tmp}/missing.mp4", "--audio", "{tmp}/a.wav", "--out", "{locked}/o.mp4"], "--out"),
    (["--long-stream", "1", "--syncnet", "{tmp}/missing.safetensors", "--results", "{locked}"], "--results"),
])
def test_an_output_folder_we_cannot_write_in_fails_first(tmp_path, capsys, monkeypatch, argv, what):
    """An output whose folder we may not write in fails before any input is read or model loaded
    (the missing video and SyncNet are never reached): one line, exit 2, naming the folder, and
    nothing left in it, not even the folders made to try it. The folder is made read-only; as root,
    whom no folder refuses, writing a file in it is made to fail as it does for a user."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    speech(tmp_path / "a.wav", 3)
    temp_file = tempfile.TemporaryFile

    def refuse(*a, dir=None, **kw):
        if dir is not None and str(locked) in os.path.abspath(dir):
            raise PermissionError(13, "Permission denied")
        return temp_file(*a, dir=dir, **kw)
    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    argv = [a.format(tmp=tmp_path, locked=locked) for a in argv]
    code, _, err = run(argv, capsys)
    folder = os.path.dirname(argv[argv.index("--out") + 1]) if what == "--out" else str(locked)
    assert_one_line_error(code, err, what, f"cannot write in {folder} (Permission denied)", "pick a folder you can write to")
    assert os.listdir(locked) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="needs Linux's /proc")
def test_an_output_folder_that_cannot_be_made_fails_first(tmp_path, capsys):
    """A folder no one can make (under /proc, for root too) fails as a read-only one does, before
    the missing video is read: the check makes the folders, not just asks whether it may."""
    speech(tmp_path / "a.wav", 3)
    out = "/proc/lipforcing-test/new/o.mp4"
    code, _, err = run(["--video", tmp_path / "missing.mp4", "--audio", tmp_path / "a.wav", "--out", out], capsys)
    assert_one_line_error(code, err, "--out", "cannot write in /proc/lipforcing-test/new", "pick a folder you can write to")


def test_hangup_leaves_no_output_and_no_temp_folder(tmp_path, ckpt):
    """Closing the terminal (SIGHUP) mid-stream ends sample.py as Ctrl-C does: exit code 130, one
    line on stderr, no mp4 nor hidden temp file in the output folder, and no temp folder left."""
    import signal
    import time
    if not hasattr(signal, "SIGHUP"):
        pytest.skip("no SIGHUP on this platform")
    face_video(tmp_path / "v.mp4", 3)
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir(), out.mkdir()
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py"), "--stream", "--video", tmp_path / "v.mp4",
                          "--audio", "-", "--out", out / "live.mp4", *ckpt], stdin=subprocess.PIPE,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ, "TMPDIR": str(tmp)})
    p.stdin.write(bytes(2 * 20 * SAMPLES_PER_FRAME))                  # 20 frames of silence; the pipe stays open
    p.stdin.flush()
    deadline = time.monotonic() + 60
    while not list(tmp.glob("*/audio.wav")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)                                              # until the stream writes its temp files
    p.send_signal(signal.SIGHUP)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.decode().strip().splitlines() == ["sample.py: interrupted; no output file was written"]
    assert os.listdir(tmp) == [] and os.listdir(out) == []


def sample_held_in_its_imports(tmp_path, ignore=None):
    """sample.py started with its imports held still by a tqdm module on PYTHONPATH that waits in
    10 ms naps (a signal that lands on one of torch's threads interrupts no nap of the main one,
    which sees it at its next bytecode; one 60 s sleep would hold it that long), returned once
    they are held. The child's SIGINT, SIGTERM and SIGHUP start at their defaults, as in a
    terminal's foreground process (a background job of a shell script inherits an ignored
    SIGINT, a nohup'd one an ignored SIGHUP), or ignored where `ignore` names one."""
    import signal
    import time
    (tmp_path / "tqdm.py").write_text("import pathlib, time\n"
                                     f"pathlib.Path({str(tmp_path / 'importing')!r}).touch()\nfor _ in range(6000):\n    time.sleep(0.01)\n")
    names = [n for n in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, n)]
    dispositions = lambda: [signal.signal(getattr(signal, n), signal.SIG_IGN if n == ignore else signal.SIG_DFL)
                            for n in names]
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "sample.py")], stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(tmp_path)}, preexec_fn=dispositions)
    deadline = time.monotonic() + 60
    while not (tmp_path / "importing").exists() and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return p


@pytest.mark.skipif(os.name != "posix", reason="POSIX signals")
@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_while_torch_loads_is_one_line_and_exit_130(tmp_path, name):
    """sample.py's imports take a second or so; a kill, a closed terminal or Ctrl-C in that second
    ends it as one later does (one line, exit code 130), not with an import traceback or a bare
    -15."""
    import signal
    p = sample_held_in_its_imports(tmp_path)
    p.send_signal(getattr(signal, name))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.decode().strip().splitlines() == ["sample.py: interrupted; no output file was written"]


@pytest.mark.skipif(not hasattr(__import__("signal"), "SIGHUP"), reason="no SIGHUP")
def test_nohup_keeps_sample_running_through_sighup(tmp_path):
    """Under nohup (SIGHUP ignored) the closed terminal's SIGHUP does not end sample.py: it keeps
    the disposition it inherited, and a later SIGTERM still ends it in one line."""
    import signal
    import time
    p = sample_held_in_its_imports(tmp_path, ignore="SIGHUP")
    p.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert p.poll() is None
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.decode().strip().splitlines() == ["sample.py: interrupted; no output file was written"]


def test_folder_pool_reads_subfolders_and_skips_hidden_files(tmp_path):
    """--data reads the clips of a folder and of its subfolders (a dataset's speaker/video/00001.mp4),
    each named by its path there, in sorted order; not its hidden files or folders: macOS's
    ._clip.mp4 resource forks, a write's leftover .clip.tmp-*.mp4 and a .cache folder's videos are
    left out, not read as (broken) clips, and a folder named like a video is not one."""
    c = L.synthtalk_clip("train", 0, 0.8, size=32)                      # 20 frames
    for name in ("clip.mp4", "spk2/vid/00001.mp4", "spk1/00002.MOV", ".cache/old.mp4"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        write_video(tmp_path / name, c.frames, c.audio)
    (tmp_path / "spk1" / "._00002.mp4").write_bytes(b"\x00\x05\x16\x07" + bytes(4000))   # an AppleDouble header
    data = (tmp_path / "clip.mp4").read_bytes()
    (tmp_path / ".clip.tmp-1a2b3c4d.mp4").write_bytes(data[:len(data) // 2])
    (tmp_path / "takes.mp4").mkdir()
    pool = L.folder_pool(tmp_path, 32, progress=False)
    assert [clip.name for clip in pool] == ["clip", "spk1/00002", "spk2/vid/00001"]
    assert all(np.array_equal(clip.frames, pool[0].frames) for clip in pool)


# -----------------------------------------------------------------------------
# sample.py: the numbers it reports and the files it writes


def test_stream_mp4_carries_the_streamed_audio_at_an_odd_size(tmp_path, capsysbinary, ckpt, monkeypatch):
    """--stream to an mp4 muxes the PCM it was driven by (not silence), one frame per 640 samples,
    and at an odd frame size (a 39x45 still image, padded to even for H.264 as write_video pads)
    holds the same frames as --out - does, up to H.264: ffmpeg is told the padded size."""
    ffmpeg("-f", "lavfi", "-i", "color=c=0x806040:s=39x45", "-frames:v", "1", tmp_path / "face.png")   # odd: no mp4 holds it
    assert L.read_video(tmp_path / "face.png")[0].shape == (1, 45, 39, 3)
    n = 22 * SAMPLES_PER_FRAME
    sf.write(tmp_path / "a.wav", tone(n / SAMPLE_RATE, SAMPLE_RATE, 440.0), SAMPLE_RATE, subtype="PCM_16")
    outs = {}
    for out in (tmp_path / "live" / "o.mp4", "-"):
        monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=Trickle(pcm(tmp_path / "a.wav"))))
        code, outs[str(out)], err = run(["--stream", "--video", tmp_path / "face.png", "--audio", "-", "--out", out, *ckpt],
                                        capsysbinary)
        assert code == 0, err
    raw = np.frombuffer(outs["-"], np.uint8).reshape(-1, 45, 39, 3)
    got = L.read_video(tmp_path / "live" / "o.mp4")[0]
    assert len(raw) == 22 and got.shape == (22, 46, 40, 3)
    assert np.abs(got[:, :45, :39].astype(int) - raw).mean() < 3
    heard, muxed = L.read_audio(tmp_path / "a.wav"), L.read_audio(tmp_path / "live" / "o.mp4")
    assert len(muxed) == n and np.corrcoef(heard, muxed)[0, 1] > 0.99


def fake_clock(monkeypatch):
    """sample.py's clock made to advance only with the models' work: one second per DiT forward
    pass and one per frame decoded. The timings it reports become exact counts of work."""
    now = [0.0]
    monkeypatch.setattr(sample, "time", SimpleNamespace(perf_counter=lambda: now[0], monotonic=time.monotonic,
                                                        sleep=time.sleep))
    forward, decode = L.DiT.forward, L.VideoAE.decode

    def ticked_forward(*a, **kw):
        now[0] += 1.0
        return forward(*a, **kw)

    def ticked_decode(*a, **kw):
        out = decode(*a, **kw)
        now[0] += out[0].shape[1]                        # (B, frames, 3, H, W)
        return out
    monkeypatch.setattr(L.DiT, "forward", ticked_forward)
    monkeypatch.setattr(L.VideoAE, "decode", ticked_decode)


def test_benchmark_arithmetic(tmp_path, capsys, ckpt, monkeypatch):
    """The benchmark's numbers are the quantities they are named for, checked on a clock that
    advances only with DiT passes and decoded frames: with 2.6 s (65 frames, two teacher windows)
    the teacher counts 32 + 33 = 65 frames (not 66); the student's compute TTFF is its first chunk
    (9 frames, less than the median 12-frame chunk), the teacher's its first window alone (half its
    time); 'DiT only' excludes decoding (faster than end to end); the throughput ratio is student
    FPS / teacher FPS; and the teacher waits for 33 - 9 = 24 frames (960 ms) more input than the
    student."""
    fake_clock(monkeypatch)
    monkeypatch.setitem(sample.MODE_DEFAULTS, "teacher", str(tmp_path / "none.safetensors"))
    code, _, err = run(["--benchmark", *ckpt, "--seconds", "2.6", "--results", tmp_path], capsys)
    assert code == 0, err
    res = json.loads((tmp_path / "benchmark.json").read_text())
    s, t = res["student"], res["teacher"]
    assert s["frames"] == t["frames"] == 65
    assert s["ttff_compute_ms"] < s["chunk_p50_ms"]              # the first chunk, 9 frames, not a 12-frame one
    assert t["ttff_compute_ms"] == pytest.approx(1000 * t["frames"] / t["fps"] / 2)
    assert s["dit_fps"] > s["fps"] and t["dit_fps"] > t["fps"]
    assert res["throughput_ratio"] == pytest.approx(s["fps"] / t["fps"])
    assert t["input_wait_ms"] - s["input_wait_ms"] == pytest.approx(1000 * 24 * SAMPLES_PER_FRAME / SAMPLE_RATE)


def test_demo_writes_the_dub_audio_and_scores_each_clip_against_its_own(tmp_path, capsys, ckpt, monkeypatch):
    """The demo's mp4 carries the dub audio (the voice the lips were made for, not the source's),
    Sync-C scores the dubbed frames against the dub audio and the source frames against their own
    audio, and its compute TTFF is the first chunk's time (9 + 12 + 4 frames, the last decoded as 12:
    under half the run on a clock that advances only with the DiT and the decoder), not the whole run's."""
    fake_clock(monkeypatch)
    syncnet = os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors")
    scored, sync_c = [], sample.sync_c
    monkeypatch.setattr(sample, "sync_c", lambda net, frames, audio: scored.append(audio) or sync_c(net, frames, audio))
    code, out, err = run([*ckpt, "--seconds", "1", "--syncnet", syncnet, "--out", tmp_path / "demo.mp4"], capsys)
    assert code == 0, err
    clip = L.synthtalk_clip("test", 0, 1.0, 32)
    muxed = L.read_audio(tmp_path / "demo.mp4")[:len(clip.dub_audio)]
    assert np.corrcoef(muxed, clip.dub_audio)[0, 1] > 0.9 > np.corrcoef(muxed, clip.audio)[0, 1]
    assert len(scored) == 2 and np.array_equal(scored[0], clip.dub_audio) and np.array_equal(scored[1], clip.audio)
    fps = float(out.split(" FPS")[0].split()[-1])
    ttff = float(out.split("compute TTFF ")[1].split(" ms")[0])
    assert ttff < 0.5 * 1000 * 25 / fps


def test_long_stream_scores_the_first_and_last_30_seconds(tmp_path, capsys, ckpt, monkeypatch):
    """--long-stream 31 (775 frames) keeps only the first and the last 30 s (750 frames) of output:
    Sync-C scores frames 0-749 against the dub audio from its start and frames 25-774 against the
    audio from frame 25 on (in sync with them), and the memory row 'at 20 s' is read at 20 s of
    output (500 frames, within one 12-frame chunk), not at the first chunk."""
    syncnet = os.path.join(HERE, "checkpoints", "syncnet_eval.safetensors")
    made, scored, dub, sync_c = [], [], sample.dub, sample.sync_c
    monkeypatch.setattr(sample, "dub", lambda *a: (made.append(f) or f for f in dub(*a)))
    monkeypatch.setattr(sample, "sync_c", lambda net, frames, audio: scored.append((frames, audio)) or 0.0)
    code, out, err = run(["--long-stream", "31", *ckpt, "--syncnet", syncnet, "--results", tmp_path], capsys)
    assert code == 0, err
    made = np.concatenate(made)
    dub_audio = L.synthtalk_clip("test", 0, 31.0, 32).dub_audio
    (first, a_first), (last, a_last) = scored
    assert len(made) == 775 and len(first) == len(last) == 750
    assert np.array_equal(first, made[:750]) and np.array_equal(last, made[-750:])
    assert np.array_equal(a_first, dub_audio) and np.array_equal(a_last, dub_audio[25 * SAMPLES_PER_FRAME:])
    res = json.loads((tmp_path / "long_stream.json").read_text())
    assert 500 <= res["memory"]["20s"]["frames"] < 512


def test_stream_reads_a_file_while_it_grows(tmp_path):
    """A raw PCM file still being written (a pause of 0.3 s, under GROW_IDLE, between its halves)
    is read to its end, not ended at the first read that finds nothing new."""
    path = tmp_path / "grow.pcm"
    samples = (np.arange(8000) % 2000 - 1000).astype("<i2")
    path.write_bytes(samples[:4000].tobytes())

    def rest():
        time.sleep(0.3)
        with open(path, "ab") as f:
            f.write(samples[4000:].tobytes())
    threading.Thread(target=rest).start()
    got = np.concatenate(list(sample.pcm_pieces(str(path))))
    assert np.array_equal(got * 32768, samples)


def test_the_model_sees_the_source_looped_ping_pong(tmp_path, capsys, ckpt, monkeypatch):
    """The frames pushed into the student follow the same ping-pong order as the frames its output
    is pasted into (0 1 2 3 4 3 2 1 0 ...), not a plain loop (0 1 2 3 4 0 1 ...)."""
    src = face_video(tmp_path / "v.mp4", 5)
    speech(tmp_path / "a.wav", 13)
    pushed, push = [], L.LipSyncStream.push
    monkeypatch.setattr(L.LipSyncStream, "push", lambda self, frames=(), audio=None:
                        (pushed.extend(frames), push(self, frames, audio))[1])
    code, _, err = run(["--video", tmp_path / "v.mp4", "--audio", tmp_path / "a.wav", "--out", tmp_path / "o.mp4",
                        *ckpt], capsys)
    assert code == 0, err
    level = lambda f: float(f[:f.shape[0] // 4].mean())
    shown = [int(np.argmin([abs(level(p) - level(s)) for s in src])) for p in pushed]
    assert shown == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4]


class SlowPipe(Trickle):
    """A pipe whose audio arrives at 2x real time: 320 samples (20 ms) every 10 ms."""
    def read1(self, n):
        time.sleep(0.01)
        b, self.pos = self.data[self.pos:self.pos + 640], self.pos + 640
        return b


def test_stream_ttff_counts_from_the_first_sample(tmp_path, capsysbinary, ckpt, monkeypatch):
    """--stream's TTFF runs from the first audio sample read to the first frame written: with the
    audio arriving at 2x real time the first chunk's 7160 samples (9 frames, 2 of context, 120)
    take 23 reads of 10 ms, so the TTFF it prints is at least 220 ms, whatever the compute."""
    face_video(tmp_path / "v.mp4", 3)
    speech(tmp_path / "a.wav", 12)
    monkeypatch.setattr(sys, "stdin", SimpleNamespace(buffer=SlowPipe(pcm(tmp_path / "a.wav"))))
    code, _, err = run(["--stream", "--video", tmp_path / "v.mp4", "--audio", "-", "--out", "-", *ckpt], capsysbinary)
    assert code == 0, err
    ttff = int(err.decode().split("TTFF ")[1].split(" ms")[0])
    assert ttff >= 220, ttff


def test_default_output_name_and_upper_case_extension(tmp_path, capsys, ckpt, monkeypatch):
    """Without --out, files mode writes out/<video name>-lipsync.mp4 in the current folder; an
    --out with an upper-case extension (X.MP4, as cameras name files) is an mp4 too."""
    monkeypatch.chdir(tmp_path)
    face_video(tmp_path / "face.mp4", 3)
    speech(tmp_path / "a.wav", 3)
    code, _, err = run(["--video", "face.mp4", "--audio", "a.wav", *ckpt], capsys)
    assert code == 0, err
    assert os.listdir(tmp_path / "out") == ["face-lipsync.mp4"]
    code, _, err = run(["--video", "face.mp4", "--audio", "a.wav", "--out", "X.MP4", *ckpt], capsys)
    assert code == 0, err
    assert len(L.read_video(tmp_path / "X.MP4")[0]) == 3


# -----------------------------------------------------------------------------
# the training stages: their schedules, draws, and what each loss and table is fed


def test_lr_at_warms_up_linearly_then_decays_by_cosine_to_5_percent():
    """lr_at: a linear warm-up over the first 100 steps (step 0 trains at 1/100 of the peak), then a
    cosine from the peak down to 5% of it at the last step."""
    assert train.lr_at(0, 1000, 1.0) == pytest.approx(0.01)              # step 0 trains, at 1/100 of the peak
    assert train.lr_at(99, 1000, 1.0) == pytest.approx(1.0)
    assert train.lr_at(100, 1000, 1.0) == pytest.approx(1.0)
    assert train.lr_at(550, 1000, 1.0) == pytest.approx(0.05 + 0.95 * 0.5)
    assert train.lr_at(1000, 1000, 1.0) == pytest.approx(0.05)


def test_fit_sets_each_steps_lr_from_the_whole_runs_schedule_and_clips_at_1(monkeypatch):
    """--stop-after ends a run early but keeps the schedule of --steps (what a resume continues)."""
    seen, optimizer_step = [], train.optimizer_step
    monkeypatch.setattr(train, "optimizer_step", lambda model, opt, loss, clip:
                        seen.append((opt.param_groups[0]["lr"], clip)) or optimizer_step(model, opt, loss, clip))
    model = torch.nn.Linear(2, 1)
    train.fit(model, lambda i: (model(torch.ones(1, 2)).sum(), 1), 6, 1.0, "toy", stop_after=3, warmup=1)
    assert [lr for lr, _ in seen] == pytest.approx([train.lr_at(i, 6, 1.0, 1) for i in range(3)])
    assert [clip for _, clip in seen] == [1.0] * 3


def test_teacher_batch_windows_start_on_the_grid_reach_every_start_and_take_their_reference_outside(monkeypatch):
    """The windows a DiT stage trains on start on the 4-frame grid of the latents, every start of a
    clip is drawn (the last one too), and each reference frame is on the grid and outside its window."""
    calls, latent_window = [], L.latent_window
    monkeypatch.setattr(L, "latent_window", lambda enc, start, n, ref, ctx:
                        calls.append((start, ref)) or latent_window(enc, start, n, ref, ctx))
    ae = L.VideoAE(L.AEConfig(width=8)).eval()
    clip = L.synthtalk_clip("train", 0, 2.0, size=32)
    c = L.DiTConfig().audio_context
    enc = [L.encode_clip(ae, clip.frames, clip.audio, c)]
    n_latent, n_frames, T = 6, 21, enc[0].n_frames
    train.teacher_batch(enc, 64, n_latent, np.random.default_rng(0), c, "cpu")
    assert {s for s, _ in calls} == set(range(0, T - n_frames + 1, 4))           # every grid start, the last too
    assert all(r % 4 == 0 and 0 <= r < T and not s <= r < s + n_frames for s, r in calls)


def test_teacher_cfg_dropout_in_mode_all_drops_the_spatial_conditions_too(tmp_path, monkeypatch):
    """CFG dropout follows --drop-mode: with every sample dropped (--cfg-drop 1) the DiT sees zero
    spatial conditions under "all" and the real ones under "audio"."""
    monkeypatch.setenv("LIPFORCING_CACHE", str(tmp_path / "cache"))
    L.save_checkpoint(tmp_path / "vae.safetensors", L.VideoAE(L.AEConfig()), L.AEConfig())
    seen, forward = [], L.DiT.forward
    monkeypatch.setattr(L.DiT, "forward", lambda self, x, t, cond, audio, **kw:
                        seen.append(cond) or forward(self, x, t, cond, audio, **kw))
    for mode in ("audio", "all"):
        seen.clear()
        train.main(["teacher", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "1.4", "--steps", "1",
                    "--batch", "2", "--latent-frames", "3", "--cfg-drop", "1", "--drop-mode", mode,
                    "--out", str(tmp_path / "t.safetensors")])
        assert len(seen) == 1 and (seen[0].flatten(1).abs().amax(1) == 0).tolist() == [mode == "all"] * 2


def test_the_mouth_weight_reaches_every_flow_matching_loss(tmp_path, monkeypatch):
    """--mouth-weight reaches the flow-matching loss of the teacher, of df and of the DMD critic."""
    base = dmd_run_options(tmp_path, monkeypatch)
    weights, fml = [], L.flow_matching_loss
    monkeypatch.setattr(L, "flow_matching_loss", lambda v, x0, eps, mw=None: weights.append(mw) or fml(v, x0, eps, mw))
    common = ["--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--size", "32", "--steps", "1",
              "--batch", "2", "--mouth-weight", "3"]
    for argv in (["teacher", *common, "--latent-frames", "3", "--out", str(tmp_path / "t.safetensors")],
                 ["df", *common, "--latent-frames", "6", "--init", str(tmp_path / "teacher.safetensors"),
                  "--out", str(tmp_path / "d.safetensors")],
                 ["dmd", *base, "--steps", "1", "--mouth-weight", "3", "--out", str(tmp_path / "s.safetensors")]):
        weights.clear()
        train.main(argv)
        assert weights and all(w == 3 for w in weights), (argv[0], weights)


def test_teacher_and_df_save_their_ema_and_df_starts_from_the_teacher(tmp_path, monkeypatch):
    """The teacher and df checkpoints hold the EMA weights, not the trained model's (df's in the
    student dtype), and df starts from the teacher: at a vanishing lr its student is the teacher,
    made causal."""
    base = dmd_run_options(tmp_path, monkeypatch)
    emas, fit = [], train.fit
    monkeypatch.setattr(train, "fit", lambda *a, **kw: emas.append(kw["ema"]) or fit(*a, **kw))
    common = ["--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--size", "32", "--batch", "2"]
    model, _ = train.main(["teacher", *common, "--steps", "2", "--latent-frames", "3", "--out", str(tmp_path / "t.safetensors")])
    saved = L.load_checkpoint(tmp_path / "t.safetensors", L.DiTConfig, L.DiT)[0].state_dict()
    assert all(torch.equal(saved[k], v) for k, v in emas[-1].state_dict().items())
    assert any(not torch.equal(saved[k], v) for k, v in model.state_dict().items())
    model, _ = train.main(["df", *common, "--steps", "2", "--latent-frames", "6", "--lr", "1e-3",
                           "--init", str(tmp_path / "teacher.safetensors"), "--out", str(tmp_path / "d.safetensors")])
    saved = L.load_checkpoint(tmp_path / "d.safetensors", L.DiTConfig, L.DiT)[0].state_dict()
    half = lambda m: {k: v.to(train.STUDENT_DTYPE).float() for k, v in m.state_dict().items()}
    assert all(torch.equal(saved[k], v) for k, v in half(emas[-1]).items())
    assert any(not torch.equal(saved[k], v) for k, v in half(model).items())
    # with a vanishing lr the student is still the teacher it started from
    train.main(["df", *common, "--steps", "1", "--latent-frames", "6", "--lr", "1e-12",
                "--init", str(tmp_path / "teacher.safetensors"), "--out", str(tmp_path / "e.safetensors")])
    student, cfg, _ = L.load_checkpoint(tmp_path / "e.safetensors", L.DiTConfig, L.DiT)
    teacher = L.load_checkpoint(tmp_path / "teacher.safetensors", L.DiTConfig, L.DiT)[0]
    assert cfg.causal
    for (k, p), q in zip(student.state_dict().items(), half(teacher).values()):
        assert_close(p, q, 1e-3, k)


def test_df_noise_draws_a_level_per_sample_and_chunk():
    """Diffusion Forcing draws a noise level of the two-step schedule per sample and per chunk:
    every level occurs, samples differ within each chunk and chunks within a sample."""
    x0 = torch.zeros(64, 12, 1, 1, 1)
    levels, eps = train.df_noise(x0, 3, np.random.default_rng(0))
    assert levels.shape == (64, 4) and eps.shape == x0.shape
    assert set(levels.unique().tolist()) == set(range(len(L.STUDENT_STEPS)))    # every level of the schedule
    assert (levels != levels[:1]).any(0).all()                                 # samples differ in every chunk
    assert (levels != levels[:, :1]).any(1).any()                              # chunks differ within a sample


def test_df_draws_its_kv_cache_shape_per_step_from_df_caches(tmp_path, monkeypatch):
    """Each df step builds its KV cache with the (window, sink) drawn for that step from DF_CACHES,
    and the draw varies over steps, as the paper trained."""
    dmd_run_options(tmp_path, monkeypatch)                             # a tiny teacher and autoencoder
    asked, made = [], []
    df_loss, KV = train.df_loss, L.KVCache
    monkeypatch.setattr(train, "df_loss", lambda *a: asked.append(a[6:8]) or df_loss(*a))
    monkeypatch.setattr(L, "KVCache", lambda depth, sink, window, chunk: made.append((window, sink)) or KV(depth, sink, window, chunk))
    train.main(["df", "--ckpt-dir", str(tmp_path), "--clips", "2", "--seconds", "2", "--size", "32", "--steps", "8",
                "--batch", "2", "--latent-frames", "6", "--init", str(tmp_path / "teacher.safetensors")])
    assert made == asked and set(made) <= set(train.DF_CACHES) and len(set(made)) > 1


def test_dmd_reward_scale_defaults_to_the_reward_syncnets_gt_sync_c_over_the_papers(tmp_path, monkeypatch):
    """Without --reward-scale, R = Sync-C / (the reward SyncNet's ground-truth Sync-C / the paper's 7.95),
    so beta means what it means in the paper; the scale is recorded in the student's checkpoint."""
    base = dmd_run_options(tmp_path, monkeypatch)
    L.save_checkpoint(tmp_path / "syncnet_reward.safetensors", L.SyncNet(L.SyncNetConfig(width=4)).eval(),
                      L.SyncNetConfig(width=4), extra={"gt_sync_c": 15.9})
    train.main(["dmd", *base, "--steps", "1"])
    extra = L.load_checkpoint(tmp_path / "student.safetensors", L.DiTConfig, L.DiT)[2]
    assert extra["reward_scale"] == pytest.approx(15.9 / train.GT_SYNC_C_PAPER)


def test_dmd_rewards_each_rollout_against_its_own_windows_audio(tmp_path, monkeypatch):
    """The waveforms dmd hands teacher_batch for the reward are each window's own clip's: their
    features equal that clip's encoded features."""
    base = dmd_run_options(tmp_path, monkeypatch)
    got, teacher_batch = [], train.teacher_batch
    monkeypatch.setattr(train, "teacher_batch", lambda enc, *a: got.append((enc, a[-1] if len(a) == 6 else None))
                        or teacher_batch(enc, *a))
    train.main(["dmd", *base, "--steps", "1"])
    enc, audios = next((e, a) for e, a in got if a is not None)
    c = L.DiTConfig().audio_context
    for e, a in zip(enc, audios):
        assert_close(L.audio_frame_features(a, c), e.feats, 1e-4, "the waveform is its clip's")


def test_sync_rewards_score_each_decoded_clip_against_its_own_audio():
    """sync_rewards is the evaluation's Sync-C of each decoded clip against its own audio, clip by
    clip: swapping the audio changes it."""
    torch.manual_seed(0)
    ae, net = L.VideoAE(L.AEConfig(width=8)).eval(), L.SyncNet(L.SyncNetConfig(width=4)).eval()
    clips = [L.synthtalk_clip("train", i, 1.0, 32) for i in range(2)]
    c = L.DiTConfig().audio_context
    x, raw = [], []
    for k in clips:
        e = L.encode_clip(ae, k.frames, k.audio, c)
        x0 = L.latent_window(e, 0, 6, 24, c)[0]
        x.append(x0), raw.append(torch.from_numpy(k.audio[:21 * L.SAMPLES_PER_FRAME]))
    x, raw = torch.stack(x), torch.stack(raw)
    R = train.sync_rewards(net, ae, x, raw)
    frames = L.tensor_to_frames(ae.decode(x)[0])
    ref = [L.evaluate_sync(net, [f], [a.numpy()])["sync_c"] for f, a in zip(frames, raw)]
    assert R.tolist() == pytest.approx(ref) and R[0] != R[1]
    swapped = [L.evaluate_sync(net, [f], [a.numpy()])["sync_c"] for f, a in zip(frames, raw.flip(0))]
    assert swapped != pytest.approx(ref)


def test_eval_teacher_scores_the_composite_driven_by_each_tasks_audio(tmp_path, monkeypatch):
    """eval-teacher drives each task with its own audio (recon: the clip's; dub: the second
    speaker's), scores it against that audio and its mouth, and scores the output pasted into the
    source frames (composite), as the tool writes it."""
    nets = (L.VideoAE(L.AEConfig(width=8)), L.SyncNet(L.SyncNetConfig(width=4)).eval(), None, L.MouthNet(L.MouthNetConfig()))
    monkeypatch.setattr(train, "load_foundation", lambda ckpt_dir, device="cpu": nets)
    teacher = dmd_dit()
    L.save_checkpoint(tmp_path / "t.safetensors", teacher, teacher.cfg)
    clip = L.synthtalk_clip("test", 0, 1.4, 32)                                # 35 frames: one window, T = 33
    clip.dub_frames = L.synthtalk_render("test", 0, clip.dub_mouth, 32)
    monkeypatch.setattr(train, "graded_clips", lambda args: ([clip], "test", "test clips"))
    feats, scored = [], []
    monkeypatch.setattr(train, "teacher_generate", lambda model, ae, enc, T, scale, seed, device, cfg_schedule=None:
                        feats.append(enc.feats) or np.zeros((33, 32, 32, 3), np.uint8))
    monkeypatch.setattr(train, "clip_metrics", lambda frames, audio, mouth, gt, *nets:
                        scored.append((frames, audio, mouth, gt)) or dict(sync_c=1.0, sync_d=1.0, mouth_err=0.1))
    train.main(["eval-teacher", "--ckpt", str(tmp_path / "t.safetensors"), "--results", str(tmp_path), "--size", "32"])
    c = teacher.cfg.audio_context
    for f, audio in zip(feats, [clip.audio] * 2 + [clip.dub_audio] * 2):
        assert torch.equal(f, L.audio_frame_features(audio, c))
    gen = scored[-4:]                                                          # after the reference rows
    assert [s[1] is a and s[2] is m for s, a, m in zip(gen, [clip.audio] * 2 + [clip.dub_audio] * 2,
                                                        [clip.mouth] * 2 + [clip.dub_mouth] * 2)] == [True] * 4
    for frames, *_ in gen:                                                     # the source's upper face, pasted
        assert np.array_equal(frames, L.composite(clip.frames[:33], np.zeros_like(frames)))


def test_dub_rows_score_mouth_err_against_the_dubs_mouth(monkeypatch):
    """The dub rows' MouthErr (a student's and the dub's ground truth) is measured against the dub
    track's mouth, not the clip's own."""
    args = train.get_args(["eval-student", "--test-clips", "2", "--size", "32"])
    monkeypatch.setattr(L, "synthtalk_pool", lambda split, n, seconds, size, workers=None:
                        [L.synthtalk_clip(split, i, 1.0, size) for i in range(n)])
    clips = train.test_pool(args, dub_truth=True)
    monkeypatch.setattr(L, "lipsync", lambda model, ae, frames, audio, seed: next(
        c.frames if audio is c.audio else c.dub_frames for c in clips if audio is c.audio or audio is c.dub_audio))
    nets = L.SyncNet(L.SyncNetConfig(width=4)).eval(), L.MouthNet(L.MouthNetConfig()).eval()
    rows = {}
    for c in clips:
        train.reference_rows(rows, L.VideoAE(L.AEConfig(width=8)), c, len(c.frames), *nets, "cpu")
    train.student_rows(rows, "s", None, None, clips, *nets)
    res = train.mean_rows(rows, len(clips))
    ref = np.mean([L.mouth_error(nets[1], c.dub_frames, c.dub_mouth) for c in clips])
    assert res["s, dub"]["mouth_err"] == pytest.approx(ref) and res["ground truth, dub"]["mouth_err"] == pytest.approx(ref)


def test_stitch_keeps_each_windows_first_32_frames_and_the_last_windows_33():
    """Consecutive 33-frame windows share a frame: stitch keeps frames 0..31 of each and all 33 of the last."""
    S = 3
    windows = np.arange(S * 33).reshape(S, 33, 1, 1, 1)                  # frame k of window s holds 33 s + k
    out = train.stitch(windows)
    assert out.shape[0] == 1 + 32 * S
    assert out.ravel().tolist() == [33 * s + k for s in range(S - 1) for k in range(32)] + list(range(66, 99))


def test_gt_ratio_se_is_the_delta_method_se_of_the_ratio_of_means():
    """gt_ratio_se is the delta-method SE of mean(x) / mean(gt) over clips, which differs from the SE
    of the per-clip ratios where the ground truth varies by clip."""
    gt, x = np.array([10.0, 20.0, 15.0, 30.0]), np.array([5.0, 14.0, 6.0, 20.0])
    metrics = lambda c: dict(sync_c=c, sync_d=1.0, mouth_err=0.1)
    res = train.mean_rows({"ground truth": [metrics(g) for g in gt], "x": [metrics(v) for v in x]}, 4)
    r = x.mean() / gt.mean()
    assert res["x"]["gt_ratio_se"] == pytest.approx((x - r * gt).std(ddof=1) / 2 / gt.mean())
    assert res["x"]["gt_ratio_se"] != pytest.approx((x / gt).std(ddof=1) / 2, rel=1e-3)     # not the per-clip ratio's SE


def test_dit_train_flops_are_palms_6n_plus_12_l_n_d():
    """The FLOPs behind MFU: per token of a training step, 6 N + 12 L n d (PaLM's count; backward is
    twice the forward), with N the weights every token multiplies in the blocks (attention's qkv and
    projection, the MLP) counted from the model itself, L its blocks, n the sequence, d the width."""
    for kw in (TINY, L.DIT_PRESETS["tiny"]):
        model, n = L.DiT(L.DiTConfig(**kw)), 9 * 16
        per_token = [m.weight.numel() for b in model.blocks for m in (b.attn.qkv, b.attn.proj, b.mlp[0], b.mlp[2])]
        expected = 6 * sum(per_token) + 12 * model.cfg.depth * n * model.cfg.dim
        assert train.dit_train_flops_per_token(model.cfg, n) == expected, kw



# -----------------------------------------------------------------------------
# README: its commands name options the scripts take

README_SCRIPTS = {"train": (train.get_args, train.check_options), "sample": (sample.get_args, sample.check_args),
                  "analyze": (A.get_args, lambda args: None)}     # analyze's get_args checks its own options


def readme_commands(text):
    """Every `python train.py|sample.py|analyze.py ...` (or torchrun ... train.py) in README's bash
    blocks and inline code, as (script, argv, processes): continued lines joined, comments dropped, a
    block's own VAR="..." expanded, the usage brackets of optional options removed, placeholder values
    (a lone capital: --seed S) given 1. Lines with "..." stand for commands, not one, and are left out."""
    blocks = re.findall(r"```bash\n(.*?)```", text, re.S)
    inline = re.findall(r"`((?:python|torchrun)\s[^`]*)`", re.sub(r"```.*?```", "", text, flags=re.S))
    commands = []
    for block in blocks + [span.replace("\n", " ") for span in inline]:
        block = block.replace("\\\n", " ")
        env = dict(m.groups() for m in re.finditer(r'\b([A-Z_]+)="([^"]*)"', block))
        for line in block.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            for part in re.split(r"&&|\|\||;|\|", line):
                m = re.search(r"(?:python|torchrun(.*?))\s+(train|sample|analyze)\.py\b(.*)", part)
                if m is None or "..." in part:
                    continue
                rest = re.sub(r"\$(\w+)", lambda v: env[v.group(1)], m.group(3)).replace("[", "").replace("]", "")
                argv = [re.sub(r"^[A-Z]$", "1", word) for word in rest.split()]
                procs = re.search(r"--nproc_per_node[= ](\d+)", m.group(1) or "")
                commands.append((m.group(2), argv, int(procs.group(1)) if procs else 1))
    return commands


def test_every_readme_command_parses_and_passes_its_scripts_option_checks(monkeypatch):
    """Each command README shows (190-odd: results tables, reproduction, usage) is taken by its script's
    parser and by the checks it runs before any work (train.py's check_options, sample.py's check_args,
    analyze.py's get_args), under torchrun with its --nproc_per_node processes: an option renamed,
    removed or given a new rule fails here, not in a reader's shell. Files, devices and folders are
    not looked at (the checkpoints many commands name are not committed)."""
    monkeypatch.chdir(HERE)
    for name in ("file_problem", "device_problem", "folder_problem", "check_file"):
        monkeypatch.setattr(L, name, lambda *a, **k: None)
    with open("README.md") as f:
        commands = readme_commands(f.read())
    assert len(commands) > 180 and {s for s, _, _ in commands} == set(README_SCRIPTS)
    refused = []
    for script, argv, procs in commands:
        monkeypatch.setenv("WORLD_SIZE", str(procs))
        parse, check = README_SCRIPTS[script]
        try:
            check(parse(argv))
        except SystemExit:
            refused.append(f"{script}.py {' '.join(argv)}")
    assert not refused, refused


def test_readme_headline_tables_are_the_committed_results_as_train_py_prints_them(capsys):
    """README's foundation, teacher, DF-init student, distillation and speed tables are, header to
    last row, what train.py and sample.py print from the JSON beside them in results/
    (print_foundation_table, print_table, print_benchmark): a number edited by hand, or a result
    rewritten without its table, fails here."""
    with open(os.path.join(HERE, "README.md")) as f:
        readme = f.read()
    rows = lambda res: train.print_table(res, "", 0)          # its title line is not part of the table
    for name, render in (("foundation", train.print_foundation_table), ("teacher", rows), ("student_df", rows),
                         ("ablation", rows), ("benchmark", sample.print_benchmark)):
        with open(os.path.join(HERE, "results", f"{name}.json")) as f:
            render(json.load(f))
        table = "\n".join(line for line in capsys.readouterr().out.splitlines() if line.startswith("|"))
        assert table.count("\n") >= 5 and readme.count(table) == 1, f"results/{name}.json's table is not in README"
