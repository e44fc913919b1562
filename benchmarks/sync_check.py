"""Check that CAdamW.step() never synchronises the host with the GPU.

Runs a few steps under ``torch.cuda.set_sync_debug_mode("error")``, which raises on any
synchronising CUDA call (``.item()``, blocking copies, ...), for each backend that claims no
sync, and compares the result with the reference backend. Needs a CUDA device:

    PYTHONPATH=. python benchmarks/sync_check.py
"""

from __future__ import annotations

import torch

from dist_cautious import CAdamW


def main() -> None:
    assert torch.cuda.is_available(), "needs a CUDA device"
    shapes = [(1000, 37), (1,), (0,), (4097,), (256, 256)]
    for dtype in (torch.float32, torch.bfloat16):
        for backend in ("triton", "foreach"):
            torch.manual_seed(0)
            ps = [torch.randn(s, device="cuda").to(dtype).requires_grad_() for s in shapes]
            ref = [p.detach().clone().requires_grad_() for p in ps]
            opt = CAdamW(ps, lr=1e-2, backend=backend)
            oref = CAdamW(ref, lr=1e-2, backend="reference")
            grads = [[torch.randn_like(p) for p in ps] for _ in range(6)]
            for k, gs in enumerate(grads):
                for p, q, g in zip(ps, ref, gs):
                    p.grad, q.grad = g.clone(), g.clone()
                torch.cuda.synchronize()
                if k >= 2:  # after the first steps have built and cached their plans
                    torch.cuda.set_sync_debug_mode("error")
                try:
                    opt.step()
                finally:
                    torch.cuda.set_sync_debug_mode("default")
                oref.step()
            err = max(
                ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()
                for a, b in zip(ps, ref)
                if a.numel()
            )
            print(
                f"{backend:8s} {str(dtype):15s} no host sync in steps 3-6; rel err vs reference {err:.2e}"
            )


if __name__ == "__main__":
    main()
