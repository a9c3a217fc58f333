"""Data-parallel training across MPI ranks: the communicator the trainer talks to.

The trainer speaks to one small interface — ``rank``, ``size``, ``allreduce`` (an in-place
sum of a float array), ``bcast``, ``allgather``, ``local_size`` and ``abort`` — that
:class:`SelfComm` (one process: every call is a no-op or an identity) and :class:`MPIComm`
(an mpi4py communicator) both implement, so a single process and N ranks run one code path.

mpi4py is imported only when a communicator is given or the process was started by
``mpiexec`` (:func:`launched`): ``import fastbptt`` never initializes MPI.  Errors are made
collective so that no rank waits forever for one that left: :func:`agree` (every rank ran
the same check) and :func:`agree_root` (rank 0 alone did the work: reading a checkpoint,
writing one) raise the same exception on every rank; :func:`guard` aborts the whole job
(``MPI_Abort``, exit 2) when an exception reaches it on one rank only.
"""
from __future__ import annotations

import contextlib
import os
import pickle
import sys
import time

import numpy as np

from ._preflight import require_mpi

#: environment variables by which launchers tell a process the size of its job: Open MPI,
#: MPICH / Intel MPI (Hydra) and Slurm's srun with PMI-2, MVAPICH2 (and, with PMIX_RANK set,
#: srun --mpi=pmix's SLURM_STEP_NUM_TASKS)
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE")
#: ... and the number of ranks on this node (Hydra, Open MPI)
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")
#: the exit code of a job that one rank's error ended (the command line's usage-error code)
EXIT_ABORT = 2
#: seconds between a rank's last message and MPI_Abort: mpiexec forwards each rank's output
#: on its own schedule and ends the job at the abort, dropping what it has not forwarded yet
ABORT_GRACE = 0.5


def launched():
    """The job size the launcher announced in the environment (``mpiexec -n N``), or 1: a
    plain process.  Read from the environment only: nothing is imported."""
    names = SIZE_VARIABLES
    if "PMIX_RANK" in os.environ:          # srun --mpi=pmix: the step's task count
        names += ("SLURM_STEP_NUM_TASKS",)
    for name in names:
        try:
            return max(1, int(os.environ[name]))
        except (KeyError, ValueError):
            continue
    return 1


#: ... and the rank of this process in it
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK", "PMIX_RANK")


def launched_rank():
    """This process's rank as the launcher announced it (0 for a plain process), read from
    the environment only: for what must be said once before MPI starts (a usage error)."""
    for name in RANK_VARIABLES:
        try:
            return int(os.environ[name])
        except (KeyError, ValueError):
            continue
    return 0


class SelfComm:
    """One process: rank 0 of 1.  The reductions are identities, so the trainer's data-
    parallel path costs nothing without MPI."""

    rank, size = 0, 1

    def allreduce(self, buf):
        """Sum ``buf`` over the ranks in place: here, nothing to add."""
        return buf

    def bcast(self, obj):
        return obj

    def allgather(self, obj):
        return [obj]

    def local_size(self):
        return 1

    def abort(self, code=EXIT_ABORT):
        sys.exit(code)


class MPIComm:
    """An mpi4py communicator behind :class:`SelfComm`'s interface."""

    def __init__(self, comm):
        from mpi4py import MPI
        self._MPI, self.comm = MPI, comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self._local = None

    def allreduce(self, buf):
        """Sum ``buf`` (a contiguous float array) over the ranks in place: one MPI_Allreduce."""
        self.comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        return buf

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def local_size(self):
        """Ranks of this communicator on this node (that share its cores and memory)."""
        if self._local is None:
            node = self.comm.Split_type(self._MPI.COMM_TYPE_SHARED, key=self.rank)
            self._local = node.Get_size()
            node.Free()
        return self._local

    def abort(self, code=EXIT_ABORT):
        """End every rank of the job with ``code`` (and this one at once: MPI_Abort may return),
        ABORT_GRACE seconds after flushing this rank's output, so that mpiexec prints it."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self.comm.Abort(code)
        os._exit(code)


def communicator(comm=None):
    """The communicator to train on: ``comm`` (an mpi4py ``Comm``, or anything with
    :class:`SelfComm`'s interface) if given; else MPI_COMM_WORLD when the process was
    started by mpiexec with more than one rank; else :class:`SelfComm`.  MissingExtra
    (exit 2 on the command line) when mpiexec started it and mpi4py is missing."""
    if comm is None:
        if launched() == 1:
            return SelfComm()
        MPI = require_mpi("mpiexec")
        comm = MPI.COMM_WORLD
        if comm.Get_size() == 1:
            return SelfComm()
        return MPIComm(comm)
    if isinstance(comm, (SelfComm, MPIComm)) or all(hasattr(comm, a) for a in ("rank", "size", "allreduce", "bcast",
                                                                                "allgather", "abort")):
        return comm
    if hasattr(comm, "Get_rank") and hasattr(comm, "Allreduce"):
        require_mpi("comm")
        return SelfComm() if comm.Get_size() == 1 else MPIComm(comm)
    raise TypeError(f"comm: expected an mpi4py communicator (e.g. MPI.COMM_WORLD) or None, got {type(comm).__name__}")


def threads_per_rank(comm, mine=None, node=None):
    """numba threads for each rank: the cores this process may run on (``mine``, its affinity)
    when the launcher bound it to fewer than the node's (``node``); else the node's cores
    over its ranks, at least 1 — so N ranks on N cores run one thread each, not N threads
    each fighting for N cores.  NUMBA_NUM_THREADS, when set, wins (None: leave it).  Every
    rank calls local_size (a collective) before deciding, whatever its own environment."""
    if comm.size == 1:
        return None
    local = comm.local_size()
    if "NUMBA_NUM_THREADS" in os.environ:
        return None
    node = node or os.cpu_count() or 1
    if mine is None:
        try:
            mine = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            mine = node
    if mine < node:
        return mine
    return max(1, node // max(1, local))


@contextlib.contextmanager
def rank_threads(comm):
    """numba's thread count set to :func:`threads_per_rank` inside the block (as it was after)."""
    n = threads_per_rank(comm)
    if n is None:
        yield None
        return
    import numba
    prev = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        yield n
    finally:
        numba.set_num_threads(prev)


# ------------------------------------------------------------------- collective errors
class _Failure:
    """An exception on its way to the other ranks: the exception when it pickles, else its
    type's name and message (raised as a RuntimeError there)."""

    def __init__(self, exc, rank):
        self.rank = rank
        try:
            pickle.dumps(exc)
            self.exc, self.text = exc, None
        except Exception:
            self.exc, self.text = None, f"{type(exc).__name__}: {exc}"

    def rebuild(self, own, my_rank):
        exc = own if self.rank == my_rank and own is not None else (self.exc or RuntimeError(self.text))
        exc.collective = True            # raised on every rank: nobody is left waiting
        exc.failed_rank = self.rank
        return exc


def is_collective(exc):
    """True when ``exc`` is raised on every rank alike (so no rank waits for another)."""
    return bool(getattr(exc, "collective", False))


def collective(exc):
    """``exc`` marked as raised on every rank alike (it follows from values all ranks share)."""
    exc.collective = True
    return exc


def agree(comm, fn):
    """``fn()`` on every rank; if it raised on any, every rank raises the exception of the
    lowest such rank (its own, where that is the rank).  One allgather."""
    own = None
    try:
        value = fn()
    except Exception as e:
        if comm.size == 1:
            raise
        own, value = e, None
    if comm.size == 1:
        return value
    failures = [f for f in comm.allgather(_Failure(own, comm.rank) if own is not None else None) if f]
    if failures:
        raise failures[0].rebuild(own, comm.rank) from None
    return value


def agree_root(comm, fn):
    """``fn()`` on rank 0 alone; its value — or its exception, raised on every rank — is
    broadcast to all.  One bcast."""
    if comm.size == 1:
        return fn()
    out = None
    if comm.rank == 0:
        try:
            out = ("ok", fn())
        except Exception as e:
            out = ("error", _Failure(e, 0), e)
    got = comm.bcast(out[:2] if out else None)
    if got[0] == "error":
        raise got[1].rebuild(out[2] if out else None, comm.rank) from None
    return got[1]


def check_same(comm, values):
    """ValueError on every rank unless the dict ``values`` is the same on every rank (the
    options each was given, the text it read): naming the first key where a rank differs
    from rank 0, so that no rank trains another model or text, or waits for a rank that
    stopped at another epoch.  One allgather."""
    if comm.size == 1:
        return
    every = comm.allgather(values)
    for rank, other in enumerate(every[1:], 1):
        for key, value in every[0].items():
            if other.get(key) != value:
                raise collective(ValueError(f"{key}: rank {rank} has {other.get(key)!r}, rank 0 {value!r}: "
                                            "every rank must train the same model on the same text"))


#: seconds a rank other than 0 that was interrupted (Ctrl-C) waits for rank 0 to end the job
#: (after saving the last epoch) before it ends the job itself
INTERRUPT_GRACE = 10.0
EXIT_INTERRUPTED = 130


@contextlib.contextmanager
def guard(comm, prog="fastbptt"):
    """An exception that leaves the block on one rank only (not :func:`is_collective`) prints
    ``PROG: error: rank R of N: …`` and aborts the job with exit 2: otherwise the other ranks
    would wait for it in their next collective call forever.  Collective ones pass through.

    Ctrl-C (KeyboardInterrupt, or an exception with ``interrupted = True``): mpiexec passes it
    to every rank, each at its own point; rank 0, which writes the last epoch's checkpoint,
    prints the message and aborts the job with exit 130; another rank gives it
    INTERRUPT_GRACE seconds to do so first (rank 0 may be waiting in an Allreduce for it)."""
    try:
        yield
    except BaseException as e:
        if comm.size == 1 or is_collective(e) or isinstance(e, (SystemExit, GeneratorExit)):
            raise
        msg = " ".join((str(e) or type(e).__name__).split())
        if isinstance(e, KeyboardInterrupt) or getattr(e, "interrupted", False):
            if comm.rank == 0:
                print(f"{prog}: {msg if str(e) else 'interrupted'}", file=sys.stderr, flush=True)
            else:
                time.sleep(INTERRUPT_GRACE)
            comm.abort(EXIT_INTERRUPTED)
            raise
        print(f"{prog}: error: rank {comm.rank} of {comm.size}: {type(e).__name__}: {msg}; "
              "ending every rank", file=sys.stderr, flush=True)
        comm.abort(EXIT_ABORT)
        raise


def pack(grads, keys, buf, scale, extra=()):
    """Copy ``grads[k]·scale`` for k in ``keys`` (then the floats ``extra``) into the flat
    ``buf``; returns the dict of views of ``buf`` that the reduced gradients will be."""
    views, i = {}, 0
    for k in keys:
        g = grads[k]
        v = buf[i:i + g.size].reshape(g.shape)
        np.multiply(g, scale, out=v)
        views[k] = v
        i += g.size
    buf[i:i + len(extra)] = extra
    return views
