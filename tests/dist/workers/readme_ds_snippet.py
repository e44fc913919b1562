"""Run README.md's DeepSpeed snippet as written (under torchrun, gloo on CPU).

The snippet is cut out of README.md (the python block after "DeepSpeed ZeRO: pass a
`CAdamW`"), given a ``model`` and a ``batch`` and executed; one step must change the
parameters and leave the optimizer state on the client CAdamW, and the snippet's
``dsc.cautious(engine).kept_fraction`` must reach its statistics (the returned ``opt`` is
DeepSpeed's wrapper, which has none).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def snippet() -> str:
    text = (ROOT / "README.md").read_text()
    at = text.index("DeepSpeed ZeRO: pass a `CAdamW`")
    m = re.search(r"```python\n(.*?)```", text[at:], re.S)
    assert m is not None, "no python block after the DeepSpeed sentence in README.md"
    return m.group(1)


def main() -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    before = [p.detach().clone() for p in model.parameters()]
    batch = torch.randn(8, 16)
    scope = {"model": model, "batch": batch}
    exec(compile(snippet(), "README.md (DeepSpeed snippet)", "exec"), scope)
    engine = scope["engine"]
    from dist_cautious import CAdamW

    client = engine.client_optimizer if hasattr(engine, "client_optimizer") else None
    assert isinstance(client, CAdamW), type(client)
    assert any(len(s) for s in client.state.values()), "no optimizer state after engine.step()"
    # the snippet's documented way to the statistics: the wrapper has none, dsc.cautious does
    import dist_cautious.deepspeed as dsc

    assert not hasattr(scope["opt"], "kept_fraction"), type(scope["opt"])
    assert dsc.cautious(engine) is client and dsc.cautious(scope["opt"]) is client
    assert 0.0 < client.kept_fraction <= 1.0, client.kept_fraction
    after = [p.detach() for p in engine.module.parameters()]
    changed = sum(not torch.equal(a, b) for a, b in zip(after, before))
    if dist.get_rank() == 0:
        print(f"README snippet OK: {changed} of {len(before)} tensors changed", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
