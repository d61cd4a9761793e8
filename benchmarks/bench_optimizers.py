"""Optimizer claims, measured: DGD vs GD on a drifting stream; M3 vs AdamW and Muon on sklearn digits;
deep momentum (DMGD) vs heavy-ball momentum on both.

    python benchmarks/bench_optimizers.py dgd            # claim 1: online loss, 3 seeds
    python benchmarks/bench_optimizers.py m3             # claim 3: accuracy, loss, step-time ratios, 3 seeds
    python benchmarks/bench_optimizers.py m3-timing      # optimizer.step() time per matrix size, M3 / Muon
    python benchmarks/bench_optimizers.py dmgd           # claim 4: DMGD (row / element-wise memory) vs SGD momentum

Every number is printed as mean +- std over seeds; timings are ratios measured in the same run. Times are CPU
time of this process (time.process_time) with one torch thread: the machine is shared, and wall time mostly
measured the other tenants.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
from torch import nn

from nested_learning.optimizers import DGD, DeepMomentumGD, build_optimizer, record_linear_inputs

SEEDS = (0, 1, 2)


def _fmt(values) -> str:
    if not all(math.isfinite(v) for v in values):
        return "diverged"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.4f} +- {std:.4f}"


# ---------------------------------------------------------------- claim 1: DGD vs GD on a non-i.i.d. stream


def drifting_stream(seed: int, steps: int, d_in: int, d_out: int, rho: float, drift: float, noise: float):
    """Unit-norm AR(1) inputs (x_t correlated with x_{t-1}) and a target map doing a random walk."""
    gen = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d_out, d_in, generator=gen)
    state = torch.randn(d_in, generator=gen)
    xs, ys = [], []
    for _ in range(steps):
        state = rho * state + (1 - rho**2) ** 0.5 * torch.randn(d_in, generator=gen)
        x = state / state.norm()
        w_true = w_true + drift * torch.randn(d_out, d_in, generator=gen)
        xs.append(x)
        ys.append(w_true @ x + noise * torch.randn(d_out, generator=gen))
    return torch.stack(xs), torch.stack(ys)


def online_loss(method: str, lr: float, xs: torch.Tensor, ys: torch.Tensor, **opt_kwargs) -> list[float]:
    """Loss of each sample before the model learns from it (prequential), batch size 1. ``method``: "gd",
    "dgd", or an optimizer name of ``build_optimizer`` (with ``opt_kwargs``)."""
    torch.manual_seed(0)
    model = nn.Linear(xs.shape[1], ys.shape[1], bias=False)
    nn.init.zeros_(model.weight)
    recorder = record_linear_inputs(model) if method == "dgd" else None
    if method == "dgd":
        opt = DGD(model.parameters(), lr=lr, recorder=recorder)
    elif method == "gd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    else:
        opt = build_optimizer(method, model, lr=lr, **opt_kwargs)
    losses = []
    for x, y in zip(xs, ys):
        opt.zero_grad()
        loss = 0.5 * (model(x[None]) - y).pow(2).sum()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    if recorder is not None:
        recorder.remove()
    return losses


def bench_dgd(args) -> None:
    print(f"# DGD vs GD, drifting linear regression: steps={args.steps} d_in={args.d_in} d_out={args.d_out} "
          f"rho={args.rho} drift={args.drift} noise={args.noise}, unit-norm inputs, batch 1")
    streams = {s: drifting_stream(s, args.steps, args.d_in, args.d_out, args.rho, args.drift, args.noise) for s in SEEDS}
    print("| method | lr | mean online loss (all steps) | mean online loss (second half) |")
    print("| --- | --- | --- | --- |")
    best = {}
    for method in ("gd", "dgd"):
        for lr in args.lrs:
            runs = [online_loss(method, lr, *streams[s]) for s in SEEDS]
            full = [statistics.fmean(r) for r in runs]
            half = [statistics.fmean(r[len(r) // 2 :]) for r in runs]
            print(f"| {method} | {lr} | {_fmt(full)} | {_fmt(half)} |", flush=True)
            score = statistics.fmean(full) if all(math.isfinite(v) for v in full) else math.inf
            if method not in best or score < statistics.fmean(best[method][1]):
                best[method] = (lr, full)
    for method, (lr, full) in best.items():
        print(f"best {method}: lr={lr} online loss {_fmt(full)}")


# ---------------------------------------------------------------- claim 3: M3 vs AdamW vs Muon on digits


def digits(seed: int, validation: bool):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        data.data, data.target, test_size=0.25, random_state=seed, stratify=data.target
    )
    if validation:  # tune on a split of the training set, never on the test set
        x_train, x_test, y_train, y_test = train_test_split(
            x_train, y_train, test_size=0.2, random_state=seed, stratify=y_train
        )
    mean, std = x_train.mean(0), x_train.std(0)
    std[std == 0] = 1.0  # pixels that are constant in the training set stay zero after scaling
    to = lambda a, dtype=torch.float32: torch.tensor(a, dtype=dtype)  # noqa: E731
    return (to((x_train - mean) / std), to(y_train, torch.long), to((x_test - mean) / std), to(y_test, torch.long))


def mlp(seed: int, hidden: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


def train_digits(name: str, opt_kwargs: dict, seed: int, args, validation: bool = False) -> dict:
    x_train, y_train, x_test, y_test = digits(seed, validation)
    model = mlp(seed, args.hidden)
    opt = build_optimizer(name, model, **opt_kwargs)
    gen = torch.Generator().manual_seed(seed)
    step_times, total_times = [], []
    for _ in range(args.epochs):
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch):
            idx = order[i : i + args.batch]
            start = time.process_time()
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            mid = time.process_time()
            opt.step()
            end = time.process_time()
            step_times.append(end - mid)
            total_times.append(end - start)
    with torch.no_grad():
        logits = model(x_test)
        return {
            "acc": (logits.argmax(-1) == y_test).float().mean().item(),
            "loss": nn.functional.cross_entropy(logits, y_test).item(),
            "step": statistics.median(step_times),
            "total": statistics.median(total_times),
        }


def m3_candidates(adam_lr: float):
    grid = [{"lr": lr, "eps": eps, "adam_lr": adam_lr} for lr in (3e-6, 1e-5, 3e-5) for eps in (1e-8, 1e-4)]
    return grid + [{"lr": lr, "eps_mode": "outside", "adam_lr": adam_lr} for lr in (1e-6, 3e-6, 1e-5)]


def bench_m3(args) -> None:
    print(f"# digits MLP 64-{args.hidden}-{args.hidden}-10, batch {args.batch}, {args.epochs} epochs, "
          f"threads={torch.get_num_threads()}")
    grids = {"adamw": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2)], "muon": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2)]}
    chosen = {}
    for name in ("adamw", "muon", "m3"):
        grid = grids.get(name) or m3_candidates(chosen["adamw"]["lr"])
        scores = []
        for kwargs in grid:
            result = train_digits(name, kwargs, 0, args, validation=True)
            scores.append((result["loss"], kwargs))
            print(f"tune {name} {kwargs}: val acc {result['acc']:.4f} val loss {result['loss']:.4f}", flush=True)
        chosen[name] = min(scores, key=lambda s: s[0])[1]
    print("| optimizer | hyper-parameters (tuned on validation loss) | test accuracy | test loss | "
          "optimizer.step() ms | full step ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    results = {name: [train_digits(name, chosen[name], s, args) for s in SEEDS] for name in chosen}
    for name, runs in results.items():
        print(f"| {name} | {chosen[name]} | {_fmt([r['acc'] for r in runs])} | {_fmt([r['loss'] for r in runs])} | "
              f"{_fmt([1e3 * r['step'] for r in runs])} | {_fmt([1e3 * r['total'] for r in runs])} |")
    for other in ("muon", "adamw"):
        step = [a["step"] / b["step"] for a, b in zip(results["m3"], results[other])]
        total = [a["total"] / b["total"] for a, b in zip(results["m3"], results[other])]
        print(f"M3 / {other}: optimizer.step() time ratio {_fmt(step)}, full step time ratio {_fmt(total)}")


def bench_m3_timing(args) -> None:
    print(f"# optimizer.step() time: one hidden (size x size) matrix + a (size x 10) head, 10 steps per sample, "
          f"optimizers interleaved, fastest of {args.repeats} samples, threads={torch.get_num_threads()}")
    print("| size | M3 / Muon | M3 / AdamW | Muon / AdamW |")
    print("| --- | --- | --- | --- |")
    for size in args.sizes:
        steps = {}
        for name in ("muon", "m3", "adamw"):
            model = nn.Sequential(nn.Linear(size, size), nn.Linear(size, 10))
            opt = build_optimizer(name, model, lr=1e-5)
            for p in model.parameters():
                p.grad = torch.randn_like(p)
            steps[name] = lambda opt=opt: [opt.step() for _ in range(10)]
        best = {name: float("inf") for name in steps}
        for fn in steps.values():
            fn()  # warm-up: state allocation, first Newton-Schulz
        for _ in range(args.repeats):  # interleaved, so a busy spell on the machine hits all three alike
            for name, fn in steps.items():
                start = time.process_time()
                fn()
                best[name] = min(best[name], time.process_time() - start)
        print(f"| {size} | {best['m3'] / best['muon']:.2f} | {best['m3'] / best['adamw']:.2f} | "
              f"{best['muon'] / best['adamw']:.2f} |", flush=True)


# ---------------------------------------------------------------- claim 4: deep momentum vs heavy-ball momentum

# Heavy-ball momentum (torch SGD, momentum 0.9) and DMGD with the same alpha = 0.9, so the linear path of DMGD is
# that same momentum buffer and any difference is the deep memory's.
# DMGD's memory_lr is tuned with lr (both on seed 0), so the deep memory gets its best chance; the row memory is
# also run at its default memory_lr with only lr tuned.
MEMORY_LRS = (1e-3, 1e-2, 1e-1)
DMGD_METHODS = {
    "sgd momentum 0.9": ("sgd", [{"momentum": 0.9}]),
    "dmgd rows, memory_lr 0.01 (default)": ("deep_momentum", [{"memory": "rows", "memory_lr": 1e-2}]),
    "dmgd rows, memory_lr tuned": ("deep_momentum", [{"memory": "rows", "memory_lr": m} for m in MEMORY_LRS]),
    "dmgd elementwise, memory_lr tuned": (
        "deep_momentum", [{"memory": "elementwise", "memory_lr": m} for m in MEMORY_LRS]
    ),
}


def _pick(scores: dict) -> tuple[tuple, str]:
    """Best (lr, memory_lr) key of ``scores`` (lower is better, non-finite counts as worst), and the grid as text."""
    scores = {key: value if math.isfinite(value) else math.inf for key, value in scores.items()}
    best = min(scores, key=scores.get)
    grid = "; ".join(f"{_label(k)}: {v:.4f}" for k, v in scores.items())
    return best, grid


def _label(key) -> str:
    lr, memory_lr = key
    return f"lr {lr}" + (f", memory_lr {memory_lr}" if memory_lr is not None else "")


def bench_dmgd(args) -> None:
    print(f"# DMGD vs heavy-ball momentum; DMGD defaults otherwise ({_dmgd_defaults()}); threads={torch.get_num_threads()}")
    # Task 1: the drifting stream of claim 1 (batch 1, prequential loss); lr picked by mean online loss on seed 0.
    streams = {s: drifting_stream(s, args.steps, 16, 4, 0.9, 0.01, 0.1) for s in SEEDS}
    print(f"## drifting linear regression stream, {args.steps} steps, batch 1")
    print("| method | lr (best on seed 0) | mean online loss (all steps) | mean online loss (second half) |")
    print("| --- | --- | --- | --- |")
    results = {}
    for label, (name, grid) in DMGD_METHODS.items():
        extra = {(lr, kw.get("memory_lr")): kw for lr in args.stream_lrs for kw in grid}
        best, table = _pick({key: statistics.fmean(online_loss(name, key[0], *streams[0], **kw)) for key, kw in extra.items()})
        runs = [online_loss(name, best[0], *streams[s], **extra[best]) for s in SEEDS]
        full = [statistics.fmean(r) for r in runs]
        half = [statistics.fmean(r[len(r) // 2 :]) for r in runs]
        results[label] = full
        print(f"| {label} | {_label(best)} ({table}) | {_fmt(full)} | {_fmt(half)} |", flush=True)
    _ratio_lines(results, "online loss")
    # Task 2: digits MLP of claim 3; lr tuned on seed 0's validation split by validation loss.
    print(f"## digits MLP 64-{args.hidden}-{args.hidden}-10, batch {args.batch}, {args.epochs} epochs")
    print("| method | hyper-parameters (validation loss on seed 0) | test accuracy | test loss | optimizer.step() ms |")
    print("| --- | --- | --- | --- | --- |")
    results = {}
    for label, (name, grid) in DMGD_METHODS.items():
        extra = {(lr, kw.get("memory_lr")): kw for lr in args.lrs for kw in grid}
        best, table = _pick({key: train_digits(name, {"lr": key[0], **kw}, 0, args, validation=True)["loss"]
                             for key, kw in extra.items()})
        runs = [train_digits(name, {"lr": best[0], **extra[best]}, s, args) for s in SEEDS]
        results[label] = [r["loss"] for r in runs]
        print(f"| {label} | {_label(best)} ({table}) | {_fmt([r['acc'] for r in runs])} | "
              f"{_fmt([r['loss'] for r in runs])} | {_fmt([1e3 * r['step'] for r in runs])} |", flush=True)
    _ratio_lines(results, "test loss")


def _ratio_lines(results: dict, what: str) -> None:
    base = results["sgd momentum 0.9"]
    for label, values in results.items():
        if label != "sgd momentum 0.9":
            wins = sum(v < b for v, b in zip(values, base))
            print(f"{label}: {what} below SGD momentum's on {wins} of {len(base)} seeds "
                  f"(per-seed difference {_fmt([v - b for v, b in zip(values, base)])})")


def _dmgd_defaults() -> str:
    import inspect

    sig = inspect.signature(DeepMomentumGD.__init__).parameters
    return ", ".join(f"{k} {sig[k].default}" for k in ("memory_depth", "hidden", "memory_lr", "memory_decay", "objective"))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--threads", type=int, default=1, help="tensors are tiny: one thread avoids synchronisation cost on a busy machine"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    dgd = sub.add_parser("dgd", help="claim 1: DGD vs GD on a drifting linear regression stream")
    dgd.add_argument("--steps", type=int, default=2000)
    dgd.add_argument("--d-in", type=int, default=16)
    dgd.add_argument("--d-out", type=int, default=4)
    dgd.add_argument("--rho", type=float, default=0.9, help="AR(1) correlation of consecutive inputs")
    dgd.add_argument("--drift", type=float, default=0.01, help="random-walk step of the target map")
    dgd.add_argument("--noise", type=float, default=0.1)
    dgd.add_argument("--lrs", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    m3 = sub.add_parser("m3", help="claim 3: M3 vs AdamW vs Muon on sklearn digits")
    m3.add_argument("--hidden", type=int, default=128)
    m3.add_argument("--epochs", type=int, default=20)
    m3.add_argument("--batch", type=int, default=64)
    timing = sub.add_parser("m3-timing", help="optimizer.step() time of M3 relative to Muon and AdamW")
    timing.add_argument("--sizes", type=int, nargs="+", default=[128, 256, 512])
    timing.add_argument("--repeats", type=int, default=7)
    dmgd = sub.add_parser("dmgd", help="claim 4: DMGD (row and element-wise memory) vs heavy-ball momentum")
    dmgd.add_argument("--steps", type=int, default=2000, help="length of the drifting stream")
    dmgd.add_argument("--stream-lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    dmgd.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1])
    dmgd.add_argument("--hidden", type=int, default=128)
    dmgd.add_argument("--epochs", type=int, default=20)
    dmgd.add_argument("--batch", type=int, default=64)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    {"dgd": bench_dgd, "m3": bench_m3, "m3-timing": bench_m3_timing, "dmgd": bench_dmgd}[args.command](args)


if __name__ == "__main__":
    main()
