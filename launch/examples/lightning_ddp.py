"""threelc in PyTorch Lightning on 2 CPU processes (README: "Use it with Lightning").

    torchrun --standalone --nproc-per-node 2 launch/examples/lightning_ddp.py OUT_DIR
    python launch/examples/lightning_ddp.py --spawn OUT_DIR        # Lightning's ddp_spawn

Each rank writes OUT_DIR/rank<r>.pt (final parameters, state.stats, logged metrics);
rank 0's logger writes OUT_DIR/lightning_logs/.../metrics.csv. tests/test_integrations.py
runs both and checks them.
"""

import argparse
import os
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from threelc.hooks import ThreeLCState
from threelc.hooks.lightning import ThreeLCStatsLogger, ThreeLCStrategy


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(32, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class SaveRank(L.Callback):
    """Saves what the test compares, in every worker (also under ddp_spawn)."""

    def __init__(self, out: Path, stats_logger: ThreeLCStatsLogger):
        self.out, self.stats_logger = out, stats_logger

    def on_train_end(self, trainer, pl_module):
        torch.save({"params": {k: v.detach().clone() for k, v in pl_module.state_dict().items()},
                    "stats": trainer.strategy.threelc_state.stats, "metrics": self.stats_logger.metrics},
                   self.out / f"rank{trainer.global_rank}.pt")


def data():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 32, generator=generator)
    return DataLoader(TensorDataset(x, x[:, :1] * 2 - x[:, 1:2]), batch_size=32)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--spawn", action="store_true", help="Lightning's ddp_spawn instead of torchrun")
    args = parser.parse_args()
    L.seed_everything(0)
    # --- README: Use it with Lightning ---
    strategy = ThreeLCStrategy(ThreeLCState(sparsity=1.0, transport="allgather"),
                               start_method="spawn" if args.spawn else "popen")
    stats = ThreeLCStatsLogger()  # threelc/ratio, bytes, codec time to every logger
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=strategy, callbacks=[stats, SaveRank(args.out, stats)],
                        logger=CSVLogger(args.out), log_every_n_steps=2, max_steps=8,
                        enable_checkpointing=False)
    trainer.fit(Regression(), data())
    # --- end ---


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
    os._exit(0)  # no interpreter teardown: gloo may still hold a hook's tensors (README: Reliability)
