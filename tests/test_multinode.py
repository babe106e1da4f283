"""train_pretrain.py beyond one machine: two torchrun "nodes" on localhost (--nnodes 2 --nproc_per_node 1, gloo on the
CPU) end with the same checkpoint as one node with two processes (--nproc_per_node 2), bit for bit, with dropout and
corruption on, both with c10d rendezvous and with the static form (--node_rank, --master_addr, --master_port).

Why exactly: everything a process does is a function of its global rank (the window shard of training.epoch_order, the
seed seed * 1000 + rank of its dropout and corruption), never of its node, and a sum of two processes' values is the
same in either order. Which node becomes rank 0 therefore does not matter, and each test starts the node that will NOT
be rank 0 first, so that the order the nodes come up in cannot be what makes it pass:
  - c10d gives group ranks in the sorted order of the nodes' (address, agent pid) (torch's dynamic_rendezvous), not in
    the order they join: here --local_addr 127.0.0.1 sorts before --local_addr localhost whatever the start order.
  - static: --node_rank says it (node 1 started first, waiting for node 0's store).
OMP_NUM_THREADS=1 in every process: torchrun sets it only when --nproc_per_node > 1, and another intra-op thread count
changes float rounding (two single-process nodes with torch's default threads end ~1e-5 away from the one-node run).
"""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import runs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
        "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800", "--data.num_workers", "0",
        "--data.val_split", "train", "--train.log_every", "1", "--train.max_steps", "3", "--train.grad_accum", "2",
        "--train.batch_size", "1"]         # dropout 0.1 and jitter/zero corruption: the tiny config's, left on
JOB_S = 120         # a whole job, every process of it; a node left alone gives up on the rendezvous after RDZV_S
RDZV_S = 30
TIMING = ("windows_per_s", "s_per_step")


def free_port() -> str:
    with socket.socket() as probe:                  # a fixed port can be held by another job
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def torchrun(launch: list[str], nights, run_dir) -> list[str]:
    # --run-dir, not --run: torchrun 2.13 rejects --run as an ambiguous abbreviation of its own --run-path
    return [sys.executable, "-m", "torch.distributed.run", *launch, "train_pretrain.py", *TINY,
            "--data.root", str(nights), "--run-dir", str(run_dir)]


def run_nodes(commands: list[list[str]], logs: list, gap_s: float = 0.0, check: bool = True) -> list[int]:
    """Start every command (a torchrun "node", each in its own process group), `gap_s` apart, and wait for all of them
    within JOB_S; on the time-out, or with `check` on the first failure, kill every process group left (agents and
    their workers) and, with `check`, fail with the logs. -> the exit statuses (-9: killed here)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    jobs = []
    try:
        for command, log in zip(commands, logs, strict=True):
            if jobs:
                time.sleep(gap_s)
            with open(log, "w") as out:         # the child keeps its own copy of the descriptor
                jobs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                             start_new_session=True))
        deadline = time.monotonic() + JOB_S
        # until all have ended, one has failed (with `check`: its peers would wait on it in a collective) or the time
        # is up
        while time.monotonic() < deadline and any(job.poll() is None for job in jobs):
            if check and any(job.poll() not in (None, 0) for job in jobs):
                break
            time.sleep(0.2)
    finally:
        for job in jobs:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    failed = [(log, job.returncode) for job, log in zip(jobs, logs) if job.returncode != 0]
    assert not (check and failed), "\n".join(f"{log}: exit {rc}{' (killed by the test)' if rc == -9 else ''}\n"
                                 f"{open(log).read()[-3000:]}"
                                 for log, rc in failed)
    return [job.returncode for job in jobs]


def is_rank0(log) -> bool:
    """Only rank 0 prints the opening line (and writes the run folder)."""
    return "\npretraining " in "\n" + open(log).read().replace("\r", "\n")


@pytest.fixture(scope="module")
def one_node(shhs_nights, tmp_path_factory):
    """The reference: torchrun --nproc_per_node 2 on one node."""
    folder = tmp_path_factory.mktemp("one_node")
    run_nodes([torchrun(["--nproc_per_node", "2", "--master_port", free_port()], shhs_nights, folder / "run")],
              [folder / "node.log"])
    return folder / "run"


def assert_same_run(run, reference) -> None:
    """The same final checkpoint exactly: weights, optimiser state, every process's RNG state, progress; and the same
    metrics.jsonl (timings aside), written once (by rank 0 only)."""
    got, expected = runs.read_run(run).checkpoint, runs.read_run(reference).checkpoint
    assert got["step"] == expected["step"] == 3
    assert got["model"].keys() == expected["model"].keys()
    for key in expected["model"]:
        assert torch.equal(got["model"][key], expected["model"][key]), key
    for index, state in expected["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(got["optimizer"]["state"][index][name], value), (index, name)
    assert len(got["rng_cpu"]) == len(expected["rng_cpu"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(got["rng_cpu"], expected["rng_cpu"]))   # dropout draws: the same
    logged, wanted = ([{k: v for k, v in m.items() if k not in TIMING} for m in runs.read_metrics(r)]
                      for r in (run, reference))
    assert logged == wanted
    assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3]
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]      # no temporary file left behind


def test_two_c10d_nodes_equal_one_node(shhs_nights, tmp_path, one_node):
    port, rdzv_id = free_port(), f"test-{os.getpid()}-{time.monotonic_ns()}"
    nodes = [["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_endpoint",
              f"localhost:{port}", "--rdzv_id", rdzv_id, "--rdzv_conf", f"join_timeout={RDZV_S}",
              "--local_addr", address] for address in ("localhost", "127.0.0.1")]
    logs = [tmp_path / "localhost.log", tmp_path / "127.0.0.1.log"]
    run_nodes([torchrun(node, shhs_nights, tmp_path / "run") for node in nodes], logs, gap_s=0.5)
    # the node that joined second is rank 0: c10d orders nodes by address, not by arrival
    assert [is_rank0(log) for log in logs] == [False, True]
    assert_same_run(tmp_path / "run", one_node)


def test_two_static_nodes_equal_one_node(shhs_nights, tmp_path, one_node):
    port = free_port()
    nodes = [["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", rank, "--master_addr", "localhost",
              "--master_port", port, "--rdzv_conf", f"timeout={RDZV_S}"] for rank in ("1", "0")]
    logs = [tmp_path / "node1.log", tmp_path / "node0.log"]
    run_nodes([torchrun(node, shhs_nights, tmp_path / "run") for node in nodes], logs, gap_s=0.5)
    assert [is_rank0(log) for log in logs] == [False, True]
    assert_same_run(tmp_path / "run", one_node)


def test_nodes_that_see_different_run_folders_stop_with_one_line_instead_of_hanging(shhs_nights, tmp_path, one_node):
    """--resume where node 0 sees the run at step 3 and node 1 an empty folder (no shared filesystem): without the
    check, rank 1 starts from step 0, the collectives pair wrong steps and the job hangs. Both stop, saying why."""
    import shutil
    shutil.copytree(one_node, tmp_path / "seen")
    port = free_port()
    nodes = [["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", rank, "--master_addr", "localhost",
              "--master_port", port, "--rdzv_conf", f"timeout={RDZV_S}"] for rank in ("1", "0")]
    logs = [tmp_path / "node1.log", tmp_path / "node0.log"]
    codes = run_nodes([[*torchrun(node, shhs_nights, tmp_path / folder), "--resume", "--train.max_steps", "5"]
                       for node, folder in zip(nodes, ("empty", "seen"))], logs, gap_s=0.5, check=False)
    assert all(code not in (0, -9) for code in codes), codes                     # both failed, neither was hung
    said = open(logs[1]).read()
    assert "the processes would resume from different steps (-1 to 3; -1: no checkpoint): every node must see the " \
           "same run folder (a shared filesystem)" in said, said[-2000:]
    assert runs.read_run(tmp_path / "seen").checkpoint["step"] == 3            # nothing was trained or written
