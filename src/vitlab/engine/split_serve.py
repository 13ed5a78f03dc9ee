"""``vitlab serve-split``: ED-ViT (arXiv:2410.11650) distributed inference, one process per sub-model.

The calling process is rank 0: it holds part 0 and the fusion head and spawns one worker process per other part
(``torch.multiprocessing``, spawn). All join one ``torch.distributed`` group on 127.0.0.1 (gloo; NCCL when CUDA has
a GPU per part). Per request rank 0 broadcasts the input batch, every rank runs its part, the logits (padded to the
widest part, plus each rank's forward seconds) are gathered to rank 0, which fuses them. The tensors travel through
``torch.distributed``; the few control words ("run a (B, C, H, W) batch", "stop") through one queue per worker,
so an idle server waits on queues, not on collectives, and the collective timeout is a per-request bound.

Failure is loud: a worker that dies or stops answering makes the next collective fail (connection closed, or the
``timeout_s`` gloo/NCCL timeout), and rank 0 raises ``SplitServeError`` naming the worker, its exit code and its
last error; the server is then closed. Workers exit on their own when rank 0's process goes away.
No official code exists; the process layout (rank 0 = caller) and the queue-based control are vitlab's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import signal
import socket
import sys
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import VitlabError
from .split_run import load_fusion, load_part, read_manifest

__all__ = ["ServeResult", "SplitServeError", "SplitServer", "pick_backend", "serve_dataset", "serve_images"]


class SplitServeError(VitlabError, RuntimeError):
    """A split-serving process died, timed out or failed; the server is closed."""


@dataclass
class ServeResult:
    logits: torch.Tensor  # (B, num_classes), fused, on CPU
    part_seconds: list[float] = field(default_factory=list)  # forward time of each rank's part
    seconds: float = 0.0  # end to end at rank 0: broadcast, forward, gather, fusion


def pick_backend(backend: str, world_size: int) -> str:
    """``auto``: NCCL when CUDA has at least one GPU per process, else gloo (CPU tensors)."""
    if backend not in ("auto", "gloo", "nccl"):
        raise ValueError(f"--backend must be auto, gloo or nccl, got {backend!r}")
    cuda_fits = torch.cuda.is_available() and torch.cuda.device_count() >= world_size
    if backend == "nccl" and not cuda_fits:
        raise ValueError(f"--backend nccl needs {world_size} CUDA devices (one per part); use gloo")
    return "nccl" if backend == "nccl" or (backend == "auto" and cuda_fits) else "gloo"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _device(backend: str, rank: int) -> torch.device:
    return torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")


def _run_part(part: nn.Module, x: torch.Tensor, width: int) -> torch.Tensor:
    """(B, width + 1): the part's logits zero-padded to ``width``, then its forward seconds in the last column."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = part(x)
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
    seconds = time.perf_counter() - t0
    padded = torch.zeros(x.shape[0], width + 1, device=x.device)
    padded[:, : out.shape[1]] = out
    padded[:, -1] = seconds
    return padded


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _worker(rank: int, cfg: dict[str, Any], control: Any, errors: Any) -> None:
    """Worker process ``rank``: load its part, join the group, then serve requests until told to stop."""
    try:
        torch.set_num_threads(cfg["threads"])
        device = _device(cfg["backend"], rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        part = load_part(cfg["path"], cfg["manifest"], rank).to(device)
        errors.put(("ready", rank, ""))
        dist.init_process_group(
            cfg["backend"],
            init_method=f"tcp://127.0.0.1:{cfg['port']}",
            rank=rank,
            world_size=cfg["world"],
            timeout=timedelta(seconds=cfg["timeout_s"]),
        )
        parent = mp.parent_process()
        while True:
            try:
                cmd = control.get(timeout=1.0)
            except queue.Empty:
                if parent is not None and not parent.is_alive():
                    return  # rank 0 is gone: nobody will ask again
                continue
            if cmd[0] == "stop":
                break
            x = torch.empty(cmd[1], device=device)
            dist.broadcast(x, src=0)
            dist.gather(_run_part(part, x, cfg["width"]), dst=0)
        dist.destroy_process_group()
    except Exception as e:  # the reason reaches rank 0's error; the exit closes this rank's sockets
        errors.put(("error", rank, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
        sys.exit(1)  # the message went to rank 0; no second traceback on stderr


class SplitServer:
    """Serve a split directory with one process per part (use as a context manager, or ``start`` / ``close``).

    Args:
        path: a directory written by ``vitlab split``.
        backend: ``auto`` / ``gloo`` / ``nccl`` (``pick_backend``).
        timeout_s: the longest one request may wait on another process before ``SplitServeError``.
        start_timeout_s: the longest the workers may take to load their parts.
        threads: torch threads per process (default: the CPU cores shared out evenly).
    """

    def __init__(
        self,
        path: str | Path,
        backend: str = "auto",
        timeout_s: float = 60.0,
        start_timeout_s: float = 300.0,
        threads: int | None = None,
    ) -> None:
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        self.path = Path(path)
        self.manifest = read_manifest(path)
        self.world = len(self.manifest["parts"])
        self.backend = pick_backend(backend, self.world)
        self.timeout_s, self.start_timeout_s = float(timeout_s), float(start_timeout_s)
        self.threads = threads or max(1, (os.cpu_count() or 1) // self.world)
        self.width = max(len(p["classes"]) for p in self.manifest["parts"])
        self._procs: list[Any] = []
        self._control: list[Any] = []
        self._errors: Any = None
        self._started = False
        self._broken: str | None = None

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers (ranks 1..N-1)."""
        return [p.pid for p in self._procs]

    def start(self) -> SplitServer:
        if self._started:
            return self
        if dist.is_initialized():
            raise SplitServeError(
                "this process already belongs to a torch.distributed group; serve the split elsewhere"
            )
        self.device = _device(self.backend, 0)
        self.part = load_part(self.path, self.manifest, 0).to(self.device)
        self.fusion = load_fusion(self.path, self.manifest).to(self.device)
        ctx = mp.get_context("spawn")
        self._errors = ctx.Queue()
        cfg = {
            "path": str(self.path),
            "manifest": self.manifest,
            "backend": self.backend,
            "port": _free_port(),
            "world": self.world,
            "timeout_s": self.timeout_s,
            "threads": self.threads,
            "width": self.width,
        }
        try:
            for rank in range(1, self.world):
                control = ctx.Queue()
                proc = ctx.Process(target=_worker, args=(rank, cfg, control, self._errors), daemon=True)
                proc.start()
                self._procs.append(proc)
                self._control.append(control)
            self._wait_ready()
            torch.set_num_threads(self.threads)
            dist.init_process_group(
                self.backend,
                init_method=f"tcp://127.0.0.1:{cfg['port']}",
                rank=0,
                world_size=self.world,
                timeout=timedelta(seconds=self.timeout_s),
            )
        except BaseException:
            self._kill()
            raise
        self._started = True
        return self

    def _wait_ready(self) -> None:
        ready, deadline = set(), time.monotonic() + self.start_timeout_s
        while len(ready) < self.world - 1:
            try:
                kind, rank, msg = self._errors.get(timeout=0.5)
            except queue.Empty:
                dead = [(i + 1, p.exitcode) for i, p in enumerate(self._procs) if p.exitcode is not None]
                if dead:
                    rank, code = dead[0]
                    raise SplitServeError(f"split worker rank {rank} {_exit_text(code)} while starting") from None
                if time.monotonic() > deadline:
                    raise SplitServeError(
                        f"split workers {sorted(set(range(1, self.world)) - ready)} did not load their parts "
                        f"within {self.start_timeout_s:.0f} s"
                    ) from None
                continue
            if kind == "error":
                raise SplitServeError(f"split worker rank {rank} failed to start: {msg.splitlines()[0]}")
            ready.add(rank)

    def infer(self, x: torch.Tensor) -> ServeResult:
        """Fused logits for a normalised batch ``x`` (B, C, H, W), with each rank's forward time."""
        if self._broken:
            raise SplitServeError(f"the split server is closed after an earlier failure: {self._broken}")
        if not self._started:
            raise SplitServeError("the split server is not started; use `with SplitServer(...) as server:`")
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images (B, C, H, W), got shape {tuple(x.shape)}")
        t0 = time.perf_counter()
        x = x.detach().to(self.device, torch.float32).contiguous()
        try:
            for control in self._control:
                control.put(("run", tuple(x.shape)))
            dist.broadcast(x, src=0)
            mine = _run_part(self.part, x, self.width)
            gathered = [torch.empty_like(mine) for _ in range(self.world)]
            dist.gather(mine, gathered, dst=0)
        except Exception as e:  # gloo / NCCL: connection closed by a dead peer, or the timeout
            self._fail(e)
        z = torch.cat([g[:, : len(p["classes"])] for g, p in zip(gathered, self.manifest["parts"], strict=True)], 1)
        with torch.inference_mode():
            logits = self.fusion(z).cpu()
        seconds = time.perf_counter() - t0
        return ServeResult(logits, [float(g[0, -1]) for g in gathered], seconds)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.infer(x).logits

    def _fail(self, error: Exception) -> None:
        time.sleep(0.5)  # let a dying worker's exit code and last message arrive
        reports: dict[int, str] = {}
        while True:
            try:
                kind, rank, msg = self._errors.get_nowait()
            except (queue.Empty, OSError, ValueError):
                break
            if kind == "error":
                reports[rank] = msg.splitlines()[0][:160]
        dead = {i + 1: p.exitcode for i, p in enumerate(self._procs) if p.exitcode is not None}
        silent = [r for r in range(1, self.world) if r not in dead and r not in reports]
        if dead:
            cause = "; ".join(f"worker rank {r} (part {r}) {_exit_text(c)}" for r, c in dead.items())
        elif silent:
            cause = f"worker rank(s) {silent} did not answer within {self.timeout_s:g} s (hung or stopped)"
        else:
            cause = "every worker failed"
        others = "; ".join(f"rank {r}: {m}" for r, m in reports.items() if r not in dead)
        first = (str(error).strip().splitlines() or [""])[0][:160]
        self._broken = f"{cause} [rank 0: {type(error).__name__}: {first}]" + (f" [{others}]" if others else "")
        self.close()
        raise SplitServeError(f"split inference failed: {self._broken}") from error

    def _kill(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=5)

    def close(self) -> None:
        """Stop the workers and leave the process group (safe to call twice)."""
        if self._started and not self._broken:
            for control in self._control:
                control.put(("stop",))
            for p in self._procs:
                p.join(timeout=10)
        self._kill()
        if dist.is_initialized() and self._started:
            dist.destroy_process_group()
        self._started = False
        self._procs, self._control = [], []

    def __enter__(self) -> SplitServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_dataset(
    path: str | Path,
    dataset: str = "fashion_mnist",
    test_subset: int = 0,
    batch_size: int = 64,
    data_dir: str | None = None,
    **server: Any,
) -> dict[str, Any]:
    """Top-1 (%) of the served split over a test set, with mean per-rank forward and end-to-end ms per batch."""
    from .split_run import load_data

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    manifest = read_manifest(path)
    x, y = load_data(manifest["host"], None, "test", test_subset, 0, dataset, data_dir)
    correct, part_s, total_s, batches = 0, [0.0] * len(manifest["parts"]), 0.0, 0
    with SplitServer(path, **server) as srv:
        for i in range(0, len(x), batch_size):
            res = srv.infer(x[i : i + batch_size])
            correct += int((res.logits.argmax(1) == y[i : i + batch_size]).sum())
            part_s = [a + b for a, b in zip(part_s, res.part_seconds, strict=True)]
            total_s, batches = total_s + res.seconds, batches + 1
    return {
        "top1": round(100.0 * correct / len(y), 3),
        "images": len(y),
        "processes": len(part_s),
        "backend": srv.backend,
        "part_ms": [round(1000 * s / batches, 3) for s in part_s],
        "end_to_end_ms": round(1000 * total_s / batches, 3),
        "batch_size": batch_size,
    }


def serve_images(
    path: str | Path, images: list[str | Path], topk: int = 3, **server: Any
) -> list[tuple[str, list[tuple[str, float]]]]:
    """(image, [(class, probability), ...] best first) for image files, served one process per part."""
    from ..data import load_image, match_channels, normalize, resize_batch

    if topk < 1:
        raise ValueError(f"--topk must be >= 1, got {topk}")
    host = read_manifest(path)["host"]
    xs = [load_image(p, in_chans=host["in_chans"])[None] for p in images]
    x = torch.cat(
        [
            resize_batch(normalize(match_channels(t, host["in_chans"]), host["mean"], host["std"]), host["img_size"])
            for t in xs
        ]
    )
    with SplitServer(path, **server) as srv:
        probs = srv(x).softmax(-1)
    out = []
    for name, row in zip(images, probs, strict=True):
        p, i = row.topk(min(topk, row.numel()))
        out.append(
            (str(name), [(host["classes"][j], round(v, 5)) for v, j in zip(p.tolist(), i.tolist(), strict=True)])
        )
    return out
