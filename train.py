"""
Every training stage of lipforcing, in one flat script.

  python train.py vae                      # video autoencoder (4x time, 8x space, 16 channels)
  python train.py syncnet --role reward    # the SyncNet the distillation optimises against
  python train.py syncnet --role eval      # the SyncNet that only reports numbers
  python train.py mouthnet                 # frames -> mouth parameters, for MouthErr
  python train.py eval                     # the foundation table (README), JSON in results/
  python train.py foundation               # all of the above, in order

Data is SynthTalk (generated, deterministic) unless --data DIR points at a folder of real clips
(mp4/mov/webm/avi with an audio track, aligned face crops). Checkpoints are safetensors with their
config inside, written to checkpoints/ unless --out says otherwise.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import lipforcing as L

# -----------------------------------------------------------------------------
# shared plumbing


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["vae", "syncnet", "mouthnet", "eval", "foundation"])
    p.add_argument("--data", default=None, help="folder of real clips instead of SynthTalk")
    p.add_argument("--size", type=int, default=64, help="frame size (square face crops)")
    p.add_argument("--clips", type=int, default=None, help="training clips in the pool")
    p.add_argument("--seconds", type=float, default=None, help="seconds per SynthTalk training clip")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps")
    p.add_argument("--batch", type=int, default=None, help="global batch size")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--role", choices=["reward", "eval"], default="eval", help="which SyncNet (syncnet stage)")
    p.add_argument("--ckpt-dir", default="checkpoints", help="where checkpoints are read and written")
    p.add_argument("--out", default=None, help="checkpoint path (default: <ckpt-dir>/<stage>.safetensors)")
    p.add_argument("--results", default="results", help="folder for JSON results")
    p.add_argument("--test-clips", type=int, default=L.TEST_CLIPS, help="test clips to evaluate on")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def lr_at(step, steps, peak, warmup=100):
    """Linear warmup, then cosine decay to 5% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    q = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + np.cos(np.pi * q)))


def train_pool(args, n_default, seconds_default):
    """The training clips: SynthTalk's train split, or a folder given by --data."""
    if args.data:
        return L.folder_pool(args.data, args.size)
    return L.synthtalk_pool("train", args.clips or n_default, args.seconds or seconds_default, args.size)


def test_pool(args):
    return L.synthtalk_pool("test", args.test_clips, L.TEST_SECONDS, args.size)


def fit(model, step_fn, steps, lr, desc, weight_decay=0.0, log_every=100, unit="samples"):
    """The shared optimisation loop: AdamW, warmup + cosine, grad clip 1, tqdm progress, and a log
    line of loss, throughput and elapsed time every `log_every` steps. step_fn(step) returns
    (loss, items processed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    t0, seen, run_loss = time.time(), 0, None
    bar = tqdm(range(steps), desc=desc, mininterval=1 if sys.stderr.isatty() else 30)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr)
        loss, n = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        seen += n
        run_loss = loss.item() if run_loss is None else 0.98 * run_loss + 0.02 * loss.item()
        bar.set_postfix(loss=f"{run_loss:.4f}")
        if (step + 1) % log_every == 0 or step + 1 == steps:
            dt = time.time() - t0
            tqdm.write(f"{desc} step {step + 1}/{steps} loss {run_loss:.5f} "
                       f"{seen / dt:.1f} {unit}/s elapsed {dt:.0f}s")
    return run_loss


def save_json(path, obj):
    with L.atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2)
    print(f"wrote {path}")


# -----------------------------------------------------------------------------
# stage: video autoencoder


def train_vae(args):
    torch.manual_seed(args.seed or 0)
    rng = np.random.default_rng(args.seed or 0)
    clips = train_pool(args, n_default=384, seconds_default=2.0)
    cfg = L.AEConfig(seed=args.seed or 0)
    ae = L.VideoAE(cfg).to(args.device)
    print(cfg, f"\nVideoAE: {sum(p.numel() for p in ae.parameters()) / 1e6:.2f}M parameters")
    n_frames = 1 + 2 * cfg.time_down                        # 9 frames -> 3 latent frames
    batch = args.batch or 16

    def step(_):
        x = L.sample_windows(clips, batch, n_frames, rng).to(args.device)
        y = ae(x)
        # full-frame MSE plus the mouth box again: the lips are what this project is about
        loss = F.mse_loss(y, x) + F.mse_loss(L.mouth_crop(y), L.mouth_crop(x))
        return loss, batch * n_frames

    fit(ae, step, args.steps or 2500, args.lr or 2e-3, "vae", unit="frames")
    out = args.out or os.path.join(args.ckpt_dir, "vae.safetensors")
    metrics = eval_vae(ae, test_pool(args), args.device)
    print(f"test split: PSNR {metrics['psnr']:.2f} dB, mouth PSNR {metrics['mouth_psnr']:.2f} dB")
    L.save_checkpoint(out, ae, cfg, extra=metrics)
    print(f"saved {out}")


@torch.no_grad()
def eval_vae(ae, clips, device):
    """Reconstruction PSNR (full frame and mouth box) over the test clips, each encoded and decoded
    whole (the first 1 + 4k frames)."""
    full, mouth = [], []
    for c in clips:
        T = 1 + (len(c.frames) - 1) // ae.cfg.time_down * ae.cfg.time_down
        x = L.frames_to_tensor(c.frames[:T])[None].to(device)
        y = L.tensor_to_frames(ae(x)[0])
        full.append(L.psnr(y, c.frames[:T]))
        mouth.append(L.psnr(L.mouth_crop(y), L.mouth_crop(c.frames[:T])))
    return {"psnr": float(np.mean(full)), "mouth_psnr": float(np.mean(mouth))}


# -----------------------------------------------------------------------------
# stage: SyncNet (reward or eval)

def role_subset(clips, role):
    """The reward and eval SyncNets see disjoint identities: even and odd training clips."""
    return clips[role == "eval"::2]


SYNC_SPAN = 15     # a batch group's windows lie within 15 frames of each other (vshift = 15)


def train_syncnet(args):
    seed = args.seed if args.seed is not None else {"reward": 1, "eval": 2}[args.role]
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clips = role_subset(train_pool(args, n_default=512, seconds_default=4.0), args.role)
    cfg = L.SyncNetConfig(role=args.role, seed=seed)
    net = L.SyncNet(cfg).to(args.device).train()
    print(cfg, f"\nSyncNet ({args.role}): {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, "
          f"{len(clips)} training clips")
    mels = [L.log_mel(torch.from_numpy(c.audio)) for c in clips]            # (4T, N_MELS) each
    n, mpf = cfg.frames, L.MELS_PER_FRAME
    group = 8                                                               # windows per clip in a batch
    batch = args.batch or 64
    # every video window is paired with every audio window of the batch: the diagonal is in sync;
    # the same clip at another start is a shifted (hard) negative, other clips are easy negatives
    gid = torch.arange(batch) // group
    same = torch.eye(batch)
    hard = (gid[:, None] == gid[None, :]).float() - same
    weight = (same * batch + hard * batch / (group - 1) / 1.5 + (1 - same - hard) * batch / (batch - group) / 3)
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
        ve = net.embed_video(L.frames_to_tensor(np.stack(video)).to(args.device))
        ae = net.embed_audio(torch.stack(audio).to(args.device))
        return L.contrastive_loss(L.pairwise_dist(ve, ae), same, cfg.margin, weight), batch

    fit(net, step, args.steps or 3000, args.lr or 1e-3, f"syncnet-{args.role}", weight_decay=1e-4, unit="windows")
    net.eval()
    metrics = eval_syncnet(net, test_pool(args), val_clips(args))
    print(json.dumps(metrics))
    out = args.out or os.path.join(args.ckpt_dir, f"syncnet_{args.role}.safetensors")
    L.save_checkpoint(out, net, cfg, extra=metrics)
    print(f"saved {out}")


def val_clips(args):
    """Training-distribution clips that no model trains on (indices far past every pool), used
    to choose the off-sync decision threshold before it is applied to the test split."""
    return [L.synthtalk_clip("train", 100_000 + i, 4.0, args.size) for i in range(16)]


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


def train_mouthnet(args):
    if args.data:
        raise SystemExit("mouthnet needs ground-truth mouth parameters: it trains on SynthTalk only (drop --data)")
    seed = args.seed if args.seed is not None else 3
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    clips = train_pool(args, n_default=512, seconds_default=4.0)
    cfg = L.MouthNetConfig(seed=seed)
    net = L.MouthNet(cfg).to(args.device).train()
    print(cfg, f"\nMouthNet: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters")
    batch = args.batch or 128

    def step(_):
        idx = [(rng.integers(len(clips)), None) for _ in range(batch)]
        idx = [(ci, rng.integers(len(clips[ci].frames))) for ci, _ in idx]
        x = L.frames_to_tensor(np.stack([clips[ci].frames[t] for ci, t in idx])).to(args.device)
        y = torch.from_numpy(np.stack([clips[ci].mouth[t] for ci, t in idx])).to(args.device)
        return F.mse_loss(net(x), y), batch

    fit(net, step, args.steps or 1500, args.lr or 1e-3, "mouthnet", weight_decay=1e-4, unit="frames")
    net.eval()
    test = test_pool(args)
    err = float(np.mean([L.mouth_error(net, c.frames, c.mouth) for c in test]))
    print(f"test split: MouthErr of ground-truth frames {err:.4f}")
    out = args.out or os.path.join(args.ckpt_dir, "mouthnet.safetensors")
    L.save_checkpoint(out, net, cfg, extra={"gt_mouth_err": err})
    print(f"saved {out}")


# -----------------------------------------------------------------------------

STAGES = {"vae": train_vae, "syncnet": train_syncnet, "mouthnet": train_mouthnet}


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    STAGES[args.stage](args)


if __name__ == "__main__":
    main()
