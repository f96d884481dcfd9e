"""Functions run by epdiff.distributed.launch in spawned workers (module level: picklable)."""

import os
import time

import torch
import torch.distributed as dist


def rank_two_fails_while_others_wait(device):
    if dist.get_rank() == 2:
        time.sleep(0.5)
        raise RuntimeError("planted failure in rank two")
    dist.all_reduce(torch.ones(1))  # never completes: rank 2 is gone
    time.sleep(600)


def sum_of_ranks(device):
    x = torch.tensor([float(dist.get_rank())])
    dist.all_reduce(x)
    return x.item()


def record_pid_and_wait(device, folder):
    with open(os.path.join(folder, f"worker{dist.get_rank()}.pid"), "w") as f:
        f.write(str(os.getpid()))
    dist.all_reduce(torch.ones(1))
    time.sleep(600)
