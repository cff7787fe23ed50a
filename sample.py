"""
Lip-sync with the causal student: a demo, real files, a live stream, and a benchmark.

  python sample.py                                                  # demo: a held-out SynthTalk speaker dubbed
  python sample.py --video face.mp4 --audio speech.m4a --out out/dubbed.mp4
  ffmpeg -i speech.mp3 -f s16le -ar 16000 -ac 1 - | \\
      python sample.py --stream --video face.mp4 --audio - --out live.mp4    # live: audio from a pipe
  python sample.py --stream --video face.mp4 --audio - --out - < speech.pcm | \\
      ffplay -f rawvideo -pixel_format rgb24 -video_size WxH -framerate 25 -  # raw frames on stdout
  python sample.py --benchmark [--device cuda] [--shape wan1.3b --size 512] [--flops]  # student vs teacher speed
  python sample.py --long-stream 180                                # memory and sync over a 3-minute stream

The student is checkpoints/student.safetensors (the DMD student) if it exists, else
checkpoints/student_df.safetensors (its Diffusion-Forcing init); --ckpt picks another.

Length policy (files and stream): the output has one frame per started 40 ms of audio,
ceil(samples / 640) frames at 25 fps. If the audio outlasts the video the source frames are played
ping-pong (0, 1, .., T-1, T-2, .., 1, 0, 1, ..), so a video of one frame (a still image) is
animated and a video shorter than one chunk works; if the audio is shorter the video is cut.
The model sees the frames resized to the size it trained at (square); the generated lower face
is resized back and blended into the original frames with a soft mask (L.composite_mask), so the
upper face is the source, pixel for pixel, at the source's resolution (odd sizes too; the mp4 is
padded to even as L.write_video does). Silent audio is not an error: the student draws what it
learnt for silence (SynthTalk's pauses hold the lips closed). Outputs are written atomically and
their folder is created. Every bad input, and an option the chosen mode would ignore, ends with
one line `sample.py: error: ...` and exit code 2; Ctrl-C, SIGTERM or SIGHUP (the terminal closed) ends
with exit code 130 and no file.

TTFF (time to first frame), as the benchmark reports it:
  compute TTFF = wall time from the start of processing, with all input already available, to the
                 first output frame returned (the first chunk: encode, DiT, decode).
  live TTFF    = input wait + compute TTFF, where the input wait is the media time that must have
                 arrived before the first chunk can run: the student needs its first chunk's 9 frames
                 plus the audio lookahead (audio_reach frames: the audio context, and the audio
                 encoder's half-window if the DiT has one; and a 120-sample mel half-window), the
                 teacher a whole 33-frame window plus the same lookahead.
--stream measures TTFF directly: from the first audio sample read to the first frame written.
"""

import argparse
import dataclasses
import itertools
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections import deque

INTERRUPTED = "sample.py: interrupted; no output file was written"


def terminated(signum, frame):
    """SIGTERM (kill) and SIGHUP (the terminal closed) end the run as Ctrl-C does: temp files and
    folders are removed on the way out."""
    raise KeyboardInterrupt


SIGNALS = [getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name)]   # Windows: no SIGHUP
if __name__ == "__main__":                   # the command only: not a library's to set for its host
    for sig in SIGNALS:                      # from here on, before the imports below take their second or so
        if signal.getsignal(sig) is not signal.SIG_IGN:      # nohup's ignored SIGHUP stays ignored
            signal.signal(sig, terminated)

try:                     # Ctrl-C (or a signal above) while torch loads ends the command as it does later
    import numpy as np
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    import lipforcing as L
except KeyboardInterrupt:
    if __name__ != "__main__":
        raise
    print(INTERRUPTED, file=sys.stderr)
    raise SystemExit(130)

SPF = L.SAMPLES_PER_FRAME
REPO = os.path.dirname(os.path.realpath(__file__))   # the committed checkpoints/ are beside this script
STUDENT_CKPTS = ("checkpoints/student.safetensors", "checkpoints/student_df.safetensors")  # DMD, then DF init
OUT_EXTS = (".mp4", ".mov", ".mkv")      # containers that hold H.264 + AAC
CONTAINER_MAGIC = {"a wav": (0, b"RIFF"), "an mp3": (0, b"ID3"), "a flac": (0, b"fLaC"),   # (offset, bytes)
                   "an ogg": (0, b"OggS"), "an mp4/m4a": (4, b"ftyp"),                     # that are not raw PCM
                   "a webm/mkv": (0, b"\x1aE\xdf\xa3"), "an aiff": (0, b"FORM"), "an au": (0, b".snd")}
TEXT_BYTES = 64              # a head this long that is all printable ASCII is text: speech as s16le never is
HEAD_BYTES = max(TEXT_BYTES, *(at + len(magic) for at, magic in CONTAINER_MAGIC.values()))  # read before the check
GROW_IDLE = 1.0               # --stream from a growing file: it has ended after this many seconds without new data

# -----------------------------------------------------------------------------
# arguments and errors

# the options that only some modes read (a mode: demo, files, --stream, --benchmark, --long-stream);
# given to another mode they are an error, not silently ignored. Their defaults, filled in by check_args:
MODE_OPTIONS = {"seconds": ("demo", "--benchmark"), "syncnet": ("demo", "--long-stream"),
                "reference": ("demo", "files", "--stream"), "seed": ("demo", "files", "--stream", "--long-stream"),
                "teacher": ("--benchmark",), "shape": ("--benchmark",), "flops": ("--benchmark",),
                "results": ("--benchmark", "--long-stream"), "out": ("demo", "files", "--stream")}
VAE_CKPT = "checkpoints/vae.safetensors"
MODE_DEFAULTS = {"seconds": 10.0, "syncnet": "checkpoints/syncnet_eval.safetensors",
                 "teacher": "checkpoints/teacher.safetensors", "results": "results", "seed": 0, "flops": False}
DEFAULT_CKPTS = {"vae": VAE_CKPT, "syncnet": MODE_DEFAULTS["syncnet"], "teacher": MODE_DEFAULTS["teacher"]}


def log(args, msg):
    """Print to stdout, or to stderr when stdout carries the frames (--stream --out -)."""
    print(msg, file=sys.stderr if args.out == "-" else sys.stdout)


def fail(msg):
    """The one way out on bad input: one line on stderr, exit code 2, no traceback."""
    print(f"sample.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (see python sample.py --help)")     # one line, not usage + error
    p.add_argument("--video", help="face video (any container/codec/fps); a still image works as a 1-frame video")
    p.add_argument("--audio", help="driving audio (any format, or a video's track); with --stream: - for "
                                   "stdin, a named pipe or a growing file of raw s16le 16 kHz mono PCM")
    p.add_argument("--out", help="output mp4 (default out/demo.mp4, or out/<video>-lipsync.mp4); "
                                 "--stream needs one: FILE.mp4, or - for raw rgb24 frames on stdout")
    p.add_argument("--ckpt", help="student checkpoint (default: checkpoints/student.safetensors, else student_df; "
                                  "each default checkpoint is looked for from the current folder, then beside sample.py)")
    p.add_argument("--vae", default=VAE_CKPT, help="autoencoder checkpoint")
    p.add_argument("--syncnet", help=f"eval SyncNet for Sync-C (demo, --long-stream; default {MODE_DEFAULTS['syncnet']})")
    p.add_argument("--teacher", help=f"teacher checkpoint (--benchmark; default {MODE_DEFAULTS['teacher']})")
    p.add_argument("--steps", type=int, default=len(L.STUDENT_STEPS), help="denoising steps per chunk: 1 or 2")
    p.add_argument("--size", type=L.frame_size, help=f"the model's frame size (square; a multiple of {L.FRAME_MULTIPLE} "
                   f"from {L.MIN_FRAME_SIZE}): "
                   f"the one the student trained at, the default; another only with --benchmark (default where "
                   f"the checkpoint does not record its size: {L.FRAME_SIZE})")
    p.add_argument("--reference", type=L.seed_int, metavar="FRAME",
                   help="the identity frame, an index into the source video (default: 0, the first frame)")
    p.add_argument("--seed", type=L.seed_int, default=None,
                   help="the stream's noise (0 .. 2**63 - 1; default 0; the benchmark always uses 0)")
    p.add_argument("--stream", action="store_true", help="live: frames out as the audio comes in")
    p.add_argument("--benchmark", action="store_true", help="student streaming vs teacher: FPS, TTFF, memory")
    p.add_argument("--shape", choices=list(L.DIT_PRESETS), help="--benchmark random-init models of this preset")
    p.add_argument("--patch", type=int, choices=L.DIT_PATCHES,
                   help=f"with --shape: the DiTs' spatial patch (default {L.DiTConfig.patch})")
    p.add_argument("--depth", type=L.positive_int, help="with --shape: the DiTs' number of blocks (default: the preset's)")
    p.add_argument("--dim", type=L.positive_int, help="with --shape: the DiTs' width, in whole heads (default: the preset's)")
    p.add_argument("--flops", action="store_true", default=None,
                   help="--benchmark: also count FLOPs per frame, end to end and in the DiT, in one more untimed "
                        "run of each model (eager; about 3x its time on a CPU)")
    p.add_argument("--seconds", type=float, help=f"SynthTalk clip length (demo, --benchmark; default {MODE_DEFAULTS['seconds']:g})")
    p.add_argument("--long-stream", type=float, metavar="SECONDS", help="stream one clip this long: memory and Sync-C")
    p.add_argument("--results", help=f"folder for the JSON of --benchmark and --long-stream (default {MODE_DEFAULTS['results']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the student's blocks (--benchmark: and the teacher's)")
    p.add_argument("--threads", type=L.positive_int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def check_folder(folder, what, path):
    """The folder an output goes into (created if missing) can take it (L.folder_problem), or the
    run stops here: a folder that cannot take the output costs no run (nor a whole live session)."""
    if why := L.folder_problem(folder):
        fail(f"{what} {path}: {why}")


def frames_str(n):
    """'1 frame', '13 frames': a count of frames as the messages print it."""
    return f"{n} frame{'' if n == 1 else 's'}"


def n_frames(seconds):
    """Video frames in `seconds` of clip, as SynthTalk counts them."""
    return round(seconds * L.FPS)


def check_args(args):
    """Everything that can be checked before any media is read or any model is loaded (the one read:
    the first bytes of a --stream audio file, last). Fills in the defaults of the options only some
    modes read (MODE_DEFAULTS), and finds the default checkpoints (default_places)."""
    if args.steps not in (1, 2):
        fail(f"--steps {args.steps}: the student samples with 1 or 2 steps per chunk (it was distilled for 2)")
    for name, value in (("--seconds", args.seconds), ("--long-stream", args.long_stream)):
        if value is not None and not 0 < value < math.inf:
            fail(f"{name} {value:g}: takes a positive number of seconds")
        if value is not None and n_frames(value) < 1:
            fail(f"{name} {value:g}: shorter than one frame at {L.FPS} fps; pass {1 / L.FPS:g} or more")
    modes = [m for m, on in (("--stream", args.stream), ("--benchmark", args.benchmark),
                             ("--long-stream", args.long_stream)) if on]
    if len(modes) > 1:
        fail(f"{' and '.join(modes)} are separate modes: pick one")
    m = modes[0] if modes else "demo" if args.video is None else "files"     # what this run does
    for name, readers in MODE_OPTIONS.items():
        if getattr(args, name) is not None and m not in readers:
            fail(f"--{name} is read by {' and '.join(readers)}, not by {m}: leave it out")
    if m == "--benchmark" and args.shape and (args.ckpt or args.teacher):
        fail("--shape times random-init models: leave out --ckpt and --teacher, or --shape to time the checkpoints")
    # the benchmark stands random-init models in for missing default checkpoints; a file you name must exist
    for name, given in (("teacher", args.teacher is not None), ("vae", args.vae != VAE_CKPT)):
        path = getattr(args, name)
        if m == "--benchmark" and given and (why := L.file_problem(path)):
            fail(f"--{name} {path}: {why}; pass a .safetensors checkpoint, or leave it out")
    for name, default in MODE_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, default in DEFAULT_CKPTS.items():
        if getattr(args, name) == default:                 # the first place that holds it, else as it was
            setattr(args, name, next((p for p in default_places(default) if os.path.isfile(p)), default))
    if args.benchmark and n_frames(args.seconds) < 1 + L.TEACHER_HOP:
        fail(f"--seconds {args.seconds:g}: the benchmark's teacher needs one {1 + L.TEACHER_HOP}-frame window; "
             f"pass --seconds {(1 + L.TEACHER_HOP) / L.FPS:g} or more")
    for name in ("patch", "depth", "dim"):
        if getattr(args, name) is not None and not (args.benchmark and args.shape):
            fail(f"--{name} sets the random-init models of --benchmark --shape; a checkpoint keeps its own {name}")
    if args.dim is not None and args.benchmark and args.shape:
        try:
            L.preset_config(args.shape, dim=args.dim)      # its one rule: whole heads of the preset's width
        except ValueError as e:
            fail(str(e))
    if why := L.device_problem(args.device):
        fail(why)
    if (args.benchmark or args.long_stream) and (args.video is not None or args.audio is not None):
        fail(f"{m} runs on a SynthTalk clip: leave out --video and --audio")
    if (args.video is None) != (args.audio is None):
        fail("pass both --video and --audio (or neither, for the demo)")
    if "" in (args.video, args.audio, args.out):
        fail("--video, --audio and --out take a path, not an empty string")
    if args.stream and args.video is None:
        fail("--stream needs --video FACE and --audio - (or a pipe / growing raw PCM file)")
    if args.stream and args.out is None:
        fail("--stream needs --out: - for raw rgb24 frames on stdout, or FILE.mp4")
    if args.audio == "-" and not args.stream:
        fail("--audio - (raw PCM on stdin) is for --stream; without it pass an audio file")
    if args.stream and args.audio != "-":
        try:
            L.check_file(args.audio, pipe_ok=True)         # a pipe or a raw PCM file: it must be there
        except L.MediaError as e:
            fail(f"--audio {e}")
    if args.out is not None and args.out != "-":
        if os.path.isdir(args.out):
            fail(f"--out {args.out} is a directory: pass a file name such as {os.path.join(args.out, 'out.mp4')}")
        if os.path.splitext(args.out)[1].lower() not in OUT_EXTS:
            fail(f"--out {args.out}: write an {' / '.join(OUT_EXTS)} file (H.264 + AAC)")
        for name in ("video", "audio"):                    # the output would replace the input it was made from
            given = getattr(args, name)
            if given not in (None, "-") and os.path.exists(given) and L.same_file(given, args.out):
                fail(f"--out {args.out} is the --{name} file: write the output to another path")
    if args.out == "-" and not args.stream:
        fail("--out - (raw frames on stdout) is only for --stream; pass an .mp4 path")
    if args.out == "-" and sys.stdout is None:
        fail("--out -: stdout is closed; pipe it into a program that reads the frames")
    if args.out not in (None, "-"):
        check_folder(os.path.dirname(args.out), "--out", args.out)
    if m in MODE_OPTIONS["results"]:
        check_folder(args.results, "--results", args.results)
    if args.size is not None and not args.benchmark and (path := student_path(args, required=False)):
        student_size(args, path, recorded_extra(path))      # a size it never saw: refused before the media is read
    if args.stream and args.audio != "-" and os.path.isfile(args.audio):   # its head is there: refused before a
        try:                                                               # model loads (and --compile warms up)
            with open(args.audio, "rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError as e:
            fail(f"--audio {args.audio}: {e.strerror or e}")
        check_raw_pcm(head, args.audio, ended=False)


# -----------------------------------------------------------------------------
# models


def run_elsewhere():
    """Whether this run's current folder is not the one sample.py is in."""
    return os.path.realpath(REPO) != os.path.realpath(os.getcwd())


def default_places(*paths):
    """Where default checkpoint paths are looked for, in order: from the current folder (a run's own
    trained models), then beside this script (the committed ones), so the tool runs from any folder."""
    return [*paths, *(os.path.join(REPO, p) for p in paths if run_elsewhere())]


def from_here(path):
    """' in <the current folder> or beside sample.py in <its folder>' for a default checkpoint path
    (found in neither), so a run is told where it looked. '' for a path the user chose."""
    beside = f" or beside sample.py in {REPO}" if run_elsewhere() else ""
    return f" in {os.getcwd()}{beside}" if path in (*STUDENT_CKPTS, *DEFAULT_CKPTS.values()) else ""


def load(path, config_class, model_class, device, how):
    """load_checkpoint's (model, extra), with every failure turned into one line saying what to do."""
    if os.path.isdir(path):
        fail(f"{path} is a folder: pass a .safetensors file; {how}")
    if not os.path.isfile(path):
        fail(f"{path} not found{from_here(path)}: {how}")
    try:
        model, _, extra = L.load_checkpoint(path, config_class, model_class, device)
        return model, extra
    except L.CheckpointError as e:  # a corrupt file, another model's checkpoint, a config from another version
        fail(f"cannot load {path} ({e}): {how}")


def student_path(args, required=True):
    """--ckpt, else the first of STUDENT_CKPTS that exists (None if none does and not required)."""
    if args.ckpt:
        return args.ckpt
    found = [p for p in default_places(*STUDENT_CKPTS) if os.path.isfile(p)]
    if not found and required:
        fail(f"no student checkpoint, {' or '.join(STUDENT_CKPTS)}, found{from_here(STUDENT_CKPTS[0])}: "
             "train one with `python train.py df`, or pass --ckpt")
    return found[0] if found else None


DIT_HINTS = {   # causal: (how to make one, what a checkpoint of the other kind is told)
    True: ("train a student with `python train.py df`",
           "{path} is a bidirectional teacher, not the causal student: {advice}"),
    False: ("train it with `python train.py teacher`",
            "--teacher {path} is a causal student, not the bidirectional teacher: pass the teacher's checkpoint"),
}


def load_dit(path, device, causal=True):
    """A student checkpoint (causal) or a teacher's (causal=False), refused in one line if it holds
    the other kind: (model, extra)."""
    how, other_kind = DIT_HINTS[causal]
    model, extra = load(path, L.DiTConfig, L.DiT, device, how)
    if model.cfg.causal != causal:
        beside = os.path.join(os.path.dirname(path), os.path.basename(STUDENT_CKPTS[1]))    # its run's student
        fail(other_kind.format(path=path, advice=f"pass --ckpt {beside}" if os.path.isfile(beside) else
                               "pass a student's checkpoint, or leave out --ckpt for the default student"))
    return model, extra


def recorded_extra(path):
    """The extra info a checkpoint records (its "size", its steps), read from the file's header
    alone; {} when there is none to read (loading the checkpoint says why, later)."""
    try:
        return L.checkpoint_header(path, L.DiTConfig)[1]
    except L.CheckpointError:
        return {}


def student_size(args, path, extra):
    """--size, else the frame size the student at `path` trained at (its checkpoint's "size"), else
    L.FRAME_SIZE. A size other than the recorded one is refused except by --benchmark, which only
    times it: the model has never seen faces at another scale, and would lip-sync them badly. (A
    checkpoint that records no size, or a random-init model, takes any --size.)"""
    trained = extra.get("size")
    if args.size is None:
        return trained or L.FRAME_SIZE
    if trained and args.size != trained and not args.benchmark:
        fail(f"--size {args.size}: {path} was trained on {trained} px frames and sees only those well; "
             f"leave --size out")
    return args.size


WARM_UP_CHUNKS = 5     # a stream's cache is empty, then filling, then rolling from the third chunk on


def warm_up_frames(ae, cfg):
    """Source frames of a stream's first WARM_UP_CHUNKS chunks (9, then 12 each: 57)."""
    return ae.cfg.time_down * cfg.chunk * WARM_UP_CHUNKS - (ae.cfg.time_down - 1)


def load_student(args):
    """(student, autoencoder, student path); sets args.size (student_size). With --compile the
    student's blocks are compiled and run once through a throwaway stream of blank input that
    passes every cache state, so compiling is over before the first real frame (a live stream's
    TTFF, the FPS printed), not inside it."""
    path = student_path(args)
    model, extra = load_dit(path, args.device)
    args.size = student_size(args, path, extra)
    log(args, f"student {path}: {model.cfg}")
    ae = load_ae(args)
    check_latents(ae, model, extra, path, args.vae)
    if args.compile:
        t0 = time.perf_counter()
        L.compile_blocks(model)
        n = warm_up_frames(ae, model.cfg)
        with L.autocast(args.device):
            L.lipsync(model, ae, np.zeros((n, args.size, args.size, 3), np.uint8), np.zeros(n * SPF, np.float32))
        log(args, f"--compile: the student's blocks compiled and warmed up in {time.perf_counter() - t0:.1f} s")
    return model, ae, path


def load_ae(args):
    return load(args.vae, L.AEConfig, L.VideoAE, args.device, "train it with `python train.py vae`")[0]


def load_syncnet(args):
    return load(args.syncnet, L.SyncNetConfig, L.SyncNet, args.device, "train it with `python train.py syncnet --role eval`")[0]


def check_latents(ae, model, extra, path, vae):
    """A DiT must read the autoencoder's latents (L.check_dit_latents): refused in one line where it
    was trained on another autoencoder."""
    try:
        L.check_dit_latents(path, model.cfg.latent_channels, extra, ae, vae)
    except L.CheckpointError as e:
        fail(f"{e}: pass it with --vae")


def student_wait(ae, cfg):
    """Seconds of live input before the student's first chunk can run: its 9 frames (the first
    latent frame holds one frame, the other chunk - 1 hold 4) and the audio lookahead after them."""
    first = ae.cfg.time_down * cfg.chunk - (ae.cfg.time_down - 1)
    return (first * SPF + L.audio_lookahead(cfg.audio_reach)) / L.SAMPLE_RATE


def teacher_wait(cfg):
    """Seconds of live input before the teacher's first window can run: 33 frames and the lookahead."""
    return ((1 + L.TEACHER_HOP) * SPF + L.audio_lookahead(cfg.audio_reach)) / L.SAMPLE_RATE


# -----------------------------------------------------------------------------
# the lip-sync loop, shared by the demo, files, the stream and the long stream


def pingpong(i, T):
    """Source frame shown at output frame i when a T-frame video is looped back and forth."""
    if T == 1:
        return 0
    j = i % (2 * (T - 1))
    return j if j < T else 2 * (T - 1) - j


def paste(source, generated):
    """Blend generated frames into the source frames at the source's resolution (L.composite):
    source uint8 (n, H, W, 3), generated uint8 (n, s, s, 3) -> uint8 (n, H, W, 3). One frame at a
    time: the float copies at the source's resolution are then one frame's, not a chunk's (a
    12-frame chunk at 720p makes several of 130 MB each)."""
    H, W = source.shape[1:3]
    out = np.empty_like(source)
    for k in range(len(source)):
        g = generated[k:k + 1]
        if g.shape[1:3] != (H, W):
            x = L.frames_to_tensor(g)                                              # (1, 3, s, s)
            mode = "bilinear" if H * W >= x.shape[-1] * x.shape[-2] else "area"
            g = L.tensor_to_frames(F.interpolate(x, size=(H, W), mode=mode))       # (1, H, W, 3)
        out[k:k + 1] = L.composite(source[k:k + 1], g)
    return out


def dub(stream, source, pieces, size):
    """Lip-sync `source` (uint8 (T, H, W, 3), looped ping-pong) to audio that arrives in `pieces`
    (an iterable of float32 16 kHz arrays). Yields the finished frames (m, H, W, 3) as the stream
    makes them, chunk by chunk; ceil(samples / 640) frames in all.

    `stream` is an L.LipSyncStream made with composite=False: it sees the frames at `size` and
    returns whole generated frames, which are pasted into the source frames here."""
    T = len(source)
    small = L.resize_frames(source, size)                                  # (T, size, size, 3)
    heard = pushed = done = 0
    for piece in itertools.chain(pieces, [None]):                          # None: the input has ended
        if piece is None:
            out = stream.flush()
        else:
            heard += len(piece)
            n = -(-heard // SPF)                                 # frames the audio has reached so far
            out = stream.push([small[pingpong(i, T)] for i in range(pushed, n)], piece)
            pushed = n
        if len(out):
            yield paste(source[[pingpong(i, T) for i in range(done, done + len(out))]], out)
            done += len(out)


def source_stream(args, student, ae, source):
    """The student's stream for dubbing `source` (the demo, files, --stream): whole generated frames
    (dub pastes them), --seed's noise, --steps' schedule, and as the identity frame the one
    --reference names, at the model's size, else the stream's own, the first frame (as the tables
    measure it). A neutral, closed-mouth frame is a good choice; the middle frame measured no
    different from the first on the test split (README)."""
    i, reference = args.reference, None
    if i is not None and i >= len(source):
        fail(f"--reference {i}: the source video has {len(source)} frames; pass 0 to {len(source) - 1}")
    if i is not None:
        reference = L.resize_frames(source[i:i + 1], args.size)[0]
    return L.LipSyncStream(student, ae, reference, seed=args.seed, composite=False, steps=args.schedule)


def warn_not_square(args, source):
    """The model sees square face crops: a frame of another shape is squeezed into one, and the
    face with it. Said, not refused: a crop a few pixels off square is fine."""
    H, W = source.shape[1:3]
    if H != W:
        log(args, f"note: the {W}x{H} frames are squeezed to {args.size}x{args.size}: the model expects square, "
                  f"aligned face crops (README, Lip-sync your own video)")


def frame_pieces(audio):
    """A whole clip's audio in 640-sample pieces, so a progress bar moves chunk by chunk."""
    return (audio[i:i + SPF] for i in range(0, len(audio), SPF))


def sync_c(net, frames, audio):
    """Sync-C (eval SyncNet) of frames (T, H, W, 3) against their audio; None for a clip of one
    SyncNet window or less, which it cannot score (not_measured says so)."""
    if len(frames) <= net.cfg.frames:
        return None
    audio = np.pad(audio[:len(frames) * SPF], (0, max(0, len(frames) * SPF - len(audio))))
    return L.evaluate_sync(net, [frames], [audio])["sync_c"]


# -----------------------------------------------------------------------------
# the demo and real files


def not_measured(net, n):
    return f"Sync-C: not measured, it takes more than {net.cfg.frames} frames ({n} here)"


def demo(args):
    """A held-out SynthTalk test speaker dubbed with another test speaker's voice, side by side with
    the source and with the dub's true video (SynthTalk draws the face with the dub track's mouth)."""
    student, ae, path = load_student(args)
    net = load_syncnet(args)
    clip = L.synthtalk_clip("test", 0, seconds=args.seconds, size=args.size)
    stream = source_stream(args, student, ae, clip.frames)
    out, t0, ttff = [], time.perf_counter(), None
    with L.autocast(args.device):
        for frames in dub(stream, clip.frames, frame_pieces(clip.dub_audio), args.size):
            ttff = ttff or time.perf_counter() - t0
            out.append(frames)
    dt, out = time.perf_counter() - t0, np.concatenate(out)
    dest = args.out or "out/demo.mp4"
    truth = L.synthtalk_render("test", 0, clip.dub_mouth, args.size)
    L.write_video(dest, np.concatenate([clip.frames, out, truth], axis=2), clip.dub_audio)
    print(f"wrote {dest}: source | dubbed | the dub's true video, {len(out)} frames, the dub audio")
    print(f"student {path}, {args.steps} steps, {args.device}: {len(out) / dt:.1f} FPS, "
          f"compute TTFF {1000 * ttff:.0f} ms, live TTFF {1000 * (ttff + student_wait(ae, student.cfg)):.0f} ms")
    print(f"mouth PSNR against the dub's true video: {L.psnr(L.mouth_crop(out), L.mouth_crop(truth)):.2f} dB")
    dubbed = sync_c(net, out, clip.dub_audio)
    if dubbed is None:
        print(not_measured(net, len(out)))
        return
    print(f"Sync-C (eval SyncNet): dubbed vs the dub audio {dubbed:.2f}; "
          f"source vs its own audio {sync_c(net, clip.frames, clip.audio):.2f}")


def files(args):
    """--video + --audio -> --out, offline."""
    source, fps = L.read_video(args.video)
    audio = L.read_audio(args.audio)
    student, ae, _ = load_student(args)
    T, n = len(source), -(-len(audio) // SPF)
    print(f"{args.video}: {frames_str(T)} {source.shape[2]}x{source.shape[1]} (from {fps:g} fps); "
          f"{args.audio}: {len(audio) / L.SAMPLE_RATE:.2f} s -> {frames_str(n)}"
          + (" (video looped ping-pong)" if n > T else " (video cut to the audio)" if n < T else ""))
    warn_not_square(args, source)
    stream = source_stream(args, student, ae, source)
    dest = args.out or os.path.join("out", f"{os.path.splitext(os.path.basename(args.video))[0]}-lipsync.mp4")

    def made():                                           # the frames as the stream makes them, counted
        for frames in dub(stream, source, frame_pieces(audio), args.size):
            bar.update(len(frames))
            yield frames

    # each chunk goes to the encoder as it is made: the output clip, as large as the source, is
    # never held whole (the mp4 is the same, byte for byte, as from the whole array)
    with L.autocast(args.device), tqdm(total=n, unit="frame") as bar:
        L.write_video(dest, made(), audio_file=args.audio, shape=(n, *source.shape[1:]))   # its own rate and channels
    print(f"wrote {dest}")


# -----------------------------------------------------------------------------
# the live stream


def check_raw_pcm(head, path, ended):
    """Refuse (one line) a head of bytes that begins a container file or is text, not raw PCM. True
    once the head is long enough to tell (or the input has ended), False while more of it may come."""
    convert = "convert with `ffmpeg -i IN -f s16le -ar 16000 -ac 1 -`"
    for kind, (at, magic) in CONTAINER_MAGIC.items():
        if head[at:at + len(magic)] == magic:
            fail(f"--stream reads raw PCM, {path} is {kind}: {convert}")
    done = ended or len(head) >= HEAD_BYTES
    if done and head and all(32 <= b < 127 or b in b"\t\n\r" for b in head[:TEXT_BYTES]):
        fail(f"--stream reads raw PCM, {path} is text: {convert}")
    return done


def pcm_pieces(path):
    """Raw 16-bit little-endian 16 kHz mono PCM as float32 pieces, as it arrives: from stdin (-),
    a named pipe (both end at EOF), or a regular file still being written (read on as it grows; it
    has ended once GROW_IDLE seconds pass without new data). Pieces are whatever one read returns."""
    f = sys.stdin.buffer if path == "-" else open(path, "rb")
    growing = path != "-" and os.path.isfile(path)
    carry, checked, idle_since = b"", False, None
    try:
        while True:
            new = f.read1(1 << 16)                         # what has arrived, without waiting for more
            ended = not new and (not growing or (idle_since and time.monotonic() - idle_since > GROW_IDLE))
            if not new and not ended:
                idle_since = idle_since or time.monotonic()
                time.sleep(0.02)
                continue
            idle_since = None
            b = carry + new
            if not checked:                                # the head is in (or all there will be): a container's?
                checked = check_raw_pcm(b, path, ended)
            if not checked:                                # a few bytes so far: wait for the rest of the head
                carry = b
                continue
            carry, b = b[len(b) // 2 * 2:], b[:len(b) // 2 * 2]    # a sample can be split across reads
            if b:
                yield np.frombuffer(b, "<i2").astype(np.float32) / 32768
            if ended:
                return
    finally:
        if f is not sys.stdin.buffer:
            f.close()


class Mp4Writer:
    """An mp4 written as frames come in: H.264 into a temp folder as the frames arrive (the
    "veryfast" preset, to keep up live), the audio into a wav beside it; finish() muxes the two and
    renames the result into place (L.atomic_path), so a stream that stops midway leaves nothing at `path`."""
    def __init__(self, path, H, W):
        self.path, self.dir = path, tempfile.TemporaryDirectory()
        self.video, self.log = os.path.join(self.dir.name, "video.mp4"), open(os.path.join(self.dir.name, "log"), "w+b")
        import soundfile
        self.wav = soundfile.SoundFile(os.path.join(self.dir.name, "audio.wav"), "w", L.SAMPLE_RATE, 1, "PCM_16")
        cmd = [L.ffmpeg_exe(), "-y", "-hide_banner", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
               "-s", f"{W + W % 2}x{H + H % 2}", "-r", str(L.FPS), "-i", "-",
               "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "18", "-preset", "veryfast", self.video]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=self.log)
        self.frames = 0

    def write(self, frames):
        # libx264 wants even sizes: replicate the last row / column, as L.write_video does
        self.frames += len(frames)
        H, W = frames.shape[1:3]
        try:
            self.proc.stdin.write(np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)), mode="edge").tobytes())
        except BrokenPipeError:                           # ffmpeg died; its log says why
            self.proc.wait()
            self.failed(self.log)

    def finish(self):
        self.proc.stdin.close()
        # the audio ends with the last frame, padded with silence as L.write_video pads it
        self.wav.write(np.zeros(max(0, self.frames * SPF - self.wav.frames), np.float32))
        self.wav.close()
        if self.proc.wait() != 0:
            self.failed(self.log)
        with L.atomic_path(self.path) as tmp, tempfile.TemporaryFile() as log:
            cmd = [L.ffmpeg_exe(), "-y", "-hide_banner", "-nostdin", "-v", "error", "-i", self.video, "-i", self.wav.name,
                   "-map", "0:v:0", "-map", "1:a:0", "-c:v", "copy", "-c:a", "aac", "-b:a", "128k",
                   "-movflags", "+faststart", L.ffmpeg_path(tmp)]
            if subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=log).returncode != 0:
                self.failed(log)

    def failed(self, log):
        log.seek(0)
        lines = log.read().decode(errors="replace").strip().splitlines() or ["no error output"]
        raise L.MediaError(f"cannot write {self.path}: ffmpeg failed ({lines[-1]})")

    def close(self):
        """Stop ffmpeg if it still runs and delete the temp folder (after finish, or on failure)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.wav.close()
        self.log.close()
        self.dir.cleanup()


def live(args):
    """--stream: push source frames as the audio arrives, write frames as they are made.

    The face video is read whole and looped ping-pong; frame i is pushed once the audio reaches into
    it, and the stream runs a chunk as soon as its 9 (then 12) frames and its audio lookahead are in:
    with real-time audio the first frame comes out student_wait (0.45 s) plus one chunk's compute
    after the first sample. TTFF is timed from the moment the first audio sample is read (audio that
    waited in the pipe while the models loaded counts from when it is read). The output ends when
    the audio does (EOF, or a growing file that stopped growing); Ctrl-C aborts and leaves no mp4."""
    source, _ = L.read_video(args.video)
    student, ae, _ = load_student(args)
    raw = args.out == "-"
    H, W = source.shape[1:3]
    dest = f"raw rgb24 {W}x{H} {L.FPS} fps frames on stdout" if raw else args.out
    log(args, f"streaming: {args.video} ({frames_str(len(source))} {W}x{H}, looped ping-pong) driven by {args.audio} -> {dest}")
    warn_not_square(args, source)
    writer = None if raw else Mp4Writer(args.out, H, W)
    t_in, t_out, n = None, None, 0

    def arriving():                                       # the audio pieces, timing the first one
        nonlocal t_in
        for piece in pcm_pieces(args.audio):
            t_in = t_in or time.perf_counter()
            if writer:
                writer.wav.write(piece)
            yield piece

    stream = source_stream(args, student, ae, source)
    try:
        with L.autocast(args.device):
            for frames in dub(stream, source, arriving(), args.size):
                if raw:
                    sys.stdout.buffer.write(frames.tobytes())
                    sys.stdout.buffer.flush()
                else:
                    writer.write(frames)
                if t_out is None:
                    t_out = time.perf_counter()
                    log(args, f"TTFF {1000 * (t_out - t_in):.0f} ms (first audio sample read -> first frame out)")
                n += len(frames)
        if n == 0:
            fail(f"no audio arrived from {args.audio}: send raw s16le 16 kHz mono PCM (ffmpeg -f s16le -ar 16000 -ac 1)")
        if writer:
            writer.finish()
    except OSError as e:
        if not raw:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())   # no second error when Python flushes at exit
        fail("stdout was closed by the program reading the frames" if isinstance(e, BrokenPipeError)
             else f"cannot write the frames to stdout ({e.strerror or e})")
    finally:
        if writer:
            writer.close()
    log(args, f"streamed {frames_str(n)} ({n / L.FPS:.2f} s) in {time.perf_counter() - t_in:.2f} s" + ("" if raw else f": {args.out}"))


# -----------------------------------------------------------------------------
# benchmark: the causal student streaming vs the bidirectional teacher


def count_flops():
    """torch's FlopCounterMode (matrix products, convolutions, attention; 2 FLOPs a multiply-add;
    elementwise work and the mel spectrogram's FFT are not counted), taught the CPU's fused
    attention kernel, which its table leaves out."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    cpu_attention = lambda q, k, v, *args, out_shape=None, **kw: sdpa_flop_count(q, k, v)    # shapes in
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention})


class Timed(torch.nn.Module):
    """The model, plus the time spent in its forward passes (for DiT-only FPS). On a CPU the wall
    time of each call; on a GPU the time between CUDA events recorded around each call on the
    stream, so that timing the DiT adds no host-device sync to the end-to-end run it sits in.
    (Its passes are also what count_flops files under the name "Timed": the DiT's FLOPs.)"""
    def __init__(self, model):
        super().__init__()
        self.model, self.cfg, self.wall, self.events = model, model.cfg, 0.0, []
        self.audio_encoder = model.audio_encoder      # outside the timed passes, as the autoencoder is
        self.device = next(model.parameters()).device

    def forward(self, *args, **kw):
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = self.model(*args, **kw)
            end.record()
            self.events.append((start, end))
            return out
        t0 = time.perf_counter()
        out = self.model(*args, **kw)
        self.wall += time.perf_counter() - t0
        return out

    @property
    def seconds(self):
        sync(self.device)
        return self.wall + sum(start.elapsed_time(end) for start, end in self.events) / 1000


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def peak_memory_mb(device):
    """Peak GPU memory allocated (cuda) or the process's peak resident memory (cpu), in MB."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2 ** 20 if sys.platform == "darwin" else 2 ** 10)


def rss_mb():
    """This process's resident memory now, in MB (Linux; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except OSError:
        return None


def bench_student(student, ae, frames, audio, device, seed=0, steps=L.STUDENT_STEPS):
    """Stream the clip as live input would arrive (frame i with the audio up to its end plus the
    lookahead), all of it available at once: FPS, DiT-only FPS, compute TTFF, chunk latencies."""
    timed = Timed(student)
    stream = L.LipSyncStream(timed, ae, seed=seed, composite=False, steps=steps)
    look = L.audio_lookahead(student.cfg.audio_reach)
    lat, n, ttff = [], 0, None
    sync(device)
    t0 = time.perf_counter()
    with L.autocast(device):
        stream.push(audio=audio[:look])
        for i in range(len(frames) + 1):                  # the last round is the flush
            t = time.perf_counter()
            if i < len(frames):
                out = stream.push(frames[i:i + 1], audio[look + i * SPF:look + (i + 1) * SPF])
            else:
                out = stream.flush()
            if len(out):
                lat.append(time.perf_counter() - t)
                ttff = ttff or time.perf_counter() - t0
                n += len(out)
    dt = time.perf_counter() - t0
    return {"frames": n, "fps": n / dt, "dit_fps": n / timed.seconds, "ttff_compute_ms": 1000 * ttff,
            "input_wait_ms": 1000 * student_wait(ae, student.cfg),
            "chunk_p50_ms": 1000 * float(np.percentile(lat, 50)), "chunk_p95_ms": 1000 * float(np.percentile(lat, 95)),
            "peak_memory_mb": peak_memory_mb(device), "state_mb": stream.nbytes() / 2 ** 20}


@torch.inference_mode()
def bench_teacher(teacher, ae, frames, audio, device, seed=0, steps=L.ODE_STEPS):
    """The teacher as it samples: 33-frame windows with a 32-frame hop, each encoded, sampled with
    50 Euler steps and CFG 4.5 (batch 2: conditional and unconditional), decoded, one after another.
    (encode_clip also encodes the unmasked frames, of which sampling uses only frame 0, the
    reference: a few % of encode time on top of 100 DiT passes per window.)"""
    ctx, T = teacher.cfg.audio_context, 1 + L.TEACHER_HOP
    timed = Timed(teacher)
    g = torch.Generator().manual_seed(seed)
    n, ttff = 0, None
    starts = range(0, len(frames) - T + 1, L.TEACHER_HOP)
    sync(device)
    t0 = time.perf_counter()
    feats = L.audio_frame_features(audio, ctx, teacher.audio_encoder)   # row i = frame i - 3 - ctx (all audio is in)
    for k, s in enumerate(starts):
        # encode_clip of the window alone; its audio rows come from the whole clip (the window's
        # first latent frame hears the 3 + ctx frames before it)
        enc = dataclasses.replace(L.encode_clip(ae, frames[s:s + T], audio[s * SPF:(s + T) * SPF], ctx), feats=feats[s:])
        x0, cond, a = (x[None].to(device) for x in L.latent_window(enc, 0, L.TEACHER_LATENT, 0, ctx))
        noise = torch.randn(x0.shape, generator=g).to(device)
        with L.autocast(device):
            z = L.sample_ode(timed, cond, a, noise, steps, cfg=L.CFG_SCALE, mode=teacher.cfg.drop_mode)
            out = L.tensor_to_frames(ae.decode(z.float())[0][0])                  # (33, H, W, 3)
        n += len(out) if k == len(starts) - 1 else L.TEACHER_HOP
        ttff = ttff or time.perf_counter() - t0
    dt = time.perf_counter() - t0
    return {"frames": n, "fps": n / dt, "dit_fps": n / timed.seconds, "ttff_compute_ms": 1000 * ttff,
            "input_wait_ms": 1000 * teacher_wait(teacher.cfg),
            "chunk_p50_ms": None, "chunk_p95_ms": None, "peak_memory_mb": peak_memory_mb(device), "state_mb": None}


def benchmark(args):
    dev, cuda = args.device, args.device.startswith("cuda")
    # weights from the checkpoints where they exist, else random init: speed does not depend on them.
    # The DiTs wait on the CPU; each goes to the device for its own run, so its peak memory is its own.
    if vae_file := os.path.isfile(args.vae):
        ae, weights = load_ae(args), f"autoencoder {args.vae}"
    else:
        ae, weights = L.VideoAE(L.AEConfig()).to(dev).eval(), "autoencoder random init"
    path = None if args.shape else student_path(args, required=False)
    extra = {}
    if path:
        student, extra = load_dit(path, "cpu")
        check_latents(ae, student, extra if vae_file else {}, path, args.vae)   # random init: speed only
        weights += f", student {path}"
    else:
        student = L.DiT(L.preset_config(args.shape or "tiny", args.depth, args.patch, args.dim, causal=True,
                                        latent_channels=ae.cfg.latent_channels)).eval()
        weights += (f", student random init (preset {args.shape or 'tiny'}, patch {student.cfg.patch}, "
                    f"depth {student.cfg.depth})")
    cfg = student.cfg
    if os.path.isfile(args.teacher) and not args.shape:
        teacher, teacher_extra = load_dit(args.teacher, "cpu", causal=False)
        check_latents(ae, teacher, teacher_extra if vae_file else {}, args.teacher, args.vae)
        weights += f", teacher {args.teacher}"
    else:
        teacher = L.DiT(dataclasses.replace(cfg, causal=False)).eval()
        weights += ", teacher random init (the student's config, bidirectional)"
    args.size = student_size(args, path, extra)
    clip = L.synthtalk_clip("test", 0, seconds=args.seconds, size=args.size)    # long enough: check_args
    frames, audio = clip.frames, clip.dub_audio
    warm = max(1 + L.TEACHER_HOP, warm_up_frames(ae, cfg))     # a teacher window, and every cache state of a stream

    def counted(fn, model, kw):
        """FLOPs per frame of one more run, end to end and in the DiT. They do not depend on speed,
        so it is untimed, after the timed one (whose peak memory stays its own), and eager."""
        if not args.flops:
            return {"gflop_per_frame": None, "dit_gflop_per_frame": None}
        with count_flops() as total:
            r = fn(model.to(dev), ae, frames, audio, dev, **kw)
        model.to("cpu")
        dit = sum(total.get_flop_counts()[Timed.__name__].values())        # the passes of fn's Timed DiT
        return {"gflop_per_frame": total.get_total_flops() / r["frames"] / 1e9,
                "dit_gflop_per_frame": dit / r["frames"] / 1e9}

    def run(fn, model, kw, warm_kw):
        model.to(dev)
        model = L.compile_blocks(model) if args.compile else model    # both or neither: a like-for-like ratio
        sync(dev)
        t0 = time.perf_counter()
        fn(model, ae, frames[:warm], audio[:warm * SPF], dev, **{**kw, **warm_kw})   # warm-up (kernels, allocator, compiling)
        sync(dev)
        warm_s = time.perf_counter() - t0
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(dev)
        r = fn(model, ae, frames, audio, dev, **kw)
        r["live_ttff_ms"] = r["input_wait_ms"] + r["ttff_compute_ms"]
        r["warm_up_s"] = warm_s
        model.to("cpu")
        if args.flops and args.compile:            # compile_blocks worked in place: count on an eager copy
            eager = L.DiT(model.cfg).eval()
            eager.load_state_dict(model.state_dict())
            model = eager
        r.update(counted(fn, model, kw))
        return r

    res = {"student": run(bench_student, student, {"steps": args.schedule}, {}),
           "teacher": run(bench_teacher, teacher, {}, {"steps": 2})}
    res["throughput_ratio"] = res["student"]["fps"] / res["teacher"]["fps"]
    if args.flops:       # the throughput ratio if every FLOP ran at one speed
        res["flop_ratio"] = {name: res["teacher"][key] / res["student"][key]
                             for name, key in (("end_to_end", "gflop_per_frame"), ("dit_only", "dit_gflop_per_frame"))}
    res["setup"] = {"device": dev, "threads": torch.get_num_threads(), "size": args.size, "seconds": args.seconds,
                    "compile": args.compile, "flops": "counted by sample.count_flops" if args.flops else None,
                    "dit": dataclasses.asdict(cfg), "weights": weights, "student_steps": args.steps,
                    "teacher": f"{L.ODE_STEPS} Euler steps, CFG {L.CFG_SCALE}, {L.TEACHER_LATENT}-latent windows, "
                               f"{L.TEACHER_HOP}-frame hop",
                    "memory": "torch.cuda.max_memory_allocated (one DiT on the GPU at a time; fp32 weights, bf16 "
                              "autocast)" if cuda else "process peak RSS so far (the teacher's includes the student's run"
                              + (" and its FLOP count)" if args.flops else ")")}
    print_benchmark(res)
    L.save_json(os.path.join(args.results, "benchmark.json"), res)


def print_benchmark(res):
    s, t, setup = res["student"], res["teacher"], res["setup"]
    fmt = lambda v, f="{:.1f}": "-" if v is None else f.format(v)
    print(f"\nbenchmark on {setup['device']} ({setup['threads']} threads), {setup['size']} px, "
          f"{setup['seconds']:g} s SynthTalk clip; {setup['weights']}")
    dit = setup["dit"]
    compiled = ", blocks compiled" if setup["compile"] else ""
    print(f"DiT dim {dit['dim']}, depth {dit['depth']}, patch {dit['patch']}{compiled}; end to end = encode + DiT + decode; "
          f"compute TTFF: all input available; live TTFF = input wait + compute TTFF\n")
    print(f"| | student (causal, {setup['student_steps']} steps, KV cache) | teacher ({setup['teacher']}) |\n|---|---|---|")
    rows = [("frames", "frames", "{:d}"), ("FPS, end to end", "fps", "{:.1f}"), ("FPS, DiT only", "dit_fps", "{:.1f}"),
            ("compute TTFF (ms)", "ttff_compute_ms", "{:.0f}"), ("input wait (ms)", "input_wait_ms", "{:.0f}"),
            ("live TTFF (ms)", "live_ttff_ms", "{:.0f}"), ("chunk latency p50 (ms)", "chunk_p50_ms", "{:.1f}"),
            ("chunk latency p95 (ms)", "chunk_p95_ms", "{:.1f}"), ("peak memory (MB)", "peak_memory_mb", "{:.0f}"),
            ("stream state (MB)", "state_mb", "{:.2f}"), ("warm-up, untimed (s)", "warm_up_s", "{:.1f}")]
    if "flop_ratio" in res:
        rows += [("GFLOP per frame, end to end", "gflop_per_frame", "{:.4g}"),
                 ("GFLOP per frame, DiT only", "dit_gflop_per_frame", "{:.4g}")]
    for label, key, f in rows:
        print(f"| {label} | {fmt(s[key], f)} | {fmt(t[key], f)} |")
    print(f"\nthroughput student / teacher: {res['throughput_ratio']:.1f}x; memory: {setup['memory']}")
    if "flop_ratio" in res:
        r = res["flop_ratio"]
        print(f"FLOP ratio teacher / student (the throughput ratio if every FLOP ran at one speed): {r['end_to_end']:.1f}x "
              f"end to end, {r['dit_only']:.1f}x DiT only; FLOPs of matrix products, convolutions and attention, counted in "
              f"one more untimed run of each")


# -----------------------------------------------------------------------------
# long stream: is memory constant and does sync hold over minutes?


def long_stream(args):
    """Stream one long SynthTalk test clip (dubbed) through the student. Only the first and the last
    30 s of output are kept (for Sync-C); the input clip itself is generated whole."""
    student, ae, path = load_student(args)
    net = load_syncnet(args)
    clip = L.synthtalk_clip("test", 0, seconds=args.long_stream, size=args.size)
    keep, mark = 30 * L.FPS, 20 * L.FPS                   # frames of Sync-C at each end; memory read at 20 s
    first, last, n, at = [], deque(maxlen=keep), 0, {}
    stream = L.LipSyncStream(student, ae, seed=args.seed, composite=False, steps=args.schedule)
    memory = lambda: {"frames": n, "peak_rss_mb": peak_memory_mb("cpu"), "rss_mb": rss_mb(), "state_bytes": stream.nbytes()}
    t0 = time.perf_counter()
    with L.autocast(args.device), tqdm(total=len(clip.frames), unit="frame") as bar:
        for frames in dub(stream, clip.frames, frame_pieces(clip.dub_audio), args.size):
            first.extend(frames[:max(0, keep - n)])
            last.extend(frames)
            n += len(frames)
            bar.update(len(frames))
            if n >= mark and "20s" not in at:
                at["20s"] = memory()
    at["end"] = memory()
    dt = time.perf_counter() - t0
    last = np.stack(last)
    res = {"seconds": args.long_stream, "frames": n, "fps": n / dt, "student": path, "steps": args.steps,
           "memory": at, "sync_c_first_30s": sync_c(net, np.stack(first), clip.dub_audio),
           "sync_c_last_30s": sync_c(net, last, clip.dub_audio[(n - len(last)) * SPF:])}
    print(f"\nlong stream: {args.long_stream:g} s SynthTalk test clip 0 dubbed, {path}, {n / dt:.1f} FPS on {args.device}\n")
    print("| | at 20 s | at the end (after the flush: no input buffered) |\n|---|---|---|")
    get = lambda k, key, f: f.format(at[k][key]) if k in at and at[k][key] is not None else "-"
    for label, key, f in (("frames", "frames", "{:d}"), ("peak RSS (MB)", "peak_rss_mb", "{:.0f}"),
                          ("RSS now (MB)", "rss_mb", "{:.0f}"), ("stream state (bytes)", "state_bytes", "{:d}")):
        print(f"| {label} | {get('20s', key, f)} | {get('end', key, f)} |")
    if res["sync_c_first_30s"] is None:                  # both ends hold all n frames or 30 s of them
        print("\n" + not_measured(net, n))
    else:
        print(f"\nSync-C (eval SyncNet, vs the dub audio): first 30 s {res['sync_c_first_30s']:.2f}, "
              f"last 30 s {res['sync_c_last_30s']:.2f}")
    L.save_json(os.path.join(args.results, "long_stream.json"), res)


# -----------------------------------------------------------------------------


def main(argv=None):
    args = get_args(argv)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.schedule = L.STUDENT_STEPS[:args.steps]          # 2: t = 0.999, 0.769; 1: t = 0.999
    try:
        with torch.no_grad():
            if args.benchmark:
                benchmark(args)
            elif args.long_stream:
                long_stream(args)
            elif args.stream:
                live(args)
            elif args.video is not None:
                files(args)
            else:
                demo(args)
    except L.MediaError as e:
        fail(str(e))
    except OSError as e:                                   # the disk or a folder: full, gone, not permitted
        fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    except MemoryError:
        fail("out of memory: use a shorter --seconds or --long-stream (with --benchmark: or a smaller --size)")
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        raise SystemExit(130)


if __name__ == "__main__":
    try:
        main()
    finally:                                             # the run is over: a late signal just ends the process
        for sig in [*SIGNALS, signal.SIGINT]:
            signal.signal(sig, signal.SIG_DFL)
