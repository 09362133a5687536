"""Run under torchrun: resume a run from its sharded checkpoint at this world size and layout, gather the
whole state (weights, AdamW moments and steps) and write it from rank 0 as safetensors to OUT.

Usage: dcp_state.py OUT RUN NAME ZOO_TRAIN_OPTIONS..."""
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

from zoo.cli import _train_config, build_parser
from zoo.distributed.world import close_process_group, init_distributed, rank_and_world
from zoo.train.trainer import Trainer

out, run, name, *rest = sys.argv[1:]
args = build_parser().parse_args(["train", name, *rest, "--out", run])
tc = _train_config(args)
init_distributed(tc.dist_timeout)
trainer = Trainer(name, args.set or None, tc, out_dir=run, resume=True, progress=False)
model_sd, optim_sd = get_state_dict(trainer.model, trainer.opt,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank_and_world()[0] == 0:
    tensors = {f"model.{k}": v for k, v in model_sd.items()}
    for fqn, state in optim_sd["state"].items():
        for key, value in state.items():
            tensors[f"optim.{fqn}.{key}"] = torch.as_tensor(value).contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, out)
close_process_group()
