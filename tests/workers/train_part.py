"""Run under torchrun: the first STOP steps of a zoo train run (the resume test's interrupted run).

Usage: train_part.py OUT DATA STOP ZOO_TRAIN_ARGS... (the options of `zoo train` after its NAME)."""
import sys

from zoo.cli import _train_config, build_parser
from zoo.distributed.world import close_process_group, init_distributed
from zoo.train.trainer import train

out, data, stop, *rest = sys.argv[1:]
args = build_parser().parse_args(["train", *rest, "--data", data, "--out", out])
tc = _train_config(args)
init_distributed(tc.dist_timeout)
train(args.source, args.set or None, tc, out_dir=out, progress=False, stop_after=int(stop))
close_process_group()
