"""Scale-out on torch.distributed: layouts on a DeviceMesh (DDP, FSDP2, HSDP, expert parallel), activation
checkpointing, sharded initialization, DCP checkpoints and the memory planner. It wraps the plain model
from outside; nothing in zoo/model or zoo/moe imports it."""
