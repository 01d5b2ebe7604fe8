"""threelc in a transformers Trainer on 2 CPU processes (README: "Use it with the HF Trainer").

    torchrun --standalone --nproc-per-node 2 launch/examples/hf_trainer.py OUT_DIR

Each rank writes OUT_DIR/rank<r>.pt: final parameters, state.stats and the Trainer's
log history (where ThreeLCCallback's threelc/* figures land).
"""

import os
import sys
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from threelc.hooks import ThreeLCState
from threelc.hooks.hf import ThreeLCCallback


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.x = torch.randn(1024, 32, generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.x[i, :1] * 2 - self.x[i, 1:2]}


def main(out: Path):
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(out / "trainer"), use_cpu=True, max_steps=8, logging_steps=2,
                             per_device_train_batch_size=32, learning_rate=0.05, report_to="none",
                             save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
    # --- README: Use it with the HF Trainer ---
    trainer = Trainer(model=Regression(), args=args, train_dataset=Rows())
    state = ThreeLCState(sparsity=1.0, transport="allgather")
    trainer.add_callback(ThreeLCCallback(trainer, state))
    trainer.train()  # threelc/ratio, bytes, codec time in every report_to logger
    # --- end ---
    params = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    torch.save({"params": params, "stats": state.stats, "log_history": trainer.state.log_history},
               out / f"rank{trainer.args.process_index}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main(Path(sys.argv[1]))
    sys.stdout.flush()
    os._exit(0)  # no interpreter teardown: gloo may still hold a hook's tensors (README: Reliability)
