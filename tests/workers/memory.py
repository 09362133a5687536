"""Run under torchrun (or as one process): one training step of a tiny variant, then each rank's bytes
of parameters, gradients and AdamW state, from the storage of the tensors it holds, the peak of what
setting the run up allocated (building and initializing the model), and whether the initial weights,
gathered, equal a single-process build's of the same seed bit for bit; JSON to OUT.

Usage: memory.py OUT NAME ZOO_TRAIN_OPTIONS..."""
import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from zoo.builder import build_model, empty_model
from zoo.cli import _train_config, build_parser
from zoo.distributed.memory import allocation_peak, rank_bytes
from zoo.distributed.parallelize import parallelize
from zoo.distributed.world import close_process_group, init_distributed, rank_and_world
from zoo.train.trainer import Trainer

out, name, *rest = sys.argv[1:]
args = build_parser().parse_args(["train", name, *rest, "--out", str(Path(out).parent / "run")])
tc = _train_config(args)
joined = init_distributed(tc.dist_timeout)
trainer = Trainer(name, args.set or None, tc, out_dir=Path(out).parent / "run", progress=False)
torch.manual_seed(tc.seed)
single = build_model(trainer.cfg).state_dict()
init_equal = all(torch.equal(p.full_tensor() if isinstance(p, DTensor) else p, single[k.removeprefix("module.")].to(p.dtype))
                 for k, p in trainer.model.state_dict().items())
_, init_peak = allocation_peak(lambda: parallelize(trainer.cfg, trainer.layout, device=trainer.device))
trainer.run(stop_after=1, progress=False)
record = {**rank_bytes(trainer.model, trainer.opt), "init_peak": init_peak, "init_equal": init_equal,
          "largest_param": max(p.numel() * p.element_size() for p in empty_model(trainer.cfg).parameters()),
          "model_params": sum(p.numel() * p.element_size() for p in empty_model(trainer.cfg).parameters())}
rank, world = rank_and_world()
Path(f"{out}.{rank}").write_text(json.dumps(record))
if joined:
    close_process_group()
