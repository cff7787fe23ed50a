"""
The teacher-trajectory analysis that the two-step schedule and the Sync-Window are derived from
(the paper's three analysis-derived components), rerun on any teacher.

  python analyze.py                                  # checkpoints/teacher.safetensors (+ teacher_all if present)
  python analyze.py --teacher A.safetensors --teacher B.safetensors --vae V.safetensors
  python analyze.py --clips 8 --seconds 3.88 --landing-steps $(seq 1 49)   # more clips, every landing step

(a) trajectory: the 50-step ODE at CFG 4.5 and at 1 (no CFG); at every step j the x0 prediction
    x0_hat = x_t - t v (v the velocity that run uses) is decoded and scored.
(b) factorial: from pure noise one Euler step with scale s0 lands at step j1,
    x_{t_j1} = x_1 + (t_j1 - t_0) v_s0(x_1, t_0); the x0 prediction there uses scale s1;
    (s0, s1) in {1, 4.5}^2.
(c) endpoints: the final sample (the x0 prediction at the last step) at fixed CFG s in {1, 3, 4.5, 6},
    against the student's two-step schedule run on the teacher without CFG (t = 0.999 -> x0 ->
    fresh noise to t = 0.769 -> x0).
(d) each of the above for every teacher given, labelled by its drop_mode: CFG's negative
    condition drops the audio ("audio") or every condition ("all"), as the teacher was trained.

Scores per clip: Sync-C / Sync-D (the eval SyncNet) and mouth-box fidelity to the reference, SSIM
and L1 (in [0, 1] units). The clips are re-synthesised with their own audio, so the source
frames are the reference. LPIPS is not reported: it needs a pretrained perceptual network and none
is available offline here. Means over clips with +-1 standard error (SE over clips).

Defaults are small so a CPU finishes in minutes: 4 test clips of 2.6 s (two 33-frame windows
each, generated in one batch and stitched as train.py eval-teacher does, noise seed i for clip i),
and every second landing step. Writes trajectory.csv, factorial.csv, endpoints.csv, their PNG
plots and summary.txt to --out, and prints the landing step and CFG window the curves suggest.
"""

import argparse
import csv
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import lipforcing as L
import train as T

# -----------------------------------------------------------------------------
# what is compared

NO_CFG, CFG = 1.0, L.CFG_SCALE           # the two guidance scales of the tradeoff and the factorial
ENDPOINT_SCALES = (1.0, 3.0, CFG, 6.0)   # fixed-CFG endpoints of part (c)
METRICS = ("sync_c", "sync_d", "mouth_ssim", "mouth_l1")
LABELS = {"sync_c": "Sync-C (higher = better)", "sync_d": "Sync-D (lower = better)",
          "mouth_ssim": "mouth SSIM to reference", "mouth_l1": "mouth L1 to reference"}
WINDOW_FRAC = 0.5    # CFG window: steps where CFG's Sync-C advantage is >= this fraction of its max
GAP_FLOOR = 0.5      # landing step: only where the CFG sync gap is >= this fraction of its max
                     # (where the gap is small, the share of it that a schedule recovers is noise)
PAPER_WINDOW, PAPER_LANDING = L.SYNC_WINDOW_STEPS, L.LANDING_STEP   # the paper's choices, steps of the 50-step ODE
TWO_STEP = "two-step (t = " + ", ".join(f"{t:.3f}" for t in L.STUDENT_STEPS) + ")"


def fail(msg):
    """Bad input: one line on stderr, exit code 2 (as train.py and sample.py)."""
    print(f"analyze.py: error: {msg}", file=sys.stderr)
    raise SystemExit(2)


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.error = lambda msg: fail(f"{msg} (see python analyze.py --help)")    # one line, not usage + error
    p.add_argument("--teacher", action="append", default=None,
                   help="teacher checkpoint, repeatable (default: <ckpt-dir>/teacher.safetensors, plus "
                        "<ckpt-dir>/teacher_all.safetensors if it exists)")
    p.add_argument("--ckpt-dir", default="checkpoints", help="where the eval SyncNet (and default teacher, vae) live")
    p.add_argument("--vae", default=None, help="the autoencoder the teacher was trained on (default: <ckpt-dir>/vae.safetensors)")
    p.add_argument("--out", default="results/analysis", help="folder for the CSVs, plots and summary")
    p.add_argument("--clips", type=L.positive_int, default=4, help="test clips (SE is over clips)")
    p.add_argument("--seconds", type=L.positive_float, default=2.6, help="seconds per clip; 2.6 s = two 33-frame windows")
    p.add_argument("--size", type=L.frame_size, default=L.FRAME_SIZE, help="frame size")
    p.add_argument("--steps", type=L.positive_int, default=L.ODE_STEPS, help="steps of the teacher's ODE")
    p.add_argument("--landing-steps", type=L.positive_int, nargs="+", default=None,
                   help="landing steps j1 of the factorial, indices into the ODE (default: 1, 2, 4, 6, .., steps - 1)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=L.positive_int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    args.teacher = args.teacher or [os.path.join(args.ckpt_dir, name) for name in
                                    ("teacher.safetensors", "teacher_all.safetensors")
                                    if name == "teacher.safetensors" or os.path.isfile(os.path.join(args.ckpt_dir, name))]
    args.vae = args.vae or os.path.join(args.ckpt_dir, "vae.safetensors")
    if args.steps < 2:
        p.error(f"--steps {args.steps}: the factorial lands between the ODE's first and last step; pass 2 or more")
    last = args.steps - 1
    args.landing_steps = sorted(set(args.landing_steps or {1, last, *range(2, last, 2)}))
    if not all(1 <= j <= last for j in args.landing_steps):
        p.error(f"landing steps must lie in 1..{last} (the ODE has {args.steps} steps)")
    if round(args.seconds * L.FPS) < L.TEACHER_HOP + 1:
        p.error(f"--seconds must hold one {L.TEACHER_HOP + 1}-frame window: at least {(L.TEACHER_HOP + 1) / L.FPS:g} s")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        p.error(f"--out {args.out} is a file; pass a folder for the CSVs, plots and summary")
    if why := L.folder_problem(args.out):               # found now, not after the analysis
        p.error(f"--out {args.out}: {why}")
    same = [(a, b) for i, a in enumerate(args.teacher) for b in args.teacher[i + 1:]
            if os.path.exists(a) and L.same_file(a, b)]
    if same:
        p.error(f"--teacher {same[0][1]} is {same[0][0]} again: pass each teacher once")
    if why := L.device_problem(args.device):
        p.error(why)
    return args


# -----------------------------------------------------------------------------
# inputs: every window of every clip in one batch


@dataclass
class Batch:
    """The analysis windows of all clips, clip-major (S windows per clip), on the model's device."""
    cond: torch.Tensor     # (n S, F, 33, h, w) reference | mask | masked source
    audio: torch.Tensor    # (n S, F, A) the clip's own audio
    noise: torch.Tensor    # (n S, F, 16, h, w) the pure noise every run starts from
    fresh: torch.Tensor    # (n S, F, 16, h, w) the two-step schedule's re-noising noise


def make_batch(model, ae, clips, device):
    """Windows of 33 frames (9 latent frames), hop 32, each with its reference frame outside it
    (train.window_ref), as train.teacher_generate; noise seed i for clip i (the same noise
    eval-teacher uses)."""
    context = model.cfg.audio_context
    cond, audio, noise, fresh = [], [], [], []
    for i, c in enumerate(clips):
        enc = L.encode_clip(ae, c.frames, c.audio, context, encoder=model.audio_encoder)
        x0, cd, au = T.teacher_windows(enc, len(c.frames), context)             # (S, F, ...)
        g = torch.Generator().manual_seed(i)
        cond.append(cd), audio.append(au)
        noise.append(torch.randn(x0.shape, generator=g)), fresh.append(torch.randn(x0.shape, generator=g))
    return Batch(*[torch.cat(x).to(device) for x in (cond, audio, noise, fresh)])


# -----------------------------------------------------------------------------
# scores: decode, stitch each clip's windows, score against the source clip


@torch.no_grad()
def score(z, ae, sync_net, clips):
    """Latents z (n S, F, 16, h, w) of all clips -> one dict of METRICS per clip."""
    frames = L.tensor_to_frames(ae.decode(z.float())[0])                       # (n S, 33, H, W, 3)
    S = len(z) // len(clips)
    out = []
    for i, c in enumerate(clips):
        f = T.stitch(frames[i * S:(i + 1) * S])                                  # (T, H, W, 3)
        n = len(f)
        s = L.evaluate_sync(sync_net, [f], [c.audio[:n * L.SAMPLES_PER_FRAME]])
        mouth, ref = L.mouth_crop(f), L.mouth_crop(c.frames[:n])
        out.append({"sync_c": s["sync_c"], "sync_d": s["sync_d"], "mouth_ssim": L.ssim(mouth, ref),
                    "mouth_l1": float(np.abs(mouth.astype(np.float32) - ref).mean() / 255)})
    return out


# -----------------------------------------------------------------------------
# the teacher's predictions along its ODE, the factorial, the two-step schedule


def velocity(model, x, t, b, scale, mode):
    """The velocity a run with guidance `scale` uses (L.velocity at one t for the whole batch)."""
    return L.velocity(model, x, torch.full(x.shape[:2], t, device=x.device), b.cond, b.audio, scale, mode)


def trajectory(model, b, scale, steps):
    """The Euler ODE from b.noise at guidance `scale`: yields (j, x0_hat) at every step j = 0..steps-1,
    x0_hat = x_tj - t_j v. The last one equals L.sample_ode's final sample."""
    for j, t, x, v in L.ode_trajectory(model, b.cond, b.audio, b.noise, steps, scale, mode=model.cfg.drop_mode):
        yield j, x - t * v


@torch.no_grad()
def factorial(model, b, landing_steps, steps):
    """The Euler-step 2x2 factorial: yields (s0, s1, j1, x0_hat) for (s0, s1) in {1, 4.5}^2 and each j1,
    x0_hat = x_j1 - t_j1 v_s1(x_j1), x_j1 = x_1 + (t_j1 - t_0) v_s0(x_1, t_0) from pure noise x_1."""
    mode, t0 = model.cfg.drop_mode, L.ode_t(0, steps)
    jump = {s0: velocity(model, b.noise, t0, b, s0, mode) for s0 in (NO_CFG, CFG)}   # one per s0, any j1
    for j1 in landing_steps:
        t = L.ode_t(j1, steps)
        for s0, v0 in jump.items():
            x = b.noise + (t - t0) * v0
            for s1 in (NO_CFG, CFG):
                yield s0, s1, j1, x - t * velocity(model, x, t, b, s1, mode)


@torch.no_grad()
def two_step(model, b):
    """The student's operating point on the teacher, no CFG: x0 at t = 0.999, re-noised with fresh
    noise to t = 0.769 (ODE step L.LANDING_STEP of 50), x0 again (L.sample_chunk without a cache)."""
    return L.sample_chunk(model, b.cond, b.audio, torch.stack([b.noise, b.fresh]))


# -----------------------------------------------------------------------------
# one teacher: parts (a), (b), (c)


def mean_se(per_clip):
    """Per-clip metric dicts -> {"n": clips, metric: mean, metric_se: SE over clips (nan for one clip)}."""
    n = len(per_clip)
    row = {"n": n}
    for m in METRICS:
        v = np.array([d[m] for d in per_clip])
        row[m], row[f"{m}_se"] = float(v.mean()), float(v.std(ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return row


def endpoint_line(r):
    """The summary's line for an endpoint row (mean_se's keys): Sync-C with its SE where there is one."""
    se = f" +- {r['sync_c_se']:.2f}" if r["n"] > 1 else " (one clip: no SE)"
    return (f"endpoint {r['schedule']} CFG {r['scale']:g} ({r['nfe']} NFE): Sync-C {r['sync_c']:.2f}{se}, "
            f"Sync-D {r['sync_d']:.2f}, mouth SSIM {r['mouth_ssim']:.3f}, mouth L1 {r['mouth_l1']:.4f}")


def analyze_teacher(path, label, ae, sync_net, clips, args):
    """Parts (a)-(c) for one teacher -> {"trajectory": rows, "factorial": rows, "endpoints": rows},
    every row tagged with the teacher's label and drop_mode."""
    model, cfg, _ = L.load_checkpoint(path, L.DiTConfig, L.DiT, args.device, args.size)
    tag = {"teacher": label, "drop_mode": cfg.drop_mode}
    b = make_batch(model, ae, clips, args.device)
    steps, last = args.steps, args.steps - 1
    rows = {"trajectory": [], "factorial": [], "endpoints": []}
    S = len(b.noise) // len(clips)
    print(f"\n{path}: drop_mode {cfg.drop_mode}, {len(clips)} clip{'s' * (len(clips) > 1)} x {S} "
          f"window{'s' * (S > 1)}")

    t0 = time.time()
    with L.autocast(args.device):
        for scale in ENDPOINT_SCALES:                        # (a) for 1 and 4.5 at every step, (c) the endpoints
            every_step = scale in (NO_CFG, CFG)
            for j, x0 in tqdm(trajectory(model, b, scale, steps), total=steps, desc=f"(a, c) ODE at CFG {scale:g}"):
                if every_step or j == last:
                    r = mean_se(score(x0, ae, sync_net, clips))
                    if every_step:
                        rows["trajectory"].append({"part": "a", **tag, "scale": scale, "step": j,
                                                   "t": L.ode_t(j, steps), **r})
                    if j == last:
                        rows["endpoints"].append({"part": "c", **tag, "schedule": f"{steps}-step ODE", "scale": scale,
                                                  "nfe": steps * (1 if scale == 1 else 2), **r})
        rows["endpoints"].append({"part": "c", **tag, "schedule": TWO_STEP, "scale": NO_CFG,
                                  "nfe": len(L.STUDENT_STEPS), **mean_se(score(two_step(model, b), ae, sync_net, clips))})
        print(f"(a, c) done in {time.time() - t0:.0f} s")

        t0 = time.time()
        n_runs = 4 * len(args.landing_steps)
        for s0, s1, j1, x0 in tqdm(factorial(model, b, args.landing_steps, steps), total=n_runs, desc="(b) factorial"):
            rows["factorial"].append({"part": "b", **tag, "s0": s0, "s1": s1, "j1": j1, "t": L.ode_t(j1, steps),
                                      **mean_se(score(x0, ae, sync_net, clips))})
        print(f"(b) done in {time.time() - t0:.0f} s")
    add_gap_shares(rows["factorial"])
    return rows


# -----------------------------------------------------------------------------
# what the curves suggest


def curve(rows, key, **match):
    """The values of column `key` over the rows matching every match[col] == value, in row order."""
    return np.array([r[key] for r in rows if all(r[k] == v for k, v in match.items())])


def add_gap_shares(rows):
    """sync_gap_share on each factorial row: (Sync-C - Sync-C(1, 1)) / (Sync-C(4.5, 4.5) - Sync-C(1, 1))
    at the same j1, the share of the CFG sync gap a schedule recovers (nan where there is no gap)."""
    ref = {(r["j1"], r["s0"], r["s1"]): r["sync_c"] for r in rows}
    for r in rows:
        base, full = ref[r["j1"], NO_CFG, NO_CFG], ref[r["j1"], CFG, CFG]
        r["sync_gap_share"] = (r["sync_c"] - base) / (full - base) if full > base else float("nan")


def cfg_window(adv, frac=WINDOW_FRAC):
    """The contiguous run of steps around the largest advantage where adv >= frac * max(adv):
    (first, last) step, or None when CFG never helps."""
    k = int(np.argmax(adv))
    if not adv[k] > 0:
        return None
    lo, hi = k, k
    while lo > 0 and adv[lo - 1] >= frac * adv[k]:
        lo -= 1
    while hi < len(adv) - 1 and adv[hi + 1] >= frac * adv[k]:
        hi += 1
    return lo, hi


def best_landing(rows, floor=GAP_FLOOR):
    """The landing step where a mixed schedule (s0 != s1) recovers the largest share of the CFG sync
    gap, among landings where the gap is >= floor * its max: (j1, s0, s1, share, gap) or None."""
    j1s = curve(rows, "j1", s0=NO_CFG, s1=NO_CFG)
    gap = curve(rows, "sync_c", s0=CFG, s1=CFG) - curve(rows, "sync_c", s0=NO_CFG, s1=NO_CFG)
    if not gap.max() > 0:
        return None
    ok = gap >= floor * gap.max()
    best = None
    for s0, s1 in ((NO_CFG, CFG), (CFG, NO_CFG)):
        share = curve(rows, "sync_gap_share", s0=s0, s1=s1)
        k = int(np.nanargmax(np.where(ok, share, np.nan)))
        if best is None or share[k] > best[3]:
            best = (int(j1s[k]), s0, s1, float(share[k]), float(gap[k]))
    return best


def suggestions(rows, steps):
    """Lines of text: the landing step and CFG window these curves suggest, and how they were chosen."""
    tr = rows["trajectory"]
    adv = curve(tr, "sync_c", scale=CFG) - curve(tr, "sync_c", scale=NO_CFG)
    lines = []
    w = cfg_window(adv)
    if w is None:
        lines.append("CFG window: none (the CFG run's x0 predictions never sync better than no-CFG ones)")
    else:
        lines.append(f"CFG window: ODE steps {w[0]}..{w[1]} of {steps}, t in [{L.ode_t(w[1], steps):.3f}, "
                     f"{L.ode_t(w[0], steps):.3f}] (paper: steps {PAPER_WINDOW[0]}..{PAPER_WINDOW[1]} of {L.ODE_STEPS}, t in "
                     f"[{L.ode_t(PAPER_WINDOW[1]):.3f}, {L.ode_t(PAPER_WINDOW[0]):.3f}]); rule: the contiguous "
                     f"steps around the largest Sync-C advantage of CFG {CFG:g} over no CFG ({adv.max():+.2f} at step "
                     f"{int(np.argmax(adv))}) where the advantage is >= {WINDOW_FRAC:.0%} of that max")
    land = best_landing(rows["factorial"])
    if land is None:
        lines.append("landing step: none (full CFG never syncs better than no CFG at any landing step)")
    elif land[3] <= 0:
        j1, s0, s1, share, gap = land
        lines.append(f"landing step: none (no mixed schedule recovers any of the CFG Sync-C gap where the gap is >= "
                     f"{GAP_FLOOR:.0%} of its max; the best, s0 = {s0:g} -> s1 = {s1:g} at j1 = {j1}, recovers "
                     f"{share:.0%} of it)")
    else:
        j1, s0, s1, share, gap = land
        lines.append(f"landing step: j1 = {j1} of {steps}, t = {L.ode_t(j1, steps):.3f} "
                     f"(paper: {PAPER_LANDING} of {L.ODE_STEPS}, t = {L.ode_t(PAPER_LANDING):.3f}); rule: "
                     f"the mixed schedule s0 = {s0:g} -> s1 = {s1:g} recovers {share:.0%} of the CFG Sync-C gap there "
                     f"({gap:.2f}), the largest share among landings where the gap is >= {GAP_FLOOR:.0%} of its max")
    return lines


# -----------------------------------------------------------------------------
# outputs: tidy CSVs, plots, summary (all written atomically)


def write_csv(path, rows):
    with L.atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()} for r in rows)
    print(f"wrote {path}")


def band(ax, x, rows, m, **kw):
    """A mean curve with its +-1 SE band."""
    y, se = np.array([r[m] for r in rows]), np.nan_to_num([r[f"{m}_se"] for r in rows])
    ax.plot(x, y, **kw)
    ax.fill_between(x, y - se, y + se, alpha=0.2, color=ax.lines[-1].get_color())


def plot(out, tables, labels):
    """One PNG per part, a row of metric panels per teacher. matplotlib is imported only here;
    returns False (nothing drawn) when it is missing."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        fig.tight_layout()
        with L.atomic_path(os.path.join(out, name)) as tmp:
            fig.savefig(tmp, dpi=110)
        plt.close(fig)
        print(f"wrote {os.path.join(out, name)}")

    n = len(labels)
    for part, x_key, series in (("trajectory", "step", [{"scale": s} for s in (NO_CFG, CFG)]),
                                ("factorial", "j1", [{"s0": a, "s1": c} for a in (NO_CFG, CFG) for c in (NO_CFG, CFG)])):
        fig, axes = plt.subplots(n, len(METRICS), figsize=(4 * len(METRICS), 3.2 * n), squeeze=False)
        for row_axes, label in zip(axes, labels):
            for ax, m in zip(row_axes, METRICS):
                for sel in series:
                    rows = [r for r in tables[part] if r["teacher"] == label
                            and all(r[k] == v for k, v in sel.items())]
                    band(ax, [r[x_key] for r in rows], rows, m,
                         label=", ".join(f"{k} = {v:g}" for k, v in sel.items()), marker="." if part == "factorial" else None)
                ax.set(title=f"{label}: {LABELS[m]}", xlabel="ODE step j" if part == "trajectory" else "landing step j1")
            row_axes[0].legend(fontsize=8)
        save(fig, f"{part}.png")

    fig, axes = plt.subplots(n, 2, figsize=(9, 3.6 * n), squeeze=False)
    for row_axes, label in zip(axes, labels):
        rows = [r for r in tables["endpoints"] if r["teacher"] == label]
        for ax, (fx, sy) in zip(row_axes, (("mouth_ssim", "sync_c"), ("mouth_l1", "sync_d"))):
            for r in rows:
                name = "two-step, no CFG" if r["schedule"] == TWO_STEP else f"CFG {r['scale']:g}"
                ax.errorbar(r[fx], r[sy], xerr=r[f"{fx}_se"], yerr=r[f"{sy}_se"], fmt="o", capsize=3, label=name)
            ax.set(title=f"{label}: endpoints", xlabel=LABELS[fx], ylabel=LABELS[sy])
        row_axes[0].legend(fontsize=8)
    save(fig, "endpoints.png")
    return True


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.writing = False                        # set once the outputs start to be written
    try:
        return analyze(args)
    except L.CheckpointError as e:
        fail(str(e))
    except OSError as e:                        # the disk or --out: full, gone, not permitted
        fail(f"{e.strerror or e}{f': {e.filename}' if e.filename else ''}")
    except KeyboardInterrupt:
        when = ("while writing: each file in --out is whole, from this run or an earlier one" if args.writing
                else "before writing: --out is as it was")
        print(f"analyze.py: interrupted {when}", file=sys.stderr)
        raise SystemExit(130)


def analyze(args):
    """Every teacher of --teacher through parts (a)-(c); the CSVs, plots and summary in --out."""
    t_start = time.time()
    ae = L.load_checkpoint(args.vae, L.AEConfig, L.VideoAE, args.device)[0]
    for path in args.teacher:                   # every teacher checked from its header before the first one's work
        stored, extra = L.checkpoint_header(path, L.DiTConfig, args.size)
        L.check_dit_kind(path, stored.get("causal"), False, "the analysis")
        L.check_dit_latents(path, stored.get("latent_channels", L.DiTConfig.latent_channels), extra, ae, args.vae)
    sync_net = L.load_checkpoint(os.path.join(args.ckpt_dir, "syncnet_eval.safetensors"), L.SyncNetConfig, L.SyncNet,
                                 args.device)[0]
    clips = [L.synthtalk_clip("test", i, args.seconds, args.size) for i in range(args.clips)]
    used = 1 + T.segment_starts(len(clips[0].frames))[-1] + L.TEACHER_HOP   # whole 33-frame windows
    print(f"{args.clips} test clip{'s' * (args.clips > 1)} x {used / L.FPS:.2f} s (the whole {L.TEACHER_HOP + 1}-frame "
          f"windows of {args.seconds:g} s), {args.steps}-step ODE, landing steps {args.landing_steps}")
    print("fidelity: mouth SSIM and L1 to the source frames; LPIPS skipped (no pretrained perceptual network offline)")

    tables = {"trajectory": [], "factorial": [], "endpoints": []}
    summary, labels = [], []
    for path in args.teacher:
        label = os.path.basename(path).removesuffix(".safetensors")
        label = label if label not in labels else path          # two teachers with one file name
        labels.append(label)
        rows = analyze_teacher(path, label, ae, sync_net, clips, args)
        for part in tables:
            tables[part] += rows[part]
        mode = rows["trajectory"][0]["drop_mode"]
        summary += [f"{label} (drop_mode {mode}, {path}):"] + [f"  {s}" for s in suggestions(rows, args.steps)]
        summary += [f"  {endpoint_line(r)}" for r in rows["endpoints"]]
    modes = sorted({r["drop_mode"] for r in tables["endpoints"]})
    missing = [m for m in ("audio", "all") if m not in modes]
    summary.append(f"drop modes analysed: {', '.join(modes)}" +
                   (f"; not analysed: {', '.join(missing)} (no teacher given was trained with it: python train.py "
                    f"teacher --drop-mode {missing[0]} --size {args.size} --out {args.ckpt_dir}/teacher_{missing[0]}"
                    ".safetensors, then pass it to analyze.py with --teacher too)" if missing else ""))

    args.writing = True
    for part, rows in tables.items():
        write_csv(os.path.join(args.out, f"{part}.csv"), rows)
    if not plot(args.out, tables, labels):
        summary.append("plots skipped: matplotlib is not installed (pip install matplotlib, then rerun); "
                       "PNGs in --out, if any, are from an earlier run")
    with L.atomic_path(os.path.join(args.out, "summary.txt")) as tmp:
        with open(tmp, "w") as f:
            f.write("\n".join(summary) + "\n")
    print("\n" + "\n".join(summary) + f"\n\ntotal {time.time() - t_start:.0f} s")
    return tables


if __name__ == "__main__":
    main()
