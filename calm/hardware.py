"""Which device and floating-point precision to compute in: the one place that looks at the hardware.

Training, evaluation, generation and the benchmarks all ask this module; no other module tests a
CPU's or GPU's features. The models take what it finds as plain arguments (``calm.checkpoint`` tells
a loaded autoencoder which exact vocabulary-argmax screens its device runs fast). ``precision:
auto`` (the default of every preset and command) resolves once per process and device:

- CUDA: ``bf16`` (autocast) where the GPU supports it, else ``fp32``;
- CPU: ``bf16`` only where oneDNN has native bf16 kernels (AVX-512 BF16, AMX) *and* a short matmul
  probe measures bf16 faster than fp32; otherwise ``fp32``. On CPUs without native bf16 (AVX2 only,
  e.g. AMD Zen 3, most laptops) a bf16 matmul is emulated at about 1 GFLOP/s against about 60 for
  fp32, so autocast there would make training some 50 times slower.

``fp32`` and ``bf16`` stay available as explicit choices. The paper trains in bf16 on GPUs
(§7.1); on CPUs the choice is ours and only about speed: results agree to bf16 rounding.

It also chooses the number of CPU threads (:func:`configure_threads`, ours). torch starts one thread
per physical core; when another process keeps some of those cores busy, its threads wait for each
other at every parallel region and a run can be ten times slower than with fewer threads. A short
probe, run only when the load average says other processes are running, times the same loop of
small matmuls with one thread and with the default count; when the default falls far below what its
cores should give, the fastest count probed is used and a warning says so.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16")
"""Accepted values of ``train.precision`` and of every ``--precision`` option."""

PROBE_SIZE = 512
"""Side of the square matmul the CPU probe times: 0.27 GFLOP, a few ms at native speeds."""

PROBE_MIN_SPEEDUP = 1.1
"""bf16 must beat fp32 by this factor in the probe to be chosen; a tie is not worth the rounding."""


class PrecisionError(ValueError):
    """An unknown precision, or bf16 asked for on a device that cannot run it."""


@dataclass(frozen=True)
class Probe:
    """What the CPU probe found; kept for reports and benchmark JSON."""

    native_bf16: bool
    """oneDNN reports native bf16 kernels on this CPU."""
    fp32_gflops: float | None
    bf16_gflops: float | None
    """None where the probe did not time bf16 (not native: it would be emulated and slow)."""

    @property
    def bf16_fast(self) -> bool:
        if not self.native_bf16 or not self.fp32_gflops or not self.bf16_gflops:
            return False
        return self.bf16_gflops >= PROBE_MIN_SPEEDUP * self.fp32_gflops


def cpu_has_native_bf16() -> bool:
    """True where oneDNN runs bf16 matmuls natively (AVX-512 BF16 or AMX) on this CPU."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _timed_rounds(calls: list[Callable[[], object]], repeats: int) -> list[list[float]]:
    """Seconds of each call in each of ``repeats`` rounds, the calls interleaved within a round (so a burst
    of load from other processes hits them alike), after one warm-up call each (kernel selection, allocation)."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for call, spent in zip(calls, times, strict=True):
            start = time.perf_counter()
            call()
            spent.append(time.perf_counter() - start)
    return times


def _matmul_gflops(dtypes: tuple[torch.dtype, ...], size: int, repeats: int = 5) -> list[float]:
    """GFLOP/s of a size² matmul per dtype: repetitions interleaved, best of each (robust to load)."""
    pairs = [(torch.randn(size, size).to(dt), torch.randn(size, size).to(dt)) for dt in dtypes]
    times = _timed_rounds([lambda a=a, b=b: torch.mm(a, b) for a, b in pairs], repeats)
    return [2 * size**3 / min(t) / 1e9 for t in times]


@functools.cache
def cpu_probe() -> Probe:
    """Time fp32 against bf16 matmuls on this CPU, once per process (a few ms to ~0.1 s).

    bf16 is timed only where oneDNN reports native kernels: emulated bf16 runs at ~1 GFLOP/s, and
    the probe itself would then take seconds. Repetitions alternate between the two dtypes and the
    best time of each counts, so a burst of load from other processes does not decide the outcome.
    Uses the current ``torch.get_num_threads()``.
    """
    native = cpu_has_native_bf16()
    if not native:
        return Probe(native_bf16=False, fp32_gflops=_matmul_gflops((torch.float32,), PROBE_SIZE)[0], bf16_gflops=None)
    fp32, bf16 = _matmul_gflops((torch.float32, torch.bfloat16), PROBE_SIZE)
    return Probe(native_bf16=True, fp32_gflops=fp32, bf16_gflops=bf16)


def int8_matmul_available(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` (int8 × int8 → int32, exact) runs on ``device``: the decoder's int8
    vocabulary screen (``calm.models.vocab_search``) needs it. CPU only, checked once per process."""
    return torch.device(device).type == "cpu" and _cpu_int_mm_works()


@functools.cache
def _cpu_int_mm_works() -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    try:
        torch._int_mm(torch.ones(4, 8, dtype=torch.int8), torch.ones(8, 4, dtype=torch.int8))
    except (RuntimeError, NotImplementedError):
        return False
    return True


INT8_SPEEDUP_NEEDED = 2.0
"""How much faster than fp32 an int8 matmul must run for the int8 vocabulary screen to pay (its overheads:
group maxima, windows, re-scoring); with VNNI it runs about 4x faster, without it (AVX2 only, e.g. AMD
Zen 3) ``torch._int_mm`` measured 18x *slower* than fp32 on a 2-core VM."""


def int8_matmul_is_fast(device: torch.device | str) -> bool:
    """Whether ``torch._int_mm`` runs on ``device`` at least ``INT8_SPEEDUP_NEEDED`` times as fast as an fp32
    matmul of the same shape (timed once per process, medians of 3): where the decoder's int8 screen pays."""
    return int8_matmul_available(device) and _cpu_int8_speedup() >= INT8_SPEEDUP_NEEDED


@functools.cache
def _cpu_int8_speedup() -> float:
    """fp32 matmul time / int8 ``_int_mm`` time at a vocabulary-screen shape (32 rows, d = 256, 4,096 ids)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (32, 256), dtype=torch.int8, generator=g)
    b = torch.randint(-127, 128, (4096, 256), dtype=torch.int8, generator=g)
    a_float, b_float = a.float(), b.float()
    calls = [lambda: torch._int_mm(a, b.t()), lambda: torch.nn.functional.linear(a_float, b_float)]
    int8, fp32 = (statistics.median(t) for t in _timed_rounds(calls, repeats=3))
    return fp32 / max(int8, 1e-9)


def default_device() -> torch.device:
    """CUDA where a GPU is present, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _device(device: torch.device | str | None) -> torch.device:
    return default_device() if device is None else torch.device(device)


def bf16_is_fast(device: torch.device | str | None = None) -> bool:
    """Whether bf16 matmuls run faster than fp32 on ``device`` (CPU: native kernels + the probe)."""
    device = _device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_probe().bf16_fast
    return False


def resolve_precision(requested: str, device: torch.device | str | None = None) -> str:
    """Turn ``auto | fp32 | bf16`` into ``fp32 | bf16`` for ``device`` (default: CUDA if present).

    ``auto`` picks bf16 where :func:`bf16_is_fast` says so, else fp32. An explicit ``bf16`` is kept
    even where it is slow (the caller asked), except on a GPU without bf16 support, where it cannot
    run. Raises :class:`PrecisionError` for any other value.
    """
    if requested not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    device = _device(device)
    if requested == "auto":
        return "bf16" if bf16_is_fast(device) else "fp32"
    if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise PrecisionError("this GPU does not support bf16; use --precision fp32 (or auto)")
    return requested


def describe(precision: str, device: torch.device | str | None = None) -> str:
    """One line for logs: the resolved precision and, on CPU, what the probe measured."""
    device = _device(device)
    if device.type != "cpu":
        return f"precision {precision} on {device.type}"
    probe = cpu_probe()
    native = "native bf16" if probe.native_bf16 else "no native bf16"
    rates = f"fp32 {probe.fp32_gflops:.0f} GFLOP/s"
    if probe.bf16_gflops is not None:
        rates += f", bf16 {probe.bf16_gflops:.0f} GFLOP/s"
    return f"precision {precision} on cpu ({native}; probe: {rates}, {torch.get_num_threads()} threads)"


def probe_record(device: torch.device | str | None = None) -> dict[str, object]:
    """The probe's findings as a JSON-ready dict (benchmarks, reports); empty off the CPU."""
    device = _device(device)
    if device.type != "cpu":
        return {"device": device.type, "bf16_supported": bf16_is_fast(device)}
    probe = cpu_probe()
    return {
        "device": "cpu",
        "native_bf16": probe.native_bf16,
        "probe_fp32_gflops": round(probe.fp32_gflops or 0.0, 1),
        "probe_bf16_gflops": None if probe.bf16_gflops is None else round(probe.bf16_gflops, 1),
    }


def autocast(device: torch.device | str, precision: str) -> AbstractContextManager:
    """The autocast context for a resolved precision: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    if precision != "fp32":
        raise PrecisionError(f"resolve the precision first (got {precision!r}; expected fp32 or bf16)")
    return nullcontext()


THREAD_EFFICIENCY_FLOOR = 0.5
"""The default thread count is kept when its probe rate is at least this fraction of (threads ×
the one-thread rate); below it the cores are taken to be shared with other busy processes. Measured
with :func:`_probe_threads` on a 2-core AMD Zen 3: 0.64-0.86 idle, 0.25-0.40 beside one busy process."""

BUSY_LOAD = 0.5
"""A 1-minute load average from which other processes count as running (see :func:`choose_threads`)."""


@dataclass(frozen=True)
class ThreadChoice:
    """How many CPU threads a command uses, and why (:func:`configure_threads`)."""

    threads: int
    default: int
    """torch's own choice (one per physical core), or ``OMP_NUM_THREADS`` where set."""
    source: str
    """``"--threads"``, ``"OMP_NUM_THREADS"``, ``"default"`` (one thread, nothing to probe) or ``"probe"``."""
    rates: dict[int, float]
    """fp32 matmul GFLOP/s per thread count probed; empty unless ``source`` is ``"probe"``."""
    load: float = 0.0
    """The 1-minute load average when the probe ran."""

    def warning(self) -> str | None:
        """The line to print when the probe chose fewer threads than the default, else None."""
        if self.source != "probe" or self.threads == self.default:
            return None
        single = self.rates[1]
        return (
            f"the CPU probe measured {self.rates[self.default]:.0f} GFLOP/s with {self.default} threads against "
            f"{single:.0f} with 1 (an idle machine gives up to {self.default * single:.0f}): other processes are "
            f"using these cores (load average {self.load:.1f}). Using {self.threads} thread"
            f"{'s' if self.threads > 1 else ''}; pass --threads N to choose"
        )


def thread_counts_to_probe(default: int) -> list[int]:
    """1, 2, 4, ... below ``default``, and ``default`` itself."""
    counts, n = [], 1
    while n < default:
        counts.append(n)
        n *= 2
    return [*counts, default]


def choose_threads(rates: dict[int, float], default: int, load: float) -> int:
    """The thread count to use from probe rates (GFLOP/s per count, including 1 and ``default``).

    ``default`` unless other processes are running (``load``, the load average, at least
    ``BUSY_LOAD``) and the default's rate is below ``THREAD_EFFICIENCY_FLOOR × default × rates[1]``;
    then the count with the highest rate. Both must hold: an idle machine with many cores can show a
    low efficiency on the probe's small matmuls, and a load average can count processes on other
    cores than ours (a container's host).
    """
    if default <= 1 or load < BUSY_LOAD or rates[default] >= THREAD_EFFICIENCY_FLOOR * default * rates[1]:
        return default
    return max(rates, key=lambda n: (rates[n], -n))


PROBE_ROWS_PER_THREAD = 64
"""Rows per thread of the thread probe's matmuls (64 × 256 by 256 × 256): small operations with a
synchronisation after each, as in training a small model, where oversubscribed cores hurt most."""


def _probe_threads(default: int, repeats: int = 5) -> dict[int, float]:
    """fp32 GFLOP/s of a loop of small matmuls per thread count (1, 2, 4, ..., ``default``).

    Every count runs the same work, ``PROBE_ROWS_PER_THREAD × default`` rows, so that ``default``
    threads each get a share a single thread handles well. The rounds alternate between counts and the
    median round counts: a busy neighbour slows most rounds, not just some, and the best round would
    hide it.
    """
    rows, size = PROBE_ROWS_PER_THREAD * default, 256
    ops = max(10, 100 // default)
    a, b = torch.randn(rows, size), torch.randn(size, size)
    counts = thread_counts_to_probe(default)
    rounds: dict[int, list[float]] = {n: [] for n in counts}
    for i in range(repeats + 1):  # the first round warms up each count's thread pool
        for n in counts:
            torch.set_num_threads(n)
            start = time.perf_counter()
            for _ in range(ops):
                torch.mm(a, b)
            if i:
                rounds[n].append(time.perf_counter() - start)
    torch.set_num_threads(default)
    return {n: 2 * rows * size * size * ops / statistics.median(t) / 1e9 for n, t in rounds.items()}


def _load_average() -> float:
    """The 1-minute load average (runnable processes), 0 where the OS does not report one."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def configure_threads(requested: int | None = None) -> ThreadChoice:
    """Set torch's CPU thread count for this process, with the machine's load in mind (ours).

    ``requested`` (``--threads``) is used as given. Otherwise ``OMP_NUM_THREADS``, where set, is
    respected; otherwise, when the load average reaches ``BUSY_LOAD``, the probe
    (:func:`choose_threads`) picks between torch's default and fewer threads (about 0.2 s on 2 cores).
    Raises ValueError for ``requested < 1``.
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        torch.set_num_threads(requested)
        return ThreadChoice(requested, requested, "--threads", {})
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return ThreadChoice(default, default, "OMP_NUM_THREADS", {})
    if default <= 1:
        return ThreadChoice(default, default, "default", {})
    load = _load_average()
    if load < BUSY_LOAD:  # nothing else runs: no need to probe
        return ThreadChoice(default, default, "default", {})
    rates = _probe_threads(default)
    threads = choose_threads(rates, default, load)
    torch.set_num_threads(threads)
    return ThreadChoice(threads, default, "probe", rates, load)
