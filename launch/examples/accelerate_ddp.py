"""threelc with Hugging Face accelerate on 2 CPU processes (README: "Use it with accelerate").

    torchrun --standalone --nproc-per-node 2 launch/examples/accelerate_ddp.py OUT_DIR

(``accelerate launch --cpu --num_processes 2`` starts one process; torchrun or
``accelerate launch --multi_gpu`` start a distributed run.) Each rank writes
OUT_DIR/rank<r>.pt: final parameters and state.stats.
"""

import os
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader, TensorDataset

from threelc.hooks import ThreeLCState
from threelc.hooks.hf import register


def main(out: Path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(0))
    loader = DataLoader(TensorDataset(x, x[:, :1] * 2 - x[:, 1:2]), batch_size=32)
    # --- README: Use it with accelerate ---
    accelerator = Accelerator(cpu=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    state = register(model, ThreeLCState(sparsity=1.0, transport="allgather"))
    for step, (inputs, targets) in zip(range(8), loader):
        loss = torch.nn.functional.mse_loss(model(inputs), targets)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
    print(state.stats["ratio"])
    # --- end ---
    params = {k: v.detach().clone() for k, v in accelerator.unwrap_model(model).state_dict().items()}
    torch.save({"params": params, "stats": state.stats, "world_size": accelerator.num_processes},
               out / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo may still hold a hook's tensors (README: Reliability)
