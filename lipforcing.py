"""
lipforcing: a minimal reference implementation of Lip Forcing (few-step autoregressive diffusion
for real-time lip synchronization), in pure PyTorch.

Read bottom-up, one section at a time:
  1. constants and helpers (checkpoints with their config inside, atomic writes)
  2. audio front end (log-mel aligned to video frames)
  3. media I/O (any video / audio in, H.264 + AAC mp4 out)
  4. the video autoencoder (Wan/TAEHV layout: 4x time, 8x space, 16 channels)
  5. the DiT (adaLN-Zero, 3D RoPE, qk-norm, channel-concat conditions, added audio)
  6. flow matching, the teacher's 50-step sampler with CFG, the student's two-step sampler
  7. conditioning: latents, the lower-face mask, packed audio
  8. SyncNet, the sync metrics (Sync-C / Sync-D as syncnet_python computes them), MouthNet
  9. SynthTalk, the procedural talking-face corpus every number here is measured on
 10. data: clip pools from SynthTalk or from a folder of real clips
 11. streaming lip sync with the causal student (LipSyncStream)
 12. distillation: Self-Forcing rollout, Sync-Window DMD, SyncNet reward
"""

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import secrets
import struct
import subprocess
import tempfile
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# 1. constants and helpers

SAMPLE_RATE = 16000                      # Hz, mono
FPS = 25                                 # video frames per second
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS   # 640 audio samples per video frame
MEL_HOP = 160                            # 100 Hz mel frames, as SyncNet's MFCCs
MELS_PER_FRAME = SAMPLES_PER_FRAME // MEL_HOP  # 4 mel frames per video frame
FRAMES_PER_LATENT = 4                    # video frames per latent frame (the autoencoder's 4x in time)


UMASK = os.umask(0)   # this process's umask, for atomic_path (reading it means setting it: set back at once)
os.umask(UMASK)


@contextlib.contextmanager
def atomic_path(path):
    """Yield a hidden temp path beside `path`; it replaces `path` only if the block succeeds.

    The parent folder is created if missing. On any failure the temp file and the folders made
    for it are removed and an existing `path` is left untouched (same folder, so os.replace is an
    atomic rename). The suffix is kept: ffmpeg and soundfile choose the format from it."""
    path = Path(path)
    made = [p for p in (path.parent, *path.parent.parents) if not p.exists()]   # deepest first
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{secrets.token_hex(4)}{path.suffix}")
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~UMASK)    # what open() makes: some writers (safetensors) make their files 0600
        os.replace(tmp, path)
        made = []
    finally:
        tmp.unlink(missing_ok=True)
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: something else writes there too
                folder.rmdir()


def positive_int(text):
    """argparse type of the count options (steps, batch, clips, threads, ...): an int >= 1."""
    n = int(text) if text.isdigit() else 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{text}: takes a positive whole number")
    return n


def number(low, high=math.inf, low_ok=False, what="a number"):
    """argparse type of a finite float option in (low, high], or [low, high] with low_ok."""
    def parse(text):
        try:
            x = float(text)
        except ValueError:
            x = math.nan
        if not (low <= x if low_ok else low < x) or not x <= high or not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"{text}: takes {what}")
        return x
    return parse


positive_float = number(0.0, what="a positive number")
nonnegative_float = number(0.0, low_ok=True, what="a number >= 0")
probability = number(0.0, 1.0, low_ok=True, what="a probability from 0 to 1")


def seed_int(text):
    """argparse type of --seed: a whole number from 0 to 2**63 - 1 (numpy's and torch's seeds)."""
    n = int(text) if text.isdigit() else -1
    if not 0 <= n < 2 ** 63:
        raise argparse.ArgumentTypeError(f"{text}: takes a whole number from 0 to 2**63 - 1")
    return n


def device_problem(spec):
    """Why `spec` cannot be the device of a run on this machine; None if it can (cpu, or cuda /
    cuda:N where CUDA is available)."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        return f"--device {spec}: not a device; use cpu, cuda or cuda:N"
    if device.type not in ("cpu", "cuda"):
        return f"--device {spec}: runs on cpu or cuda; use cpu, cuda or cuda:N"
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {spec}: CUDA is not available here; use --device cpu"
    return None


def cpu_count():
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cache_path(name, cache_dir=None):
    """Where a cache file of derived data lives: cache_dir, else $LIPFORCING_CACHE, else .cache."""
    return os.path.join(cache_dir or os.environ.get("LIPFORCING_CACHE", ".cache"), name)


def save_json(path, obj):
    """Write obj as indented json, atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    print(f"wrote {path}")


def autocast(device, cpu=False):
    """bf16 autocast on GPU; on a CPU plain fp32, or bf16 with cpu=True (worth it only on a CPU with
    native bf16: AVX512-BF16 or AMX)."""
    kind = torch.device(device).type
    return torch.autocast(kind, torch.bfloat16) if kind == "cuda" or (cpu and kind == "cpu") else contextlib.nullcontext()


def weights_digest(model):
    """A short fingerprint of a model: sha256 over its config's fields that differ from their
    defaults (so a field added to the class later, at its default, leaves old digests as they were)
    and every weight and buffer (name, shape, dtype, bytes). A DiT checkpoint records its
    autoencoder's (`autoencoder` in its extra), so a DiT is never run on the latents of another
    autoencoder unnoticed."""
    cfg = model.cfg
    own = {f.name: getattr(cfg, f.name) for f in fields(cfg) if getattr(cfg, f.name) != f.default}
    h = hashlib.sha256(json.dumps(own, sort_keys=True).encode())
    for name, v in sorted(model.state_dict().items()):
        v = v.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name} {tuple(v.shape)} {v.dtype}".encode())
        h.update(v.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def save_checkpoint(path, model, config, extra=None, dtype=None):
    """Weights as safetensors; the dataclass config (and any extra info) as json metadata, so the
    file alone rebuilds its model. Written atomically. dtype (e.g. torch.float16) stores floating
    weights at that precision, half the size for a shipped model; loading casts them back."""
    from safetensors.torch import save_file
    meta = {"config": json.dumps(asdict(config)), "config_class": type(config).__name__}
    if extra:
        meta["extra"] = json.dumps(extra)
    cast = lambda v: v.to(dtype) if dtype is not None and v.is_floating_point() else v
    tensors = {k: cast(v.detach().cpu().contiguous()) for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, a folder, unreadable, another model's, NaN
    weights); its message is one line that says what is wrong."""


def read_safetensors(path, what="checkpoint", tensors=True):
    """(tensors on the CPU, metadata dict) of a safetensors file; CheckpointError if it is missing,
    a folder, or not a readable safetensors file. tensors=False reads the header only: ({}, metadata)."""
    from safetensors import safe_open
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a folder, not a {what} file")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: {what} not found; train it first (see README)")
    try:
        with safe_open(path, "pt") as f:                 # one read: the header's metadata, then the tensors
            return {k: f.get_tensor(k) for k in f.keys()} if tensors else {}, f.metadata() or {}
    except Exception as e:                         # truncated, corrupt, or not safetensors at all
        raise CheckpointError(f"{path} is not a readable safetensors {what} ({first_line(e)})") from None


def file_problem(path):
    """Why `path` is not a file to read, as a command line reports it: "a folder", "not found";
    None when it is one."""
    return "a folder" if os.path.isdir(path) else None if os.path.isfile(path) else "not found"


def folder_problem(folder):
    """Why an output cannot be written into `folder` (created if missing), as a command line reports
    it: it lies under a file, or cannot be made or written in; None when it can. Checked by making
    the folder and a file in it and removing both again, so a folder that cannot take an output is
    found before the work that makes it."""
    folder = os.path.abspath(folder)
    missing, parent = [], folder
    while not os.path.exists(parent):
        missing.append(parent)                                  # deepest first
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        return f"{parent} is a file, not a folder; pick another path"
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror}); pick a folder you can write to"
    finally:
        for m in missing:                                       # the output's writer makes them again
            with contextlib.suppress(OSError):
                os.rmdir(m)
    return None


def same_file(a, b):
    """Whether two paths name one file: the same path, or (both there) one file by two names
    (links, a case-insensitive disk)."""
    return os.path.abspath(a) == os.path.abspath(b) or (os.path.exists(a) and os.path.exists(b)
                                                          and os.path.samefile(a, b))


def first_line(e):
    """An exception's message, first line only (its type's name if it has none), and the line after
    it where the first only introduces a list (load_state_dict's "Error(s) in loading state_dict
    for DiT:" then its first "size mismatch for ...")."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    if not lines:
        return type(e).__name__
    return " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]


def checkpoint_header(path, config_class, size=None, meta=None):
    """(the stored config's fields, extra dict) of a checkpoint written by save_checkpoint, from its
    header alone (`meta`, when the caller has read it already). CheckpointError when it is not a
    checkpoint of `config_class`, or when `size` (the frame size the caller runs at) is not the
    "size" its extra records: a DiT sees faces only at the scale it trained at."""
    meta = read_safetensors(path, tensors=False)[1] if meta is None else meta
    if meta.get("config_class") != config_class.__name__:
        if "config_class" not in meta:             # a training-state file, or another program's safetensors
            state = str(path).endswith(".state.safetensors")
            raise CheckpointError(f"{path} is not a model checkpoint (no config inside): "
                                  + ("it is a run's training state; pass the checkpoint beside it, without .state"
                                     if state else "pass one that train.py wrote"))
        kind = lambda name: name.removesuffix("Config")      # AEConfig -> AE
        raise CheckpointError(f"{path} holds {kind(meta['config_class'])} weights, "
                              f"not {kind(config_class.__name__)} ones")
    try:
        stored, extra = json.loads(meta["config"]), json.loads(meta.get("extra", "{}"))
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: its header's config cannot be read ({first_line(e)})") from None
    trained = extra.get("size")
    if size is not None and trained is not None and trained != size:
        raise CheckpointError(f"{path} was trained on {trained} px frames, not {size}: pass --size {trained}")
    return stored, extra


def load_checkpoint(path, config_class, model_class, device="cpu", size=None):
    """Rebuild `model_class(config)` from a safetensors checkpoint written by save_checkpoint.
    Returns (model in eval mode, config, extra dict). CheckpointError when the file cannot give one,
    or when it was recorded at another frame size than `size` (checkpoint_header)."""
    tensors, meta = read_safetensors(path)
    stored, extra = checkpoint_header(path, config_class, size, meta)
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path} holds NaN or infinite weights ({bad[0]} and {len(bad) - 1} more tensors): "
                              "the file is damaged or its training diverged; copy or train it again")
    # a field missing from the stored config takes its default: so a field added to a config class
    # must default to the behaviour from before it existed (DiTConfig.audio_adaln = False)
    known = {f.name for f in fields(config_class)}
    try:
        config = config_class(**{k: tuple(v) if isinstance(v, list) else v        # json turns tuples into lists
                                 for k, v in stored.items() if k in known})
        model = model_class(config)
        model.load_state_dict(tensors)
    except Exception as e:                         # a config or weights this version cannot rebuild
        raise CheckpointError(f"{path}: cannot rebuild its {config_class.__name__} model ({first_line(e)})") from None
    return model.to(device).eval(), config, extra


DIT_KINDS = {True: "a causal student", False: "a bidirectional teacher"}   # DiTConfig.causal, in words


def check_dit_kind(path, causal, wanted, who):
    """CheckpointError unless the DiT at `path` (causal or not) is the kind `who` takes (`wanted`;
    None: either)."""
    if wanted is not None and bool(causal) != wanted:
        raise CheckpointError(f"{path} is {DIT_KINDS[bool(causal)]}; {who} takes {DIT_KINDS[wanted]}")


def check_dit_latents(path, channels, extra, ae, vae):
    """CheckpointError unless the DiT at `path` (its latent channels, extra info) reads the latents
    of the autoencoder `ae` (from the file `vae`): the same channels and, where the checkpoint
    records its autoencoder's weights_digest (the DiT stages write it), the same autoencoder."""
    if channels != ae.cfg.latent_channels:
        raise CheckpointError(f"{path} reads {channels}-channel latents, the autoencoder {vae} makes "
                              f"{ae.cfg.latent_channels}: use the autoencoder it was trained with")
    if extra.get("autoencoder") not in (None, weights_digest(ae)):
        raise CheckpointError(f"{path} was trained on the latents of another autoencoder than {vae}: use the "
                              "autoencoder it was trained with (the vae.safetensors of its training's --ckpt-dir)")


def seeded_rng(*keys):
    """A numpy Generator determined by a tuple of ints: identical on every machine."""
    return np.random.default_rng(list(keys))


# -----------------------------------------------------------------------------
# 2. audio front end: log-mel spectrogram in torch, 4 mel frames per video frame

N_MELS = 40
MEL_WIN = 400     # 25 ms analysis window
MEL_FFT = 512


def mel_filterbank(n_mels=N_MELS, n_fft=MEL_FFT, sr=SAMPLE_RATE, fmin=40.0, fmax=7600.0):
    """Triangular filters on the HTK mel scale, (n_fft // 2 + 1, n_mels)."""
    mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
    hz = lambda m: 700.0 * (10.0 ** (m / 2595.0) - 1.0)
    edges = hz(np.linspace(mel(fmin), mel(fmax), n_mels + 2))
    freqs = np.linspace(0, sr / 2, n_fft // 2 + 1)
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    fb = np.maximum(0, np.minimum((freqs - lo) / (mid - lo), (hi - freqs) / (hi - mid)))
    return torch.tensor(fb.T, dtype=torch.float32)


_MEL_FB = mel_filterbank()


def log_mel(audio):
    """(..., T * 640) waveform -> (..., T * 4, N_MELS) log-mel.

    Mel frame m is centred on sample 160 m + 80, so the 4 mel frames 4v .. 4v+3 tile exactly the
    640 samples of video frame v: the audio of a frame never leaks into its neighbours' features
    except through the 25 ms window. Zero padding (not reflection) keeps the features of a prefix
    identical however much audio follows it, which streaming relies on."""
    pad = (MEL_WIN - MEL_HOP) // 2                                       # 120 samples each side
    x = F.pad(audio.float(), (pad, pad))
    frames = x.unfold(-1, MEL_WIN, MEL_HOP)                              # (..., 4T, 400)
    window = torch.hann_window(MEL_WIN, periodic=True, device=audio.device)
    power = torch.fft.rfft(frames * window, n=MEL_FFT).abs().pow(2)      # (..., 4T, 257)
    mel = power @ _MEL_FB.to(audio.device)                               # (..., 4T, N_MELS)
    return torch.log(mel + 1e-6)


# -----------------------------------------------------------------------------
# 3. media I/O: any common video / audio in (through ffmpeg), H.264 + AAC mp4 out, atomically

_SOUNDFILE_EXTS = {".wav", ".flac", ".ogg"}  # libsndfile reads these without ffmpeg
_AUDIO_RE = re.compile(r"Stream #\d+:\d+\S*: Audio:")
# mp3/m4a cover art shows up as a one-frame "Video" stream; it is not a video.
_VIDEO_RE = re.compile(r"Stream #\d+:\d+\S*: Video:(?!.*attached pic)")


class MediaError(ValueError):
    """Bad media input. The message is one line: what is wrong and what to do."""


class NoAudioTrack(MediaError):
    """A file read for its sound that has no audio track (a reader that knows why it wanted one,
    folder_pool, words the advice)."""


# soundfile and imageio_ffmpeg are imported where media is read or written, not at the top: the
# DiT stages and the benchmark, which touch no media file, run where neither is installed.
def _sf():
    import soundfile
    return soundfile


def ffmpeg_exe():
    import imageio_ffmpeg
    return imageio_ffmpeg.get_ffmpeg_exe()


def ffmpeg_path(path):
    """A local path as ffmpeg must be given it: ffmpeg reads `take1:final.mp4` as protocol `take1`
    ("Protocol not found"), so every path goes in with the file: protocol spelled out."""
    return f"file:{path}"


def _last_line(text):
    lines = [l.strip() for l in str(text).splitlines() if l.strip()]
    return lines[-1] if lines else "no error output"


def check_file(path, pipe_ok=False):
    """An input media path as a Path, or MediaError if it is missing or a folder, or (unless
    pipe_ok) empty, or a pipe such as bash's <(...): ffmpeg reads a media file more than once
    (probe, check, decode), and a pipe's bytes are gone after the first read."""
    path = Path(path)
    if not path.exists():
        raise MediaError(f"{path} does not exist: check the path and spelling")
    if path.is_dir():
        raise MediaError(f"{path} is a directory, not a media file: pass a file inside it")
    if not pipe_ok and not path.is_file():
        raise MediaError(f"{path} is a pipe or device, not a file: save it to a file first")
    if not pipe_ok and path.stat().st_size == 0:        # (a stream's raw PCM file may be empty yet: it grows)
        raise MediaError(f"{path} is empty (0 bytes): pass a file that holds the media")
    return path


def _probe(path):
    """ffmpeg's stream listing for `path` (stderr of `ffmpeg -i`; it exits 1 without an output, that's fine)."""
    p = subprocess.run([ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", ffmpeg_path(path)], capture_output=True)
    return p.stderr.decode(errors="replace")


def _not_media(path, info):
    return MediaError(f"{path} could not be decoded ({_last_line(info)}): the file is corrupt or not audio/video")


def _cut_short(path, what):
    return MediaError(f"{path} is damaged or cut short ({what}): re-download or re-encode it")


NO_PTS = -2 ** 63        # ffmpeg's AV_NOPTS_VALUE: a packet without a timestamp


def _ffmpeg_on_stream(path, stream, *output, first=()):
    """Run ffmpeg, errors only, on the first `stream` ("v" or "a") of `path` into `output` (its
    output options and target), `first` before the input. Returns (the process, its stderr text)."""
    p = subprocess.run([ffmpeg_exe(), "-nostdin", "-v", "error", *first, "-i", ffmpeg_path(path),
                        "-map", f"0:{stream}:0", *output], capture_output=True)
    return p, p.stderr.decode(errors="replace")


def _without_source(line):
    """An ffmpeg message without the "[demuxer @ 0x..]" / "[dec:aac @ 0x..]" tags in front of it."""
    return re.sub(r"^(\[[^]]*\]\s*)+", "", line)


def _check_whole(path, stream):
    """MediaError if ffmpeg's demuxer finds the first `stream` ("v" or "a") of `path` damaged or cut
    short. ffmpeg decodes the first part of a partial download and exits 0, which would pass a short
    clip on silently; copying the packets, without decoding, to framecrc's listing (one line per
    packet: stream, dts, pts, duration, size, crc) is where it says so. Returns that listing."""
    p, err = _ffmpeg_on_stream(path, stream, "-c", "copy", "-f", "framecrc", "-")
    if err.strip() or p.returncode != 0:
        raise _cut_short(path, _without_source(_last_line(err)))
    return p.stdout.decode(errors="replace")


def _check_decodes(path, stream):
    """MediaError if decoding the first `stream` ("v" or "a") of `path` hits an error. Garbled bytes
    inside an intact container pass the demuxer (_check_whole), and the decoder hides the damage
    and exits 0: the run would go on with broken frames. -xerror stops ffmpeg at the first error."""
    p, err = _ffmpeg_on_stream(path, stream, "-f", "null", "-", first=["-xerror"])
    if p.returncode != 0:
        lines = err.strip().splitlines()
        what = _without_source(lines[0]) if lines else f"ffmpeg exit {p.returncode}"
        raise _cut_short(path, f"it does not decode: {what}")


def _stream_end(listing):
    """The time, in seconds, at which the last packet of a framecrc listing stops being shown (the
    latest pts plus its duration, or the typical duration where a packet states none), or None
    where the packets carry no timestamps (a raw .h264 stream) or no durations."""
    tb = re.search(r"^#tb \d+: (\d+)/(\d+)", listing, re.M)
    rows = [line.split(",") for line in listing.splitlines() if line and not line.startswith("#")]
    rows = [(int(f[2]), int(f[3])) for f in rows if len(f) >= 4]          # (pts, duration)
    durations = sorted(d for _, d in rows if d > 0)
    if not (tb and rows and durations) or any(pts == NO_PTS for pts, _ in rows):
        return None
    end = max(pts + (d or durations[len(durations) // 2]) for pts, d in rows)
    return end * int(tb[1]) / int(tb[2])


def _declared_seconds(path):
    """The length a wav's or flac's header states, in seconds; None for other files, or a header that
    states none (a wav streamed through a pipe). A wav cut short still says how long it was meant to
    be, though libsndfile just reads the samples that are there."""
    suffix = path.suffix.lower()
    if suffix == ".flac":
        try:
            info = _sf().info(str(path))  # STREAMINFO's total, read from the first bytes
        except RuntimeError:
            return None
        return info.frames / info.samplerate if info.frames > 0 else None
    if suffix != ".wav":
        return None
    with open(path, "rb") as f:
        riff = f.read(12)
        if len(riff) < 12 or riff[:4] != b"RIFF" or riff[8:] != b"WAVE":
            return None  # RF64, Wave64, or not a wav at all: the decoder has its say
        rate = align = None
        while len(head := f.read(8)) == 8:
            chunk, n = struct.unpack("<4sI", head)
            if chunk == b"fmt ":
                fmt = f.read(n)
                if len(fmt) >= 14:
                    rate, align = struct.unpack_from("<I4xH", fmt, 4)  # sample rate, bytes per frame
                f.seek(n & 1, 1)  # chunks are padded to even sizes
            elif chunk == b"data":
                if n in (0, 0xFFFFFFFF) or not (rate and align):
                    return None
                return n // align / rate
            else:
                f.seek(n + (n & 1), 1)
    return None


def has_audio(path):
    """True if ffmpeg sees an audio stream in `path` (False for undecodable files; MediaError for a
    path check_file refuses: missing, a folder, a pipe, empty)."""
    return bool(_AUDIO_RE.search(_probe(check_file(path))))


# reading audio

def resample_audio(x, sr_in, sr_out):
    """Band-limited resampling of a mono signal by FFT; output length is exactly round(N * sr_out / sr_in)."""
    x = np.asarray(x, dtype=np.float32)
    assert x.ndim == 1, f"resample_audio wants a mono (N,) signal, got shape {x.shape}"
    n, n_out = len(x), round(len(x) * sr_out / sr_in)
    if sr_in == sr_out or n == 0:
        return x.copy() if sr_in == sr_out else np.zeros(n_out, np.float32)
    # Resampling in the frequency domain treats the clip as periodic, so the end would bleed into the
    # start. Pad with >= 50 ms of zeros to kill that, and to a multiple of sr_in/gcd so the padded
    # output length is an exact integer (no fractional-sample drift); then crop.
    down = sr_in // math.gcd(sr_in, sr_out)
    L = -(-(n + sr_in // 20) // down) * down
    L_out = L * sr_out // sr_in
    X = np.fft.rfft(x, L)
    k = min(len(X), L_out // 2 + 1)  # keep only what fits below the lower Nyquist
    Y = np.zeros(L_out // 2 + 1, dtype=X.dtype)
    Y[:k] = X[:k]
    if sr_out < sr_in:
        # Anti-aliasing: fade out the top 5% of the kept band rather than a brick wall, so the
        # implied filter kernel is short and doesn't ring for long (or reach around the padding).
        m = max(1, k // 20)
        Y[k - m:k] *= 0.5 + 0.5 * np.cos(np.linspace(0, np.pi, m))
    y = np.fft.irfft(Y, L_out) * (L_out / L)
    return y[:n_out].astype(np.float32)


# ffmpeg's audio filters that place the samples by their timestamps (_ffmpeg_audio says why)
AUDIO_TIMING = "asetpts=PTS-min(STARTPTS\\,0),aresample=async=1:first_pts=0"
AAC_LAYOUTS = "mono|stereo|2.1|3.0|4.0|5.0|5.1|6.1|7.1"     # what ffmpeg's AAC encoder takes; more channels are downmixed


def _ffmpeg_audio(path, sr):
    # ffmpeg downmixes (-ac 1) and resamples (-ar) itself; raw float32 comes out on stdout. Raw
    # samples carry no timestamps, so an audio track that starts after the container's time 0 (an
    # mkv muxed with -itsoffset, a late mp4 edit) would slide to sample 0 and out of sync with the
    # frames. aresample places the samples by their timestamps instead: first_pts=0 pads a late
    # start with silence, async=1 fills a gap later in the track the same way. A track stamped to
    # start before 0 is shifted to 0 first (asetpts), not cut: an opus webm's first packet sits
    # 13 ms early and holds the recording's first samples. Audio that starts at 0 comes out sample
    # for sample as without the filters (checked on mp4/m4a AAC, mp3, ogg, opus, webm, avi, ts).
    cmd = [ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", ffmpeg_path(path), "-map", "0:a:0",
           "-af", AUDIO_TIMING, "-ac", "1", "-ar", str(sr), "-f", "f32le", "-"]
    p = subprocess.run(cmd, capture_output=True)
    err = p.stderr.decode(errors="replace")
    if "Stream #" not in err:  # ffmpeg never got as far as listing streams
        raise _not_media(path, err)
    if not _AUDIO_RE.search(err):
        raise NoAudioTrack(f"{path} has no audio track: pass a separate wav/mp3/m4a file as the audio")
    if p.returncode != 0:
        raise MediaError(f"{path}: ffmpeg failed to decode the audio ({_last_line(err)}): re-encode it, e.g. to wav")
    _check_whole(path, "a")
    return np.frombuffer(p.stdout, dtype=np.float32).copy()


def read_audio(path, sr=SAMPLE_RATE):
    """Mono float32 audio in [-1, 1] at `sr` from an audio file or the audio track of a video."""
    path = check_file(path)
    declared = _declared_seconds(path)
    x = None
    if path.suffix.lower() in _SOUNDFILE_EXTS:
        try:
            x, sr_in = _sf().read(str(path), dtype="float32", always_2d=True)
            x = resample_audio(x.mean(axis=1), sr_in, sr)
        except RuntimeError:
            x = None  # e.g. a codec this libsndfile lacks: let ffmpeg have a go (and word the error)
    by_ffmpeg = x is None
    if by_ffmpeg:
        x = _ffmpeg_audio(path, sr)
    if len(x) == 0:
        raise MediaError(f"{path} contains no audio samples: pass a non-empty audio file")
    if declared is not None and declared - len(x) / sr > 1 / FPS:  # a missing part under a frame is harmless
        raise _cut_short(path, f"its header says {declared:.2f} s, it holds {len(x) / sr:.2f} s")
    if by_ffmpeg:
        _check_decodes(path, "a")
    if not np.isfinite(x).all():
        raise MediaError(f"{path} holds NaN or infinite samples: re-export it (e.g. as a 16-bit PCM wav)")
    # Float files and the resampler can overshoot slightly; the model expects [-1, 1].
    return np.clip(x, -1.0, 1.0)


def _check_audio(audio, path):
    audio = np.asarray(audio)
    if not np.issubdtype(audio.dtype, np.floating) or audio.ndim not in (1, 2) or audio.shape[0] == 0:
        raise MediaError(f"cannot write {path}: audio must be a non-empty float array (N,) or (N, C) in [-1, 1], "
                         f"got {audio.dtype} {audio.shape}")
    if not np.isfinite(audio).all():
        raise MediaError(f"cannot write {path}: audio contains NaN or inf: check the model output")
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


# writing (atomically, through atomic_path)

def write_audio(path, audio, sr=SAMPLE_RATE):
    """Write audio (N,) or (N, C) float in [-1, 1] as 16-bit PCM (for .wav), atomically."""
    audio = _check_audio(audio, path)
    with atomic_path(path) as tmp:
        _sf().write(str(tmp), audio, sr)


def _pad_even(frame):
    # yuv420p stores chroma at half resolution, so libx264 refuses odd sizes. Replicate the last
    # row/column rather than scaling: the real pixels stay untouched.
    h, w = frame.shape[:2]
    return np.pad(frame, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge") if h % 2 or w % 2 else frame


def _check_frames(frames, path, size=None):
    """`frames` as a uint8 array (m, H, W, 3), of frame size `size` = (H, W) when one is given;
    else MediaError."""
    frames = np.asarray(frames)
    if (frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape[1:]
            or size not in (None, frames.shape[1:3])):
        want = "(T, H, W, 3)" if size is None else f"(m, {size[0]}, {size[1]}, 3)"
        raise MediaError(f"cannot write {path}: frames must be a non-empty uint8 array {want}, "
                         f"got {frames.dtype} {frames.shape}")
    return frames


def write_video(path, frames, audio=None, fps=FPS, sr=SAMPLE_RATE, shape=None, audio_file=None):
    """Write uint8 (T, H, W, 3) RGB frames as H.264 mp4, with `audio` (at `sr`) muxed as AAC, or
    instead the first audio track of the media file `audio_file`, re-encoded as AAC at its own
    sample rate (at most AAC's 96 kHz) and channels (at most 7.1), placed by its timestamps as
    ffmpeg's decode for read_audio places it, and cut or padded with silence to the frames (by
    ffmpeg's apad and -t).

    With `shape` = (T, H, W, 3), `frames` is instead an iterable of uint8 (m, H, W, 3) batches that
    together make that clip (a generator, as a model makes them): each batch is encoded as it comes,
    so a long clip is never held whole, and the file is byte for byte the one the whole array would
    give. The shape is given up front because ffmpeg needs the frame size, and the audio its length,
    before the first frame.

    Odd H or W is padded to even by replicating the last row/column, so read_video returns the
    padded size. The video length rules: the audio is cut or zero-padded to exactly T / fps seconds
    (here for `audio`, by -t and apad for `audio_file`; not by ffmpeg's -shortest, which would cut
    the video if the audio is short).
    Atomic (see atomic_path): on failure nothing is left at `path` or next to it.
    """
    if shape is None:                                   # the whole clip in hand: one batch of it
        frames = _check_frames(frames, path)
        shape, frames = frames.shape, [frames]
    T, H, W, _ = shape
    if T == 0:
        raise MediaError(f"cannot write {path}: frames must be a non-empty uint8 array (T, H, W, 3), "
                         f"got {tuple(shape)}")
    rate = str(Fraction(fps).limit_denominator(1001))  # exact for 25, 30, 30000/1001
    cmd = [ffmpeg_exe(), "-y", "-hide_banner", "-nostdin", "-v", "error",
           "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{W + W % 2}x{H + H % 2}", "-r", rate, "-i", "-"]
    if audio is not None and audio_file is not None:
        raise ValueError("write_video takes `audio` or `audio_file`, not both")
    if audio_file is not None and not has_audio(audio_file):
        raise MediaError(f"{audio_file} has no audio track: pass a file with sound as the audio")
    if audio is not None:
        audio, n = _check_audio(audio, path), round(T * sr / fps)
        audio = np.pad(audio[:n], ((0, n - len(audio[:n])),) + ((0, 0),) * (audio.ndim - 1))
    with atomic_path(path) as tmp, tempfile.TemporaryDirectory() as td:
        if audio is not None:
            wav = os.path.join(td, "audio.wav")
            _sf().write(wav, audio, sr, subtype="FLOAT")  # float wav: no extra quantisation before AAC
            cmd += ["-i", wav, "-map", "0:v:0", "-map", "1:a:0", "-c:a", "aac", "-b:a", "128k"]
        elif audio_file is not None:
            cmd += ["-i", ffmpeg_path(audio_file), "-map", "0:v:0", "-map", "1:a:0", "-map_chapters", "-1",
                    "-af", f"{AUDIO_TIMING},aformat=channel_layouts={AAC_LAYOUTS},apad",
                    "-t", f"{float(T / Fraction(rate)):.6f}", "-c:a", "aac", "-b:a", "192k"]
        cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-preset", "medium",
                "-movflags", "+faststart", ffmpeg_path(tmp)]
        # stderr goes to a file, not a pipe: an unread pipe can fill up and deadlock ffmpeg.
        with open(os.path.join(td, "ffmpeg.log"), "w+b") as log:
            p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
            written = 0
            try:
                for batch in frames:
                    batch = _check_frames(batch, path, (H, W))
                    written += len(batch)
                    if written > T:
                        break
                    for frame in batch:  # stream frame by frame: no second full copy of the clip
                        p.stdin.write(np.ascontiguousarray(_pad_even(frame)).tobytes())
                if written != T:  # the audio was cut to T frames: a clip of another length is the caller's bug
                    raise ValueError(f"write_video {path}: {'more than' if written > T else 'only'} {min(written, T)} "
                                     f"frames came, not the {T} of shape {tuple(shape)}")
                p.stdin.close()
                rc = p.wait()
            except BrokenPipeError:  # ffmpeg died early; its log says why
                rc = p.wait()
            finally:
                if p.poll() is None:  # our own failure midway: don't leave ffmpeg running
                    p.kill()
                    p.wait()
            if rc != 0:
                log.seek(0)
                raise MediaError(f"cannot write {path}: ffmpeg failed ({_last_line(log.read().decode(errors='replace'))})")


# reading video

def read_video(path, fps=FPS):
    """Decode a video to uint8 (T, H, W, 3) RGB frames at `fps`; returns (frames, source_fps).

    By timestamps, as a player shows it: output frame i is the source frame on screen at time i / fps
    of the container's clock. ffmpeg's fps filter does it (round=up: a frame shown from time p fills
    the output times >= p until the next one), so a variable-frame-rate phone video keeps its timing
    and a video stream that starts after time 0 (as the audio track may not) is led by its first
    frame, both in sync with read_audio. Output frames are kept while their whole display interval
    [i, i + 1) / fps lies within the video, so T_out * SAMPLES_PER_FRAME never outruns the clip's
    audio; a clip shorter than one output frame still gives 1."""
    path = check_file(path)
    info = _probe(path)
    if "Stream #" not in info:
        raise _not_media(path, info)
    if not _VIDEO_RE.search(info):
        raise MediaError(f"{path} has no video stream: pass a video file ({'/'.join(e[1:] for e in VIDEO_EXTS)})")
    end = _stream_end(_check_whole(path, "v"))
    _check_decodes(path, "v")
    rate = Fraction(fps).limit_denominator(1001)
    import imageio_ffmpeg
    try:
        with contextlib.closing(imageio_ffmpeg.read_frames(
                ffmpeg_path(path), output_params=["-map", "0:v:0", "-vf", f"fps={rate}:round=up:start_time=0"])) as gen:
            meta = next(gen)
            w, h = meta["size"]
            src_fps = float(meta["fps"]) or float(fps)     # the stream's nominal rate, for messages
            out = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    except (RuntimeError, OSError) as e:
        raise MediaError(f"{path} could not be decoded by ffmpeg ({_last_line(e)}): check that it plays, or re-encode it") from None
    if not out:
        raise MediaError(f"{path} has a video stream but no decodable frames: re-encode it")
    t_out = len(out) if end is None else min(len(out), max(1, math.floor(end * rate + 1e-6)))
    frames = np.empty((t_out, h, w, 3), np.uint8)
    for k in range(t_out):  # each decoded frame let go as it is copied: the clip is never held twice
        frames[k], out[k] = out[k], None
    return frames, src_fps


# -----------------------------------------------------------------------------
# 4. video autoencoder: the Wan / TAEHV latent layout at toy size
#
# 1 + 4k frames <-> 1 + k latent frames of 16 channels at 1/8 resolution. The first latent frame
# holds one video frame (the encoder sees it repeated 4 times, the decoder's first 3 outputs are
# dropped); every later latent frame holds 4. The encoder looks at one latent frame's 4 frames at a
# time; the decoder also looks one latent frame back (MemBlock), so decoding chunk by chunk with
# the carried memory equals decoding the whole clip. A fork can swap in Wan-VAE or TAEHV latents
# without touching the DiT.


@dataclass
class AEConfig:
    latent_channels: int = 16
    time_down: int = FRAMES_PER_LATENT   # video frames per latent frame: the DiT's data and audio assume 4
    space_down: int = 8       # pixels per latent cell, each side
    width: int = 32           # channels at the finest conv level, doubling at each level below
    # per-channel mean and std of the encoder's output on training clips (set after training):
    # latents are normalised with them, as Wan-VAE's are, so the DiT's x0 has unit variance
    # against unit-variance noise. Empty = raw encoder output.
    latent_mean: tuple = ()
    latent_std: tuple = ()
    seed: int = 0


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class MemBlock(nn.Module):
    """A residual block that also sees the previous latent frame's features (zeros before the
    first). The only path along which the decoder mixes time."""
    def __init__(self, c):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(2 * c, c, 3, padding=1), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, past):                      # x, past: (B, F, C, h, w)
        h = torch.cat([x, past], 2).flatten(0, 1)    # (B*F, 2C, h, w)
        h = self.conv2(F.relu(self.conv1(F.relu(h))))
        return x + h.reshape_as(x)


class VideoAE(nn.Module):
    """The video autoencoder. Its tensors are reshaped, not viewed, so that it also runs in
    channels-last memory (train.py --channels-last), where conv outputs are not contiguous in
    (B, C, H, W) order."""
    def __init__(self, cfg: AEConfig):
        super().__init__()
        self.cfg = cfg
        assert cfg.time_down == FRAMES_PER_LATENT, "latent windows and packed audio assume FRAMES_PER_LATENT"
        cin = 3 * cfg.time_down * 4                   # 4 frames packed in channels, then 2x2 unshuffle
        levels = int(math.log2(cfg.space_down)) - 1   # stride-2 steps after the unshuffle
        ch = [cfg.width * 2 ** i for i in range(levels + 1)]   # 32, 64, 128 channels at 1/2, 1/4, 1/8
        enc = [nn.Conv2d(cin, ch[0], 3, padding=1), ResBlock(ch[0])]
        for i in range(levels):
            enc += [nn.Conv2d(ch[i], ch[i + 1], 3, stride=2, padding=1), ResBlock(ch[i + 1])]
        self.encoder = nn.Sequential(*enc, nn.ReLU(), nn.Conv2d(ch[-1], cfg.latent_channels, 1))
        self.dec_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.dec_mem = nn.ModuleList(MemBlock(ch[i + 1]) for i in reversed(range(levels)))
        self.dec_res = nn.ModuleList(ResBlock(ch[i + 1]) for i in reversed(range(levels)))
        self.dec_up = nn.ModuleList(nn.Conv2d(ch[i + 1], ch[i], 3, padding=1) for i in reversed(range(levels)))
        self.dec_out = nn.Sequential(ResBlock(ch[0]), nn.ReLU(), nn.Conv2d(ch[0], cin, 3, padding=1))
        stat = lambda v, fill: torch.tensor(v or [fill] * cfg.latent_channels, dtype=torch.float32).view(-1, 1, 1)
        self.register_buffer("z_mean", stat(cfg.latent_mean, 0.0), persistent=False)
        self.register_buffer("z_std", stat(cfg.latent_std, 1.0), persistent=False)

    def encode(self, x):
        """x (B, 1 + 4k, 3, H, W) in [-1, 1] -> z (B, 1 + k, 16, H/8, W/8)."""
        tf = self.cfg.time_down
        B, T, C, H, W = x.shape
        assert (T - 1) % tf == 0, f"the autoencoder takes 1 + {tf}k frames, got {T}"
        return self.encode_groups(torch.cat([x[:, :1].expand(B, tf - 1, C, H, W), x], 1))

    def encode_groups(self, x):
        """x (B, 4k, 3, H, W): k groups of 4 frames -> their k latent frames (B, k, 16, H/8, W/8).
        Each latent frame sees only its own 4 frames, so a stream can encode group by group."""
        tf = self.cfg.time_down
        B, T, C, H, W = x.shape
        assert T % tf == 0, f"encode_groups takes {tf}k frames, got {T}"
        Fr = T // tf
        x = x.reshape(B * Fr, tf * C, H, W)                                  # frames packed in C
        z = (self.encoder(F.pixel_unshuffle(x, 2)) - self.z_mean) / self.z_std   # (B*F, 16, h, w)
        return z.reshape(B, Fr, *z.shape[1:])

    def decode(self, z, memory=None):
        """z (B, F, 16, h, w) -> (frames (B, T, 3, H, W), memory). memory=None starts a clip: the
        first latent frame yields 1 frame, later ones 4. Pass the returned memory with the next
        chunk of latents to continue the same clip."""
        B, Fr = z.shape[:2]
        first = memory is None
        h = self.dec_in(z.flatten(0, 1) * self.z_std + self.z_mean)
        new_memory = []
        for i, (mem, res, up) in enumerate(zip(self.dec_mem, self.dec_res, self.dec_up)):
            h = h.reshape(B, Fr, *h.shape[1:])                               # (B, F, C, h, w)
            prev = torch.zeros_like(h[:, :1]) if first else memory[i]
            new_memory.append(h[:, -1:])
            h = res(mem(h, torch.cat([prev, h[:, :-1]], 1)).flatten(0, 1))
            h = up(F.interpolate(h, scale_factor=2, mode="nearest"))
        x = F.pixel_shuffle(self.dec_out(h), 2)                              # (B*F, 4*3, H, W)
        tf = self.cfg.time_down
        x = x.reshape(B, Fr * tf, 3, *x.shape[-2:])                          # (B, 4F, 3, H, W)
        return (x[:, tf - 1:] if first else x), new_memory

    def forward(self, x):
        return self.decode(self.encode(x))[0]


def frames_to_tensor(frames):
    """uint8 (..., H, W, 3) numpy -> float (..., 3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).movedim(-1, -3).float() / 127.5 - 1


def tensor_to_frames(x):
    """float (..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) numpy."""
    return ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def psnr(a, b):
    """PSNR in dB between uint8 arrays (or [0, 255] floats)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float(10 * np.log10(255.0 ** 2 / max(mse, 1e-10)))


# -----------------------------------------------------------------------------
# 5. DiT: one class for the bidirectional teacher and the block-causal student
#
# Wan2.1's layout at any size: patch (1, 2, 2); adaLN-Zero modulation from a per-frame timestep;
# 3D RoPE over (t, h, w) with RMS-normalised queries and keys (per head here; Wan normalises over
# the full width, so Wan weights would not load as they are); conditions concatenated on channels
# (noisy latent | reference latent repeated over time | lower-face mask | masked source latent;
# the paper's fifth input, a reference-sequence latent, is left out: README, What is left out);
# audio packed per latent frame and *added* to that frame's tokens in a set of blocks
# (OmniAvatar-style), not cross-attended.


@dataclass
class DiTConfig:
    dim: int = 192
    depth: int = 6
    heads: int = 6
    ffn: int = 512
    latent_channels: int = 16
    patch: int = 2                 # spatial patch; temporal patch is 1
    audio_context: int = 2         # video frames of audio on each side of a latent frame's 4
    audio_every: int = 1           # audio is added in every k-th block
    audio_adaln: bool = False      # the audio embedding also joins the timestep's in every block's adaLN input
    audio_encoder: bool = False    # per-frame audio features from the frozen reward SyncNet's audio stream (AudioEncoder)
    rope_theta: float = 10000.0
    cfg_drop: float = 0.1          # probability of dropping the condition in training (CFG)
    drop_mode: str = "audio"       # "audio": drop only the audio; "all": audio and spatial conditions
    chunk: int = 3                 # latent frames per chunk (block-causal student)
    causal: bool = False           # a block-causal student (True) or the bidirectional teacher
    sink: int = 1                  # streaming: latent frames kept from the start of the stream
    window: int = 7                # streaming: latent frames attended in all (sink + past + current chunk)
    seed: int = 0

    @property
    def cond_channels(self):       # reference latent + mask + masked source latent
        return 2 * self.latent_channels + 1

    @property
    def audio_channels(self):      # one latent frame's packed audio (pack_audio): its 4 video frames and the context's
        per_frame = SyncNetConfig.embed if self.audio_encoder else MELS_PER_FRAME * N_MELS
        return (FRAMES_PER_LATENT + 2 * self.audio_context) * per_frame

    @property
    def audio_reach(self):         # video frames of audio either side of a latent frame's 4 that its features read
        return self.audio_context + (AudioEncoder.reach if self.audio_encoder else 0)


DIT_PRESETS = {
    "tiny": dict(dim=192, depth=6, heads=6, ffn=512),                # CPU
    "small": dict(dim=512, depth=12, heads=8, ffn=1536),             # one GPU, 128-256 px
    "wan1.3b": dict(dim=1536, depth=30, heads=12, ffn=8960),         # shapes only (random init)
    "wan14b": dict(dim=5120, depth=40, heads=40, ffn=13824),
}
DIT_PATCHES = (1, 2)      # spatial patches a --size that is a multiple of FRAME_MULTIPLE allows (2 is Wan's, the default)


FFN_MULTIPLE = 32         # a --dim's FFN width is rounded up to a multiple of this


def preset_config(name, depth=None, patch=None, dim=None, **kw):
    """DiTConfig of the DIT_PRESETS shape `name`, its depth, patch and width overridden where given
    (--depth, --patch, --dim), other fields from kw. Another width keeps the preset's head width and
    FFN ratio (tiny at 256: 8 heads of 32, FFN 704); ValueError if it is not a whole number of heads."""
    preset = dict(DIT_PRESETS[name])
    if dim is not None:
        head = preset["dim"] // preset["heads"]
        if dim % head:
            raise ValueError(f"--dim {dim}: the {name} preset's heads are {head} wide; pass a multiple of {head}")
        ffn = math.ceil(dim * preset["ffn"] / preset["dim"] / FFN_MULTIPLE) * FFN_MULTIPLE
        preset.update(dim=dim, heads=dim // head, ffn=ffn)
    return DiTConfig(**{**preset, "depth": depth or preset["depth"]}, patch=patch or DiTConfig.patch, **kw)


FRAME_MULTIPLE = AEConfig.space_down * max(DIT_PATCHES)   # 16: frame sizes the autoencoder and every patch tile
FRAME_SIZE = 64           # SynthTalk's frame size: the default of every --size and of the corpus functions


def frame_size(text):
    """argparse type of --size: square frames, a multiple of FRAME_MULTIPLE pixels from
    MIN_FRAME_SIZE up (set beside MOUTH_BOX, from it)."""
    n = int(text) if text.isdigit() else 0
    if n < MIN_FRAME_SIZE or n % FRAME_MULTIPLE:
        raise argparse.ArgumentTypeError(f"{text}: must be a multiple of {FRAME_MULTIPLE} ({AEConfig.space_down}x "
                                         f"autoencoder, {max(DIT_PATCHES)}x{max(DIT_PATCHES)} DiT patches) from "
                                         f"{MIN_FRAME_SIZE} up (the mouth box's one latent row)")
    return n


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


def timestep_embedding(t, dim, max_period=10000):
    """Sinusoidal embedding of t in [0, 1] (scaled by 1000 as Wan does): (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = 1000 * t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


def rope_freqs(head_dim, theta):
    """Split the head dim over (t, h, w) as Wan does: h and w get 2 * (d // 6) each, t the rest.
    Returns the three frequency vectors (each of half its part's size)."""
    dh = dw = 2 * (head_dim // 6)
    dt = head_dim - dh - dw
    f = lambda d: 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    return f(dt), f(dh), f(dw)


def rope_angles(freqs, t_pos, h, w):
    """Rotation angles for tokens at latent-frame positions t_pos (F,) on an h x w patch grid:
    (F * h * w, head_dim / 2), tokens ordered (frame, row, column)."""
    ft, fh, fw = freqs
    Fr = len(t_pos)
    at = (t_pos.double()[:, None] * ft.to(t_pos.device))[:, None, None, :].expand(Fr, h, w, -1)
    ah = (torch.arange(h, device=t_pos.device).double()[:, None] * fh.to(t_pos.device))[None, :, None, :].expand(Fr, h, w, -1)
    aw = (torch.arange(w, device=t_pos.device).double()[:, None] * fw.to(t_pos.device))[None, None, :, :].expand(Fr, h, w, -1)
    return torch.cat([at, ah, aw], -1).reshape(Fr * h * w, -1)                 # float64; rope_factors casts


def rope_factors(angles, dtype=torch.float32):
    """apply_rope's multipliers for angles (N, Dh/2): (2, N, Dh), per channel pair (cos, cos) and
    (-sin, sin), so that the pair (a, b) -> (a, b) * (cos, cos) + (b, a) * (-sin, sin). Made once per
    forward pass and shared by every block."""
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([cos.repeat_interleave(2, -1), torch.stack([-sin, sin], -1).flatten(-2)]).to(dtype)


def apply_rope(x, rope):
    """Rotate each channel pair (a, b) of x (B, H, N, Dh) by its angle: (a cos - b sin, a sin + b cos),
    Wan's complex product, in at least the factors' dtype. rope = rope_factors(angles) (2, N, Dh)."""
    cos, sin = rope
    swapped = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)                  # (b, a) for each pair (a, b)
    return (x * cos + swapped * sin).type_as(x)


def block_causal_mask(n_frames, tokens_per_frame, chunk, device=None):
    """(F N, F N) bool, True where attention is allowed: a token sees its own chunk of `chunk`
    latent frames and every earlier chunk (the student's training mask)."""
    c = torch.arange(n_frames, device=device).repeat_interleave(tokens_per_frame) // chunk
    return c[:, None] >= c[None, :]


class KVCache:
    """Sink + rolling-window keys and values for streaming, one slot per block (StreamingLLM's
    layout, counted in latent frames).

    Holds the first `sink` latent frames of the stream and the most recent ones, so that the current
    chunk attends `window` latent frames in all: [sink | recent | current]. Keys are stored after
    qk-norm but *before* RoPE and rotated when used by their place in that layout (dynamic RoPE):
    positions stay below `window` however long the stream runs, and memory is constant once the
    window has filled. Only a forward pass with update=True (the KV refresh on the clean output at
    t = 0) writes into it. Block i reads and writes through its own slot, `layers[i]`."""
    def __init__(self, depth, sink=1, window=7, chunk=3):
        assert window - chunk - sink >= 0, "the window must hold the sink and the current chunk"
        self.sink, self.recent = sink, window - chunk - sink
        self.layers = [KVSlot(self) for _ in range(depth)]
        self.frames = 0               # latent frames written since the stream began
        self.update = False           # set by DiT.forward for the KV-refresh pass

    @property
    def cached_frames(self):
        return min(self.frames, self.sink + self.recent)

    def nbytes(self):
        return sum(t.numel() * t.element_size() for s in self.layers for t in (s.k, s.v) if t is not None)


class KVSlot:
    """One block's cached keys and values (B, H, m, Dh), k not yet rotated. A block is handed its
    slot rather than its number, so torch.compile can compile the block's code once for every
    block (compile_blocks) instead of once per number."""
    def __init__(self, cache):
        self.cache, self.k, self.v = cache, None, None

    def __call__(self, k, v, tokens_per_frame):
        """Keys and values to attend: (cached, then the current chunk's); writes the current ones
        into the slot when the cache is updating. k, v (B, H, n, Dh), k not yet rotated."""
        k_all = k if self.k is None else torch.cat([self.k, k], 2)
        v_all = v if self.v is None else torch.cat([self.v, v], 2)
        if self.cache.update:
            keep_sink, keep_recent = self.cache.sink * tokens_per_frame, self.cache.recent * tokens_per_frame
            if k_all.shape[2] > keep_sink + keep_recent:
                roll = lambda z: torch.cat([z[:, :, :keep_sink], z[:, :, z.shape[2] - keep_recent:]], 2)
                self.k, self.v = roll(k_all), roll(v_all)
            else:
                self.k, self.v = k_all, v_all
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, rope, mask=None, kv=None, tokens_per_frame=1):
        """x (B, n, D). rope (2, m, Dh): rope_factors of the m >= n keys attended: without a cache
        m = n; with one (kv: this block's KVSlot) the cached keys come first and the queries take
        the last n positions."""
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)  # (B, H, N, Dh)
        # qk-norm in its weight's dtype: fp32 under bf16 autocast, as Wan computes it
        norm_dtype = self.q_norm.weight.dtype
        q, k = self.q_norm(q.to(norm_dtype)).to(v.dtype), self.k_norm(k.to(norm_dtype)).to(v.dtype)
        if kv is not None:
            k, v = kv(k, v, tokens_per_frame)                                     # (B, H, m, Dh)
        q, k = apply_rope(q, rope[:, -N:]), apply_rope(k, rope)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)          # (B, H, N, Dh)
        return self.proj(y.transpose(1, 2).reshape(B, N, D))


class DiTBlock(nn.Module):
    """adaLN-Zero block (DiT): shift/scale/gate for attention and MLP from the frame's timestep
    embedding; DiT.initialize_weights zeroes the modulation (and the audio projection), so each
    block of a fresh DiT is the identity."""
    def __init__(self, cfg, audio):
        super().__init__()
        d = cfg.dim
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(d, cfg.heads)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(d, cfg.ffn), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn, d))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.audio = nn.Linear(d, d) if audio else None   # this block's audio projection (zero-init)

    def forward(self, x, c, a, rope, mask=None, kv=None):
        """x (B, F, N, D) tokens; c (B, F, D) timestep embedding (plus the audio's with audio_adaln);
        a (B, F, D) audio or None; kv: this block's KVSlot when streaming."""
        B, Fr, N, D = x.shape
        if self.audio is not None and a is not None:
            x = x + self.audio(a)[:, :, None, :]                                  # added to the frame's tokens
        s1, sc1, g1, s2, sc2, g2 = self.ada(c)[:, :, None, :].chunk(6, -1)      # each (B, F, 1, D)
        h = modulate(self.norm1(x), s1, sc1).reshape(B, Fr * N, D)
        x = x + g1 * self.attn(h, rope, mask, kv, N).view(B, Fr, N, D)
        x = x + g2 * self.mlp(modulate(self.norm2(x), s2, sc2))
        return x


class DiT(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p, zc = cfg.dim, cfg.patch, cfg.latent_channels
        self.patch_in = nn.Linear((zc + cfg.cond_channels) * p * p, d)
        self.t_embed = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        # the audio encoder's weights travel in the DiT's checkpoint; it runs once per video frame where
        # the features are made (frame_features), not in each of a sampler's passes
        self.audio_encoder = AudioEncoder() if cfg.audio_encoder else None     # (section 8, beside SyncNet)
        self.audio_embed = nn.Sequential(nn.Linear(cfg.audio_channels, d), nn.SiLU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList(DiTBlock(cfg, audio=(i % cfg.audio_every == 0)) for i in range(cfg.depth))
        self.norm_out = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ada_out = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.patch_out = nn.Linear(d, zc * p * p)
        self.freqs = rope_freqs(d // cfg.heads, cfg.rope_theta)     # RoPE's (t, h, w) frequencies, as Wan's self.freqs
        self.checkpointing = False     # activation checkpointing in training (set by train.py --grad-ckpt)
        self.initialize_weights()

    def initialize_weights(self):
        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        self.apply(basic)
        for b in self.blocks:                          # adaLN-Zero: every block starts as the identity
            nn.init.zeros_(b.ada[-1].weight), nn.init.zeros_(b.ada[-1].bias)
            if b.audio is not None:
                nn.init.zeros_(b.audio.weight), nn.init.zeros_(b.audio.bias)
        nn.init.zeros_(self.ada_out[-1].weight), nn.init.zeros_(self.ada_out[-1].bias)
        nn.init.zeros_(self.patch_out.weight), nn.init.zeros_(self.patch_out.bias)

    def forward(self, x, t, cond, audio, mask=None, cache=None, update_cache=False):
        """Predict the flow-matching velocity v = eps - x0.

        x (B, F, 16, h, w) noisy latent; t (B, F) per-frame timestep in [0, 1]; cond (B, F, 33, h, w)
        reference latent | mask | masked source latent; audio (B, F, A) packed audio features (zeros
        = dropped); mask: attention mask over the F N tokens, None for the config's own: none
        (bidirectional) for the teacher, block_causal_mask for a student (cfg.causal) run without
        a cache. cache: a KVCache to attend (streaming); update_cache writes this pass's keys and
        values into it (the KV refresh)."""
        B, Fr, C, H, W = x.shape
        p = self.cfg.patch
        h, w = H // p, W // p
        tok = torch.cat([x, cond], 2).view(B, Fr, -1, h, p, w, p)
        tok = tok.permute(0, 1, 3, 5, 2, 4, 6).reshape(B, Fr, h * w, -1)              # (B, F, N, (C + cond) p p)
        tok = self.patch_in(tok)                                                      # (B, F, N, D)
        if mask is None and cache is None and self.cfg.causal:
            mask = block_causal_mask(Fr, h * w, self.cfg.chunk, x.device)              # (F N, F N)
        # the residual stream stays in (at least) fp32 under bf16 autocast, as Wan's does: only the
        # blocks' matrix products run in bf16, and 30 blocks add into it without bf16 rounding
        tok = tok.to(torch.promote_types(tok.dtype, torch.float32))
        c = self.t_embed(timestep_embedding(t, 256).to(tok.dtype))                    # (B, F, D)
        a = self.audio_embed(audio)                                                   # (B, F, D)
        cb = c + a if self.cfg.audio_adaln else c                                     # the blocks' modulation input
        past = cache.cached_frames if cache is not None else 0
        if self.freqs[0].device != x.device:        # moved once, as Wan moves its self.freqs: not copied
            self.freqs = tuple(f.to(x.device) for f in self.freqs)    # from the host (a sync) every pass
        angles = rope_angles(self.freqs, torch.arange(past + Fr, device=x.device), h, w)   # ((P+F) N, Dh/2)
        rope = rope_factors(angles, torch.promote_types(tok.dtype, torch.float32))         # (2, (P+F) N, Dh)
        if cache is not None:
            cache.update = update_cache
        for i, blk in enumerate(self.blocks):
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                # keep only each block's input; backward runs the block again. Not with a cache: by
                # the time backward runs, later chunks have rewritten it
                tok = torch.utils.checkpoint.checkpoint(blk, tok, cb, a, rope, mask, use_reentrant=False)
            else:
                tok = blk(tok, cb, a, rope, mask, None if cache is None else cache.layers[i])
        if cache is not None and update_cache:
            cache.frames += Fr
            cache.update = False
        with torch.autocast(tok.device.type, enabled=False):     # the output layer in fp32, as Wan's head:
            shift, scale = self.ada_out(c.to(tok.dtype))[:, :, None, :].chunk(2, -1)   # CFG amplifies its rounding
            out = self.patch_out(modulate(self.norm_out(tok), shift, scale))          # (B, F, N, C p p)
        out = out.view(B, Fr, h, w, C, p, p).permute(0, 1, 4, 2, 5, 3, 6)
        return out.reshape(B, Fr, C, H, W)


def compile_blocks(model, **options):
    """torch.compile a DiT's blocks in place (regional compilation). The blocks share one code, so
    compiling costs about one block's worth however deep the model is, where compiling the whole
    model traces every block again, and again for each cache size a stream passes through. The
    rest of the forward (patches, embeddings, RoPE factors) stays eager; parameter names do not
    change. options go to torch.compile (mode, backend). Returns the model.
    A stream compiles the block 6 times (cache empty or not, refresh pass or not, then dynamic
    shapes) and a bidirectional pass once more, close to dynamo's default limit of 8 per code,
    past which the rest would run eagerly; the limit is raised so that cannot happen unseen."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    for blk in model.blocks:
        blk.compile(**options)
    return model


# -----------------------------------------------------------------------------
# 6. flow matching (rectified flow, v-prediction) and the teacher's sampler

SHIFT = 5.0              # timestep shift, Wan's default for this resolution class
ODE_STEPS = 50           # the teacher's ODE
CFG_SCALE = 4.5          # the teacher's guidance scale
TEACHER_LATENT = 9       # the teacher generates windows of 9 latent frames (33 video frames), as it trains,
TEACHER_HOP = FRAMES_PER_LATENT * (TEACHER_LATENT - 1)   # stitched with a 32-frame hop (consecutive windows share a frame)


def shift_t(t, shift=SHIFT):
    """t' = s t / (1 + (s - 1) t): spends more of the schedule at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def ode_t(j, steps=ODE_STEPS, shift=SHIFT):
    """Time of ODE step j of the teacher's Euler solver: t_j = shift(1 - j / steps)."""
    return shift_t(1 - j / steps, shift)


def add_noise(x0, eps, t):
    """x_t = (1 - t) x0 + t eps with per-frame t (B, F)."""
    t = t[..., None, None, None]
    return (1 - t) * x0 + t * eps


def flow_matching_loss(v, x0, eps, mouth_weight=None):
    """The v-prediction loss per sample (B,): the squared error of v against eps - x0, averaged
    over (F, C, h, w), plus mouth_weight (None or 0: none) times the same average over the mouth
    box (MOUTH_BOX on the latent grid). Positive per-pixel weights leave the loss's minimiser, the true velocity,
    where it is; they move where a model too small to reach it spends its capacity."""
    err = (v.float() - (eps - x0)).pow(2)                                     # (B, F, C, h, w)
    loss = err.mean((1, 2, 3, 4))
    return loss + mouth_weight * mouth_crop(err).mean((1, 2, 3, 4)) if mouth_weight else loss


def drop_conditions(cond, audio, drop, mode):
    """CFG dropout / the negative condition. drop (B,) bool: those samples lose their audio
    (zero features) and, in mode "all", their spatial conditions too."""
    keep = (~drop).float()
    audio = audio * keep[:, None, None]
    if mode == "all":
        cond = cond * keep[:, None, None, None, None]
    return cond, audio


def guided_velocity(model, x, t, cond, audio, scale, mode="audio", **kw):
    """Classifier-free guidance: v = v_uncond + scale (v_cond - v_uncond), both in one batch."""
    B = len(x)
    drop = torch.arange(2 * B, device=x.device) >= B                          # the second half drops
    c2, a2 = drop_conditions(cond.repeat(2, 1, 1, 1, 1), audio.repeat(2, 1, 1), drop, mode)
    v = model(x.repeat(2, 1, 1, 1, 1), t.repeat(2, 1), c2, a2, **kw)
    v_cond, v_uncond = v.chunk(2)
    return v_uncond + scale * (v_cond - v_uncond)


def velocity(model, x, t, cond, audio, scale=1.0, mode="audio", **kw):
    """The velocity a sampler uses at guidance `scale` (one float, or one per sample (B,)): the
    conditional prediction alone (one pass) where every scale is 1, else guided_velocity."""
    if (torch.as_tensor(scale) == 1).all():
        return model(x, t, cond, audio, **kw)
    if torch.is_tensor(scale):
        scale = scale.to(x.device, torch.float32).view(-1, 1, 1, 1, 1)            # one per sample
    return guided_velocity(model, x, t, cond, audio, scale, mode, **kw)


@torch.inference_mode()
def ode_trajectory(model, cond, audio, noise, steps=ODE_STEPS, cfg=CFG_SCALE, cfg_schedule=None, mode="audio"):
    """The teacher's Euler sampler from pure noise, step by step: yields (j, t_j, x_tj, v_j) at
    t_j = shift(1 - j/steps), before the step x <- x + (t_{j+1} - t_j) v. x_tj - t_j v_j is the x0
    prediction at step j; at the last step (t_{steps} = 0) it is the sample itself.

    cfg: the guidance scale (1 = no CFG); cfg_schedule(j) -> scale overrides it per step, so
    windowed guidance (e.g. only for ODE steps 20..40) can be run."""
    x = noise
    B, Fr = x.shape[:2]
    for j in range(steps):
        t, t_next = ode_t(j, steps), ode_t(j + 1, steps)
        s = cfg_schedule(j) if cfg_schedule is not None else cfg
        v = velocity(model, x, torch.full((B, Fr), t, device=x.device), cond, audio, s, mode)
        yield j, t, x, v
        x = x + (t_next - t) * v


@torch.inference_mode()
def sample_ode(model, cond, audio, noise, steps=ODE_STEPS, cfg=CFG_SCALE, cfg_schedule=None, mode="audio"):
    """The teacher's 50-step Euler sampler (ode_trajectory run to the end): the sample at t = 0."""
    *_, (j, t, x, v) = ode_trajectory(model, cond, audio, noise, steps, cfg, cfg_schedule, mode)
    return x + (ode_t(steps, steps) - t) * v


# The student's two-step schedule: t = 0.999 (just below ODE step 0, t = 1) and 0.769 (step 30 of 50,
# the landing step the paper's trajectory analysis chose: analyze.py reruns it).
LANDING_STEP = 30
STUDENT_STEPS = (0.999, ode_t(LANDING_STEP))


@torch.no_grad()
def kv_refresh(model, x0, cond, audio, cache):
    """The KV refresh: the model run once more on a chunk's clean latents x0 (B, F, 16, h, w) at
    t = 0, writing their keys and values into `cache`, so the next chunk attends a clean past.
    No gradient. The stream, the Self-Forcing rollout and Diffusion Forcing all refresh this way."""
    model(x0, torch.zeros(x0.shape[:2], device=x0.device), cond, audio, cache=cache, update_cache=True)


def sample_chunk(model, cond, audio, noises, cache=None, steps=STUDENT_STEPS, grad=False, refresh=True):
    """One chunk of the student's few-step sampler, no CFG: predict x0 from pure noise at steps[0],
    re-noise the prediction to steps[1] with fresh noise, predict x0 again, and so on. With a
    cache, a last pass on the clean output at t = 0 writes the chunk's keys and values into it
    (kv_refresh), so the next chunk attends a clean past. refresh=False leaves it out, for a last
    chunk whose cache nothing reads after it (a training rollout's).

    grad=True (Self-Forcing's rollout): the last step runs with gradient; the earlier steps and the
    KV refresh never do, so no gradient crosses steps or chunks.
    cond (B, F, 33, h, w), audio (B, F, A), noises (len(steps), B, F, 16, h, w) -> x0 (B, F, 16, h, w)."""
    B, Fr = noises.shape[1:3]
    x0 = None
    for i, t in enumerate(steps):
        tt = torch.full((B, Fr), t, device=noises.device)
        x = noises[0] if x0 is None else add_noise(x0, noises[i], tt)
        with torch.set_grad_enabled(grad and i == len(steps) - 1):
            x0 = x - t * model(x, tt, cond, audio, cache=cache)
    if cache is not None and refresh:
        kv_refresh(model, x0, cond, audio, cache)
    return x0


# -----------------------------------------------------------------------------
# 7. conditioning: latents, lower-face mask, packed audio

MEL_MEAN, MEL_STD = -4.0, 4.0     # log-mel normalisation; dropped (CFG-negative) audio is exactly 0


def lower_face_mask(H, W, device=None):
    """1 over the lower half of a face crop (the region the model regenerates), 0 above: (H, W)."""
    m = torch.zeros(H, W, device=device)
    m[H // 2:] = 1
    return m


def frame_features(audio, v0, v1, offset=0, encoder=None):
    """Normalised log-mel of video frames v0 .. v1-1: (v1 - v0, 160), 4 mel frames per row; with an
    AudioEncoder, its embedding of each frame's window instead: (v1 - v0, embed).
    `audio` holds the waveform from sample `offset` on; samples outside it are silence. A frame's
    mel windows reach 120 samples into its neighbours, so one frame of margin on each side makes
    any range equal to the same rows of the whole clip (a stream computes them piece by piece)."""
    if encoder is not None:
        return encoder(frame_features(audio, v0 - encoder.reach, v1 + encoder.reach, offset))
    a = torch.as_tensor(audio).float()
    s0, s1 = (v0 - 1) * SAMPLES_PER_FRAME, (v1 + 1) * SAMPLES_PER_FRAME
    x = torch.zeros(s1 - s0)
    lo, hi = max(s0, offset), min(s1, offset + len(a))
    if hi > lo:
        x[lo - s0:hi - s0] = a[lo - offset:hi - offset]
    mel = (log_mel(x) - MEL_MEAN) / MEL_STD                             # (4 (v1 - v0 + 2), N_MELS)
    return mel[MELS_PER_FRAME:-MELS_PER_FRAME].reshape(v1 - v0, MELS_PER_FRAME * N_MELS)


def audio_frame_features(audio, context, encoder=None):
    """A whole clip's features, padded for packing: (T * 640,) -> (T + 3 + 2c, 160 or embed). Row i
    holds video frame i - 3 - c; frames before the clip and after its end are silence."""
    T = -(-len(audio) // SAMPLES_PER_FRAME)
    return frame_features(audio, -3 - context, T + context, encoder=encoder)


def audio_lookahead(reach):
    """Audio samples past a frame's end that its features need: `reach` frames (DiTConfig.audio_reach),
    plus the 120 samples a mel window reaches into the next frame. What a stream waits for."""
    return reach * SAMPLES_PER_FRAME + (MEL_WIN - MEL_HOP) // 2


def pack_audio(feats, start, n_latent, context):
    """Audio of latent frames 0..n_latent-1 of a window starting at video frame `start`: latent f
    covers video frames start + 4f - 3 .. start + 4f (its 4 frames; the first latent frame's 3
    before the window are real past audio or silence) plus `context` frames either side.
    Returns (n_latent, (4 + 2c) * 160)."""
    width = FRAMES_PER_LATENT + 2 * context
    idx = start + FRAMES_PER_LATENT * torch.arange(n_latent)[:, None] + torch.arange(width)  # (F, 4 + 2c)
    return feats[idx].flatten(1)


@dataclass
class EncodedClip:
    """A clip in latent space, computed once so training never runs the encoder. Windows start and
    references sit on the 4-frame grid: single[m] = latent of frame 4m alone (a window's first
    latent frame, or a reference), groups[j] = latent of frames 4j+1 .. 4j+4; m_* the same for
    the lower-face-masked frames; feats = audio_frame_features of the driving audio."""
    single: torch.Tensor
    groups: torch.Tensor
    m_single: torch.Tensor
    m_groups: torch.Tensor
    feats: torch.Tensor

    @property
    def n_frames(self):
        return 1 + FRAMES_PER_LATENT * len(self.groups)


@torch.no_grad()
def encode_clip(ae, frames, audio, context, batch=64, encoder=None):
    """frames uint8 (T, H, W, 3), audio (T * 640,) -> EncodedClip (the first 1 + 4 ((T - 1) // 4) frames;
    audio features by the DiT's AudioEncoder, if it has one).
    At most `batch` single frames or 4-frame groups go through the encoder at once, so a long clip
    at a large size needs no more memory than a 10 s one."""
    dev = next(ae.parameters()).device
    x = frames_to_tensor(frames)                                                   # (T, 3, H, W)
    masked = x * (1 - lower_face_mask(*x.shape[-2:]))
    tf = FRAMES_PER_LATENT
    G = (len(x) - 1) // tf

    def enc(v):
        grid = v[:1 + tf * G:tf, None]                                             # (G + 1, 1, 3, H, W)
        single = torch.cat([ae.encode(grid[i:i + batch].to(dev))[:, 0] for i in range(0, len(grid), batch)])
        groups = torch.cat([ae.encode_groups(v[None, 1 + tf * i:1 + tf * min(G, i + batch)].to(dev))[0]
                            for i in range(0, max(G, 1), batch)])                   # (G, 16, h, w)
        return single.cpu(), groups.cpu()

    (s, g), (ms, mg) = enc(x), enc(masked)
    return EncodedClip(s, g, ms, mg, audio_frame_features(audio, context, encoder))


def encode_pool(ae, clips, context, cache_dir=None, progress=True, desc="encoding the training clips", encoder=None):
    """encode_clip of every clip, cached on disk. The cache file is named by a hash of the
    autoencoder's weights and config, the audio context, the AudioEncoder's weights (if any) and
    every clip's frames and audio, so it is found only for exactly this input (SynthTalk or a
    folder of real clips) and a retrained autoencoder never reads stale latents. The code that encodes is not in the name: a cache is used only when
    its first clip equals (within 1%) that clip encoded afresh, so a changed mask, condition or audio feature
    (a fork's) encodes the pool again. The DiT stages all train on one pool: only the first encodes it."""
    from safetensors.torch import load_file, save_file
    from tqdm import tqdm
    h = hashlib.sha1(f"{context} {ae.cfg}".encode())      # the config holds the latent statistics
    for v in [*ae.state_dict().values(), *(encoder.state_dict().values() if encoder is not None else [])]:
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    for c in clips:
        h.update(np.ascontiguousarray(c.frames).tobytes()), h.update(np.ascontiguousarray(c.audio).tobytes())
    path = cache_path(f"encoded-{h.hexdigest()[:16]}.safetensors", cache_dir)
    names = [f.name for f in fields(EncodedClip)]
    if os.path.isfile(path):
        t = load_file(path)
        first = encode_clip(ae, clips[0].frames, clips[0].audio, context, encoder=encoder)
        cached = [t.get(f"0.{k}") for k in names]
        # within 1% (relative norm): another device or TF32 convolutions differ by less, other code by more
        if all(c is not None and c.shape == getattr(first, k).shape and (c - getattr(first, k)).norm() <= 0.01 * c.norm()
               for c, k in zip(cached, names)):
            return [EncodedClip(*(t[f"{i}.{k}"] for k in names)) for i in range(len(clips))]
        print(f"{path} holds latents of other encoding code; encoding the clips again")
    encoded = [encode_clip(ae, c.frames, c.audio, context, encoder=encoder)
               for c in tqdm(clips, desc=desc, disable=not progress)]
    with atomic_path(path) as tmp:
        save_file({f"{i}.{k}": getattr(e, k).contiguous() for i, e in enumerate(encoded) for k in names}, tmp)
    return encoded


def latent_window(enc, start, n_latent, ref, context):
    """The teacher's inputs for the window of 1 + 4(n_latent - 1) frames at video frame `start`
    with reference frame `ref` (both multiples of 4): x0 (F, 16, h, w), cond (F, 33, h, w), audio (F, A)."""
    tf = FRAMES_PER_LATENT
    assert start % tf == 0 and ref % tf == 0, "windows and references sit on the 4-frame grid of the latents"
    m = start // tf
    x0 = torch.cat([enc.single[m:m + 1], enc.groups[m:m + n_latent - 1]])
    src = torch.cat([enc.m_single[m:m + 1], enc.m_groups[m:m + n_latent - 1]])
    h, w = x0.shape[-2:]
    mask = lower_face_mask(h, w).expand(n_latent, 1, h, w)
    cond = torch.cat([enc.single[ref // tf].expand(n_latent, -1, -1, -1), mask, src], 1)
    return x0, cond, pack_audio(enc.feats, start, n_latent, context)


# -----------------------------------------------------------------------------
# 8. SyncNet ("Out of time", Chung & Zisserman 2016), the sync metrics, and MouthNet
#
# The metric's algorithm is syncnet_python's (sync_scores). The network reads the 40-band log-mel
# of section 2 (centred 25 ms windows, 4 per video frame), as the DiT does, but without the DiT's
# MEL_MEAN / MEL_STD normalisation; the published SyncNet reads 13 MFCCs of uncentred windows. Its
# Sync-C is on its own scale: compare it to the ground truth's (x GT), not to published numbers.


def lower_face(x, size=(32, 64)):
    """The lower half of face crops (..., 3, H, W) resized (area) to `size` -> (..., 3, h, w)."""
    lead, (C, H, W) = x.shape[:-3], x.shape[-3:]
    y = x[..., H // 2:, :].reshape(-1, C, H - H // 2, W)
    if tuple(y.shape[-2:]) != tuple(size):
        y = F.interpolate(y, size=size, mode="area")
    return y.reshape(*lead, C, *size)


def conv_bn(cin, cout, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


@dataclass
class SyncNetConfig:
    frames: int = 5           # video frames per window (and 4 * 5 = 20 mel frames of audio)
    crop_h: int = 32          # lower-face crop fed to the visual stream
    crop_w: int = 64
    width: int = 16
    embed: int = 128
    margin: float = 10.0      # contrastive loss: off-sync pairs pushed at least this far apart
    role: str = "eval"        # "reward" (optimised against) or "eval" (only reports numbers)
    seed: int = 0


class SyncNet(nn.Module):
    """Two streams into one embedding space: 5 frames of the lower face and the matching 20 mel
    frames (200 ms) of audio. In-sync pairs are close in Euclidean distance, off-sync pairs far."""
    def __init__(self, cfg: SyncNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.visual = nn.Sequential(                                 # (B, 15, 32, 64)
            conv_bn(3 * cfg.frames, 2 * w), conv_bn(2 * w, 2 * w, 2),  # (B, 32, 16, 32)
            conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w, 2),         # (B, 64, 8, 16)
            conv_bn(4 * w, 8 * w, 2), conv_bn(8 * w, 8 * w, 2),      # (B, 128, 2, 4)
            nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten(),
            nn.Linear(8 * w * 8, 256), nn.ReLU(), nn.Linear(256, cfg.embed))
        self.audio = nn.Sequential(                                  # (B, 1, 40, 20)
            conv_bn(1, 2 * w), conv_bn(2 * w, 4 * w, 2),             # (B, 64, 20, 10)
            conv_bn(4 * w, 4 * w), conv_bn(4 * w, 8 * w, 2),         # (B, 128, 10, 5)
            conv_bn(8 * w, 8 * w, 2),                                # (B, 128, 5, 3)
            nn.AdaptiveAvgPool2d((2, 2)), nn.Flatten(),
            nn.Linear(8 * w * 4, 256), nn.ReLU(), nn.Linear(256, cfg.embed))

    def embed_video(self, x):
        """x (B, 5, 3, H, W) in [-1, 1] -> (B, embed)."""
        x = lower_face(x, (self.cfg.crop_h, self.cfg.crop_w))
        return self.visual(x.flatten(1, 2))

    def embed_audio(self, mel):
        """mel (B, 20, N_MELS) -> (B, embed)."""
        return self.audio(mel.transpose(1, 2)[:, None])


AUDIO_EMBED_STD = 1.5     # spread of the reward SyncNet's audio embeddings on SynthTalk: AudioEncoder's output at unit scale


class AudioEncoder(nn.Module):
    """The DiT's frozen audio encoder (DiTConfig.audio_encoder), this world's wav2vec2: a video
    frame's feature is the reward SyncNet's audio embedding of the 5-frame window (20 mel frames)
    centred on it, `reach` frames either side. The weights are buffers, copied from the reward
    SyncNet when a teacher starts (load_syncnet_audio) and saved with the DiT: no optimiser,
    requires_grad_ or train() reaches them, and it always runs as evaluated (BatchNorm's running
    statistics)."""
    reach = (SyncNetConfig.frames - 1) // 2

    def __init__(self):
        super().__init__()
        tower = SyncNet(SyncNetConfig()).audio.eval().requires_grad_(False)
        self.names = {k: k.replace(".", "_") for k in tower.state_dict()}   # the tower's names -> buffer names
        for k, v in tower.state_dict().items():
            self.register_buffer(self.names[k], v.clone())
        self.tower = [tower]      # in a list, not a submodule: its weights are the buffers above

    def load_syncnet_audio(self, net):
        """Copy a SyncNet's audio stream (SyncNetConfig's default shape) into the buffers."""
        for k, v in net.audio.state_dict().items():
            getattr(self, self.names[k]).copy_(v)

    @torch.no_grad()
    def forward(self, mel, batch=1024):
        """mel (n + 4, 160) frame_features rows -> (n, embed): the frames with a whole window."""
        weights = {k: getattr(self, b) for k, b in self.names.items()}
        dev = next(iter(weights.values())).device
        mel = (mel.to(dev) * MEL_STD + MEL_MEAN).view(len(mel), MELS_PER_FRAME, N_MELS)   # unnormalised, as SyncNet reads it
        win = mel.unfold(0, SyncNetConfig.frames, 1).permute(0, 3, 1, 2)                  # (n, 5, 4, 40)
        x = win.reshape(len(win), 1, -1, N_MELS).transpose(2, 3)                         # (n, 1, 40, 20)
        out = [torch.func.functional_call(self.tower[0], weights, (x[i:i + batch],)) for i in range(0, len(x), batch)]
        return (torch.cat(out) / AUDIO_EMBED_STD).float().cpu() if out else torch.zeros(0, SyncNetConfig.embed)


def contrastive_loss(d, same, margin, weight=None):
    """Chung & Zisserman's loss on Euclidean distances d: same * d^2 + (1 - same) * max(margin - d, 0)^2,
    halved and averaged (weighted by `weight` if given)."""
    per_pair = same * d ** 2 + (1 - same) * F.relu(margin - d) ** 2
    w = torch.ones_like(d) if weight is None else weight
    return (w * per_pair).sum() / w.sum() / 2


def pairwise_dist(v, a, eps=1e-8):
    """Euclidean distances between every row of v (B, D) and of a (B', D) -> (B, B')."""
    return ((v[:, None, :] - a[None, :, :]) ** 2).sum(-1).add(eps).sqrt()


@torch.no_grad()
def sync_embeddings(net, frames, audio, batch=256):
    """Embed every 5-frame window of a clip and its audio window, as syncnet_python does: windows
    start at frames 0 .. T - 6 (T - 5 windows; the last possible start is left out there too).
    frames (T, 3, H, W) in [-1, 1], audio (T * 640,). Returns (v_emb, a_emb), each (T - 5, D).
    In fp32 whatever the caller's autocast (bf16 on a GPU): the metric is the same on every device."""
    n = net.cfg.frames
    dev = next(net.parameters()).device
    T = min(len(frames), len(audio) // SAMPLES_PER_FRAME)
    if T <= n:
        raise ValueError(f"Sync-C needs more than {n} frames with their audio; this clip has {T}")
    v_emb, a_emb = [], []
    with torch.autocast(dev.type, enabled=False):
        mel = log_mel(torch.as_tensor(audio[:T * SAMPLES_PER_FRAME]).to(dev))   # (4T, N_MELS)
        for s in range(0, T - n, batch):
            idx = torch.arange(s, min(T - n, s + batch))
            win = idx[:, None] + torch.arange(n)                                  # (b, 5)
            v_emb.append(net.embed_video(frames[win].to(dev).float()))
            mwin = idx[:, None] * MELS_PER_FRAME + torch.arange(n * MELS_PER_FRAME)   # (b, 20)
            a_emb.append(net.embed_audio(mel[mwin.to(dev)]))
    return torch.cat(v_emb), torch.cat(a_emb)


def sync_scores(v_emb, a_emb, vshift=15):
    """(av_offset, Sync-D, Sync-C) exactly as syncnet_python's evaluation computes them.

    The audio embeddings are zero-padded by vshift on both sides; for each offset k in
    -vshift..vshift, D_k is the mean over windows t of ||v_t - a_{t+k}||. Sync-D (LSE-D) is
    min_k D_k, Sync-C (LSE-C) is median_k D_k - min_k D_k, and the AV offset is vshift - argmin."""
    win = 2 * vshift + 1
    a_pad = F.pad(a_emb, (0, 0, vshift, vshift))                                 # (N + 2 vshift, D)
    idx = torch.arange(len(v_emb))[:, None] + torch.arange(win)                  # (N, win)
    dists = F.pairwise_distance(v_emb[:, None, :].expand(-1, win, -1), a_pad[idx], eps=1e-6)
    mdist = dists.mean(0)                                                        # (win,)
    minval, minidx = torch.min(mdist, 0)
    return int(vshift - minidx), float(minval), float(torch.median(mdist) - minval)


def evaluate_sync(net, videos, audios, vshift=15):
    """Mean Sync-C / Sync-D over clips, plus the per-clip AV offsets. videos: list of (T, 3, H, W)
    tensors in [-1, 1] (or uint8 (T, H, W, 3) arrays); audios: list of (T * 640,) arrays."""
    offsets, dists, confs = [], [], []
    for v, a in zip(videos, audios):
        if isinstance(v, np.ndarray):
            v = frames_to_tensor(v)
        off, d, c = sync_scores(*sync_embeddings(net, v, a), vshift=vshift)
        offsets.append(off), dists.append(d), confs.append(c)
    return {"sync_c": float(np.mean(confs)), "sync_d": float(np.mean(dists)), "offsets": offsets}


def ssim(a, b, window=7, sigma=1.5):
    """Mean SSIM (Wang et al. 2004, Gaussian window, per channel) of uint8 images (..., H, W, 3)."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1, *a.shape[-3:]).movedim(-1, 1)
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).reshape(-1, *b.shape[-3:]).movedim(-1, 1)
    g = torch.exp(-0.5 * ((torch.arange(window, dtype=torch.float64) - window // 2) / sigma) ** 2)
    g = (g[:, None] * g[None, :] / g.sum() ** 2).expand(x.shape[1], 1, window, window)
    blur = lambda z: F.conv2d(z, g, groups=x.shape[1])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx ** 2, blur(y * y) - my ** 2, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())


@dataclass
class MouthNetConfig:
    crop_h: int = 32
    crop_w: int = 64
    width: int = 16
    n_params: int = 3         # (open, width, teeth)
    seed: int = 0


class MouthNet(nn.Module):
    """Regresses the mouth parameters from one frame's lower face. Trained on ground-truth frames
    only, it gives a mouth-shape metric that does not depend on SyncNet: MouthErr is its mean
    absolute error against the true trajectory of the *driving* audio."""
    def __init__(self, cfg: MouthNetConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.net = nn.Sequential(
            conv_bn(3, 2 * w), conv_bn(2 * w, 2 * w, 2), conv_bn(2 * w, 4 * w), conv_bn(4 * w, 4 * w, 2),
            conv_bn(4 * w, 8 * w, 2), nn.AdaptiveAvgPool2d((2, 4)), nn.Flatten(),
            nn.Linear(8 * w * 8, 128), nn.ReLU(), nn.Linear(128, cfg.n_params))

    def forward(self, x):
        """x (B, 3, H, W) in [-1, 1] -> (B, 3)."""
        return self.net(lower_face(x, (self.cfg.crop_h, self.cfg.crop_w)))


@torch.no_grad()
def mouth_error(net, frames, mouth, batch=512):
    """MouthErr of frames (T, 3, H, W) (or uint8 (T, H, W, 3)) against the true mouth (T, 3)."""
    if isinstance(frames, np.ndarray):
        frames = frames_to_tensor(frames)
    dev = next(net.parameters()).device
    pred = torch.cat([net(frames[s:s + batch].to(dev)).cpu() for s in range(0, len(frames), batch)])
    return float((pred - torch.as_tensor(mouth[:len(pred)])).abs().mean())


# -----------------------------------------------------------------------------
# 9. SynthTalk: a procedural talking-face corpus whose audio alone drives the mouth
#
# Speech is made from an articulatory trajectory: three mouth parameters per instant,
#   open  (jaw / lip opening, 0 closed .. 1 wide)     <-> first formant F1
#   width (0 rounded .. 1 spread)                      <-> second formant F2
#   teeth (0 hidden .. 1 showing)                      <-> fricative noise, spread vowels
# The audio is synthesised *from* that trajectory (formants from the articulators, voicing,
# fricative noise, stop bursts, silence), and the mouth is drawn from the same trajectory. Head
# motion, blinks and identity are drawn independently of the speech, so the only way a model can
# get the mouth right is to listen.

SPLITS = {"train": 1, "test": 2}
TEST_CLIPS, TEST_SECONDS = 33, 10.0      # the fixed test split, as HDTF's 33 test clips
CTRL_RATE = 200                          # Hz, articulatory control rate (5 ms)
MOUTH_REST = (0.0, 0.4, 0.0)             # (open, width, teeth) with the lips closed at rest

# phone -> (open, width, teeth, weight). weight is how firmly the articulators reach the target:
# bilabials must close the lips, weak consonants (t, d, k, n, l) just follow their neighbours.
VOWELS = {"a": (1.0, 0.45, 0.5), "e": (0.6, 0.75, 0.7), "i": (0.12, 1.0, 0.8), "o": (0.6, 0.2, 0.2),
          "u": (0.12, 0.0, 0.0), "ae": (0.85, 0.85, 0.7), "uh": (0.7, 0.5, 0.4)}
CONSONANTS = {  # kind, (open, width, teeth), weight
    "p": ("stop", (0.0, 0.4, 0.0), 6.0), "b": ("voiced_stop", (0.0, 0.4, 0.0), 6.0),
    "m": ("nasal", (0.0, 0.4, 0.0), 6.0),
    "f": ("fricative", (0.05, 0.45, 0.9), 3.0), "s": ("fricative", (0.1, 0.75, 1.0), 3.0),
    "sh": ("fricative", (0.15, 0.15, 0.8), 3.0),
    "t": ("stop", (0.3, 0.5, 0.5), 0.05), "k": ("stop", (0.3, 0.5, 0.5), 0.05),
    "d": ("voiced_stop", (0.3, 0.5, 0.5), 0.05), "n": ("nasal", (0.3, 0.5, 0.5), 0.05),
    "l": ("approximant", (0.3, 0.5, 0.5), 0.05)}
NOISE_BANDS = {"f": (1500, 7000, 0.12), "s": (4500, 7800, 0.35), "sh": (2000, 4500, 0.3),
               "burst": (500, 7000, 0.3)}  # (low Hz, high Hz, amplitude)


def synth_identity(rng):
    """Draw a speaker: face geometry, colours, hair, eyes, brows, lips, background, and voice.
    All continuous, so every seed is a distinct identity."""
    u = lambda a, b: float(rng.uniform(a, b))
    tone = u(0, 1)  # skin from light to dark, with a little hue jitter
    skin = np.array([0.96, 0.80, 0.68]) * (1 - tone) + np.array([0.36, 0.23, 0.16]) * tone
    skin = np.clip(skin + rng.normal(0, 0.025, 3), 0, 1)
    hair_base = [(0.08, 0.06, 0.05), (0.35, 0.22, 0.12), (0.80, 0.65, 0.35), (0.55, 0.25, 0.10),
                 (0.60, 0.60, 0.60)][rng.integers(5)]
    iris = [(0.25, 0.45, 0.70), (0.30, 0.50, 0.25), (0.35, 0.20, 0.10)][rng.integers(3)]
    return dict(
        face_w=u(0.24, 0.31), face_h=u(0.31, 0.38), jaw=u(0.8, 1.0), skin=skin,
        hair=np.clip(np.array(hair_base) + rng.normal(0, 0.04, 3), 0, 1),
        hair_len=u(0.0, 0.35), hairline=u(-0.22, -0.14), hair_volume=u(1.0, 1.15),
        eye_sep=u(0.085, 0.115), eye_y=u(-0.08, -0.03), eye_size=u(0.8, 1.2),
        iris=np.clip(np.array(iris) + rng.normal(0, 0.04, 3), 0, 1),
        brow_thick=u(0.6, 1.5), brow_tilt=u(-0.25, 0.25), brow_gap=u(0.045, 0.07),
        lips=np.clip(skin * np.array([0.85, 0.5, 0.5]) + np.array([0.12, 0, 0.02]) + rng.normal(0, 0.03, 3), 0, 1),
        mouth_w=u(0.085, 0.115), mouth_y=u(0.15, 0.19), lip_th=u(0.016, 0.026),
        nose_len=u(0.04, 0.08),
        bg_top=rng.uniform(0.1, 0.9, 3), bg_bottom=rng.uniform(0.1, 0.9, 3),
        cloth=rng.uniform(0.05, 0.9, 3),
        f0=u(85, 240), tract=u(0.85, 1.2), rate=u(0.8, 1.25))


def synth_phones(rng, seconds, rate):
    """Random speech-like phone sequence: [(phone, duration_s)], words of CV / CVC syllables
    separated by pauses, filling `seconds`."""
    vowels, cons = list(VOWELS), list(CONSONANTS)
    seq, t = [("pause", rng.uniform(0.1, 0.4))], 0.0
    t += seq[0][1]
    while t < seconds:
        for _ in range(rng.integers(1, 4)):                       # syllables in a word
            onset = rng.random() < 0.8
            parts = [rng.choice(cons)] if onset else []
            parts += [rng.choice(vowels)]
            if rng.random() < 0.3:
                parts += [rng.choice(cons)]
            for ph in parts:
                if ph in VOWELS:
                    d = rng.uniform(0.08, 0.22)
                elif CONSONANTS[ph][0] == "fricative":
                    d = rng.uniform(0.07, 0.14)
                else:
                    d = rng.uniform(0.05, 0.10)
                seq.append((ph, d / rate))
                t += d / rate
        if rng.random() < 0.25:
            d = rng.uniform(0.12, 0.5)
            seq.append(("pause", d))
            t += d
    return seq


def _gauss_smooth(x, sigma):
    """Gaussian smoothing along axis 0 with edge padding; sigma in samples."""
    r = int(3 * sigma) + 1
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    xp = np.pad(x, [(r, r)] + [(0, 0)] * (x.ndim - 1), mode="edge")
    return np.apply_along_axis(lambda c: np.convolve(c, k, mode="valid"), 0, xp)


def synth_speech(rng, voice, n_frames):
    """Speech for `n_frames` video frames from a voice (f0, tract, rate).

    Returns (audio (n_frames * 640,) float32, mouth (n_frames, 3) float32): the mouth parameters
    (open, width, teeth) at each video frame's centre, sampled from the same articulatory
    trajectory that made the audio (offset 0)."""
    seconds = n_frames / FPS
    n_ctrl = int(math.ceil(seconds * CTRL_RATE)) + 1
    target = np.tile(np.array(MOUTH_REST, np.float32), (n_ctrl, 1))
    weight = np.full(n_ctrl, 2.0, np.float32)             # pauses hold the mouth at rest
    voicing = np.zeros(n_ctrl, np.float32)                 # glottal source amplitude
    noise = {k: np.zeros(n_ctrl, np.float32) for k in NOISE_BANDS}
    t = 0.0
    for ph, d in synth_phones(rng, seconds + 0.5, voice["rate"]):
        a, b = int(t * CTRL_RATE), min(int((t + d) * CTRL_RATE), n_ctrl)
        t += d
        if a >= n_ctrl:
            break
        if ph == "pause":
            continue
        if ph in VOWELS:
            target[a:b], weight[a:b], voicing[a:b] = VOWELS[ph], 1.0, 1.0
            continue
        kind, tgt, w = CONSONANTS[ph]
        target[a:b], weight[a:b] = tgt, w
        release = max(a, b - 2)                            # last 10 ms of a stop: the burst
        if kind == "stop":
            noise["burst"][release:b] = 1.0
        elif kind == "voiced_stop":
            voicing[a:b], noise["burst"][release:b] = 0.15, 0.6
        elif kind == "nasal":
            voicing[a:b] = 0.35
        elif kind == "approximant":
            voicing[a:b] = 0.6
        else:
            noise[ph][a:b] = 1.0
            voicing[a:b] = 0.1 * (ph == "f")
    # coarticulation: weighted Gaussian smoothing, so firm targets (closures) are reached and weak
    # ones are pulled towards their neighbours
    sigma = 0.022 * CTRL_RATE
    art = _gauss_smooth(target * weight[:, None], sigma) / _gauss_smooth(weight[:, None], sigma)
    voicing = _gauss_smooth(voicing, 0.006 * CTRL_RATE)
    noise = {k: _gauss_smooth(v, 0.004 * CTRL_RATE) for k, v in noise.items()}

    # voiced part: harmonics of f0 shaped by formants that follow the articulators
    n = n_frames * SAMPLES_PER_FRAME
    ts = np.arange(n) / SAMPLE_RATE
    tc = np.arange(n_ctrl) / CTRL_RATE
    slow = _gauss_smooth(rng.normal(0, 1, n_ctrl), 0.25 * CTRL_RATE) * 6
    f0c = voice["f0"] * np.exp(0.08 * slow - 0.05 * (tc % 2.5))       # intonation + declination
    f0 = np.interp(ts, tc, f0c)
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    tract = voice["tract"]
    formants = np.stack([250 + 550 * art[:, 0], 800 + 1500 * art[:, 1], 2500 + 300 * art[:, 1]], 1) * tract
    bandwidth, gain = np.array([90.0, 110.0, 170.0]), np.array([1.0, 0.6, 0.3])
    y = np.zeros(n)
    for k in range(1, int(4800 / f0c.min()) + 1):
        fk = k * f0c[:, None]                                             # (n_ctrl, 1)
        amp = (gain / (1 + ((fk - formants) / (bandwidth / 2)) ** 2)).sum(1) / math.sqrt(k)
        amp *= (k * f0c < 4800) * voicing
        y += np.interp(ts, tc, amp) * np.sin(k * phase)
    y *= 0.2
    # unvoiced part: band-limited noise (fricatives, stop bursts)
    spec = np.fft.rfft(rng.normal(0, 1, n))
    freqs = np.fft.rfftfreq(n, 1 / SAMPLE_RATE)
    for k, (lo, hi, amp) in NOISE_BANDS.items():
        band = np.fft.irfft(spec * ((freqs >= lo) & (freqs <= hi)), n)
        y += 0.6 * amp * band * np.interp(ts, tc, noise[k])
    y += rng.normal(0, 1e-3, n)                                           # room noise floor
    centres = (np.arange(n_frames) + 0.5) / FPS
    mouth = np.stack([np.interp(centres, tc, art[:, i]) for i in range(3)], 1)
    return np.clip(y, -1, 1).astype(np.float32), mouth.astype(np.float32)


def _ellipse(u, v, cx, cy, rx, ry, px, angle=0.0):
    """Anti-aliased coverage in [0, 1] of an ellipse, from a first-order signed distance
    (f / |grad f|), faded when thinner than a pixel. Broadcasts over leading (T, 1, 1) params."""
    du, dv = u - cx, v - cy
    rx, ry = np.maximum(rx, 1e-4), np.maximum(ry, 1e-4)
    if angle:
        c, s = math.cos(angle), math.sin(angle)
        du, dv = c * du + s * dv, -s * du + c * dv
    f = (du / rx) ** 2 + (dv / ry) ** 2 - 1
    g = 2 * np.sqrt((du / rx ** 2) ** 2 + (dv / ry ** 2) ** 2) + 1e-6
    cov = np.clip(0.5 - f / g / px, 0, 1)
    return cov * np.clip(2 * np.minimum(rx, ry) / px, 0, 1)


def _over(img, alpha, color):
    """Alpha-composite a flat colour over img (T, H, W, 3) with coverage alpha (T, H, W)."""
    a = alpha[..., None]
    img *= 1 - a
    img += a * np.asarray(color, np.float32)


def render_face(ident, mouth, pose, blink, size):
    """Draw frames (T, size, size, 3) uint8 of one identity.

    mouth (T, 3) open/width/teeth; pose (T, 4) dx, dy, scale, roll; blink (T,) eyelid closure.
    Shapes are analytic in face coordinates (the face centre at 0, y down, units of the frame
    width at scale 1), so any resolution renders the same picture."""
    T = len(mouth)
    out = np.empty((T, size, size, 3), np.uint8)
    grid = (np.arange(size, dtype=np.float32) + 0.5) / size
    chunk = max(1, (1 << 18) // (size * size))              # bounded memory at any resolution
    for s0 in range(0, T, chunk):
        sl = slice(s0, min(T, s0 + chunk))
        col = lambda a: np.asarray(a, np.float32)[sl].reshape(-1, 1, 1)
        op, wd, th = col(mouth[:, 0]), col(mouth[:, 1]), col(mouth[:, 2])
        dx, dy, sc, roll = (col(pose[:, i]) for i in range(4))
        bl = col(blink)
        n = len(op)
        # background: a static vertical gradient (the camera does not move)
        gy = grid[None, :, None, None]
        img = np.broadcast_to(ident["bg_top"] * (1 - gy) + ident["bg_bottom"] * gy,
                              (n, size, size, 3)).astype(np.float32).copy()
        # face coordinates of each pixel: undo translation, scale and roll
        x = (grid[None, None, :] - 0.5 - dx) / sc
        y = (grid[None, :, None] - 0.5 - dy) / sc
        c, s = np.cos(roll), np.sin(roll)
        u, v = c * x + s * y, -s * x + c * y
        px = 1.0 / (size * sc)                              # one pixel in face units
        fw, fh, i = ident["face_w"], ident["face_h"], ident
        jaw = 0.045 * op                                      # the chin drops as the mouth opens
        _over(img, _ellipse(u, v, 0, 0.62, 0.42, 0.22, px), i["cloth"])                # shoulders
        _over(img, _ellipse(u, v, 0, -0.04 + i["hair_len"] / 2, fw * 1.12 * i["hair_volume"],
                            fh * 0.95 + i["hair_len"] / 2, px), i["hair"] * 0.85)        # hair behind
        _over(img, np.clip(0.5 - (np.abs(u) - 0.12 * fw / 0.27) / px, 0, 1) * (v > 0.1), i["skin"] * 0.8)  # neck
        lower = v > 0
        face = np.where(lower, _ellipse(u, v, 0, 0, fw * i["jaw"], fh + jaw, px), _ellipse(u, v, 0, 0, fw, fh, px))
        shade = 1 - 0.18 * np.clip((u / fw) ** 2 + (v / fh) ** 2, 0, 1)
        a = face[..., None]
        img *= 1 - a
        img += a * (shade[..., None] * np.asarray(i["skin"], np.float32))
        top = _ellipse(u, v, 0, -0.03, fw * 1.05 * i["hair_volume"], fh * 0.95 * i["hair_volume"], px)
        _over(img, top * np.clip(0.5 - (v - i["hairline"] - 0.03 * (u / fw) ** 2) / px, 0, 1), i["hair"])
        for side in (-1, 1):                                                              # eyes, brows
            ex, ey, es = side * i["eye_sep"], i["eye_y"], i["eye_size"]
            open_eye = np.maximum(1 - bl, 0.02)
            white = _ellipse(u, v, ex, ey, 0.04 * es, 0.022 * es * open_eye, px)
            _over(img, white, (0.95, 0.95, 0.93))
            _over(img, white * _ellipse(u, v, ex, ey, 0.018 * es, 0.018 * es, px), i["iris"])
            _over(img, white * _ellipse(u, v, ex, ey, 0.008 * es, 0.008 * es, px), (0.02, 0.02, 0.02))
            _over(img, (1 - open_eye) * _ellipse(u, v, ex, ey, 0.042 * es, 0.024 * es, px), i["skin"] * 0.9)
            _over(img, _ellipse(u, v, ex, ey - i["brow_gap"], 0.048, 0.008 * i["brow_thick"], px,
                                angle=side * i["brow_tilt"]), i["hair"] * 0.8)
        _over(img, 0.35 * _ellipse(u, v, 0, 0.02 + i["nose_len"] / 2, 0.022, i["nose_len"] / 2, px),
              i["skin"] * 0.6)                                                            # nose
        # mouth: lips, dark inner mouth, upper and lower teeth; all from (open, width, teeth)
        my = i["mouth_y"] + 0.6 * jaw
        rx = i["mouth_w"] * (0.75 + 0.5 * wd)
        inner_ry = 0.06 * op
        _over(img, _ellipse(u, v, 0, my, rx, i["lip_th"] + inner_ry, px), i["lips"])
        inner = _ellipse(u, v, 0, my, rx * 0.82, inner_ry, px)
        _over(img, inner, (0.25, 0.05, 0.06))
        tooth_h = 0.02 * th
        _over(img, inner * th * np.clip(0.5 - (v - (my - inner_ry + tooth_h)) / px, 0, 1), (0.97, 0.96, 0.9))
        _over(img, inner * th * np.clip(0.5 + (v - (my + inner_ry - 0.6 * tooth_h)) / px, 0, 1), (0.9, 0.89, 0.84))
        out[sl] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def synth_motion(rng, n_frames):
    """Head pose (T, 4) = dx, dy, scale, roll as sums of slow sinusoids, and blinks (T,) in [0, 1].
    Drawn independently of the speech."""
    t = np.arange(n_frames) / FPS
    pose = np.zeros((n_frames, 4), np.float32)
    amp = (0.025, 0.02, 0.035, 0.06)
    for j in range(4):
        for _ in range(3):
            f, ph = rng.uniform(0.05, 0.45), rng.uniform(0, 2 * np.pi)
            pose[:, j] += amp[j] / 3 * np.sin(2 * np.pi * f * t + ph)
    pose[:, 2] += 1.0
    blink = np.zeros(n_frames, np.float32)
    tb = rng.uniform(0.3, 3.0)
    while tb < t[-1] + 1:
        blink += np.exp(-0.5 * ((t - tb) / 0.05) ** 2)    # ~150 ms blink
        tb += rng.uniform(1.5, 5.0)
    return pose, np.clip(blink, 0, 1)


@dataclass
class Clip:
    """One talking-face clip: frames (T, H, W, 3) uint8 at 25 fps, audio (T * 640,) float32 at
    16 kHz, and for SynthTalk the ground-truth mouth (T, 3). Test clips also carry a second,
    different driving audio with its own true mouth trajectory (for cross-dubbing), and, where an
    evaluation asks for it, dub_frames: the dub's true video, the same face moving the same way
    with the dub's mouth (synthtalk_render; it is not cached with the pool)."""
    frames: np.ndarray
    audio: np.ndarray
    mouth: np.ndarray = None
    dub_audio: np.ndarray = None
    dub_mouth: np.ndarray = None
    name: str = ""
    dub_frames: np.ndarray = None


def synthtalk_render(split, index, mouth, size=FRAME_SIZE):
    """The frames (T, size, size, 3) of clip `index` of a split with the mouth trajectory (T, 3)
    given: its speaker, head motion and blinks, drawn from the clip's own seeds. With the clip's
    own mouth they are its frames; with a test clip's dub_mouth, the true video of its dub, which
    a real corpus never has: the dubbed face is scored against it as a reconstruction is."""
    sid = SPLITS[split]
    pose, blink = synth_motion(seeded_rng(sid, index, 2), len(mouth))
    return render_face(synth_identity(seeded_rng(sid, index, 0)), mouth, pose, blink, size)


def synthtalk_clip(split, index, seconds=TEST_SECONDS, size=FRAME_SIZE):
    """Clip `index` of a SynthTalk split, identical on every machine. Train and test identities
    come from disjoint random streams. Test clips get a dub track spoken by another test speaker."""
    sid = SPLITS[split]
    ident = synth_identity(seeded_rng(sid, index, 0))
    n = int(round(seconds * FPS))
    audio, mouth = synth_speech(seeded_rng(sid, index, 1), ident, n)
    clip = Clip(synthtalk_render(split, index, mouth, size), audio, mouth, name=f"synthtalk-{split}-{index:05d}")
    if split == "test":
        other = synth_identity(seeded_rng(sid, (index + 1) % TEST_CLIPS, 0))
        clip.dub_audio, clip.dub_mouth = synth_speech(seeded_rng(sid, index, 3), other, n)
    return clip


# -----------------------------------------------------------------------------
# 10. data: pools of clips from SynthTalk or from a folder of real clips

VIDEO_EXTS = (".mp4", ".mov", ".webm", ".avi", ".mkv", ".m4v", ".mpg", ".mpeg")
RESIZE_VALUES = 2 ** 24   # float values resize_frames holds at a time: 64 MB (a 150-frame 720p clip is 1.7 GB)


def resize_frames(frames, size):
    """uint8 (T, H, W, 3) -> (T, size, size, 3): area resampling (bilinear when enlarging).
    A few frames at a time (RESIZE_VALUES), so the float copies stay small however long and large
    the clip; each frame is resized on its own either way, so the result is the same."""
    T, H, W, _ = frames.shape
    if (H, W) == (size, size):
        return frames
    mode = "area" if min(H, W) >= size else "bilinear"
    step = max(1, RESIZE_VALUES // (H * W * 3))
    out = np.empty((T, size, size, 3), np.uint8)
    for i in range(0, T, step):
        x = frames_to_tensor(frames[i:i + step])                                   # (b, 3, H, W)
        out[i:i + step] = tensor_to_frames(F.interpolate(x, size=(size, size), mode=mode))
    return out


def folder_clips(folder):
    """The video files under `folder`, its subfolders too (datasets keep clips per speaker or per
    source video: speaker/video/00001.mp4), sorted. Hidden files and folders are not clips: macOS's
    ._name.mp4 resource forks, a write's .name.tmp-*.mp4 left over, a .cache or .git folder."""
    root = Path(folder)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_EXTS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


def folder_pool(folder, size=FRAME_SIZE, progress=True):
    """Every video under `folder` (aligned face crops with an audio track; folder_clips) as a Clip
    at 25 fps, 16 kHz and size x size, named by its path in the folder without the extension
    (speaker/video/00001). The audio is cut or zero-padded to 640 samples per frame. Any length:
    each stage leaves out the clips too short for what it draws (train.py train_pool). progress:
    the reading's bar and notes (one process of a torchrun run)."""
    from tqdm import tqdm
    if not os.path.isdir(folder):
        raise MediaError(f"{folder} is not a folder: --data takes a folder of {'/'.join(e[1:] for e in VIDEO_EXTS)} clips")
    paths = folder_clips(folder)
    if not paths:
        raise MediaError(f"{folder} holds no {'/'.join(VIDEO_EXTS)} files, nor do its subfolders: put aligned face-crop "
                         "clips with audio there")
    clips, oblong = [], 0
    for p in tqdm(paths, desc=f"reading {folder}", disable=not progress):
        frames, _ = read_video(p)
        oblong += frames.shape[1] != frames.shape[2]
        try:
            audio = read_audio(p)
        except NoAudioTrack:
            raise MediaError(f"{p} has no audio track: a --data clip carries the speech its mouth follows; "
                             "mux it in (ffmpeg -i clip -i speech -map 0:v -map 1:a) or move the clip out") from None
        n = len(frames) * SAMPLES_PER_FRAME
        audio = np.pad(audio[:n], (0, max(0, n - len(audio))))
        clips.append(Clip(resize_frames(frames, size), audio, name=p.relative_to(folder).with_suffix("").as_posix()))
    if oblong and progress:
        print(f"note: {oblong} of {len(paths)} clips in {folder} are not square: squeezed to {size}x{size} (the "
              "models train on square face crops; crop them square to keep the face's shape)")
    return clips


MOUTH_BOX = (0.55, 0.875, 0.28, 0.72)    # (top, bottom, left, right) as fractions of the frame:
                                         # holds the mouth through all SynthTalk head motion


def mouth_crop(x):
    """The mouth box of frames (..., H, W, C) numpy or (..., C, H, W) torch."""
    t, b, l, r = MOUTH_BOX
    if isinstance(x, np.ndarray):
        H, W = x.shape[-3:-1]
        return x[..., int(t * H):int(b * H), int(l * W):int(r * W), :]
    H, W = x.shape[-2:]
    return x[..., int(t * H):int(b * H), int(l * W):int(r * W)]


# The smallest frame size (frame_size refuses less) whose latent grid holds a row and a column of
# the mouth box, which the DiT's loss counts again: 32 for this box; at 16 px the 2x2 latent's box
# is empty and that loss is nan.
MIN_FRAME_SIZE = next(s for s in range(FRAME_MULTIPLE, 1 << 16, FRAME_MULTIPLE)
                      if mouth_crop(torch.empty(s // AEConfig.space_down, s // AEConfig.space_down)).numel())


def _forked(fn, jobs, workers, desc, progress):
    """[fn(*job) for job in jobs], in up to `workers` forked processes when there are two or more
    jobs (SynthTalk's drawing is numpy only, so a fork is safe as torch's DataLoader workers are;
    where fork does not exist, one process). A 4 s clip at 512 px takes ~14 s on one core."""
    import multiprocessing
    from tqdm import tqdm
    bar = dict(total=len(jobs), desc=desc, disable=not progress)
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [fn(*j) for j in tqdm(jobs, **bar)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        chunk = max(1, min(4, len(jobs) // (4 * workers)))        # a few jobs a task once there are many
        return list(tqdm(pool.imap(_forked_job, [(fn, j) for j in jobs], chunksize=chunk), **bar))


def _forked_job(task):
    fn, job = task
    return fn(*job)


def synthtalk_renders(split, mouths, size=FRAME_SIZE, workers=None, progress=True):
    """synthtalk_render of clip i of a split with mouths[i], for every i, in `workers` processes
    (default: one per CPU): e.g. the true videos of a test pool's dubs."""
    jobs = [(split, i, m, size) for i, m in enumerate(mouths)]
    return _forked(synthtalk_render, jobs, workers or cpu_count(), f"SynthTalk {split}, redrawn", progress)


def synthtalk_pool(split, n, seconds, size=FRAME_SIZE, cache_dir=None, progress=True, workers=None):
    """Clips 0..n-1 of a SynthTalk split, cached on disk as one npz (generation is deterministic,
    so the cache is only a speed-up; delete it freely). Clip i is the same in every pool, so a
    cached pool of the same split, length and size is a prefix of this one: the nearest is read
    and only the clips it lacks are generated, in `workers` processes (default: one per CPU)."""
    head, tail = f"synthtalk-{split}-n", f"-s{seconds:g}-{size}px.npz"
    path = cache_path(f"{head}{n}{tail}", cache_dir)
    folder = os.path.dirname(path) or "."
    files = os.listdir(folder) if os.path.isdir(folder) else []
    counts = [f[len(head):-len(tail)] for f in files if f.startswith(head) and f.endswith(tail)]
    cached = [int(k) for k in counts if k.isdigit()]
    # this pool itself, else the smallest cached pool that holds it, else the largest prefix of it
    have = min((k for k in cached if k >= n), default=max(cached, default=0))
    keys = ("frames", "audio", "mouth", "dub_audio", "dub_mouth")
    clips = []
    if have:
        with np.load(cache_path(f"{head}{have}{tail}", cache_dir)) as d:
            arrays = {k: d[k][:n].copy() if have > n else d[k] for k in keys if k in d}   # read each array once
        clips = [Clip(**{k: v[i] for k, v in arrays.items()}, name=f"synthtalk-{split}-{i:05d}")
                 for i in range(min(n, have))]
    if have >= n:
        return clips
    clips += _forked(synthtalk_clip, [(split, i, seconds, size) for i in range(have, n)], workers or cpu_count(),
                     f"SynthTalk {split}", progress)
    arrays = {k: np.stack([getattr(c, k) for c in clips]) for k in keys if getattr(clips[0], k) is not None}
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
    return clips


def sample_windows(clips, batch, n_frames, rng, with_audio=False):
    """A batch of random windows: frames (B, n_frames, 3, H, W) in [-1, 1] and, if asked, the
    matching audio (B, n_frames * 640)."""
    frames, audio = [], []
    for _ in range(batch):
        c = clips[rng.integers(len(clips))]
        s = rng.integers(len(c.frames) - n_frames + 1)
        frames.append(c.frames[s:s + n_frames])
        audio.append(c.audio[s * SAMPLES_PER_FRAME:(s + n_frames) * SAMPLES_PER_FRAME])
    x = frames_to_tensor(np.stack(frames))
    return (x, torch.from_numpy(np.stack(audio))) if with_audio else x


# -----------------------------------------------------------------------------
# 11. streaming lip sync with the causal student


def composite_mask(H, W, feather=None):
    """Where the generated frame replaces the source: the lower face, with a linear ramp of
    `feather` rows (H / 16 by default) centred on the mask's edge so no seam shows. (H, W, 1)."""
    feather = feather or max(1, H // 16)
    rows = np.clip((np.arange(H) - (H // 2 - feather / 2) + 0.5) / feather, 0, 1)
    return np.broadcast_to(rows[:, None, None], (H, W, 1)).astype(np.float32)


def composite(source, generated):
    """Paste the generated lower face into the source frames (uint8 (T, H, W, 3) both)."""
    m = composite_mask(*source.shape[-3:-1])
    return (source * (1 - m) + generated * m).round().astype(np.uint8)


class LipSyncStream:
    """Live lip sync: push source frames and driving audio as they arrive, get finished frames
    back chunk by chunk.

    Chunk k is latent frames 3k .. 3k+2 of the stream: video frames 0-8 for the first chunk (its
    first latent frame holds frame 0 alone), then 12 frames per chunk. A chunk runs as soon as its
    source frames and its audio have arrived; the audio of a latent frame reaches `audio_reach`
    frames (its audio context, and the AudioEncoder's half-window if it has one; plus one
    120-sample mel half-window) past its last video frame, so that is the lookahead. Per chunk:
    encode the masked source frames, the student's two denoising passes and
    the KV refresh, the autoencoder's streaming decoder, then the lower face is composited into
    the source frames. Everything kept is bounded: the KV cache (sink + window), the decoder's
    one-latent memory, and the input not yet used: less than two chunks of it when frames and audio
    arrive in real time (a whole track pushed at once waits in full until its frames come).

    reference: the identity frame (uint8 (H, W, 3)); by default the first source frame, which (as
    the only frame a live stream has at its start) lies in the first chunk, where training always
    takes the reference from outside the window: pass a frame from elsewhere where there is one.
    steps: the denoising schedule per chunk (STUDENT_STEPS; (0.999,) for one step)."""
    def __init__(self, student, ae, reference=None, seed=0, composite=True, steps=STUDENT_STEPS):
        cfg = student.cfg
        self.model, self.ae, self.composite, self.steps = student, ae, composite, tuple(steps)
        self.device = next(student.parameters()).device
        self.cache = KVCache(cfg.depth, cfg.sink, cfg.window, cfg.chunk)
        self.chunk, self.context, self.reach = cfg.chunk, cfg.audio_context, cfg.audio_reach
        self.tf = ae.cfg.time_down
        self.gen = torch.Generator().manual_seed(seed)
        self.reference = reference
        self.ref = None                                  # reference latent (1, 1, 16, h, w)
        self.frames = []                                 # source frames not yet used
        self.frame_shape = None if reference is None else np.shape(reference)   # (H, W, 3) once known
        self.audio, self.audio_start = np.zeros(0, np.float32), 0   # audio from sample audio_start on
        self.latents = 0                                 # latent frames generated so far
        self.done = 0                                    # video frames output so far
        self.memory = None                               # the decoder's memory

    def _need(self):
        """(source frames, audio samples since the start of the stream) the next chunk needs."""
        n = self.tf * self.chunk - (self.tf - 1 if self.latents == 0 else 0)    # 9, then 12
        return n, (self.done + n) * SAMPLES_PER_FRAME + audio_lookahead(self.reach)

    def push(self, frames=(), audio=None):
        """Add source frames (uint8 (n, H, W, 3)) and/or audio (16 kHz mono float samples).
        Returns the frames finished by this call, uint8 (m, H, W, 3); m is often 0."""
        self.frames.extend(np.asarray(f) for f in frames)
        if self.frames and self.frame_shape is None:
            self.frame_shape = self.frames[0].shape
        if audio is not None:
            self.audio = np.concatenate([self.audio, np.asarray(audio, np.float32)])
        out = []
        while True:
            n, samples = self._need()
            if len(self.frames) < n or self.audio_start + len(self.audio) < samples:
                break
            out.append(self._run_chunk(n))
        return np.concatenate(out) if out else self._nothing()

    def flush(self):
        """End of input: the last partial chunk is completed by repeating the last source frame
        (audio past the end is silence) and only the real frames are returned."""
        out = []
        while self.frames:
            n, _ = self._need()
            real = min(n, len(self.frames))
            self.frames += [self.frames[-1]] * (n - real)
            out.append(self._run_chunk(n)[:real])
        return np.concatenate(out) if out else self._nothing()

    def _nothing(self):
        return np.zeros((0, *(self.frame_shape or (0, 0, 3))), np.uint8)

    @torch.inference_mode()
    def _run_chunk(self, n):
        src, self.frames = np.stack(self.frames[:n]), self.frames[n:]
        x = frames_to_tensor(src).to(self.device)                                # (n, 3, H, W)
        H, W = x.shape[-2:]
        masked = (x * (1 - lower_face_mask(H, W, x.device)))[None]
        if self.latents == 0:
            ref = src[0] if self.reference is None else self.reference
            self.ref = self.ae.encode(frames_to_tensor(ref)[None, None].to(self.device))
            z_src = self.ae.encode(masked)                                       # (1, 3, 16, h, w)
        else:
            z_src = self.ae.encode_groups(masked)
        Fr, (h, w) = z_src.shape[1], z_src.shape[-2:]
        mask = lower_face_mask(h, w, x.device).expand(1, Fr, 1, h, w)
        cond = torch.cat([self.ref.expand(1, Fr, -1, -1, -1), mask, z_src], 2)  # (1, F, 33, h, w)
        # audio rows of video frames 4g - 3 - c .. 4g + c for the chunk's latent frames g
        v0 = self.tf * self.latents - (self.tf - 1) - self.context
        feats = frame_features(self.audio, v0, v0 + self.tf * Fr + 2 * self.context, self.audio_start,
                               self.model.audio_encoder)
        audio = pack_audio(feats, 0, Fr, self.context)[None].to(self.device)    # (1, F, A)
        noises = torch.randn((len(self.steps), 1, Fr, *z_src.shape[2:]), generator=self.gen).to(self.device)
        z = sample_chunk(self.model, cond, audio, noises, self.cache, self.steps)
        y, self.memory = self.ae.decode(z, self.memory)                          # (1, n, 3, H, W)
        out = tensor_to_frames(y[0])
        if self.composite:
            out = composite(src, out)
        self.latents += Fr
        self.done += n
        # drop audio no later chunk reads (its rows start at frame v0 + 4F, their audio up to the
        # encoder's half-window before, with one frame of margin)
        keep_from = (v0 + self.tf * Fr - 1 - (self.reach - self.context)) * SAMPLES_PER_FRAME
        if keep_from > self.audio_start:
            cut = min(keep_from - self.audio_start, len(self.audio))
            self.audio, self.audio_start = self.audio[cut:], self.audio_start + cut
        return out

    def nbytes(self):
        """Bytes held by the stream's state (cache, decoder memory, buffered input)."""
        mem = sum(t.numel() * t.element_size() for t in self.memory) if self.memory else 0
        return self.cache.nbytes() + mem + self.audio.nbytes + sum(f.nbytes for f in self.frames)


def lipsync(student, ae, frames, audio, reference=None, seed=0, composite=True, steps=STUDENT_STEPS):
    """Offline lip sync through the same stream: frames uint8 (T, H, W, 3), audio (>= T * 640,)
    16 kHz -> uint8 (T, H, W, 3)."""
    stream = LipSyncStream(student, ae, reference, seed, composite, steps)
    return np.concatenate([stream.push(frames, audio), stream.flush()])


# -----------------------------------------------------------------------------
# 12. distillation: Self-Forcing rollout, Sync-Window DMD, SyncNet reward


def self_forcing_rollout(model, cond, audio, noises, exit_step, steps=STUDENT_STEPS):
    """Self-Forcing rollout (Huang et al. 2025): the student generates the clip chunk by chunk
    exactly as it streams (sample_chunk with its own outputs written into a sink + window KV cache
    by the KV refresh), except that every chunk stops at denoising step `exit_step` and returns that
    step's x0 prediction. Steps before the exit and the refresh run without gradient, the exit step
    with it (when grad is enabled at all): gradient reaches the weights only through each chunk's
    exit pass. With exit_step = len(steps) - 1 the output is what the stream makes from the same noises.
    cond (B, F, 33, h, w), audio (B, F, A), noises (len(steps), B, F, 16, h, w) -> x (B, F, 16, h, w)."""
    cfg = model.cfg
    cache = KVCache(cfg.depth, cfg.sink, cfg.window, cfg.chunk)     # the inference cache (df draws others)
    n, grad = exit_step + 1, torch.is_grad_enabled()
    Fr = noises.shape[2]
    return torch.cat([sample_chunk(model, cond[:, c:c + cfg.chunk], audio[:, c:c + cfg.chunk],
                                   noises[:n, :, c:c + cfg.chunk], cache, steps[:n], grad, refresh=c + cfg.chunk < Fr)
                      for c in range(0, Fr, cfg.chunk)], 1)


DMD_T_RANGE = (0.02, 0.98)                 # re-noise times: shift_t of a uniform in this range
SYNC_WINDOW_STEPS = (20, 40)                # the paper's CFG window, steps of the teacher's 50-step ODE (analyze.py)
SYNC_WINDOW = (ode_t(SYNC_WINDOW_STEPS[1]), ode_t(SYNC_WINDOW_STEPS[0]))   # as times: t in [0.556, 0.882]


def dmd_timesteps(batch, device=None):
    """DMD's re-noise times, one per sample: t = shift_t(u), u ~ U[0.02, 0.98] -> (B,)."""
    lo, hi = DMD_T_RANGE
    return shift_t(lo + (hi - lo) * torch.rand(batch, device=device))


def sync_window_cfg(t, scale=CFG_SCALE, window=SYNC_WINDOW):
    """Sync-Window CFG (the paper's component 3): the teacher's guidance scale per sample for re-noise
    times t (B,): `scale` where t lies in the window (bounds included), 1 (no CFG) elsewhere.
    window = (0, 1) is a fixed scale everywhere; scale = 1 is no CFG at all."""
    lo, hi = window
    return torch.where((t >= lo) & (t <= hi), scale, 1.0)


def predict_x0(model, x, t, cond, audio, scale=1.0, mode="audio"):
    """x0_hat = x_t - t v with classifier-free guidance at a per-sample scale (B,) or one float. t (B, F)."""
    return x - t[..., None, None, None] * velocity(model, x, t, cond, audio, scale, mode)


def dmd_loss(x, real_x0, fake_x0):
    """Distribution Matching Distillation (Yin et al. 2024, as DMD2 / Self Forcing implement it),
    per sample: grad = (fake - real) / mean|x - real|, L = 0.5 mean (x - stopgrad(x - grad))^2.
    Its gradient in x is grad / numel, so the generator moves its sample along real - fake: toward
    the teacher's x0 prediction and away from the critic's (its own distribution's).
    x, real_x0, fake_x0 (B, ...); only x carries gradient -> (B,). A sample at both predictions
    (0 / 0) gets loss 0, as DMD2's nan_to_num makes it."""
    dims = tuple(range(1, x.ndim))
    real, fake = real_x0.detach().double(), fake_x0.detach().double()
    grad = (fake - real) / (x.detach().double() - real).abs().mean(dims, keepdim=True)
    target = (x.detach().double() - torch.nan_to_num(grad)).to(x.dtype)
    return 0.5 * (x - target).pow(2).mean(dims)


def reward_weights(R, beta=2.0, scale=1.0):
    """The SyncNet reward's per-sample weight w = exp(beta R / scale) (the paper's component 4;
    its w = exp(beta R) is scale = 1), in float64 and without gradient through R. Exact, but
    with our SyncNets' Sync-C of ~16-19 it is ~1e14-1e16: use reward_weighted_mean to apply it."""
    return torch.exp(beta * R.detach().double() / scale)


def _reward_share(R, beta, scale):
    """w_i / sum_j w_j for w = reward_weights(R, beta, scale), as a float64 softmax (finite for any R)."""
    return torch.softmax(beta * R.detach().double() / scale, 0)


def reward_weighted_mean(losses, R, beta=2.0, scale=1.0):
    """mean_i(w_i L_i) / mean_i(w_i) with w = reward_weights(R, beta, scale): a self-normalised
    weighting. Within the batch the samples keep the paper's relative weights
    exp(beta (R_i - R_j) / scale) exactly. The division takes out the batch's mean weight
    mean_j exp(beta R_j / scale), which the paper's loss keeps: 1e14-1e16 at our Sync-C of 16-19 (1e7 at
    the paper's ~8), and apart by orders of magnitude from one batch to the next, more than the
    float32 gradients hold (clip_grad_norm would see inf and zero the step). So here a batch of
    higher rewards does not take a larger step than another, as it would in the paper's loss; in
    each batch the better samples count more, as there. Computed as a float64 softmax, finite for
    any R. beta = 0 gives the plain mean. L (B,), R (B,)."""
    w = _reward_share(R, beta, scale) * len(R)                           # w_i / mean_j w_j
    return (w.to(losses) * losses).mean()


def effective_batch(R, beta=2.0, scale=1.0):
    """How many samples the reward weighting effectively keeps, (sum w)^2 / sum w^2, in 1..B:
    B when the weights are equal, 1 when one sample takes all the weight. A cheap diagnostic."""
    return float(1 / _reward_share(R, beta, scale).pow(2).sum())
