"""threelc with torch.compile on 2 CPU processes (README: "Use it with torch.compile").

    torchrun --standalone --nproc-per-node 2 launch/examples/compile_ddp.py OUT_DIR [BACKEND]

Compile the module and wrap the compiled module in DDP: ``DDP(torch.compile(model))``.
``torch.compile(DDP(model))`` graph-breaks in DDP's forward and compiles nothing on
torch 2.13 (CPU, gloo). Each rank writes OUT_DIR/rank<r>.pt: final parameters,
state.stats and how many graphs dynamo compiled.
"""

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from threelc.hooks import ThreeLCState, threelc_hook


def main(out: Path, backend: str):
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(dist.get_rank())
    # --- README: Use it with torch.compile ---
    ddp_model = DDP(torch.compile(model, backend=backend))
    state = ThreeLCState(sparsity=1.0, transport="allgather")
    ddp_model.register_comm_hook(state, threelc_hook)
    # --- end ---
    for _ in range(8):
        x = torch.randn(32, 32, generator=generator)
        loss = torch.nn.functional.mse_loss(ddp_model(x), x[:, :1] * 2 - x[:, 1:2])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    params = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"params": params, "stats": state.stats, "graphs": graphs}, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "inductor")
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo may still hold a hook's tensors (README: Reliability)
