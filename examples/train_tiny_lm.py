"""Train the tiny byte-level LM twins: softmax (alpha = 1) and entmax15 (alpha = 1.5), same recipe and seed.

Run from the repository root::

    python -m examples.train_tiny_lm --out out/tiny_lm            # GPU: ~4 minutes per twin
    python -m examples.train_tiny_lm --out /tmp/smoke --smoke     # CPU: a seconds-long check

Data: the running interpreter's stdlib sources (see ``examples/tiny_lm/data.py``). Both twins see the
same batches (one generator seed). Without ``--steps`` the step count is calibrated once from the
entmax twin's measured step time so that it fits ``--budget-s``; the softmax twin then runs the
same number of steps. Writes ``tiny_lm_softmax.safetensors``, ``tiny_lm_entmax15.safetensors``
(fp16) and ``train_log.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from examples.tiny_lm.data import load_split, sample_batch
from examples.tiny_lm.model import TinyLM, TinyLMConfig, save_checkpoint

TWIN_NAMES = {1.0: "softmax", 1.5: "entmax15"}
SMOKE_CONFIG = dict(d_model=48, n_layers=2, head_dim=8, mlp_hidden=64)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="directory for checkpoints and the log")
    p.add_argument("--alphas", type=float, nargs="+", default=[1.5, 1.0], help="twins to train (1 = softmax)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: calibrated to --budget-s)")
    p.add_argument("--budget-s", type=float, default=230.0, help="training seconds per twin when calibrating")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model and few steps, for a CPU check")
    return p.parse_args()


def make_model(alpha: float, smoke: bool, seed: int, device: torch.device) -> TinyLM:
    """A freshly initialised twin: same seed, so both twins start from the same weights."""
    torch.manual_seed(seed)
    extra = SMOKE_CONFIG if smoke else {}
    return TinyLM(TinyLMConfig(alpha=alpha, **extra)).to(device)


def make_optimizer(model: TinyLM, lr: float) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (not on norms' gains)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=torch.cuda.is_available())


def lr_at(step: int, total: int, peak: float) -> float:
    """Linear warm-up over the first 5% of steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def train_step(
    model: TinyLM, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float, device: torch.device
) -> torch.Tensor:
    """One optimizer step; returns the loss tensor (not synchronised)."""
    for group in opt.param_groups:
        group["lr"] = lr
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss


def calibrate_steps(args: argparse.Namespace, stream: torch.Tensor, device: torch.device) -> tuple[int, float]:
    """Steps that fit the budget, from the timed steady-state step of the slowest (largest alpha) twin."""
    model = make_model(max(args.alphas), args.smoke, args.seed, device)
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    times = []
    for i in range(8):
        x, y = (t.to(device, non_blocking=True) for t in sample_batch(stream, args.batch, args.seq_len, gen))
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        train_step(model, opt, x, y, args.lr * 0.1, device).item()
        times.append(time.perf_counter() - t0)
    step_s = sorted(times[3:])[len(times[3:]) // 2]
    return max(20, int(args.budget_s / step_s)), step_s


@torch.no_grad()
def held_out_bpb(
    model: TinyLM, held_out: list[tuple[str, bytes]], seq_len: int, device: torch.device, max_windows: int = 64
) -> float:
    """Bits per byte on non-overlapping ``seq_len`` windows of the held-out files (teacher forced)."""
    stream = b"".join(data for _, data in held_out)
    n = min(max_windows, (len(stream) - 1) // seq_len)
    buf = torch.frombuffer(bytearray(stream[: n * seq_len + 1]), dtype=torch.uint8).long().to(device)
    total = 0.0
    for i in range(n):
        chunk = buf[i * seq_len : (i + 1) * seq_len + 1]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(chunk[None, :-1])
        total += F.cross_entropy(logits[0], chunk[1:]).item()
    return total / n / math.log(2)


def train_twin(
    alpha: float, steps: int, args: argparse.Namespace, stream: torch.Tensor,
    held_out: list[tuple[str, bytes]], device: torch.device,
) -> dict:
    """Train one twin for ``steps`` steps, score it on held-out text, save its checkpoint."""
    model = make_model(alpha, args.smoke, args.seed, device)
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed + 1)
    history, t0, last = [], time.perf_counter(), None
    for step in range(steps):
        x, y = (t.to(device, non_blocking=True) for t in sample_batch(stream, args.batch, args.seq_len, gen))
        last = train_step(model, opt, x, y, lr_at(step, steps, args.lr), device)
        if step % 100 == 0 or step == steps - 1:
            loss = last.item()
            history.append({"step": step, "loss": loss, "elapsed_s": time.perf_counter() - t0})
            print(f"[{TWIN_NAMES.get(alpha, alpha)}] step {step}/{steps} loss {loss:.4f} "
                  f"({time.perf_counter() - t0:.0f}s)", flush=True)
    train_s = time.perf_counter() - t0
    model.eval()
    bpb = held_out_bpb(model, held_out, args.seq_len, device)
    name = TWIN_NAMES.get(alpha, f"alpha{alpha:g}")
    path = args.out / f"tiny_lm_{name}.safetensors"
    meta = {"steps": str(steps), "seed": str(args.seed), "held_out_bpb_512": f"{bpb:.4f}",
            "data": "python stdlib *.py, crc32(path) % 10 != 0", "python": platform.python_version(),
            "torch": torch.__version__}
    save_checkpoint(model, path, meta)
    print(f"[{name}] done: {steps} steps in {train_s:.0f}s, held-out {bpb:.4f} bits/byte -> {path.name}", flush=True)
    return {"alpha": alpha, "name": name, "steps": steps, "train_s": train_s, "final_loss": last.item(),
            "held_out_bpb_512": bpb, "checkpoint": path.name, "history": history,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    args = parse_args()
    if args.smoke:
        args.batch, args.seq_len = min(args.batch, 4), min(args.seq_len, 64)
        args.steps = args.steps or 6
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    stream, held_out = load_split()
    print(f"data: {stream.numel()} train bytes, {len(held_out)} held-out files; device {device}", flush=True)
    steps, step_s = (args.steps, None) if args.steps else calibrate_steps(args, stream, device)
    print(f"steps per twin: {steps} (calibrated step time: {step_s})", flush=True)
    runs = [train_twin(a, steps, args, stream, held_out, device) for a in args.alphas]
    log = {"args": {k: str(v) for k, v in vars(args).items()}, "device": str(device),
           "gpu": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
           "torch": torch.__version__, "python": platform.python_version(),
           "train_bytes": stream.numel(), "held_out_files": len(held_out),
           "calibrated_step_s": step_s, "runs": runs}
    (args.out / "train_log.json").write_text(json.dumps(log, indent=1))


if __name__ == "__main__":
    main()
