"""The main job: what entmaxkv_compile does, end to end, on a small model (CPU is fine).

Run with `make demo`. It grows with the project; see README.md.
"""

import torch

from entmaxkv_compile import entmax, entmax_threshold


def main() -> None:
    torch.manual_seed(0)
    scores = torch.randn(4, 1024, dtype=torch.float64) * 3
    for alpha in (1.25, 1.5, 2.0):
        p = entmax(scores, alpha)
        tau = entmax_threshold(scores, alpha)
        print(
            f"alpha={alpha:<5} support={int((p > 0).sum(-1).float().mean()):4d}/1024 "
            f"sum={p.sum(-1).mean():.12f} tau={tau.mean():+.4f}"
        )


if __name__ == "__main__":
    main()
