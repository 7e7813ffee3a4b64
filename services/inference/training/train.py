"""Train a reference model on synthetic CT (CPU, 2 threads).

    python train.py --model detector --variant full --seed 0 --steps 1500 --out runs/detector-full
    python train.py --model classifier --seed 0 --minutes 4 --out runs/classifier

Writes ``<out>/model.pt`` (state dict + variant) and ``<out>/log.txt``. Training scans use seeds from
data.TRAIN_SEED on, so they never meet the evaluation (500000+) or calibration (900000+) scans.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import data
import numpy as np
import torch
from losses import assign, diou_loss, focal_loss
from model import DETECTOR_VARIANTS, HemorrhageClassifier, NoduleDetector


def train_detector(a: argparse.Namespace, log: list[str]) -> torch.nn.Module:
    """Focal + DIoU training on 2.5D crops around nodules and anywhere in the lungs."""
    t0 = time.perf_counter()
    scans = [
        data.chest_scan(data.TRAIN_SEED + a.seed * 10_000 + i, slices=64, n_nodules=int(4 + i % 5))
        for i in range(a.scans)
    ]
    log.append(f"generated {len(scans)} scans in {time.perf_counter() - t0:.0f}s")
    rng = np.random.default_rng(a.seed)
    net = NoduleDetector(a.variant)
    return _fit(net, a, log, lambda: _detector_step(net, scans, rng, a))


def _detector_step(
    net: NoduleDetector, scans: list[data.ChestScan], rng: np.random.Generator, a: argparse.Namespace
) -> torch.Tensor:
    images, targets = data.sample_detector_batch(scans, rng, a.batch, a.crop)
    obj, dist = net(torch.from_numpy(images))
    h, w = obj.shape[2:]
    t_obj, t_valid, t_box = (torch.from_numpy(x) for x in assign(targets, h, w, net.stride))
    npos = t_obj.sum().clamp(min=1.0)
    loss = focal_loss(obj, t_obj, t_valid) / npos
    pos = t_obj[:, 0] > 0
    if pos.any():
        ys = (torch.arange(h, dtype=torch.float32) + 0.5) * net.stride
        xs = (torch.arange(w, dtype=torch.float32) + 0.5) * net.stride
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        d = dist.permute(0, 2, 3, 1)[pos]
        cxp, cyp = cx.expand_as(pos)[pos], cy.expand_as(pos)[pos]
        pred = torch.stack([cxp - d[:, 0], cyp - d[:, 1], cxp + d[:, 2], cyp + d[:, 3]], dim=1)
        loss = loss + diou_loss(pred, t_box.permute(0, 2, 3, 1)[pos]) / npos
    return loss


def train_classifier(a: argparse.Namespace, log: list[str]) -> torch.nn.Module:
    """BCE training on single brain-windowed slices, balanced between hemorrhage and normal slices."""
    t0 = time.perf_counter()
    vols = [
        data.head_slices(data.TRAIN_SEED + a.seed * 10_000 + i, hemorrhage=i % 2 == 0) for i in range(a.scans)
    ]
    images = np.concatenate([v for v, _ in vols])
    labels = np.concatenate([lab for _, lab in vols])
    pos, neg = np.flatnonzero(labels > 0), np.flatnonzero(labels == 0)
    log.append(
        f"generated {len(vols)} head scans ({len(pos)} positive / {len(neg)} negative slices) "
        f"in {time.perf_counter() - t0:.0f}s"
    )
    rng = np.random.default_rng(a.seed)
    net = HemorrhageClassifier()

    def step() -> torch.Tensor:
        idx = np.concatenate([rng.choice(pos, a.batch // 2), rng.choice(neg, a.batch - a.batch // 2)])
        x = images[idx].astype(np.float32)
        if rng.random() < 0.5:
            x = x[:, :, ::-1]
        x = np.clip(x * rng.uniform(0.9, 1.1) + rng.uniform(-8, 8), 0, 255) / 255.0
        logits = net(torch.from_numpy(np.ascontiguousarray(x[:, None])))
        y = torch.from_numpy(labels[idx][:, None])
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, y)

    return _fit(net, a, log, step)


def _fit(net: torch.nn.Module, a: argparse.Namespace, log: list[str], step: object) -> torch.nn.Module:
    """AdamW with cosine decay, stopping at --steps or --minutes, whichever comes first."""
    opt = torch.optim.AdamW(net.parameters(), lr=a.lr, weight_decay=1e-4)
    net.train()
    t0 = time.perf_counter()
    total = a.steps
    running = 0.0
    for i in range(total):
        lr = a.lr * 0.5 * (1 + np.cos(np.pi * i / total)) if i > 50 else a.lr * (i + 1) / 51
        for g in opt.param_groups:
            g["lr"] = lr
        loss = step()  # type: ignore[operator]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 10.0)
        opt.step()
        running = 0.95 * running + 0.05 * loss.item() if i else loss.item()
        elapsed = time.perf_counter() - t0
        if i % 50 == 0 or i == total - 1:
            log.append(f"step {i} loss {running:.4f} lr {lr:.2e} {elapsed:.0f}s")
            print(log[-1], flush=True)
        if a.minutes and elapsed > a.minutes * 60:
            log.append(f"time budget reached at step {i}")
            break
    log.append(f"trained {i + 1} steps in {time.perf_counter() - t0:.0f}s")
    return net


def main() -> None:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["detector", "classifier"], required=True)
    ap.add_argument("--variant", choices=DETECTOR_VARIANTS, default="full", help="detector ablation arm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--steps", type=int, default=1500, help="optimizer steps (the learning-rate schedule length)"
    )
    ap.add_argument("--minutes", type=float, default=0.0, help="also stop after this wall time (0: no limit)")
    ap.add_argument("--scans", type=int, default=24, help="synthetic training scans generated up front")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--crop", type=int, default=192, help="detector crop size (fully convolutional at 512)")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    log: list[str] = [f"args {vars(a)}"]
    t0 = time.perf_counter()
    net = train_detector(a, log) if a.model == "detector" else train_classifier(a, log)
    a.out.mkdir(parents=True, exist_ok=True)
    torch.save({"model": a.model, "variant": a.variant, "state_dict": net.state_dict()}, a.out / "model.pt")
    log.append(f"total {time.perf_counter() - t0:.0f}s")
    (a.out / "log.txt").write_text("\n".join(log) + "\n")
    print("\n".join(log[-3:]))


if __name__ == "__main__":
    main()
