"""One rank of the context-parallel tests (test_cp.py starts world_size of these):
``python cp_worker.py WORLD RANK PORT OUT_DIR DEVICE JOBS``, JOBS a comma list of
``op:<case>`` (cp_cases.CASES) and ``layer:<mode>``; writes OUT_DIR/<job>.rank<RANK>.pt."""

import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "0" if "cuda" in sys.argv[5] else "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import cp_cases  # noqa: E402


def main():
    world, rank, port, out_dir, device, jobs = sys.argv[1:7]
    world, rank = int(world), int(rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        for job in jobs.split(","):
            kind, name = job.split(":")
            if kind == "op":
                res = cp_cases.run_rank(name, device, world, rank, group=dist.group.WORLD)
            else:
                res = cp_cases.run_layer(name, world, rank, group=dist.group.WORLD)
            torch.save({n: v.cpu() for n, v in res.items()},
                       os.path.join(out_dir, f"{kind}-{name}.rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
