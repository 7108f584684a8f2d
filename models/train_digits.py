"""Train the shipped reference weights: MixFormer-B0 on scikit-learn's digits at 32x32.

    python models/train_digits.py [--epochs N] [--out PATH] [--size HxW] [--seed S]

Data: mixformer_deploy.data.digits_split() (stratified 80/20, random_state 0: 1437 train / 360 test),
preprocessed by mixformer_deploy.data.digits_to_inputs (grey -> RGB, anti-aliased resize, ImageNet
mean/std, NCHW). Augmentation: random +-1 px shifts of the 8x8 image (zero fill; the nine shifted
copies of the training set are preprocessed once). No flips (digits are not flip-invariant).
Optimiser: AdamW, linear warm-up then cosine decay, label smoothing, gradient clipping.
Runs on one CPU thread, seeded; the final model (no early stopping, no selection on the test split)
is evaluated on the held-out 20% in eval mode and written as safetensors with its manifest.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mixformer_deploy import create_model
from mixformer_deploy.checkpoints import save_safetensors
from mixformer_deploy.data import DIGITS_SEED, Preprocessing, digits_split, digits_to_inputs, parse_size
from mixformer_deploy.model import check_input_size, count_params

HERE = Path(__file__).resolve().parent
DEFAULTS = dict(variant="B0", size="32x32", epochs=40, batch_size=64, lr=1e-3, min_lr=1e-5, weight_decay=0.05,
                warmup_epochs=3, label_smoothing=0.1, clip_grad=5.0, seed=0, shift=1)
SHIFTS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]


def shift_images(images: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """Translate (N, 8, 8) images by (dy, dx) pixels, filling with background (0)."""
    out = np.zeros_like(images)
    h, w = images.shape[1:]
    out[:, max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        images[:, max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def lr_at(step: int, total: int, warmup: int, base: float, floor: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + 0.5 * (base - floor) * (1.0 + math.cos(math.pi * t))


@torch.no_grad()
def evaluate(model, x: torch.Tensor, y: torch.Tensor, batch_size: int = 120) -> tuple[float, np.ndarray]:
    model.eval()
    preds = torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    return (preds == y).float().mean().item(), preds.numpy()


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n: int = 10) -> np.ndarray:
    cm = np.zeros((n, n), dtype=np.int64)
    np.add.at(cm, (y_true, y_pred), 1)
    return cm


def tensor_digest(path) -> str:
    """sha256 over the saved tensors (sorted names, dtypes, shapes, bytes): reproducible where the file's
    own hash is not (safetensors writes its metadata keys in no fixed order)."""
    import hashlib
    from safetensors.torch import load_file
    h = hashlib.sha256()
    for k, v in sorted(load_file(str(path)).items()):
        h.update(f"{k}|{v.dtype}|{tuple(v.shape)}|".encode())
        h.update(v.contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=DEFAULTS["epochs"])
    ap.add_argument("--out", default=str(HERE / "mixformer-b0-digits.safetensors"))
    ap.add_argument("--size", default=DEFAULTS["size"], help="input HxW (each side a multiple of 32)")
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    torch.use_deterministic_algorithms(True)
    rng = np.random.default_rng(args.seed)
    H, W = parse_size(args.size)

    model = create_model(DEFAULTS["variant"], num_classes=10, seed=args.seed)
    check_input_size(model.cfg, H, W)
    print(f"MixFormer-{model.cfg.name}: {count_params(model):,} parameters, input {H}x{W}, "
          f"{args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, seed {args.seed}, threads {args.threads}")

    xtr, ytr, xte, yte = digits_split()
    t0 = time.perf_counter()
    shifts = SHIFTS if DEFAULTS["shift"] else [(0, 0)]
    train_views = torch.from_numpy(np.stack([digits_to_inputs(shift_images(xtr, dy, dx), H, W) for dy, dx in shifts]))
    center = shifts.index((0, 0))
    x_test = torch.from_numpy(digits_to_inputs(xte, H, W))
    y_train, y_test = torch.from_numpy(ytr).long(), torch.from_numpy(yte).long()
    print(f"data: {len(ytr)} train ({len(shifts)} shifted views) / {len(yte)} test, "
          f"preprocessed in {time.perf_counter() - t0:.1f}s")

    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and "relative_position_bias_table" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim > 1 and "relative_position_bias_table" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": DEFAULTS["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr)
    n = len(ytr)
    steps_per_epoch = math.ceil(n / args.batch_size)
    total, warmup = args.epochs * steps_per_epoch, DEFAULTS["warmup_epochs"] * steps_per_epoch

    step, t_start = 0, time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        t_ep = time.perf_counter()
        order = rng.permutation(n)
        view = rng.integers(0, len(shifts), size=n)
        loss_sum = correct = 0.0
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size:(b + 1) * args.batch_size]
            xb = train_views[torch.from_numpy(view[idx]), torch.from_numpy(idx)]
            yb = y_train[torch.from_numpy(idx)]
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, warmup, args.lr, DEFAULTS["min_lr"])
            logits = model(xb)
            loss = F.cross_entropy(logits, yb, label_smoothing=DEFAULTS["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), DEFAULTS["clip_grad"])
            opt.step()
            step += 1
            loss_sum += loss.item() * len(idx)
            correct += (logits.argmax(1) == yb).sum().item()
        test_acc, _ = evaluate(model, x_test, y_test)
        print(f"epoch {epoch + 1:3d}/{args.epochs}  lr {opt.param_groups[0]['lr']:.2e}  loss {loss_sum / n:.4f}  "
              f"train acc {correct / n:.4f}  held-out acc {test_acc:.4f}  ({time.perf_counter() - t_ep:.1f}s)",
              flush=True)
    train_time = time.perf_counter() - t_start

    model.eval()
    acc, preds = evaluate(model, x_test, y_test)
    train_acc, _ = evaluate(model, train_views[center], y_train)
    cm = confusion(yte, preds)
    per_class = {str(c): round(float(cm[c, c] / cm[c].sum()), 4) for c in range(10)}
    print(f"training time {train_time / 60:.1f} min")
    print(f"final train accuracy (eval mode, unshifted) {train_acc:.4f}")
    print(f"final held-out accuracy {acc:.4f} ({int((preds == yte).sum())}/{len(yte)})")
    print("per-class held-out accuracy:", json.dumps(per_class))
    print("confusion (rows true 0-9, columns predicted 0-9):")
    for c in range(10):
        print(f"  {c}: " + " ".join(f"{v:3d}" for v in cm[c]))

    prep = Preprocessing().to_dict()
    prep.update(input="8x8 grey in [0, 16], divided by 16, replicated to RGB", scale="digit values / 16",
                resize=f"8x8 -> {H}x{W}, skimage.transform.resize(anti_aliasing=True)",
                function="mixformer_deploy.data.digits_to_inputs")
    extra = {
        "input_size": f"{H}x{W}",
        "labels": [str(c) for c in range(10)],
        "dataset": "sklearn-digits",
        "split": f"stratified 80/20 (sklearn train_test_split, random_state {DIGITS_SEED}): "
                 f"{len(ytr)} train / {len(yte)} test",
        "preprocessing": prep,
        "heldout_accuracy": f"{acc:.4f}",
        "per_class_accuracy": per_class,
        "recipe": "models/train_digits.py",
        "hyperparameters": {**DEFAULTS, "size": f"{H}x{W}", "epochs": args.epochs, "batch_size": args.batch_size,
                            "lr": args.lr, "seed": args.seed, "optimizer": "AdamW", "schedule": "warmup+cosine"},
    }
    out = save_safetensors(model, args.out, extra=extra)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB), tensor sha256 {tensor_digest(out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
