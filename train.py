"""
Every training stage of lipforcing, in one flat script.

  python train.py vae                      # video autoencoder (4x time, 8x space, 16 channels)
  python train.py syncnet --role reward    # the SyncNet the distillation optimises against
  python train.py syncnet --role eval      # the SyncNet that only reports numbers
  python train.py mouthnet                 # frames -> mouth parameters, for MouthErr
  python train.py eval                     # the foundation table (README), JSON in results/
  python train.py foundation               # all of the above, in order
  python train.py export --out DIR         # write SynthTalk clips as mp4 files (the --data layout)
  python train.py teacher                  # the bidirectional audio-conditioned DiT (flow matching)
  python train.py heldout                  # the teacher's x0 error on its training identities vs unseen ones
  python train.py audio-probe              # how well the DiT's audio input alone determines the mouth
  python train.py eval-teacher             # the teacher's table (50 steps, CFG 4.5 / none)
  python train.py df                       # Diffusion-Forcing init of the causal student from the teacher
  python train.py dmd                      # Self-Forcing DMD, Sync-Window CFG teacher, SyncNet reward
  python train.py eval-student             # the student streamed over the test clips (2 steps per chunk)
  python train.py eval-student --split val # the same over 16 unseen training-distribution clips (no dub track)
  python train.py ablation                 # the distillation's table: teacher, DF-init and every DMD student
  python train.py pipeline                 # foundation models, teacher, df, dmd: every model the final student needs
  python train.py pipeline --steps 2 --clips 4 --seconds 2 --batch 16 --size 32 --ckpt-dir /tmp/dry   # its dry run

On a GPU: add --device cuda (the default when one is present; bf16 autocast), and --compile to teacher.
On a CPU: add --channels-last to foundation or pipeline; with native bf16 (AVX512-BF16 or AMX),
--bf16-convs too (README).

Several processes (nanoGPT-style data parallel; --batch stays the global batch):
  torchrun --nproc_per_node=8 train.py teacher --preset small --size 256
  torchrun --nproc_per_node=8 train.py teacher --preset wan1.3b --size 512 --fsdp --compile
  torchrun --nproc_per_node=2 train.py vae --device cpu          # CPU processes talk over gloo

Data is SynthTalk (generated, deterministic) unless --data DIR points at a folder of real clips
(mp4/mov/webm/avi/mkv with an audio track, aligned face crops). Checkpoints are safetensors with their
config inside, written to checkpoints/ unless --out says otherwise.
"""

import argparse
import contextlib
import copy
import dataclasses
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import lipforcing as L

# -----------------------------------------------------------------------------
# shared plumbing

RESULTS = "results"       # --results: where the tables' JSON goes (the committed ones are here)
CKPT_DIR = "checkpoints"  # --ckpt-dir: where checkpoints are read and written
PATH_DEFAULTS = {"ckpt_dir": CKPT_DIR, "results": RESULTS}   # filled in after parsing, once it is known whether they were given
STAGE_OUT = {"vae": "vae", "syncnet": "syncnet_{role}", "mouthnet": "mouthnet", "teacher": "teacher",
             "df": "student_df", "dmd": "student"}   # each training stage's checkpoint in --ckpt-dir, unless --out


def out_path(args):
    """The checkpoint a training stage writes: --out, else its STAGE_OUT name in --ckpt-dir."""
    return args.out or os.path.join(args.ckpt_dir, STAGE_OUT[args.stage].format(role=args.role) + ".safetensors")


def stage_reads(args):
    """The checkpoints a training stage reads, which it must not write over (vae --init, which
    fine-tunes in place, excepted)."""
    ckpt = lambda name: os.path.join(args.ckpt_dir, f"{name}.safetensors")
    return {"teacher": [ckpt("vae")], "df": [ckpt("vae"), args.init or ckpt("teacher")],
            "dmd": [ckpt("vae"), ckpt("syncnet_reward"), args.teacher or ckpt("teacher"),
                    args.init or ckpt("student_df")]}.get(args.stage, [])


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (see python train.py --help)")       # one line, not usage + error
    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("--data", default=None, help="folder of real clips instead of SynthTalk")
    p.add_argument("--size", type=L.frame_size, default=L.FRAME_SIZE,
                   help=f"frame size (square face crops, a multiple of {L.FRAME_MULTIPLE} from {L.MIN_FRAME_SIZE}; "
                        "the DiT checkpoints record it, and sample.py samples a student at its own)")
    p.add_argument("--clips", type=L.positive_int, default=None, help="training clips in the pool")
    p.add_argument("--seconds", type=L.positive_float, default=None, help="seconds per SynthTalk training clip")
    p.add_argument("--steps", type=L.positive_int, default=None, help="optimiser steps")
    p.add_argument("--batch", type=L.positive_int, default=None, help="global batch size")
    p.add_argument("--lr", type=L.positive_float, default=None,
                   help=f"peak learning rate (default: vae {VAE_LR:g}, syncnet {SYNCNET_LR['reward']:g} (reward) "
                        f"or {SYNCNET_LR['eval']:g} (eval), mouthnet {MOUTHNET_LR:g}, teacher {TEACHER_LR:g}, "
                        f"df {DF_LR:g}, dmd {DMD_LR:g}, audio-probe {PROBE_LR:g})")
    p.add_argument("--seed", type=L.seed_int, default=None)
    p.add_argument("--role", choices=["reward", "eval"], default="eval", help="which SyncNet (syncnet stage)")
    p.add_argument("--ckpt-dir", default=None, help=f"where checkpoints are read and written (default {CKPT_DIR})")
    p.add_argument("--init", default=None, help="start from this checkpoint's weights and config (vae: fine-tuning; "
                                                "df: the teacher it starts from; dmd: the student it starts from)")
    p.add_argument("--ckpt", default=None, help="checkpoint to evaluate (default: <ckpt-dir>/teacher.safetensors; "
                                                "eval-student: <ckpt-dir>/student_df.safetensors)")
    p.add_argument("--out", default=None, help="checkpoint path (default: <ckpt-dir>/<stage>.safetensors; syncnet: "
                                              "syncnet_<role>, df: student_df, dmd: student); export: the folder "
                                              "of clips (default data/synthtalk)")
    p.add_argument("--results", default=None, help=f"folder for JSON results (default {RESULTS})")
    p.add_argument("--test-clips", type=L.positive_int, default=L.TEST_CLIPS, help="test clips to evaluate on")
    p.add_argument("--split", choices=["test", "val"], default=None,
                   help="eval-teacher, eval-student: the test split (default), or val: 16 unseen training-distribution clips as "
                        "long as the test clips and without a dub track, to choose a recipe off the test split")
    p.add_argument("--preset", choices=list(L.DIT_PRESETS), default="tiny", help="DiT size")
    p.add_argument("--latent-frames", type=L.positive_int, default=None,
                   help="latent frames per training window (teacher 9 = 33 video frames, df 12 = 4 chunks)")
    p.add_argument("--patch", type=int, choices=L.DIT_PATCHES, default=None,
                   help=f"the DiT's spatial patch (teacher; df and dmd inherit it; default {L.DiTConfig.patch})")
    p.add_argument("--depth", type=L.positive_int, default=None,
                   help="the DiT's blocks, over the preset's (teacher; df and dmd inherit it)")
    p.add_argument("--dim", type=L.positive_int, default=None,
                   help="the DiT's width, over the preset's, with its head width and FFN ratio "
                        "(teacher; df and dmd inherit it)")
    p.add_argument("--mouth-weight", type=L.nonnegative_float, default=MOUTH_WEIGHT,
                   help="the flow-matching losses (teacher, df, the dmd critic) add this times their error over "
                        f"the mouth box (default {MOUTH_WEIGHT:g}; 0: the plain loss)")
    p.add_argument("--drop-mode", choices=["audio", "all"], default=L.DiTConfig.drop_mode,
                   help="CFG dropout: audio only, or all conditions (teacher)")
    p.add_argument("--cfg-drop", type=L.probability, default=L.DiTConfig.cfg_drop,
                   help=f"CFG dropout: the probability that a training sample loses its condition (teacher; default {L.DiTConfig.cfg_drop:g})")
    p.add_argument("--audio-adaln", action="store_true",
                   help="the audio embedding also joins the timestep's in every block's adaLN input (teacher; "
                        "df and dmd inherit it): a stronger model without CFG and a better student (README)")
    p.add_argument("--audio-encoder", action="store_true",
                   help="the DiT reads per-frame embeddings of the frozen reward SyncNet's audio stream, not the "
                        "raw log-mel (teacher; df and dmd inherit it; <ckpt-dir>/syncnet_reward.safetensors): "
                        "a teacher that syncs better with CFG (README)")
    p.add_argument("--compile", action="store_true", help="torch.compile the DiT's blocks (teacher; pipeline passes it to teacher)")
    p.add_argument("--grad-ckpt", action="store_true",
                   help="activation checkpointing of the DiT blocks (teacher, the dmd critic): each block's "
                        "activations are recomputed in backward instead of kept, for the large shapes on one GPU "
                        "(not df or the dmd student: their passes attend a KV cache, which later chunks rewrite)")
    p.add_argument("--bf16-convs", action="store_true",
                   help="train the convolutional models (vae, syncnet, mouthnet) under bf16 autocast, on a CPU too: "
                        "1.4-1.7x faster steps on a CPU with native bf16 (AVX512-BF16 or AMX); leave it off on one without. "
                        "foundation and pipeline keep the eval SyncNet in fp32")
    p.add_argument("--channels-last", action="store_true",
                   help="train the convolutional models (vae, syncnet, mouthnet) in channels-last memory: the same "
                        "model up to float rounding, and on a CPU (oneDNN's convolutions) 1.35x faster autoencoder "
                        "steps, 1.15x faster SyncNet steps")
    p.add_argument("--fsdp", action="store_true", help="under torchrun: shard the DiTs' weights, gradients and "
                                                      "optimiser state over the processes (teacher, df, dmd; "
                                                      "no --resume, --state or --stop-after)")
    p.add_argument("--resume", action="store_true", help="continue from the training-state file (training stages)")
    p.add_argument("--state", default=None, help="training-state file (default: the output's name with .state.safetensors); "
                                                 "none: write no state (a timing run of a large shape: at wan1.3b it is 26 GB)")
    p.add_argument("--stop-after", type=L.positive_int, default=None, help="stop after this many steps (state saved)")
    p.add_argument("--log-every", type=L.positive_int, default=None,
                   help=f"steps between log lines (default {LOG_EVERY}; dmd {DMD_LOG_EVERY}, audio-probe {PROBE_LOG_EVERY})")
    g = p.add_argument_group("dmd")
    g.add_argument("--teacher", default=None, help="teacher checkpoint (default: <ckpt-dir>/teacher.safetensors); "
                                                   "the critic starts from it too")
    g.add_argument("--teacher-cfg", choices=TEACHER_CFG, default=None,
                   help="the teacher's guidance in DMD: none, fixed (--cfg-scale everywhere), "
                        "window (the default: --cfg-scale for re-noise t in [0.556, 0.882], 1 elsewhere)")
    g.add_argument("--cfg-scale", type=L.nonnegative_float, default=None,
                   help=f"the teacher's guidance scale (default {L.CFG_SCALE:g}; dmd, and eval-teacher, which "
                        "grades it beside no CFG)")
    g.add_argument("--beta", type=L.nonnegative_float, default=None,
                   help=f"SyncNet reward w = exp(beta R) (default {DMD_DEFAULTS['beta']:g}); 0 turns it off")
    g.add_argument("--reward-scale", type=L.positive_float, default=None,
                   help="R = Sync-C / this in w = exp(beta R). Default: the reward SyncNet's ground-truth "
                        "Sync-C over syncnet_python's on HDTF (19.15 / 7.95 = 2.41 for ours), which puts R in the "
                        "paper's units: our SyncNets' distances have their own scale, and with R in them exp(2 R) "
                        "weights samples far more sharply than the paper's (a Sync-C gap of 5 is a factor e^10). "
                        "1 is the paper's formula applied to our raw Sync-C")
    g.add_argument("--critic-lr", type=L.positive_float, default=None, help=f"critic learning rate (default {DMD_LR:g})")
    g.add_argument("--critic-steps", type=L.positive_int, default=None,
                   help=f"critic updates per student update (default {DMD_DEFAULTS['critic_steps']})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=L.positive_int, default=None,
                   help="torch CPU threads (default: torch's), and the processes that generate a SynthTalk "
                        "pool (default: this process's share of the cores)")
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    stage = next((a for a in argv if a in STAGES), None)
    if stage and {"-h", "--help"} & set(argv):          # a stage's help leaves out the options it refuses
        for action in p._actions:
            if action.dest in STAGE_OPTIONS and stage not in STAGE_OPTIONS[action.dest]:
                action.help = argparse.SUPPRESS
        p.epilog = f"(without the options {stage} refuses; python train.py --help lists them all)"
    args = p.parse_args(argv)
    args.paths_given = [name for name in PATH_DEFAULTS if getattr(args, name) is not None]   # for check_options
    for name, default in PATH_DEFAULTS.items():
        setattr(args, name, getattr(args, name) or default)
    return args


def lr_at(step, steps, peak, warmup=100):
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    q = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * q)))


def conv_autocast(args):
    """The forward passes of the convolutional stages: bf16 autocast (L.autocast, on a CPU too) under
    --bf16-convs, else fp32. Their losses are taken in fp32."""
    return L.autocast(args.device, cpu=True) if args.bf16_convs else contextlib.nullcontext()


def conv_memory(args, net):
    """A convolutional stage's model, in channels-last memory under --channels-last. Its checkpoint
    is written contiguous, so nothing downstream sees the difference."""
    return net.to(memory_format=torch.channels_last) if args.channels_last else net


def train_pool(args, n_default, seconds_default, stage, need=1, what="a frame", or_else=""):
    """The training clips: SynthTalk's train split, or a folder given by --data; every clip at least
    `need` frames long, what `stage` draws from one (`what`). SynthTalk clips too short are refused
    before they are made; a --data folder's are left out with a note, and refused if none is left
    (`or_else`: another way out, added to the advice)."""
    why = f"shorter than {need} frames ({need / L.FPS:.2f} s at {L.FPS} fps), what {what} takes"
    if not args.data:
        seconds = args.seconds or seconds_default
        if round(seconds * L.FPS) < need:
            fail(f"{stage}: --seconds {seconds:g} makes clips {why}; pass --seconds {need / L.FPS:g} or more{or_else}")
        return L.synthtalk_pool("train", args.clips or n_default, seconds, args.size, workers=pool_workers(args))
    clips = L.folder_pool(args.data, args.size, progress=master())
    keep = [c for c in clips if len(c.frames) >= need]
    if not keep:
        fail(f"{stage}: every clip in {args.data} is {why}; use longer clips{or_else}")
    if len(keep) < len(clips):
        print(f"{stage}: {len(clips) - len(keep)} of {len(clips)} clips are {why}; left out")
    return keep


def test_pool(args, dub_truth=False):
    """The SynthTalk test split; with dub_truth, each clip also holds its dub's true video (dub_frames)."""
    clips = L.synthtalk_pool("test", args.test_clips, L.TEST_SECONDS, args.size, workers=pool_workers(args))
    if dub_truth:
        truths = L.synthtalk_renders("test", [c.dub_mouth for c in clips], args.size, pool_workers(args), master())
        for c, truth in zip(clips, truths):
            c.dub_frames = truth
    return clips


def load_dit(args, path, causal, who, ae, device="cpu"):
    """(model, config, extra) of the DiT checkpoint at `path` for `who`, the stage or role that reads
    it: refused in one line (CheckpointError) when it is not the kind `causal` asks for (None:
    either), was trained at another --size or on another autoencoder than `ae` (--ckpt-dir's)."""
    model, cfg, extra = L.load_checkpoint(path, L.DiTConfig, L.DiT, device, args.size)
    L.check_dit_kind(path, cfg.causal, causal, who)
    L.check_dit_latents(path, cfg.latent_channels, extra, ae, os.path.join(args.ckpt_dir, "vae.safetensors"))
    return model, cfg, extra


def pool_workers(args):
    """Processes that generate a SynthTalk pool: --threads, else this process's share of the cores
    (every process of a torchrun run generates the pool, the same on each)."""
    return args.threads or max(1, L.cpu_count() // DIST.world)


# -----------------------------------------------------------------------------
# data parallel over processes (torchrun), and FSDP for the large shapes
#
# nanoGPT's recipe: torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; without them the run is one
# process. Every process draws the whole global batch from the same seeded RNGs (numpy for the
# data, torch for noise and timesteps) and keeps its own rows (`shard`), so a run is the same run
# for any number of processes: the global batch is --batch, and the losses match a one-process
# run up to float summation order (a test checks it). Drawing the global batch on every process
# costs little, since the DiT stages read pre-encoded latents.


@dataclasses.dataclass
class Dist:
    rank: int = 0
    world: int = 1
    fsdp: bool = False      # the DiTs are sharded (fully_shard) and reduce their own gradients


DIST = Dist()               # this process's place in the run, set by init_distributed


def init_distributed(args):
    """Join the torchrun process group (NCCL on GPU, gloo on CPU). Only rank 0 prints and saves:
    the others' stdout goes to /dev/null (their errors still reach stderr)."""
    global DIST
    if "RANK" not in os.environ:
        if args.fsdp:
            fail("--fsdp needs several processes: launch with torchrun --nproc_per_node=N")
        return
    cuda = args.device.startswith("cuda")
    if cuda:
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if cuda else "gloo")
    DIST = Dist(dist.get_rank(), dist.get_world_size(), args.fsdp)
    if DIST.rank:
        sys.stdout = open(os.devnull, "w")


def master():
    return DIST.rank == 0


def local_batch(batch):
    """This process's share of the global batch."""
    if batch % DIST.world:
        fail(f"--batch {batch} must be a multiple of the number of processes ({DIST.world})")
    return batch // DIST.world


def shard(*xs):
    """This process's rows of global-batch tensors or arrays (B, ...): the rank-th of N equal parts."""
    out = [x[DIST.rank * local_batch(len(x)):][:local_batch(len(x))] for x in xs]
    return out if len(xs) > 1 else out[0]


def summed(x):
    """x summed over the processes (a new tensor; x is left as it is)."""
    x = x.clone()
    dist.all_reduce(x)
    return x


class GatherRows(torch.autograd.Function):
    """Every process's rows, concatenated in rank order (B / N, ...) -> (B, ...), with gradient:
    for losses over the whole batch that do not split per sample (the SyncNet's contrastive loss
    pairs every video window with every audio window). Each process then holds the same loss;
    backward sums the processes' gradients for these rows, so after the gradient average below the
    weights get exactly the one-process gradient."""

    @staticmethod
    def forward(ctx, x):
        if DIST.world == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(DIST.world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, g):
        return g if DIST.world == 1 else shard(summed(g))


def gather_rows(x):
    return GatherRows.apply(x)


class AllReduceSum(torch.autograd.Function):
    """The sum of a tensor over the processes, with gradient (every process's loss depends on the
    sum, so the backward sums the processes' gradients too)."""

    @staticmethod
    def forward(ctx, x):
        return summed(x)

    @staticmethod
    def backward(ctx, g):
        return summed(g)


class GlobalBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch (every process's rows), so N
    processes train the same SyncNet / MouthNet as one. torch's SyncBatchNorm does this on GPUs
    only; this one runs over gloo too. Same state as BatchNorm2d (checkpoints are unchanged)."""

    def forward(self, x):                                            # x (b, C, H, W)
        if not self.training or DIST.world == 1:
            return super().forward(x)
        dtype, x = x.dtype, x.float()       # statistics in fp32 under bf16 autocast, as BatchNorm2d's
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        stats = AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), x.pow(2).sum((0, 2, 3)), count]))
        C, n = x.shape[1], stats[-1]
        mean, var = stats[:C] / n, stats[C:2 * C] / n - (stats[:C] / n) ** 2        # biased, as BatchNorm
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * n / (n - 1), self.momentum)
            self.num_batches_tracked += 1
        shape = (1, C, 1, 1)
        return ((x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps) * self.weight.view(shape) +
                self.bias.view(shape)).to(dtype)


def global_batchnorm(net):
    """Swap net's BatchNorm2d layers for GlobalBatchNorm (a subclass with no extra state)."""
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm
    return net


def global_mean(x):
    """A per-process tensor (a loss, on the training device) averaged over the processes -> float."""
    x = x.detach().double()
    return (summed(x) / DIST.world).item() if DIST.world > 1 else x.item()


def average_gradients(model):
    """Average the gradients over the processes after backward: what DDP does, without its
    bucketing and overlap with the backward pass, so that models stay plain modules (the KV-cache
    streaming code and the DMD rollout call them and read their cfg). FSDP-sharded models
    average their own gradients (reduce-scatter) and are left alone."""
    if DIST.world == 1 or DIST.fsdp:
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:                    # every process must send every gradient
            p.grad = torch.zeros_like(p)
    for h in [dist.all_reduce(p.grad, async_op=True) for p in params]:
        h.wait()
    for p in params:
        p.grad /= DIST.world


def place_dit(device, *models):
    """Put DiTs built (or loaded) on the CPU onto the training device, or with --fsdp shard each
    over the processes (FSDP2 fully_shard, one unit per block and one for the rest), which moves
    only this process's shards to its device: no GPU holds a whole model, the layout for the
    wan1.3b / wan14b shapes. A sharded module keeps its class and cfg; its forward gathers each
    block's weights just in time."""
    if not DIST.fsdp:
        return [m.to(device) for m in models]
    from torch.distributed.fsdp import fully_shard
    for m in models:
        for blk in m.blocks:
            fully_shard(blk)
        fully_shard(m)
    return models


def unsharded(model):
    """The model with full weights for saving: itself, or with --fsdp a plain copy gathered onto
    rank 0 (None on the other ranks; every rank must call this)."""
    if not DIST.fsdp:
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not master():
        return None
    plain = L.DiT(model.cfg)                                     # only the DiTs are sharded
    plain.load_state_dict(full)
    return plain


def progress(iterable, **kw):
    """tqdm on rank 0 only; refreshed every 30 s when stderr is a log file."""
    return tqdm(iterable, disable=not master(), mininterval=1 if sys.stderr.isatty() else 30, **kw)


LOG_EVERY = 100           # steps between the log lines of fit


def fit(model, step_fn, steps, lr, desc, weight_decay=0.0, log_every=None, unit="samples", betas=(0.9, 0.999),
        ema=None, ema_decay=0.999, state=None, save_every=200, stop_after=None, rng=None, warmup=100,
        flops_per_unit=None, device="cpu", run=None):
    """The shared optimisation loop: AdamW, warmup + cosine, grad clip 1, tqdm progress, and a log
    line of loss, throughput and elapsed time every `log_every` steps (None: LOG_EVERY). Throughput
    is given twice: since the start (it includes the first steps' warm-up and any torch.compile
    compilation) and over the steps since the previous log line (the steady rate; MFU on GPU is
    taken from it).
    step_fn(step) returns (loss, items processed[, extra text for the log line]) for this process's
    share of the global batch; the loss logged and returned is the global batch's (the mean over
    processes). Returns the list of per-step losses.

    ema: a copy of the model kept as an exponential moving average. state: a training-state file
    (model, EMA, optimiser, step, numpy RNG, torch RNGs of the CPU and of `device`): if it exists
    the run resumes from it, and it is rewritten every `save_every` steps and at the end, so an
    interrupted run continues as if it never stopped. stop_after: stop (and save the state) after this many steps.
    run: the options the run was started with (run_options), kept in the state and checked on resume.
    flops_per_unit: model FLOPs per item, for MFU on GPU."""
    log_every = log_every or LOG_EVERY
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=betas)
    start = load_train_state(state, model, ema, opt, rng, device) if resumes_from(state, device) else 0
    end = min(steps, stop_after) if stop_after else steps
    if start:
        check_resume(desc, state, end, run)
        if master():
            print(f"{desc}: resumed from {state} at step {start}")
    t0, seen, run_loss, losses = time.time(), 0, None, []
    t_log, seen_log, step_log = t0, 0, start                     # at the previous log line
    bar = progress(range(start, end), desc=desc, initial=start, total=steps)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        loss, n, *extra = step_fn(step)
        optimizer_step(model, opt, loss, clip=1.0)
        if ema is not None:
            ema_update(ema, model, step, ema_decay)
        seen += n * DIST.world
        losses.append(global_mean(loss))
        run_loss = losses[-1] if run_loss is None else 0.98 * run_loss + 0.02 * losses[-1]
        bar.set_postfix(loss=f"{run_loss:.4f}", refresh=False)     # shown at the bar's own interval
        if (step + 1) % log_every == 0 or step + 1 == end:
            now = time.time()
            dt, rate = now - t0, (seen - seen_log) / (now - t_log)
            on_gpu = flops_per_unit and str(device).startswith("cuda")
            util = f" MFU {mfu(rate * flops_per_unit, device):.1%}" if on_gpu else ""
            tqdm.write(f"{desc} step {step + 1}/{steps} loss {run_loss:.5f} {seen / dt:.1f} {unit}/s "
                       f"(steps {step_log + 1}-{step + 1}: {rate:.1f}{util}) elapsed {dt:.0f}s"
                       + (f" {extra[0]}" if extra else ""))
            t_log, seen_log, step_log = now, seen, step + 1
        if state and master() and ((step + 1) % save_every == 0 or step + 1 == end):
            save_train_state(state, model, ema, opt, step + 1, rng, device, run)
    return losses


RUN_SHAPE = ("size", "preset", "depth", "dim", "patch", "audio_adaln", "audio_encoder")   # a resumed run must keep these
RUN_OPTIONS = (*RUN_SHAPE, "data", "clips", "seconds", "batch", "latent_frames", "mouth_weight", "steps", "lr", "seed",
               "init", "teacher", "drop_mode", "cfg_drop", "teacher_cfg", "cfg_scale", "beta", "reward_scale",
               "critic_lr", "critic_steps")


def run_options(args):
    """The options that make a training run what it is, as a training-state file keeps them: as
    given on the command line (None: not given), but steps and batch as used."""
    return {name: getattr(args, name) for name in RUN_OPTIONS} | {
        "steps": args.steps or STAGE_STEPS[args.stage], "batch": args.batch or STAGE_BATCH[args.stage]}


def resume_changes(desc, state, end, run):
    """Check that the run in the training-state file `state` can resume: it must have steps left
    before `end` and keep its shape (RUN_SHAPE), else one line and exit 2. Returns the other options
    `run` changes from those it started with ({name: (then, now)}): they may change."""
    meta = L.read_safetensors(state, "training state", tensors=False)[1]
    start, kept = int(meta.get("step", 0)), json.loads(meta.get("run", "null")) or {}
    if start >= end:
        fail(f"{desc}: {state} is at step {start}, and this run ends at step {end}: nothing to train; "
             "raise --steps (or --stop-after) to go on, or leave out --resume to start over")
    changed = {k: (kept[k], v) for k, v in (run or {}).items() if k in kept and kept[k] != v}
    for k in (k for k in RUN_SHAPE if k in changed):             # its model or its frames would change
        given = lambda v: f"{option(k)} {v}" if v is not None else f"no {option(k)}"
        fail(f"{desc}: {state} holds a run started with {given(changed[k][0])}: it cannot go on with "
             f"{given(changed[k][1])}; resume it with the options it started with")
    return changed


def check_resume(desc, state, end, run):
    """resume_changes, said (by rank 0): a note for the options that changed."""
    changed = resume_changes(desc, state, end, run)
    if changed and master():
        was = lambda v: "the default" if v is None else v
        print(f"{desc}: resuming with " + ", ".join(f"{option(k)} {was(now)} (it started with {was(then)})"
                                                   for k, (then, now) in changed.items())
              + ": not the run it would have been")


def optimizer_step(model, opt, loss, clip):
    """One update: backward, the gradient average over processes, grad-norm clipping at `clip`, step.
    A loss of NaN or inf stops the run before it reaches the weights."""
    if not torch.isfinite(loss.detach()):
        fail(f"the loss is {loss.item()}: training diverged, or a checkpoint it reads holds NaN; "
             f"lower --lr, or retrain that checkpoint")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    average_gradients(model)
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()


@torch.no_grad()
def ema_update(ema, model, step, decay):
    """ema <- lerp toward model at decay min(decay, (1 + step) / (10 + step)). The warm-up weights
    the recent steps, over a span that grows with the run (about its last ninth), so a short run's
    EMA is not mostly the initial model (zero-output for the teacher). `decay` caps it only from
    step (10 decay - 1) / (1 - decay) on: 890 for 0.99, 8990 for 0.999, past the default lengths
    of every stage (teacher 2400 steps: 0.9963 at the end; df 500: 0.982; dmd 50: 0.85)."""
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p, 1 - d)


def state_path(args, out):
    """The training-state file of the run that saves `out` (fresh_state says which), or None."""
    if DIST.fsdp or args.state == "none":
        return None
    return args.state or os.path.splitext(out)[0] + ".state.safetensors"


def fresh_state(args, out, derived=lambda state: []):
    """The training-state file of the run that saves `out`: --state, else out's name with
    .state.safetensors (teacher.safetensors -> teacher.state.safetensors), so runs with different
    --out never share one. Unless --resume, it and the files derived(state) names beside it are
    deleted, so the run starts from scratch. None under --fsdp: training-state files hold full,
    unsharded tensors (main refuses --resume, --state and --stop-after there); None for --state none.
    Every rank deletes them (on nodes that share no filesystem each has its own stale copy; where
    they share one, a file another rank removed first is no error), and the barrier keeps a rank
    from finding a stale file in fit before it is gone."""
    state = state_path(args, out)
    if state is None:
        return None
    if args.resume and not os.path.isfile(state) and master():
        print(f"--resume: no training state at {state}; this run starts from scratch")
    if not args.resume:
        for f in [state, *derived(state)]:
            with contextlib.suppress(FileNotFoundError):
                os.remove(f)
        if DIST.world > 1:
            dist.barrier()
    return state


# The torch RNGs a training-state file keeps: the CPU's, and on a GPU the training device's own
# generator, which draws the noise and timesteps there (torch.randn(..., device="cuda")) and which
# every stage reseeds at its start with torch.manual_seed: without its state a resumed run would
# draw its first steps' noise again. Under torchrun the one file rank 0 writes restores every rank:
# each rank seeds the same and draws the whole global batch (section "data parallel"), so at every
# step each rank's generators, CPU and device (cuda:LOCAL_RANK), are in the same state as rank 0's.
# A per-rank seed would break that and need one entry per rank.


def device_rng(device):
    """The generator module of the training device when it has its own (torch.cuda), else None."""
    return torch.cuda if torch.device(device).type == "cuda" else None


def resumes_from(state, device="cpu"):
    """Whether the run continues from the training-state file `state`. Every process must find it,
    or none: on nodes that share no filesystem only rank 0's would, and the others would start from
    scratch beside it, silently."""
    here = bool(state) and os.path.isfile(state)
    if DIST.world > 1:
        found = round(summed(torch.tensor([float(here)], device=device)).item())
        if 0 < found < DIST.world:
            fail(f"{state}: {found} of {DIST.world} processes find it; --resume on several "
                 "nodes needs the checkpoint folder on a filesystem they share")
    return here


def save_train_state(path, model, ema, opt, step, rng, device="cpu", run=None):
    """Everything a run needs to continue identically, as safetensors (nothing pickled), and the
    options it was started with (`run`, checked when it resumes)."""
    from safetensors.torch import save_file
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in ema.state_dict().items()})
    for i, p in enumerate(model.parameters()):
        for name, v in opt.state.get(p, {}).items():
            tensors[f"opt.{i}.{name}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    gen = device_rng(device)
    if gen:
        tensors["rng.device"] = gen.get_rng_state(device)
    meta = {"step": str(step), "np_rng": json.dumps(rng.bit_generator.state if rng is not None else None),
            "run": json.dumps(run)}
    with L.atomic_path(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp, metadata=meta)


def load_train_state(path, model, ema, opt, rng, device="cpu"):
    t, meta = L.read_safetensors(path, "training state")
    sub = lambda prefix: {k[len(prefix):]: v for k, v in t.items() if k.startswith(prefix)}
    try:
        model.load_state_dict(sub("model."))
        if ema is not None:
            ema.load_state_dict(sub("ema."))
    except RuntimeError as e:                      # another --preset, --depth, --dim, ..., or another stage's file
        raise L.CheckpointError(f"{path} holds a run of another model ({L.first_line(e)}): resume with the options "
                                "it started with, or leave out --resume to start over") from None
    for i, p in enumerate(model.parameters()):
        # Adam keeps its step count on the CPU (unless capturable): on the device it would cost a sync a step
        st = {name: v if name == "step" else v.to(p.device)
              for name, v in ((k.split(".", 2)[2], v) for k, v in t.items() if k.startswith(f"opt.{i}."))}
        if st:
            opt.state[p] = st
    torch.set_rng_state(t["rng.torch"])
    gen = device_rng(device)
    if gen and "rng.device" in t:
        gen.set_rng_state(t["rng.device"], device)
    elif gen:                                     # resumable, but not the same run
        print(f"{path} holds no {device} RNG state (saved on the CPU, or by an older train.py): the resumed run "
              "draws other noise than an uninterrupted one")
    if rng is not None:
        rng.bit_generator.state = json.loads(meta["np_rng"])
    return int(meta["step"])


# -----------------------------------------------------------------------------
# stage: video autoencoder


VAE_STEPS = 5000         # then 2000 more at a lower rate (foundation: the committed autoencoder's recipe)
VAE_LR = 2e-3


def train_vae(args):
    torch.manual_seed(args.seed or 0)
    rng = np.random.default_rng(args.seed or 0)
    n_frames = 1 + 2 * L.AEConfig.time_down                  # 9 frames -> 3 latent frames
    clips = train_pool(args, 384, 2.0, "vae", need=n_frames, what=f"a {n_frames}-frame training window")
    if args.init:
        ae, cfg, _ = L.load_checkpoint(args.init, L.AEConfig, L.VideoAE, args.device)
        ae.train()
    else:
        cfg = L.AEConfig(seed=args.seed or 0)
        ae = L.VideoAE(cfg).to(args.device)
    ae = conv_memory(args, ae)
    print(cfg, f"\nVideoAE: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M parameters")
    batch = args.batch or STAGE_BATCH["vae"]

    def step(_):
        x = shard(L.sample_windows(clips, batch, n_frames, rng)).to(args.device)
        with conv_autocast(args):
            y = ae(x).float()
        # full-frame MSE plus the mouth box again: the lips are what this project is about
        loss = F.mse_loss(y, x) + F.mse_loss(L.mouth_crop(y), L.mouth_crop(x))
        return loss, len(x) * n_frames

    out = out_path(args)
    losses = fit(ae, step, args.steps or STAGE_STEPS["vae"], args.lr or VAE_LR, "vae", unit="frames",
                 state=fresh_state(args, out), stop_after=args.stop_after, rng=rng, device=args.device,
                 log_every=args.log_every, run=run_options(args))
    if not master():
        return ae, losses
    trained = ae
    ae, cfg = latent_statistics(ae, clips[:64], args.device)
    print(f"latent mean {np.round(cfg.latent_mean, 3).tolist()}\nlatent std {np.round(cfg.latent_std, 3).tolist()}")
    metrics = eval_vae(ae, test_pool(args), args.device)
    print(f"test split: PSNR {metrics['psnr']:.2f} dB, mouth PSNR {metrics['mouth_psnr']:.2f} dB")
    L.save_checkpoint(out, ae, cfg, extra=metrics)
    print(f"saved {out}")
    return trained, losses


@torch.no_grad()
def latent_statistics(ae, clips, device):
    """Measure the raw encoder output's per-channel mean and std on training clips and return
    the autoencoder rebuilt with them in its config (so its latents come out normalised)."""
    tf = L.FRAMES_PER_LATENT                                                   # whole latent frames only
    z = torch.cat([ae.encode(L.frames_to_tensor(c.frames[:1 + tf * ((len(c.frames) - 1) // tf)])[None].to(device))[0]
                   for c in clips]) * ae.z_std + ae.z_mean                    # (N, 16, h, w), raw
    cfg = dataclasses.replace(ae.cfg, latent_mean=tuple(z.mean((0, 2, 3)).tolist()),
                              latent_std=tuple(z.std((0, 2, 3)).tolist()))
    out = L.VideoAE(cfg).to(device).eval()
    out.load_state_dict(ae.state_dict())
    return out, cfg


@torch.no_grad()
def reconstruct(ae, clip, device):
    """A clip through the autoencoder (encode + decode), padded to 1 + 4k frames and trimmed back."""
    T, tf = len(clip.frames), ae.cfg.time_down
    pad = (-(T - 1)) % tf
    frames = np.concatenate([clip.frames, np.repeat(clip.frames[-1:], pad, 0)])
    return L.tensor_to_frames(ae(L.frames_to_tensor(frames)[None].to(device))[0])[:T]


def eval_vae(ae, clips, device, recon=None):
    """Reconstruction PSNR (full frame and mouth box) over whole clips."""
    recon = recon or [reconstruct(ae, c, device) for c in clips]
    return {"psnr": float(np.mean([L.psnr(r, c.frames) for r, c in zip(recon, clips)])),
            "mouth_psnr": float(np.mean([L.psnr(L.mouth_crop(r), L.mouth_crop(c.frames)) for r, c in zip(recon, clips)]))}


# -----------------------------------------------------------------------------
# stage: SyncNet (reward or eval)

def role_subset(clips, role):
    """The reward and eval SyncNets see disjoint identities: even and odd training clips."""
    return clips[role == "eval"::2]


SYNC_SPAN = 15     # a batch group's windows lie within 15 frames of each other (vshift = 15)
SYNCNET_STEPS = 3000
# Peak learning rate per role. At 1e-3 the eval SyncNet (seed 2, odd identities) reached 96.0%
# off-sync accuracy, but the reward SyncNet (even identities) stopped at 90-91% for seeds 1, 3 and 4,
# with 6000 steps, and with twice the identities (a 1024-clip pool). At 3e-4 (seed 1) it reaches 95.5%.
SYNCNET_LR = {"reward": 3e-4, "eval": 1e-3}


def train_syncnet(args):
    seed = args.seed if args.seed is not None else {"reward": 1, "eval": 2}[args.role]
    group = 8                                                               # windows per clip in a batch
    batch = args.batch or STAGE_BATCH["syncnet"]
    if batch % group or batch < 2 * group:       # the loss needs windows of other clips (easy negatives)
        fail(f"--batch {batch}: a SyncNet batch is groups of {group} windows from one clip, at least "
             f"two of them; pass a multiple of {group} from {2 * group} up")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    cfg = L.SyncNetConfig(role=args.role, seed=seed)
    need = cfg.frames + SYNC_SPAN
    clips = role_subset(train_pool(args, 512, 4.0, "syncnet", need=need,
                                   what=f"a {cfg.frames}-frame window at {SYNC_SPAN + 1} starts"), args.role)
    if len(clips) < 2:                  # the loss needs windows of other clips (easy negatives)
        fail(f"syncnet --role {args.role}: trains on every other clip of the pool (the {args.role} SyncNet's "
             f"identities), {len(clips)} here; it needs two or more: "
             + ("put more clips in --data" if args.data else "pass --clips 4 or more"))
    net = conv_memory(args, global_batchnorm(L.SyncNet(cfg).to(args.device).train()))
    print(cfg, f"\nSyncNet ({args.role}): {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
          f"{len(clips)} training clips")
    mels = [L.log_mel(torch.from_numpy(c.audio)) for c in clips]            # (4T, N_MELS) each
    n, mpf = cfg.frames, L.MELS_PER_FRAME
    # every video window is paired with every audio window of the batch: the diagonal is in sync;
    # the same clip at another start is a shifted (hard) negative, other clips are easy negatives
    gid = torch.arange(batch) // group
    same = torch.eye(batch)
    hard = (gid[:, None] == gid[None, :]).float() - same
    easy = 1 - same - hard
    # pair weights: in-sync pairs carry half the loss, shifted pairs a third, other clips a sixth
    weight = same / same.sum() / 2 + hard / hard.sum() / 3 + easy / easy.sum() / 6
    same, weight = same.to(args.device), weight.to(args.device)

    def step(_):
        video, audio = [], []
        for _ in range(batch // group):
            ci = rng.integers(len(clips))
            T = len(clips[ci].frames)
            lo = rng.integers(T - n - SYNC_SPAN + 1)
            for v in lo + rng.choice(SYNC_SPAN + 1, group, replace=False):
                video.append(clips[ci].frames[v:v + n])
                audio.append(mels[ci][v * mpf:(v + n) * mpf])
        # each process embeds its rows; the loss pairs all of them, so every process gathers the rest
        with conv_autocast(args):
            ve = gather_rows(net.embed_video(L.frames_to_tensor(shard(np.stack(video))).to(args.device)).float())
            ae = gather_rows(net.embed_audio(shard(torch.stack(audio)).to(args.device)).float())
        return L.contrastive_loss(L.pairwise_dist(ve, ae), same, cfg.margin, weight), local_batch(batch)

    out = out_path(args)
    losses = fit(net, step, args.steps or STAGE_STEPS["syncnet"], args.lr or SYNCNET_LR[args.role],
                 f"syncnet-{args.role}",
                 weight_decay=1e-4, unit="windows", state=fresh_state(args, out), stop_after=args.stop_after, rng=rng,
                 device=args.device, log_every=args.log_every, run=run_options(args))
    if not master():
        return net, losses
    net.eval()
    metrics = eval_syncnet(net, test_pool(args), val_clips(args))
    print(json.dumps(metrics))
    L.save_checkpoint(out, net, cfg, extra=metrics)
    print(f"saved {out}")
    return net, losses


def val_clips(args, n=16, seconds=4.0):
    """Training-distribution clips that no model trains on (indices far past every pool), used
    to choose the off-sync decision threshold before it is applied to the test split, to
    measure the teacher's held-out gap, and (as long as the test clips) to compare students."""
    return [L.synthtalk_clip("train", 100_000 + i, seconds, args.size) for i in range(n)]


OFFSYNC_SHIFT = (3, 15)    # off-sync detection test: audio shifted by 3..15 frames (120-600 ms)


@torch.no_grad()
def offsync_distances(net, clips, rng, per_clip=64):
    """Distances of in-sync pairs and of pairs whose audio is shifted by OFFSYNC_SHIFT frames
    (either way) within the same clip."""
    pos, neg = [], []
    for c in clips:
        v_emb, a_emb = L.sync_embeddings(net, L.frames_to_tensor(c.frames), c.audio)
        N = len(v_emb)
        for _ in range(per_clip):
            t = rng.integers(N)
            while True:
                k = rng.integers(*OFFSYNC_SHIFT, endpoint=True) * rng.choice([-1, 1])
                if 0 <= t + k < N:
                    break
            pos.append(torch.dist(v_emb[t], a_emb[t]).item())
            neg.append(torch.dist(v_emb[t], a_emb[t + k]).item())
    return np.array(pos), np.array(neg)


def eval_syncnet(net, test, val):
    """Off-sync detection accuracy (threshold chosen on validation clips, applied to the test
    split), and the sync metrics of ground truth and of audio shuffled across clips."""
    rng = np.random.default_rng(0)
    vp, vn = offsync_distances(net, val, rng)
    cands = np.sort(np.concatenate([vp, vn]))
    acc = [((vp < th).mean() + (vn >= th).mean()) / 2 for th in cands]
    th = float(cands[int(np.argmax(acc))])
    tp, tn = offsync_distances(net, test, rng)
    gt = L.evaluate_sync(net, [c.frames for c in test], [c.audio for c in test])
    shuffled = L.evaluate_sync(net, [c.frames for c in test], [test[(i + 1) % len(test)].audio for i in range(len(test))])
    return {"offsync_accuracy": float(((tp < th).mean() + (tn >= th).mean()) / 2), "threshold": th,
            "gt_sync_c": gt["sync_c"], "gt_sync_d": gt["sync_d"],
            "gt_offset0_frac": float(np.mean(np.array(gt["offsets"]) == 0)),
            "shuffled_sync_c": shuffled["sync_c"], "shuffled_sync_d": shuffled["sync_d"]}


# -----------------------------------------------------------------------------
# stage: MouthNet


MOUTHNET_STEPS, MOUTHNET_LR = 1500, 1e-3


def train_mouthnet(args):
    seed = args.seed if args.seed is not None else 3
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clips = train_pool(args, 512, 4.0, "mouthnet")
    cfg = L.MouthNetConfig(seed=seed)
    net = conv_memory(args, global_batchnorm(L.MouthNet(cfg).to(args.device).train()))
    print(cfg, f"\nMouthNet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    batch = args.batch or STAGE_BATCH["mouthnet"]

    def step(_):
        idx = [(rng.integers(len(clips)), None) for _ in range(batch)]
        idx = [(ci, rng.integers(len(clips[ci].frames))) for ci, _ in idx]
        idx = shard(idx)
        x = L.frames_to_tensor(np.stack([clips[ci].frames[t] for ci, t in idx])).to(args.device)
        y = torch.from_numpy(np.stack([clips[ci].mouth[t] for ci, t in idx])).to(args.device)
        with conv_autocast(args):
            pred = net(x).float()
        return F.mse_loss(pred, y), len(idx)

    out = out_path(args)
    losses = fit(net, step, args.steps or STAGE_STEPS["mouthnet"], args.lr or MOUTHNET_LR, "mouthnet", weight_decay=1e-4,
                 unit="frames",
                 state=fresh_state(args, out), stop_after=args.stop_after, rng=rng, device=args.device,
                 log_every=args.log_every, run=run_options(args))
    if not master():
        return net, losses
    net.eval()
    test = test_pool(args)
    err = float(np.mean([L.mouth_error(net, c.frames, c.mouth) for c in test]))
    print(f"test split: MouthErr of ground-truth frames {err:.4f}")
    L.save_checkpoint(out, net, cfg, extra={"gt_mouth_err": err})
    print(f"saved {out}")
    return net, losses


# -----------------------------------------------------------------------------
# stage: teacher (bidirectional, audio-conditioned, flow matching with CFG dropout)

T_BINS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)     # the training loss is also logged per t bin


def dit_pool(args, n_latent, stage):
    """The DiT stages' training clips (train_pool), less those too short for a window of n_latent
    latent frames plus a reference frame outside it on the 4-frame grid: 4 n_latent + 1 frames.
    A --data folder may hold such clips; they are left out with a note."""
    return train_pool(args, DIT_CLIPS, 4.0, stage, need=L.FRAMES_PER_LATENT * n_latent + 1,
                      what=f"a {n_latent}-latent window and its reference frame",
                      or_else=", or a smaller --latent-frames" if stage in STAGE_OPTIONS["latent_frames"] else "")


def random_ref(rng, T, start, length):
    """A reference frame on the 4-frame grid, outside the target window [start, start + length)."""
    while True:
        r = L.FRAMES_PER_LATENT * int(rng.integers((T - 1) // L.FRAMES_PER_LATENT + 1))
        if not start <= r < start + length:
            return r


def teacher_batch(encoded, batch, n_latent, rng, context, device, audios=None):
    """Random windows of n_latent latent frames: x0 (B, F, 16, h, w), cond, audio features. With
    `audios` (audios[i] = encoded[i]'s waveform) also each window's raw audio (B, T * 640) on the
    CPU: the 640 samples of each of its 1 + 4 (n_latent - 1) frames (what ae.decode returns)."""
    tf = L.FRAMES_PER_LATENT
    n_frames = 1 + tf * (n_latent - 1)
    n_samples = n_frames * L.SAMPLES_PER_FRAME
    items, raw = [], []
    for _ in range(batch):
        i = rng.integers(len(encoded))
        T = encoded[i].n_frames
        start = tf * int(rng.integers((T - n_frames) // tf + 1))
        items.append(L.latent_window(encoded[i], start, n_latent, random_ref(rng, T, start, n_frames), context))
        if audios is not None:
            a = audios[i][start * L.SAMPLES_PER_FRAME:][:n_samples]
            raw.append(np.pad(a, (0, n_samples - len(a))))
    out = [torch.stack(x).to(device) for x in zip(*items)]
    return out + [torch.from_numpy(np.stack(raw))] if audios is not None else out


def dit_train_flops_per_token(cfg, seq_len):
    """Matmul FLOPs per token of one training step (backward = 2x forward): per block the qkv and
    output projections (4 d^2), the MLP (2 d ffn), and attention scores and values (2 n d),
    each 2 FLOPs per multiply-add."""
    d = cfg.dim
    return 3 * cfg.depth * 2 * (4 * d * d + 2 * d * cfg.ffn + 2 * seq_len * d)


TEACHER_STEPS = 2400     # the tiny teacher's run fits in 20 min on 2 CPU cores
TEACHER_LR = 2e-3        # peak lr; within those steps it beats 1e-3 on loss, PSNR and no-CFG sync (README)
DIT_CLIPS = 1024         # SynthTalk clips of 4 s in the training pool of the DiT stages (teacher, df, dmd);
                         # with the mouth weight, 1024 identities sync better than 256 at the same cost per step (README)
MOUTH_WEIGHT = 1.0       # the DiT stages' loss counts the mouth box twice: better no-CFG sync and PSNR than 0 or 4 (README)


def dit_extra(args, steps, ae, **more):
    """What a DiT stage records in its checkpoint beside the weights and config: the steps it
    trained (and, when --stop-after ended it early, the `steps` its learning-rate schedule was
    for), the mouth weight, the frame size it trained at (sample.py samples a student at that
    size), the weights_digest of the autoencoder `ae` whose latents it reads (check_dit_latents),
    and `more`."""
    done = min(steps, args.stop_after or steps)
    return {"steps": done, **({"schedule_steps": steps} if done < steps else {}), "mouth_weight": args.mouth_weight,
            "size": args.size, "autoencoder": L.weights_digest(ae), **more}


def train_teacher(args):
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ae = L.load_checkpoint(os.path.join(args.ckpt_dir, "vae.safetensors"), L.AEConfig, L.VideoAE, args.device)[0]
    cfg = L.preset_config(args.preset, args.depth, args.patch, args.dim, drop_mode=args.drop_mode,
                          cfg_drop=args.cfg_drop, audio_adaln=args.audio_adaln, audio_encoder=args.audio_encoder,
                          seed=seed)
    n_latent, batch = args.latent_frames or 9, args.batch or STAGE_BATCH["teacher"]
    encoder, more = None, {}
    if cfg.audio_encoder:               # a frozen copy of the reward SyncNet's audio stream (AudioEncoder)
        net, net_cfg, _ = L.load_checkpoint(os.path.join(args.ckpt_dir, "syncnet_reward.safetensors"),
                                            L.SyncNetConfig, L.SyncNet)
        shape = ("frames", "width", "embed")
        if any(getattr(net_cfg, k) != getattr(L.SyncNetConfig, k) for k in shape):
            fail(f"--audio-encoder needs a reward SyncNet of the default shape ({', '.join(shape)}); this one is {net_cfg}")
        encoder = L.AudioEncoder()
        encoder.load_syncnet_audio(net)
        more["audio_encoder"] = L.weights_digest(net)
    encoded = L.encode_pool(ae, dit_pool(args, n_latent, "teacher"), cfg.audio_context, progress=master(), encoder=encoder)
    model = L.DiT(cfg)
    if encoder is not None:
        model.audio_encoder.load_state_dict(encoder.state_dict())
    model.checkpointing = args.grad_ckpt
    ema = copy.deepcopy(model).requires_grad_(False)
    model, ema = place_dit(args.device, model, ema)
    if args.compile:
        L.compile_blocks(model)
    print(cfg, f"\nDiT ({args.preset}): {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    h = w = args.size // ae.cfg.space_down
    tokens = n_latent * (h // cfg.patch) * (w // cfg.patch)
    bins = np.zeros((2, len(T_BINS) - 1))                      # loss sums and counts per t bin
    log_every = args.log_every or LOG_EVERY                     # fit's log lines, given to it below

    def step(i):
        x0, cond, audio = teacher_batch(encoded, batch, n_latent, rng, cfg.audio_context, args.device)
        t = L.shift_t(torch.rand(batch, device=args.device))[:, None].expand(-1, n_latent)   # (B, F)
        eps = torch.randn_like(x0)
        drop = torch.rand(batch, device=args.device) < cfg.cfg_drop
        x0, cond, audio, t, eps, drop = shard(x0, cond, audio, t, eps, drop)                # this process's rows
        cond, audio = L.drop_conditions(cond, audio, drop, cfg.drop_mode)
        with L.autocast(args.device):
            v = model(L.add_noise(x0, eps, t), t, cond, audio)
        per_sample = L.flow_matching_loss(v, x0, eps, args.mouth_weight)
        b = np.digitize(gather_rows(t[:, 0].detach()).cpu().numpy(), T_BINS[1:-1])
        np.add.at(bins[0], b, gather_rows(per_sample.detach()).cpu().numpy())
        np.add.at(bins[1], b, 1)
        text = "loss by t " + " ".join(f"{lo:.1f}-{hi:.1f}:{s / c:.3f}" if c else f"{lo:.1f}-{hi:.1f}:-"   # - : no sample
                                       for lo, hi, s, c in zip(T_BINS[:-1], T_BINS[1:], *bins))
        if (i + 1) % log_every == 0:                           # each log line covers the steps since the one before
            bins[:] = 0
        return per_sample.mean(), len(x0) * tokens, text

    out = out_path(args)
    state = fresh_state(args, out)
    steps = args.steps or STAGE_STEPS["teacher"]
    losses = fit(model, step, steps, args.lr or TEACHER_LR, "teacher", unit="tokens", ema=ema,
                 state=state, stop_after=args.stop_after, rng=rng, betas=(0.9, 0.99),
                 flops_per_unit=dit_train_flops_per_token(cfg, tokens), device=args.device, log_every=log_every,
                 run=run_options(args))
    ema = unsharded(ema)
    if master():
        L.save_checkpoint(out, ema, cfg, extra=dit_extra(args, steps, ae, final_loss=float(np.mean(losses[-50:])), **more))
        print(f"saved {out} (EMA weights)")
    return model, losses


GPU_PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12}   # dense bf16 FLOP/s


def mfu(flops_per_s, device):
    """Model FLOPs utilisation against the GPU's dense bf16 peak (nan if unknown or on CPU)."""
    if not str(device).startswith("cuda"):
        return float("nan")
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in GPU_PEAK_BF16.items() if k in name), None)
    return flops_per_s / peak if peak else float("nan")


# -----------------------------------------------------------------------------
# stage: df, the Diffusion-Forcing init of the causal student

STUDENT_DTYPE = torch.float16   # students are shipped (the demo loads one): stored at half size

# (window, sink) configurations of the KV cache, in latent frames, drawn per training step as the
# paper did; inference uses (7, 1)
DF_CACHES = [(7, 1), (10, 1), (13, 1), (9, 3), (12, 3)]


def df_noise(x0, chunk, rng):
    """Diffusion Forcing's randomness for a batch x0 (B, F, ...): each chunk's noise level, an
    index into the two-step schedule drawn per sample and chunk (B, F / chunk), and its noise eps."""
    levels, eps = [], []
    for c0 in range(0, x0.shape[1], chunk):
        levels.append(torch.from_numpy(rng.integers(len(L.STUDENT_STEPS), size=len(x0))))
        eps.append(torch.randn_like(x0[:, c0:c0 + chunk]))
    return torch.stack(levels, 1).to(x0.device), torch.cat(eps, 1)


def df_loss(model, x0, cond, audio, levels, eps, window, sink, mouth_weight=None):
    """One Diffusion-Forcing step through the KV cache, exactly as the student streams: chunk by
    chunk, each chunk noised to its own level from the two-step schedule (levels (B, F / chunk),
    eps like x0, from df_noise), its velocity loss taken, then the clean chunk written into the
    cache at t = 0 (the KV refresh, without gradient), so later chunks attend a clean past with
    dynamic RoPE and rolling.

    The paper's stage 1 is one block-causal pass with per-chunk noise levels, in which later chunks
    attend the earlier chunks at their own noise levels. Here they attend the clean ground truth,
    as the streaming cache holds clean keys (the KV refresh), and the cache's rolling and sink are
    trained as they run. At t = 0.999 the input is add_noise's 0.001 x0 + 0.999 eps, where the
    sampler starts from eps alone: a signal 1000x below the noise, kept so that every level is
    the same flow-matching pair."""
    n, chunk = x0.shape[1], model.cfg.chunk
    cache = L.KVCache(model.cfg.depth, sink, window, chunk)
    steps = torch.tensor(L.STUDENT_STEPS, device=x0.device)
    losses = []
    for k, c0 in enumerate(range(0, n, chunk)):
        sl = slice(c0, c0 + chunk)
        t = steps[levels[:, k]][:, None].expand(-1, chunk)                  # (B, chunk)
        v = model(L.add_noise(x0[:, sl], eps[:, sl], t), t, cond[:, sl], audio[:, sl], cache=cache)
        losses.append(L.flow_matching_loss(v, x0[:, sl], eps[:, sl], mouth_weight))
        if c0 + chunk < n:                              # the last chunk's refresh would feed no one
            L.kv_refresh(model, x0[:, sl], cond[:, sl], audio[:, sl], cache)
    return torch.stack(losses, 1)                                   # (B, chunks)


DF_STEPS = 500      # the paper: 5000 at lr 1e-5; here 500 at DF_LR. 1000 synced 0.02-0.04 better after DMD (README)
DF_LR = 1e-4


def train_df(args):
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    ae = L.load_checkpoint(os.path.join(args.ckpt_dir, "vae.safetensors"), L.AEConfig, L.VideoAE, args.device)[0]
    teacher, tcfg, _ = load_dit(args, args.init or os.path.join(args.ckpt_dir, "teacher.safetensors"), False, "df", ae)
    cfg = dataclasses.replace(tcfg, causal=True, sink=1, window=7, seed=seed)
    model = L.DiT(cfg)
    model.load_state_dict(teacher.state_dict())                     # the student starts as the teacher
    encoder = teacher.audio_encoder                                 # its audio features are the teacher's
    del teacher
    ema = copy.deepcopy(model).requires_grad_(False)
    model, ema = place_dit(args.device, model, ema)
    n_latent, batch = args.latent_frames or 12, args.batch or STAGE_BATCH["df"]
    assert n_latent % cfg.chunk == 0, f"--latent-frames must be a multiple of the chunk ({cfg.chunk})"
    encoded = L.encode_pool(ae, dit_pool(args, n_latent, "df"), cfg.audio_context, progress=master(), encoder=encoder)
    tokens = n_latent * (args.size // ae.cfg.space_down // cfg.patch) ** 2

    log_every = args.log_every or LOG_EVERY
    by_chunk = np.zeros((2, n_latent // cfg.chunk))                  # loss sums and steps since the last log line

    def step(i):
        x0, cond, audio = teacher_batch(encoded, batch, n_latent, rng, cfg.audio_context, args.device)
        window, sink = DF_CACHES[rng.integers(len(DF_CACHES))]
        levels, eps = df_noise(x0, cfg.chunk, rng)
        x0, cond, audio, levels, eps = shard(x0, cond, audio, levels, eps)        # this process's rows
        with L.autocast(args.device):
            per_chunk = df_loss(model, x0, cond, audio, levels, eps, window, sink, args.mouth_weight)
        by_chunk[0] += gather_rows(per_chunk.detach()).mean(0).cpu().numpy()
        by_chunk[1] += 1
        text = "loss by chunk " + " ".join(f"{v:.3f}" for v in by_chunk[0] / by_chunk[1])
        if (i + 1) % log_every == 0:                           # each log line covers the steps since the one before
            by_chunk[:] = 0
        return per_chunk.mean(), len(x0) * tokens, text

    out = out_path(args)
    state = fresh_state(args, out)
    steps = args.steps or STAGE_STEPS["df"]
    losses = fit(model, step, steps, args.lr or DF_LR, "df", unit="tokens", ema=ema, state=state,
                 stop_after=args.stop_after, rng=rng, betas=(0.9, 0.99), device=args.device, log_every=log_every,
                 run=run_options(args))
    ema = unsharded(ema)
    if master():
        L.save_checkpoint(out, ema, cfg, extra=dit_extra(args, steps, ae, final_loss=float(np.mean(losses[-50:]))),
                          dtype=STUDENT_DTYPE)
        print(f"saved {out} (EMA weights)")
    return model, losses


# -----------------------------------------------------------------------------
# stage: dmd, Self-Forcing DMD with the Sync-Window CFG teacher and the SyncNet reward

GT_SYNC_C_PAPER = 7.95      # syncnet_python's ground-truth Sync-C on HDTF (the paper's table)
DMD_CLIP = 10.0             # grad-norm clip of student and critic, as Self Forcing
DMD_EMA = 0.99              # the student's EMA decay cap (Self Forcing's); at 50 steps the warm-up's 0.85 holds (ema_update)
DMD_STEPS, DMD_BATCH = 50, 8    # paper: 600 at 16; 2.5-3.9 s per step on 2 CPU cores; sync peaks by step 25-75 and falls after (README, "Why 50 steps")
DMD_LOG_EVERY = 10          # a log line every 10 student steps
DMD_LR = 2e-5               # student and critic; paper: 2e-6 for both, a fifth of its stage-1 lr (1e-5); our df runs at DF_LR
TEACHER_CFG = ("none", "fixed", "window")   # the ablation's teacher guidance in DMD
# the dmd options' defaults (--cfg-scale's for eval-teacher too), filled in by the stages that read
# them, so that any other stage can refuse them (STAGE_OPTIONS)
DMD_DEFAULTS = {"teacher_cfg": "window", "cfg_scale": L.CFG_SCALE, "beta": 2.0, "critic_steps": 5}


def with_dmd_defaults(args):
    """args with every DMD_DEFAULTS option that was not given set to its default."""
    return argparse.Namespace(**{**vars(args), **{k: v for k, v in DMD_DEFAULTS.items() if getattr(args, k) is None}})


@torch.no_grad()
def sync_rewards(net, ae, x, raw_audio):
    """R = Sync-C of each decoded clip against its audio, as the evaluation measures it (uint8 frames,
    syncnet_python's algorithm), on the whole decoded frame: the evaluation scores the lower face
    pasted into the source frames (composite), which the encoded pool does not keep.
    x (B, F, 16, h, w) latents, raw_audio (B, T * 640) -> (B,)."""
    frames = L.tensor_to_frames(ae.decode(x.detach().float())[0])             # (B, T, H, W, 3)
    return torch.tensor([L.evaluate_sync(net, [f], [a.numpy()])["sync_c"] for f, a in zip(frames, raw_audio)],
                        dtype=torch.float64)


def critic_loss(critic, x, cond, audio, t, eps, mouth_weight=None):
    """The critic's flow-matching (v-prediction) loss on the student's detached samples x, at
    DMD's re-noise times t (B,) with noise eps like x: it learns the score of the student's
    current distribution."""
    t = t[:, None].expand(-1, x.shape[1])                                      # (B, F)
    with L.autocast(x.device):
        v = critic(L.add_noise(x, eps, t), t, cond, audio)
    return L.flow_matching_loss(v, x, eps, mouth_weight).mean()


def same_weights(a, b):
    """Two modules' tensors equal up to half-precision rounding (a student is stored in fp16)."""
    return all(torch.allclose(x.float().cpu(), y.float().cpu(), rtol=2e-3, atol=1e-4)
               for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def train_dmd(args):
    args = with_dmd_defaults(args)
    seed = args.seed if args.seed is not None else 0
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    dev, ckpt = args.device, lambda name: os.path.join(args.ckpt_dir, f"{name}.safetensors")
    ae = L.load_checkpoint(ckpt("vae"), L.AEConfig, L.VideoAE, dev)[0]
    sync_net, _, sync_meta = L.load_checkpoint(ckpt("syncnet_reward"), L.SyncNetConfig, L.SyncNet, dev)
    # the DiTs are loaded on the CPU and placed (or sharded) a pair at a time, so a process's host
    # memory peaks at about three whole models and its device holds only what place_dit puts there
    teacher, tcfg, _ = load_dit(args, args.teacher or ckpt("teacher"), False, "dmd's --teacher", ae)
    critic = copy.deepcopy(teacher).train().requires_grad_(True)        # the critic starts as the teacher
    critic.checkpointing = args.grad_ckpt        # the student rolls out with a KV cache: never checkpointed
    teacher, critic = place_dit(dev, teacher.requires_grad_(False), critic)
    init, icfg, _ = load_dit(args, args.init or ckpt("student_df"), None, "dmd", ae)
    # a bidirectional init (no Diffusion-Forcing stage) becomes causal with the inference cache
    cfg = icfg if icfg.causal else dataclasses.replace(icfg, causal=True, sink=1, window=7)
    cfg = dataclasses.replace(cfg, seed=seed)
    reads = lambda c: (c.audio_context, c.latent_channels, c.audio_encoder)
    if reads(cfg) != reads(tcfg) or (cfg.audio_encoder and not same_weights(init.audio_encoder, teacher.audio_encoder)):
        fail(f"dmd: the student (audio context, latent channels, audio encoder: {reads(cfg)}) and the teacher "
             f"({reads(tcfg)}) must read the same latents and packed audio, by the same audio encoder: "
             "pass a --teacher and --init of one chain")
    student = L.DiT(cfg)
    student.load_state_dict(init.state_dict())
    del init
    ema = copy.deepcopy(student).requires_grad_(False)
    student, ema = place_dit(dev, student.train(), ema)
    n_param = lambda m: f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M"
    print(cfg, f"\nstudent {n_param(student)}, teacher and critic {n_param(teacher)} parameters")
    gt = sync_meta.get("gt_sync_c")
    reward_scale = args.reward_scale or (gt / GT_SYNC_C_PAPER if gt else 1.0)
    print(f"reward SyncNet: ground-truth Sync-C {f'{gt:.2f}' if gt else 'not in its metadata'}; "
          f"R = Sync-C / {reward_scale:.3f}")

    n_latent, batch = args.latent_frames or 12, args.batch or STAGE_BATCH["dmd"]
    assert n_latent % cfg.chunk == 0, f"--latent-frames must be a multiple of the chunk ({cfg.chunk})"
    clips = dit_pool(args, n_latent, "dmd")
    encoded = L.encode_pool(ae, clips, cfg.audio_context, progress=master(), encoder=student.audio_encoder)
    audios = [c.audio for c in clips]                               # EncodedClip keeps features only
    del clips
    scale = 1.0 if args.teacher_cfg == "none" else args.cfg_scale
    window = L.SYNC_WINDOW if args.teacher_cfg == "window" else (0.0, 1.0)       # (0, 1): every t

    def draw(cond):
        """A global batch's randomness: the rollout's exit step (the same for every chunk) and its
        noises (B, steps, F, 16, h, w), and per sample a re-noise time t (B,) and noise eps."""
        shape = (len(cond), n_latent, cfg.latent_channels, *cond.shape[-2:])
        exit_step = int(rng.integers(len(L.STUDENT_STEPS)))
        noises = torch.randn(shape[0], len(L.STUDENT_STEPS), *shape[1:], device=dev)
        return exit_step, noises, L.dmd_timesteps(len(cond), dev), torch.randn(shape, device=dev)

    def rollout(cond, audio, noises, exit_step):
        with L.autocast(dev):
            return L.self_forcing_rollout(student, cond, audio, noises.transpose(0, 1), exit_step).float()

    s_opt = torch.optim.Adam(student.parameters(), lr=args.lr or DMD_LR, betas=(0.0, 0.999))
    c_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr or DMD_LR, betas=(0.0, 0.999))
    critic_state = lambda state: os.path.join(os.path.dirname(state), "critic-" + os.path.basename(state))
    out = out_path(args)
    state = fresh_state(args, out, lambda st: [critic_state(st)])
    c_state = state and critic_state(state)
    start = 0
    if resumes_from(state, dev):
        start = load_train_state(state, student, ema, s_opt, rng, dev)
        if not os.path.isfile(c_state) or load_train_state(c_state, critic, None, c_opt, None) != start:
            # two files, written one after the other: a run killed between the writes leaves them apart
            fail(f"{c_state} is missing or not at step {start} as {state} is (the run stopped while saving): "
                 f"delete both and start over without --resume")
    steps = args.steps or STAGE_STEPS["dmd"]
    end = min(steps, args.stop_after) if args.stop_after else steps
    if start:
        check_resume("dmd", state, end, run_options(args))
        if master():
            print(f"dmd: resumed from {state} at step {start}")
    log = {"dmd": [], "critic": [], "sync_c": [], "ess": []}
    log_every = args.log_every or DMD_LOG_EVERY
    t0 = time.time()
    for step in progress(range(start, end), desc="dmd", initial=start, total=steps):
        # the critic tracks the student: flow matching on fresh rollouts, several updates per student update
        for _ in range(args.critic_steps):
            _, cond, audio = teacher_batch(encoded, batch, n_latent, rng, cfg.audio_context, dev)
            exit_step, noises, t, eps = draw(cond)
            cond, audio, noises, t, eps = shard(cond, audio, noises, t, eps)      # this process's rows
            with torch.no_grad():
                x = rollout(cond, audio, noises, exit_step)
            loss = critic_loss(critic, x, cond, audio, t, eps, args.mouth_weight)
            optimizer_step(critic, c_opt, loss, DMD_CLIP)
            log["critic"].append(global_mean(loss))
        # the student: a rollout with gradient at the exit steps, scored by teacher and critic
        _, cond, audio, raw = teacher_batch(encoded, batch, n_latent, rng, cfg.audio_context, dev, audios)
        exit_step, noises, t, eps = draw(cond)
        cond, audio, raw, noises, t, eps = shard(cond, audio, raw, noises, t, eps)
        x = rollout(cond, audio, noises, exit_step)
        with torch.no_grad(), L.autocast(dev):
            tt = t[:, None].expand(-1, n_latent)                                   # (B, F)
            x_t = L.add_noise(x.detach(), eps, tt)
            real = L.predict_x0(teacher, x_t, tt, cond, audio, L.sync_window_cfg(t, scale, window), tcfg.drop_mode)
            fake = L.predict_x0(critic, x_t, tt, cond, audio)
        # the reward weights are normalised over the whole batch: every process gathers its losses and rewards
        R = gather_rows(sync_rewards(sync_net, ae, x, raw).to(dev))                # (B,)
        per_sample = gather_rows(L.dmd_loss(x, real.float(), fake.float()))        # (B,)
        loss = L.reward_weighted_mean(per_sample, R, args.beta, reward_scale)
        optimizer_step(student, s_opt, loss, DMD_CLIP)
        ema_update(ema, student, step, DMD_EMA)
        log["dmd"].append(per_sample.mean().item())
        log["sync_c"].append(R.mean().item())
        log["ess"].append(L.effective_batch(R, args.beta, reward_scale))
        if (step + 1) % log_every == 0 or step + 1 == end:
            n, dt = log_every, time.time() - t0                                  # means over the last n steps
            tqdm.write(f"dmd step {step + 1}/{steps} dmd loss {np.mean(log['dmd'][-n:]):.4f} "
                       f"critic loss {np.mean(log['critic'][-n * args.critic_steps:]):.4f} "
                       f"reward Sync-C {np.mean(log['sync_c'][-n:]):.2f} "
                       f"effective batch {np.mean(log['ess'][-n:]):.1f}/{batch} "
                       f"{dt / (step + 1 - start):.2f} s/step elapsed {dt:.0f}s")
        if state and master() and ((step + 1) % 50 == 0 or step + 1 == end):
            save_train_state(state, student, ema, s_opt, step + 1, rng, dev, run_options(args))
            save_train_state(c_state, critic, None, c_opt, step + 1, None)
    extra = dit_extra(args, steps, ae, teacher_cfg=args.teacher_cfg, cfg_scale=args.cfg_scale, beta=args.beta,
                      reward_scale=reward_scale, final_reward_sync_c=float(np.mean(log["sync_c"][-50:] or [np.nan])))
    ema = unsharded(ema)
    if master():
        L.save_checkpoint(out, ema, cfg, extra=extra, dtype=STUDENT_DTYPE)
        print(f"saved {out} (EMA weights)")
    return student, log


# -----------------------------------------------------------------------------
# stage: eval-teacher (the teacher's table on the test split)



def segment_starts(T):
    """Starts of the 33-frame segments that tile the first 1 + 32 n frames of a T-frame clip."""
    return list(range(0, T - (L.TEACHER_HOP + 1) + 1, L.TEACHER_HOP))


def window_ref(s, T, n_frames=L.TEACHER_HOP + 1):
    """The reference frame of the n_frames window at frame s of a T-frame clip: half a clip away on
    the latent grid; where that falls inside the window (a clip shorter than two windows), the grid
    frame nearest to it outside, as training always draws it outside (random_ref); a clip that is
    one window long has no frame outside it, and keeps the one inside."""
    tf = L.FRAMES_PER_LATENT
    r = tf * (((s + T // 2) % T) // tf)
    outside = [q for q in range(0, T, tf) if not s <= q < s + n_frames]
    return r if r in outside else min(outside, key=lambda q: abs(q - r), default=r)


def teacher_windows(enc, T, context):
    """The teacher's inputs for a T-frame clip: its 33-frame windows (32-frame hop), each with its
    reference frame outside it (window_ref). Returns x0, cond, audio, each (S, F, ...)."""
    items = [L.latent_window(enc, s, L.TEACHER_LATENT, window_ref(s, T), context) for s in segment_starts(T)]
    return [torch.stack(x) for x in zip(*items)]


def stitch(frames):
    """Windows (S, 33, H, W, 3) that share one frame each -> one clip (1 + 32 S, H, W, 3)."""
    return np.concatenate([f[:L.TEACHER_HOP] for f in frames[:-1]] + [frames[-1]])


@torch.no_grad()
def teacher_generate(model, ae, enc, T, cfg_scale, seed, device, cfg_schedule=None):
    """Generate a clip window by window (all windows in one batch) with the 50-step sampler,
    decode, and stitch: (T_out, H, W, 3) uint8 with T_out = 1 + 32 n."""
    x0, cond, audio = [x.to(device) for x in teacher_windows(enc, T, model.cfg.audio_context)]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=g).to(device)
    with L.autocast(device):
        z = L.sample_ode(model, cond, audio, noise, cfg=cfg_scale, cfg_schedule=cfg_schedule, mode=model.cfg.drop_mode)
    return stitch(L.tensor_to_frames(ae.decode(z.float())[0]))                         # from (S, 33, H, W, 3)


FIDELITY = ("psnr", "mouth_psnr", "mouth_ssim")   # the metrics clip_metrics takes against a true video


def scored_fidelity(res):
    """Results rows as they can be trusted: where res has no "ground truth, dub" row it was written
    before the dub rows were scored against the dub's true video (they were compared with the
    source frames then), and their fidelity metrics are dropped."""
    if "ground truth, dub" in res:
        return res
    return {k: {m: v for m, v in row.items() if "dub" not in k or m not in FIDELITY} if isinstance(row, dict) else row
            for k, row in res.items()}


def tasks(c):
    """(task, driving audio, its true mouth, the true video) of each task clip c offers: "recon"
    (its own audio, its own frames) and, for a test clip, "dub" (the second speaker's audio; the
    true video is dub_frames, or None without it)."""
    return [("recon", c.audio, c.mouth, c.frames)] + ([("dub", c.dub_audio, c.dub_mouth, c.dub_frames)]
                                                      if c.dub_audio is not None else [])


def clip_metrics(frames, audio, mouth, gt, sync_net, mouth_net):
    """Sync-C / Sync-D, MouthErr against the driving audio's mouth, and fidelity to the true video
    gt (None: no true video, no fidelity)."""
    T = len(frames)
    s = L.evaluate_sync(sync_net, [frames], [audio[:T * L.SAMPLES_PER_FRAME]])
    m = {"sync_c": s["sync_c"], "sync_d": s["sync_d"], "mouth_err": L.mouth_error(mouth_net, frames, mouth[:T])}
    if gt is not None:
        m.update(psnr=L.psnr(frames, gt[:T]), mouth_psnr=L.psnr(L.mouth_crop(frames), L.mouth_crop(gt[:T])),
                 mouth_ssim=L.ssim(L.mouth_crop(frames), L.mouth_crop(gt[:T])))
    return m


def eval_teacher(args):
    args = with_dmd_defaults(args)
    ae, sync_eval, _, mouth_net = load_foundation(args.ckpt_dir, args.device)
    model = load_dit(args, args.ckpt or os.path.join(args.ckpt_dir, "teacher.safetensors"), False, "eval-teacher", ae,
                     args.device)[0]
    test, split, words = graded_clips(args)
    rows = {}
    for ci, c in enumerate(tqdm(test, desc=f"teacher on the {split} clips")):
        T = 1 + segment_starts(len(c.frames))[-1] + L.TEACHER_HOP
        gt = c.frames[:T]
        add = reference_rows(rows, ae, c, T, sync_eval, mouth_net, args.device)
        enc = L.encode_clip(ae, c.frames, c.audio, model.cfg.audio_context, encoder=model.audio_encoder)
        for task, audio, mouth, truth in tasks(c):
            # the frames (and so the latents) are the same for both tasks: only the audio changes
            if task != "recon":                       # encode_clip made the features of the clip's own audio
                enc = dataclasses.replace(enc, feats=L.audio_frame_features(audio, model.cfg.audio_context,
                                                                            model.audio_encoder))
            for name, scale in ((f"CFG {args.cfg_scale:g}", args.cfg_scale), ("no CFG", 1.0)):
                out = teacher_generate(model, ae, enc, len(c.frames), scale, seed=ci, device=args.device)
                out = L.composite(gt, out)                    # the lower face pasted into the source, as the tool does
                add(f"teacher 50 steps {name}, {task}", clip_metrics(out, audio, mouth, truth, sync_eval, mouth_net))
    res = mean_rows(rows, len(test), split)
    print_table(res, f"teacher (bidirectional, 50-step Euler) on SynthTalk's {words}; sync by the eval SyncNet", len(test))
    L.save_json(results_json(args, "teacher", split), res)


HELDOUT_STEPS = (0, 20, 30, 40)    # the teacher's ODE steps at which the held-out gap is measured
HELDOUT_CLIPS = 64                 # clips of each kind; 2 x 64 windows of 9 latent frames drawn from them


@torch.no_grad()
def eval_heldout(args):
    """Does the DiT generalise to new identities? Its x0-prediction error (MSE over the lower-face
    latent rows, the region it regenerates; conditional, no CFG) at a few ODE times, on windows of
    SynthTalk training clips it trained on (the first clips of every pool) and on windows of
    clips of the same distribution whose identities no model saw (val_clips). Same noise, times
    and window draw for both. A ratio well above 1 means the DiT memorised its training
    identities and more clips (--clips) will help; near 1, it is limited by steps or size."""
    ae = L.load_checkpoint(os.path.join(args.ckpt_dir, "vae.safetensors"), L.AEConfig, L.VideoAE, args.device)[0]
    path = args.ckpt or os.path.join(args.ckpt_dir, "teacher.safetensors")
    model, cfg, extra = load_dit(args, path, False, "heldout", ae, args.device)
    pools = {"training": dit_pool(args, L.TEACHER_LATENT, "heldout")[:HELDOUT_CLIPS],
             "unseen": val_clips(args, HELDOUT_CLIPS)}
    err = {}
    for kind, clips in pools.items():
        enc = L.encode_pool(ae, clips, cfg.audio_context, progress=master(), desc=f"encoding the {kind} clips",
                            encoder=model.audio_encoder)
        rng = np.random.default_rng(0)
        torch.manual_seed(0)
        x0, cond, audio = teacher_batch(enc, 2 * HELDOUT_CLIPS, L.TEACHER_LATENT, rng, cfg.audio_context, args.device)
        eps = torch.randn_like(x0)
        region = L.lower_face_mask(*x0.shape[-2:], args.device)                  # (h, w)
        silent = L.drop_conditions(cond, audio, torch.ones(len(x0), dtype=torch.bool, device=args.device), "audio")
        for j in HELDOUT_STEPS:
            t = torch.full(x0.shape[:2], L.ode_t(j), device=args.device)
            for name, (c, a) in ((kind, (cond, audio)), (f"{kind}, audio dropped", silent)):
                with L.autocast(args.device):
                    x0_hat = L.predict_x0(model, L.add_noise(x0, eps, t), t, c, a).float()
                mse = ((x0_hat - x0).pow(2) * region).sum() / (region.sum() * x0.shape[:3].numel())
                err.setdefault(j, {})[name] = float(mse)
    print(f"\n{path} ({extra.get('steps')} steps): lower-face x0 MSE, {2 * HELDOUT_CLIPS} windows of each kind; "
          f"'audio dropped' is the CFG-negative condition\n")
    print("| ODE step (t) | training identities | unseen identities | unseen / training | "
          "training, audio dropped | unseen, audio dropped |\n|---|---|---|---|---|---|")
    for j, e in err.items():
        print(f"| {j} ({L.ode_t(j):.3f}) | {e['training']:.4f} | {e['unseen']:.4f} | {e['unseen'] / e['training']:.2f} | "
              f"{e['training, audio dropped']:.4f} | {e['unseen, audio dropped']:.4f} |")
    L.save_json(os.path.join(args.results, "heldout.json"), {"checkpoint": path, "steps": extra.get("steps"),
                                                             "mse": {str(j): e for j, e in err.items()}})
    return err


PROBE_CONTEXTS = (0, 2, 4, 8)      # audio context of the probe's inputs, video frames on each side
PROBE_STEPS, PROBE_BATCH, PROBE_LR = 3000, 512, 1e-3
PROBE_LOG_EVERY = 1000            # the probe's steps are cheap: a log line every 1000


def probe_data(clips, context, track="audio"):
    """Each clip's latent frames 1..G (the 4-frame groups) as the DiT receives their audio:
    pack_audio features (sum G, (4 + 2c) 160) and the true mouth of their 4 video frames
    (sum G, 12). track="dub_audio" pairs each test clip's second audio track with its own mouth
    (a control: audio that did not make that mouth)."""
    X, Y, tf = [], [], L.FRAMES_PER_LATENT
    for c in clips:
        G = (len(c.mouth) - 1) // tf
        feats = L.audio_frame_features(getattr(c, track), context)
        X.append(L.pack_audio(feats, tf, G, context))                  # latent f: frames 4f + 1 .. 4f + 4
        Y.append(torch.as_tensor(c.mouth[1:1 + tf * G]).reshape(G, tf * c.mouth.shape[1]))
    return torch.cat(X), torch.cat(Y)


def eval_audio_probe(args):
    """Does the audio the DiT is given determine the mouth? For each audio context, an MLP as
    wide as the DiT's audio embedding is trained (L1, on the teacher's training pool) to predict
    the SynthTalk ground-truth mouth (open, width, teeth) of a latent frame's 4 video frames from
    exactly that frame's packed audio features; its error on the test split is set against
    predicting the pool's mean mouth, and against the test clips' second audio track (speech that
    did not make that mouth). A small error means the corpus is learnable from the DiT's input:
    a teacher short of sync is limited by the DiT, not by its audio features or context."""
    seed = args.seed if args.seed is not None else 0
    clips, test = train_pool(args, DIT_CLIPS, 4.0, "audio-probe"), test_pool(args)
    d = L.DIT_PRESETS[args.preset]["dim"]
    res = {}
    for context in PROBE_CONTEXTS:
        torch.manual_seed(seed)
        X, Y = (v.to(args.device) for v in probe_data(clips, context))
        net = nn.Sequential(nn.Linear(X.shape[1], d), nn.SiLU(), nn.Linear(d, d),        # the DiT's audio_embed
                            nn.SiLU(), nn.Linear(d, 12)).to(args.device)                  # + a readout of 4 x 3
        g = torch.Generator().manual_seed(seed)

        def step(i):
            idx = torch.randint(len(X), (args.batch or PROBE_BATCH,), generator=g).to(args.device)
            return (net(X[idx]) - Y[idx]).abs().mean(), len(idx)

        fit(net, step, args.steps or PROBE_STEPS, args.lr or PROBE_LR, f"audio probe, context {context}",
            log_every=args.log_every or PROBE_LOG_EVERY, device=args.device)
        with torch.no_grad():
            err = lambda X, Y: (net(X.to(args.device)) - Y.to(args.device)).abs().view(-1, 4, 3).mean((0, 1)).cpu()  # (3,)
            own, control = probe_data(test, context), probe_data(test, context, "dub_audio")
            res[context] = {"train": float(err(X, Y).mean()), "test": err(*own).tolist(),
                            "dub track": float(err(*control).mean()),
                            "mean mouth": float((own[1] - Y.mean(0).cpu()).abs().mean())}
    print(f"\naudio -> mouth probe: MAE of the mouth (open, width, teeth; each 0..1) of a latent frame's 4 video "
          f"frames from its packed audio; MLP width {d}, {len(clips)} training clips, {len(test)} test clips\n")
    print("| audio context (frames each side) | train MAE | test MAE | open / width / teeth | "
          "test, the other audio track | test, the pool's mean mouth |\n|---|---|---|---|---|---|")
    for context, r in res.items():
        mark = " (the DiT's)" if context == L.DiTConfig.audio_context else ""
        print(f"| {context}{mark} | {r['train']:.4f} | {np.mean(r['test']):.4f} | "
              f"{' / '.join(f'{v:.3f}' for v in r['test'])} | {r['dub track']:.4f} | {r['mean mouth']:.4f} |")
    L.save_json(os.path.join(args.results, "audio_probe.json"), {"train_clips": len(clips), "test_clips": len(test),
                                                                "width": d, "mae": {str(c): r for c, r in res.items()}})
    return res


def reference_rows(rows, ae, c, T, sync_net, mouth_net, device):
    """Add the ground-truth and autoencoder rows for the first T frames of clip c, and the dub's
    ground truth where c holds it; returns add(name, metrics)."""
    add = lambda name, m: rows.setdefault(name, []).append(m)
    gt = c.frames[:T]
    add("ground truth", clip_metrics(gt, c.audio, c.mouth, gt, sync_net, mouth_net))
    if c.dub_frames is not None:
        add("ground truth, dub", clip_metrics(c.dub_frames[:T], c.dub_audio, c.dub_mouth, c.dub_frames,
                                              sync_net, mouth_net))
    add("autoencoder reconstruction", clip_metrics(reconstruct(ae, L.Clip(gt, c.audio), device),
                                                   c.audio, c.mouth, gt, sync_net, mouth_net))
    return add


def mean_rows(rows, n_clips, split="test", gt=None):
    """Each row's metrics averaged over its clips, and the clip count as "<split>_clips". With the
    ground truth's Sync-C of the same clips (gt: per clip, in order; default: rows["ground truth"]),
    each other row also gets gt_ratio_se, the standard error over clips of its Sync-C / GT: for the
    ratio of means r = mean(x) / mean(g), the SE of mean(x - r g) over mean(g) (the delta method)."""
    res = {name: {k: float(np.mean([m[k] for m in ms])) for k in ms[0]} for name, ms in rows.items()}
    g = np.array(gt if gt is not None else [m["sync_c"] for m in rows.get("ground truth", [])])
    for name, ms in rows.items():
        x = np.array([m["sync_c"] for m in ms])
        if name != "ground truth" and len(x) == len(g) > 1:
            r = x.mean() / g.mean()
            res[name]["gt_ratio_se"] = float((x - r * g).std(ddof=1) / np.sqrt(len(x)) / g.mean())
    res[f"{split}_clips"] = n_clips
    return res


# -----------------------------------------------------------------------------
# stage: eval-student (the causal student streamed over whole test clips)


def student_rows(rows, name, model, ae, clips, sync_net, mouth_net):
    """Stream the student over each whole clip, with its own audio (recon) and, where the clip has
    one, the second speaker's (dub), and add the metrics to rows["<name>, recon" / ", dub"]."""
    for ci, c in enumerate(tqdm(clips, desc=name)):
        for task, audio, mouth, truth in tasks(c):
            out = L.lipsync(model, ae, c.frames, audio, seed=ci)
            rows.setdefault(f"{name}, {task}", []).append(clip_metrics(out, audio, mouth, truth, sync_net, mouth_net))


def graded_clips(args):
    """The clips eval-teacher and eval-student grade (--split), their split's key and its words:
    the test split with its dubs' true videos, or 16 validation clips as long (no dub track)."""
    if args.split == "val":
        return val_clips(args, seconds=L.TEST_SECONDS), "val", "validation clips (unseen training-distribution identities)"
    return test_pool(args, dub_truth=True), "test", "test clips"


def results_json(args, stem, split):
    """Where an evaluation of `stem` on `split` writes its table: <results>/<stem>.json, or
    <stem>_val.json for the validation split."""
    return os.path.join(args.results, f"{stem}_val.json" if split == "val" else f"{stem}.json")


def eval_student(args):
    ae, sync_eval, _, mouth_net = load_foundation(args.ckpt_dir, args.device)
    path = args.ckpt or os.path.join(args.ckpt_dir, "student_df.safetensors")
    model, cfg, _ = load_dit(args, path, True, "eval-student", ae, args.device)
    clips, split, words = graded_clips(args)
    rows = {}
    for c in clips:
        reference_rows(rows, ae, c, len(c.frames), sync_eval, mouth_net, args.device)
    stem = os.path.basename(path).removesuffix(".safetensors")
    student_rows(rows, f"student {stem}, {len(L.STUDENT_STEPS)} steps", model, ae, clips, sync_eval, mouth_net)
    res = mean_rows(rows, len(clips), split)
    print_table(res, f"causal student streamed (sink {cfg.sink}, window {cfg.window}) over whole {words}; "
                     "sync by the eval SyncNet", len(clips))
    L.save_json(results_json(args, stem, split), res)


def print_table(res, title, n_clips):
    """The results table over n_clips clips; an "fps" entry in a row adds the FPS column. Sync-C / GT
    is against the ground truth with its own audio in every row, +- its standard error over clips
    where the results hold one (gt_ratio_se, mean_rows); fidelity is to the row's true video,
    "-" where it has none (scored_fidelity: dub rows of results written before they were given the dub's)."""
    res = scored_fidelity(res)
    gt_c = res["ground truth"]["sync_c"]
    fps = any("fps" in m for m in res.values() if isinstance(m, dict))
    print(f"\n{title}, {n_clips} clips\n")
    print("| row | Sync-C | Sync-C / GT | Sync-D | MouthErr | mouth PSNR | mouth SSIM | PSNR |" + " FPS |" * fps)
    print("|---|---|---|---|---|---|---|---|" + "---|" * fps)
    for name, m in res.items():
        if isinstance(m, dict):
            fid = f"{m['mouth_psnr']:.2f} | {m['mouth_ssim']:.3f} | {m['psnr']:.2f}" if "psnr" in m else "- | - | -"
            speed = (f" {m['fps']:.1f} |" if m.get("fps") else " - |") * fps
            ratio = f"{m['sync_c'] / gt_c:.3f} +- {m['gt_ratio_se']:.3f}" if "gt_ratio_se" in m else f"{m['sync_c'] / gt_c:.2f}"
            print(f"| {name} | {m['sync_c']:.2f} | {ratio} | {m['sync_d']:.2f} | {m['mouth_err']:.3f} | "
                  f"{fid} |{speed}")


# the distillation's ablation: (row, student checkpoint in --ckpt-dir, the command that makes it)
ABLATION = (
    ("DF-init student", "student_df", "train.py df"),
    ("DMD, teacher without CFG", "student_dmd_none",
     "train.py dmd --teacher-cfg none --beta 0 --threads 1 --out checkpoints/student_dmd_none.safetensors"),
    (f"DMD, fixed CFG {L.CFG_SCALE:g}", "student_dmd_fixed",
     "train.py dmd --teacher-cfg fixed --beta 0 --threads 1 --out checkpoints/student_dmd_fixed.safetensors"),
    ("DMD, Sync-Window CFG", "student_dmd_window",
     "train.py dmd --teacher-cfg window --beta 0 --threads 1 --out checkpoints/student_dmd_window.safetensors"),
    ("DMD, Sync-Window CFG + SyncNet reward", "student", "train.py dmd"),
)


def read_results(args, name):
    """A JSON file in --results as a dict ({} if it has not been written yet)."""
    path = os.path.join(args.results, name)
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def eval_ablation(args):
    """The distillation's table: ground truth, the teacher's rows (from results/teacher.json,
    written by eval-teacher) and every student of ABLATION found in --ckpt-dir, streamed over the
    test split (2 steps per chunk). FPS: end to end on this machine, from results/benchmark.json
    (sample.py --benchmark); every student has the same architecture and so the same speed."""
    ae, sync_eval, _, mouth_net = load_foundation(args.ckpt_dir, args.device)
    test = test_pool(args, dub_truth=True)
    refs, students, found = {}, {}, []
    for c in test:
        reference_rows(refs, ae, c, len(c.frames), sync_eval, mouth_net, args.device)
    for name, stem, command in ABLATION:
        path = os.path.join(args.ckpt_dir, f"{stem}.safetensors")
        if not os.path.isfile(path):
            print(f"{name}: {path} not found (made by python {command}); row skipped")
            continue
        model, _, extra = load_dit(args, path, True, "ablation", ae, args.device)
        student_rows(students, name, model, ae, test, sync_eval, mouth_net)
        found.append({"row": name, "checkpoint": path, **extra})
    teacher, bench = scored_fidelity(read_results(args, "teacher.json")), read_results(args, "benchmark.json")
    fps = lambda who: bench.get(who, {}).get("fps")
    guided = f"CFG {L.CFG_SCALE:g}"                                  # the benchmark samples the teacher with CFG
    res = {**mean_rows(refs, len(test)),
           **{k: dict(v, fps=fps("teacher") if guided in k else None) for k, v in teacher.items() if k.startswith("teacher")},
           **{k: dict(v, fps=fps("student")) for k, v in
              mean_rows(students, len(test), gt=[m["sync_c"] for m in refs["ground truth"]]).items() if isinstance(v, dict)},
           "students": found}                                          # mean_rows wrote test_clips
    print_table(res, "the distillation on the SynthTalk test split (teacher rows from results/teacher.json); "
                     "sync by the eval SyncNet", len(test))
    L.save_json(os.path.join(args.results, "ablation.json"), res)


# -----------------------------------------------------------------------------
# stage: eval, the foundation table


def load_foundation(ckpt_dir, device="cpu"):
    """The trained autoencoder, both SyncNets and MouthNet from ckpt_dir."""
    path = lambda name: os.path.join(ckpt_dir, f"{name}.safetensors")
    ae = L.load_checkpoint(path("vae"), L.AEConfig, L.VideoAE, device)[0]
    sync_eval = L.load_checkpoint(path("syncnet_eval"), L.SyncNetConfig, L.SyncNet, device)[0]
    sync_reward = L.load_checkpoint(path("syncnet_reward"), L.SyncNetConfig, L.SyncNet, device)[0]
    mouth = L.load_checkpoint(path("mouthnet"), L.MouthNetConfig, L.MouthNet, device)[0]
    return ae, sync_eval, sync_reward, mouth


def corpus_speed(seconds=4.0, size=L.FRAME_SIZE):
    """SynthTalk frames generated per second (video and audio) on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    L.synthtalk_clip("train", 999_999, seconds, size)
    dt = time.perf_counter() - t0
    torch.set_num_threads(threads)
    return seconds * L.FPS / dt


def eval_foundation(args):
    ae, sync_eval, sync_reward, mouth = load_foundation(args.ckpt_dir, args.device)
    test = test_pool(args)
    recon = [reconstruct(ae, c, args.device) for c in tqdm(test, desc="autoencoder")]
    res = {"test_clips": len(test), "corpus_frames_per_s_one_core": corpus_speed()}
    ae_metrics = eval_vae(ae, test, args.device, recon)
    res["ae_psnr"], res["ae_mouth_psnr"] = ae_metrics["psnr"], ae_metrics["mouth_psnr"]
    val = val_clips(args)
    for role, net in (("eval", sync_eval), ("reward", sync_reward)):
        r = eval_syncnet(net, test, val)
        res[f"syncnet_{role}"] = r
        rec = L.evaluate_sync(net, recon, [c.audio for c in test])
        r["ae_recon_sync_c"], r["ae_recon_sync_d"] = rec["sync_c"], rec["sync_d"]
    res["mouth_err_gt"] = float(np.mean([L.mouth_error(mouth, c.frames, c.mouth) for c in test]))
    res["mouth_err_ae_recon"] = float(np.mean([L.mouth_error(mouth, r, c.mouth) for r, c in zip(recon, test)]))
    res["mouth_err_shuffled"] = float(np.mean([L.mouth_error(mouth, c.frames, test[(i + 1) % len(test)].mouth)
                                               for i, c in enumerate(test)]))
    print_foundation_table(res)
    L.save_json(os.path.join(args.results, "foundation.json"), res)


def print_foundation_table(r):
    e, w = r["syncnet_eval"], r["syncnet_reward"]
    rows = [
        ("SynthTalk generation, frames/s (one core, 64 px, with audio)", f"{r['corpus_frames_per_s_one_core']:.0f}", ""),
        ("autoencoder PSNR, full frame / mouth box (dB)", f"{r['ae_psnr']:.2f} / {r['ae_mouth_psnr']:.2f}", ""),
        ("off-sync detection accuracy (3-15 frame shifts)", f"{e['offsync_accuracy']:.1%}", f"{w['offsync_accuracy']:.1%}"),
        ("ground truth: clips with AV offset 0", f"{e['gt_offset0_frac']:.1%}", f"{w['gt_offset0_frac']:.1%}"),
        ("ground truth Sync-C / Sync-D", f"{e['gt_sync_c']:.2f} / {e['gt_sync_d']:.2f}", f"{w['gt_sync_c']:.2f} / {w['gt_sync_d']:.2f}"),
        ("audio shuffled across clips Sync-C / Sync-D", f"{e['shuffled_sync_c']:.2f} / {e['shuffled_sync_d']:.2f}",
         f"{w['shuffled_sync_c']:.2f} / {w['shuffled_sync_d']:.2f}"),
        ("GT Sync-C / shuffled Sync-C", f"{e['gt_sync_c'] / e['shuffled_sync_c']:.1f}x", f"{w['gt_sync_c'] / w['shuffled_sync_c']:.1f}x"),
        ("autoencoder reconstruction Sync-C / Sync-D", f"{e['ae_recon_sync_c']:.2f} / {e['ae_recon_sync_d']:.2f}",
         f"{w['ae_recon_sync_c']:.2f} / {w['ae_recon_sync_d']:.2f}"),
        ("MouthErr: ground truth / AE reconstruction / shuffled mouth",
         f"{r['mouth_err_gt']:.3f} / {r['mouth_err_ae_recon']:.3f} / {r['mouth_err_shuffled']:.3f}", ""),
    ]
    print(f"\nSynthTalk test split, {r['test_clips']} clips of 10 s\n")
    print("| measure | eval SyncNet | reward SyncNet |\n|---|---|---|")
    for name, a, b in rows:
        print(f"| {name} | {a} | {b} |")


# what foundation and pipeline pass on to every stage they run
SHARED_OPTIONS = ("ckpt_dir", "results", "device", "size", "data", "preset", "patch", "depth", "dim", "clips",
                  "seconds", "steps", "batch", "test_clips", "mouth_weight", "log_every", "cfg_drop", "drop_mode", "threads")


def option(name):
    """An args attribute's command-line spelling: stop_after -> --stop-after."""
    return "--" + name.replace("_", "-")


def run_stage(args, stage, *extra, withhold=()):
    """Run another stage with its defaults and `extra`, then this run's SHARED_OPTIONS and FLAGS
    that are set and that the stage acts on (STAGE_OPTIONS), less those named in `withhold`: they
    come last, so they win. `pipeline --data DIR` trains every stage on DIR (but MouthNet:
    foundation); `pipeline --steps 2 --clips 8 ...` is a dry run of the whole chain."""
    takes = lambda name: stage in STAGE_OPTIONS.get(name, (stage,)) and name not in withhold
    shared = [x for name in SHARED_OPTIONS if getattr(args, name) is not None and takes(name)
              for x in (option(name), str(getattr(args, name)))]
    flags = [option(name) for name in FLAGS if getattr(args, name) and takes(name)]
    return STAGES[stage](get_args([stage, *extra, *shared, *flags]))


def foundation_models(args):
    """Every foundation model in order, each graded on the test split as its stage ends."""
    vae = os.path.join(args.ckpt_dir, "vae.safetensors")
    # the autoencoder: 5000 steps, then 2000 more at a lower rate (the committed checkpoint's recipe).
    # The eval SyncNet, which grades every table, trains in fp32 whatever --bf16-convs says: under
    # bf16 autocast on a CPU with AMX it settled at ~90% off-sync accuracy in both runs (README).
    for stage, extra, withhold in (("vae", [], ()), ("vae", ["--init", vae, "--steps", "2000", "--lr", "5e-4"], ()),
                                   ("syncnet", ["--role", "reward"], ()),
                                   ("syncnet", ["--role", "eval"], ("bf16_convs",)),
                                   ("mouthnet", [], ())):
        if stage == "mouthnet" and args.data:
            # MouthNet, the MouthErr instrument, learns SynthTalk's ground-truth mouth, which real
            # clips do not come with: run_stage gives it no --data (STAGE_OPTIONS)
            print("foundation: mouthnet trains on SynthTalk (--data clips carry no ground-truth mouth)")
        if withhold and args.bf16_convs:
            print(f"foundation: {stage} {' '.join(extra)} trains in fp32 (not --bf16-convs)")
        run_stage(args, stage, *extra, withhold=withhold)


def foundation(args):
    """Every foundation model in order, then their table (the eval stage)."""
    foundation_models(args)
    run_stage(args, "eval")


def pipeline(args):
    """Every model the final student needs, each stage with its defaults: the foundation models
    (autoencoder, both SyncNets, MouthNet), the teacher, the Diffusion-Forcing student and the
    final DMD student (Sync-Window CFG + SyncNet reward); the wall time of each stage is printed.
    It trains; the tables are the evaluation stages' (eval, eval-teacher, eval-student, ablation)."""
    t_start, times = time.time(), {}
    for stage in ("foundation", "teacher", "df", "dmd"):
        t0 = time.time()
        if stage == "foundation":
            foundation_models(args)          # the models; their table is `train.py eval`
        else:
            run_stage(args, stage)
        times[stage] = time.time() - t0
        print(f"pipeline: {stage} took {times[stage] / 60:.1f} min ({(time.time() - t_start) / 60:.1f} min so far)")
    return times


# -----------------------------------------------------------------------------
# stage: export SynthTalk as a folder of mp4 clips (the layout --data reads)


EXPORT_DIR = "data/synthtalk"


def export_synthtalk(args):
    out, n, seconds = args.out or EXPORT_DIR, args.clips or 64, args.seconds or 4.0
    for i in tqdm(range(n), desc=f"writing {out}"):
        c = L.synthtalk_clip("train", i, seconds, args.size)
        L.write_video(os.path.join(out, f"{c.name}.mp4"), c.frames, c.audio)
    print(f"wrote {n} clip{'' if n == 1 else 's'} to {out}; train on them with --data {out}")


# -----------------------------------------------------------------------------

STAGES = {"vae": train_vae, "syncnet": train_syncnet, "mouthnet": train_mouthnet, "teacher": train_teacher,
          "eval-teacher": eval_teacher, "df": train_df, "dmd": train_dmd, "eval-student": eval_student,
          "ablation": eval_ablation, "eval": eval_foundation, "foundation": foundation, "pipeline": pipeline,
          "export": export_synthtalk, "heldout": eval_heldout,
          "audio-probe": eval_audio_probe}


DISTRIBUTED_STAGES = ("vae", "syncnet", "mouthnet", "teacher", "df", "dmd")     # torchrun-able
FSDP_STAGES = ("teacher", "df", "dmd")                                          # the DiT stages
TRAINING_STAGES = DISTRIBUTED_STAGES                                            # they keep a training-state file

# the options only some stages act on: any other stage refuses them rather than ignore them.
# (Not --role, --drop-mode, --cfg-drop, --mouth-weight, --preset and --test-clips: they have values
# by default, pipeline passes --mouth-weight to every stage, and the stages that do not read them ignore them.)
# --seed and --lr are each stage's own: pipeline and foundation, which run stages of different seeds and
# rates, refuse them. A DiT's shape (--depth, --dim, --patch) is the teacher's to choose: df and dmd copy it.
# The teacher trains from scratch (--resume continues a stopped run: a teacher --init would have to
# say which of its shape and CFG-dropout options the checkpoint's config overrides); the SyncNets
# and MouthNet are short runs that nothing fine-tunes; torch.compile is wired into the teacher only.
# foundation and pipeline take the FLAGS of the stages they run, and pass each on where it acts.
STAGE_STEPS = {"vae": VAE_STEPS, "syncnet": SYNCNET_STEPS, "mouthnet": MOUTHNET_STEPS, "teacher": TEACHER_STEPS,
               "df": DF_STEPS, "dmd": DMD_STEPS}    # each training stage's length, unless --steps
STAGE_BATCH = {"vae": 16, "syncnet": 64, "mouthnet": 128, "teacher": 16, "df": 16, "dmd": DMD_BATCH}   # unless --batch
TRAINERS = (*TRAINING_STAGES, "audio-probe")                  # the stages that run an optimiser (fit)
STAGE_OPTIONS = {"seed": TRAINERS, "lr": TRAINERS, "out": (*TRAINING_STAGES, "export"),
                 **{name: (*TRAINERS, "foundation", "pipeline") for name in ("steps", "batch", "log_every")},
                 **{name: ("teacher", "pipeline") for name in ("depth", "dim", "patch")},
                 "init": ("vae", "df", "dmd"), "compile": ("teacher", "pipeline"), "split": ("eval-teacher", "eval-student"),
                 "ckpt": ("eval-teacher", "eval-student", "heldout"), "teacher": ("dmd",),
                 "latent_frames": ("teacher", "df", "dmd"), "cfg_scale": ("dmd", "eval-teacher"),
                 **{name: ("dmd",) for name in ("teacher_cfg", "beta", "reward_scale", "critic_lr", "critic_steps")},
                 "audio_adaln": ("teacher",), "audio_encoder": ("teacher",),
                 "grad_ckpt": ("teacher", "dmd", "pipeline"),
                 "bf16_convs": ("vae", "syncnet", "mouthnet", "foundation", "pipeline"),
                 "channels_last": ("vae", "syncnet", "mouthnet", "foundation", "pipeline"),
                 "resume": TRAINING_STAGES, "state": TRAINING_STAGES, "stop_after": TRAINING_STAGES,
                 "data": ("vae", "syncnet", "teacher", "df", "dmd", "foundation", "pipeline"),
                 "ckpt_dir": tuple(stage for stage in STAGES if stage not in ("export", "audio-probe")),
                 "results": ("eval", "foundation", "eval-teacher", "eval-student", "ablation", "heldout", "audio-probe")}
OPTION_NOTES = {"data": "the evaluations grade SynthTalk's test split; mouthnet, heldout and audio-probe "
                        "need SynthTalk's ground-truth mouths or identities"}
FLAGS = ("compile", "bf16_convs", "channels_last", "grad_ckpt")


class Refused(SystemExit):
    """SystemExit with exit code 2 that reads as its message (for whoever catches it)."""
    def __init__(self, msg):
        super().__init__(2)
        self.msg = msg

    def __str__(self):
        return self.msg


def fail(msg):
    """A refused command line or bad input: one line on stderr, exit code 2 (as argparse and sample.py)."""
    print(f"train.py: error: {msg}", file=sys.stderr)
    raise Refused(msg)


def given(args, name):
    """Whether an option was set on the command line: not None and not an unset flag (0 is set)."""
    if name in PATH_DEFAULTS:
        return name in args.paths_given
    value = getattr(args, name)
    return value is not None and value is not False


def check_options(args):
    """Refuse, before any work, an option the stage would silently ignore."""
    for name, stages in STAGE_OPTIONS.items():
        if given(args, name) and args.stage not in stages:
            note = f" ({OPTION_NOTES[name]})" if name in OPTION_NOTES else ""
            fail(f"{option(name)} does nothing in {args.stage}; {', '.join(stages)} read it, no other stage{note}")
    world = int(os.environ.get("WORLD_SIZE", 1))                     # torchrun's processes
    batch = args.batch or STAGE_BATCH.get(args.stage)
    if batch and batch % world:
        fail(f"--batch {batch}{'' if args.batch else ' (the default)'} must be a multiple of the number of processes "
             f"({world}): pass another --batch")
    if args.data and args.stage not in ("foundation", "pipeline") and (args.clips or args.seconds):
        fail(f"{'--clips' if args.clips else '--seconds'} sizes a SynthTalk pool; --data {args.data} trains on "
             "every clip of the folder, as long as it is: leave it out")
    for name in ("init", "teacher", "ckpt"):                          # checkpoints named on the command line
        path = getattr(args, name)
        if path is not None and (why := L.file_problem(path)):
            fail(f"{option(name)} {path}: {why}; pass a .safetensors checkpoint")
    if why := L.device_problem(args.device):
        fail(why)
    if args.out is not None:
        if args.stage == "export" and os.path.exists(args.out) and not os.path.isdir(args.out):
            fail(f"--out {args.out} is a file; export writes a folder of clips")
        if args.stage != "export" and (os.path.isdir(args.out) or not args.out.endswith(".safetensors")):
            fail(f"--out {args.out}: pass a checkpoint path ending in .safetensors")
    if args.stage == "dmd" and args.teacher_cfg == "none" and args.cfg_scale is not None:
        fail("--cfg-scale does nothing with --teacher-cfg none: that teacher is sampled without CFG")
    if args.stage == "dmd" and args.beta == 0 and args.reward_scale is not None:
        fail("--reward-scale does nothing with --beta 0: the SyncNet reward is off")
    if args.stage == "export" and args.seconds and round(args.seconds * L.FPS) < 1:
        fail(f"export: --seconds {args.seconds:g} makes clips shorter than a frame; pass --seconds {1 / L.FPS:g} or more")
    if args.dim is not None:
        try:
            L.preset_config(args.preset, dim=args.dim)
        except ValueError as e:
            fail(str(e))
    chunk = L.DiTConfig.chunk
    if args.latent_frames and args.stage in ("df", "dmd") and args.latent_frames % chunk:
        fail(f"--latent-frames {args.latent_frames}: {args.stage} trains on whole chunks; pass a multiple of {chunk}")
    if args.state == "none" and (args.resume or args.stop_after):
        fail(f"{'--resume' if args.resume else '--stop-after'} needs a training-state file; --state none writes none")
    for name in ("resume", "state", "stop_after"):
        if args.fsdp and given(args, name):
            fail(f"{option(name)} does nothing under --fsdp: training-state files hold whole tensors and are "
                 "not written there")


def check_paths(args):
    """Refuse, before any work, an output that would replace what the stage reads or a committed
    table, or that cannot be written where it goes, and a --resume of a finished run or of one of
    another shape (resume_changes, from the state file's header)."""
    if args.state not in (None, "none") and os.path.isdir(args.state):
        fail(f"--state {args.state} is a folder: pass a file path (or none)")
    if args.state not in (None, "none") and os.path.isfile(args.state) and "config_class" in \
            L.read_safetensors(args.state, tensors=False)[1]:
        fail(f"--state {args.state} is a model checkpoint, which a run would overwrite: pass another path")
    if args.stage in TRAINING_STAGES:
        reads, out = stage_reads(args), out_path(args)
        state = state_path(args, out)
        if args.resume and state and os.path.isfile(state):       # found now, not after the pool is made
            steps = args.steps or STAGE_STEPS[args.stage]
            resume_changes(args.stage, state, min(steps, args.stop_after or steps), run_options(args))
        for name, path, others in (("--out", out, reads), ("--state", args.state, reads + [out])):
            if path not in (None, "none") and any(L.same_file(path, other) for other in others):
                fail(f"{name} {path}{'' if name == '--state' or args.out else ' (the default)'} is a file this "
                     "stage reads or writes: write it to another path")
    if args.stage == "eval-teacher":             # the committed table: the default teacher, graded as the README says
        teacher, committed = args.ckpt or os.path.join(args.ckpt_dir, "teacher.safetensors"), \
            os.path.join(CKPT_DIR, "teacher.safetensors")
        other = [why for why, on in (("--cfg-scale", args.cfg_scale not in (None, L.CFG_SCALE)),
                                     ("--test-clips", args.test_clips != L.TEST_CLIPS),
                                     ("another --ckpt-dir", not L.same_file(args.ckpt_dir, CKPT_DIR)),
                                     ("another teacher", not L.same_file(teacher, committed)))
                 if on]
        table = results_json(args, "teacher", args.split or "test")
        if other and L.same_file(table, os.path.join(RESULTS, "teacher.json")):
            fail(f"eval-teacher with {' and '.join(other)} writes over {table}, the table of the default teacher "
                 f"at CFG {L.CFG_SCALE:g} that ablation reads: pass --results DIR")
    if int(os.environ.get("RANK", 0)):          # under torchrun rank 0 alone makes and removes the test folders
        return
    # the folders the stage writes into take a file: found now, not when a trained model is saved
    if args.stage == "export":
        writes = [("--out", args.out or EXPORT_DIR)]
    elif args.stage in (*TRAINING_STAGES, "foundation", "pipeline"):
        writes = [("--out", os.path.dirname(args.out) or ".") if args.out else ("--ckpt-dir", args.ckpt_dir)]
        writes += [("--state", os.path.dirname(args.state) or ".")] if args.state not in (None, "none") else []
        writes += [("--results", args.results)] if args.stage == "foundation" else []    # its eval's table
    else:
        writes = [("--results", args.results)]                  # the evaluations' JSON
    for name, folder in writes:
        if why := L.folder_problem(folder):
            fail(f"{name} {getattr(args, name[2:].replace('-', '_'))}: {why}")


def main(argv=None):
    """Run a stage. Training stages return (the trained model, its loss log)."""
    global DIST
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if "RANK" in os.environ and args.stage not in DISTRIBUTED_STAGES:
        fail(f"{args.stage} runs in one process; torchrun runs {', '.join(DISTRIBUTED_STAGES)}")
    if args.fsdp and args.stage not in FSDP_STAGES:
        fail(f"--fsdp shards the DiT stages ({', '.join(FSDP_STAGES)})")
    check_options(args)
    try:
        check_paths(args)
    except L.CheckpointError as e:              # a --state file that cannot be read
        fail(str(e))
    init_distributed(args)
    try:
        return STAGES[args.stage](args)
    except (L.MediaError, L.CheckpointError) as e:  # a bad clip in a --data folder, a missing or bad checkpoint
        fail(str(e))
    except MemoryError:
        fail("out of memory: use fewer or shorter clips (--clips, --seconds), a smaller --batch or --size")
    except KeyboardInterrupt:
        print("train.py: interrupted; no checkpoint or table was written (a training stage continues from "
              "its last saved state with --resume)", file=sys.stderr)
        raise SystemExit(130)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        DIST = Dist()


if __name__ == "__main__":
    main()
