"""A zoo train run that dies (os._exit, as a SIGKILL would leave it) at one phase of its second checkpoint.

Usage: kill_during_checkpoint.py PHASE ZOO_TRAIN_ARGS...   PHASE: before-weights, after-weights, after-state,
between-renames, after-swap. The phases are reached by wrapping the functions the save calls; the zoo itself
has no test hooks."""
import os
import sys

import zoo.files
import zoo.train.trainer as trainer
from zoo.cli import main

phase, args = sys.argv[1], sys.argv[2:]
saves = {"n": 0}
real_save, real_state, real_rename = trainer.save, trainer.save_trainer_state, os.rename


def die() -> None:
    sys.stdout.flush()
    os._exit(9)


def save(*a, **k):
    saves["n"] += 1
    if saves["n"] == 2 and phase == "before-weights":
        die()
    out = real_save(*a, **k)
    if saves["n"] == 2 and phase == "after-weights":
        die()
    return out


def save_state(*a, **k):
    real_state(*a, **k)
    if saves["n"] == 2 and phase == "after-state":
        die()


renames = {"n": 0}


def rename(src, dst):
    real_rename(src, dst)
    if saves["n"] == 2:
        renames["n"] += 1
        if (phase, renames["n"]) in (("between-renames", 1), ("after-swap", 2)):
            die()


trainer.save, trainer.save_trainer_state = save, save_state
zoo.files.os.rename = rename
sys.exit(main(["train", *args]))
