"""Run a function in several gloo processes on 127.0.0.1 and collect what each rank returns.

    results = run_distributed(fn, world_size=4, args=(...,), timeout=120)

`fn(rank, world_size, *args)` must be defined at module level (it is pickled for spawn). The process
group is initialised before `fn` runs and destroyed after. An exception on any rank is re-raised in
the test with that rank's traceback; a rank that hangs past `timeout` fails the test, and every
child is killed before returning, so no stray processes outlive a test.
"""
import os
import socket
import traceback

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(fn, rank, world_size, port, args, queue):
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(seconds=120))
        try:
            result = fn(rank, world_size, *args)
        finally:
            dist.destroy_process_group()
        queue.put((rank, True, result))
    except BaseException:  # report everything, including KeyboardInterrupt, to the parent
        queue.put((rank, False, traceback.format_exc()))


def run_distributed(fn, world_size, args=(), timeout=180.0):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, r, world_size, port, args, queue), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, []
    try:
        import queue as queue_mod
        import time

        deadline = time.monotonic() + timeout
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"distributed test timed out after {timeout}s; "
                                   f"ranks done: {sorted(results)}")
            try:
                rank, ok, payload = queue.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0)]
                if dead and len(results) + len(errors) < world_size:
                    # A rank died without reporting (segfault, os._exit): give the others a moment.
                    time.sleep(1.0)
                    if queue.empty():
                        raise RuntimeError(f"rank(s) {dead} exited with codes "
                                           f"{[procs[i].exitcode for i in dead]} without reporting")
                continue
            if ok:
                results[rank] = payload
            else:
                errors.append((rank, payload))
                break
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank, tb = errors[0]
        raise RuntimeError(f"rank {rank} failed:\n{tb}")
    return [results[r] for r in range(world_size)]
