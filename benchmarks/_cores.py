"""Core-to-core round trip of a cache line between two threads (nanoseconds), for benchmark rows.

On these shared 2-vCPU machines the host sometimes runs the two vCPUs on one die (a round
trip of about 95 ns) and sometimes on two (about 420 ns), and moves them while a process
runs. With the threads on two dies, every line one thread wrote and the other reads crosses
between the dies, which slows the compact model's batch-1 layers by about a third and the
dense model hardly at all (docs/benchmarks.md). Benchmarks record this figure beside their
timings so that each row says which case it was measured in.

Built on first use with ``torch.utils.cpp_extension.load_inline`` (the same compiler the
kernel needs); ``core_to_core_ns`` returns None where it cannot be built.
"""

from __future__ import annotations

import statistics

import torch

_SRC = r"""
#include <torch/extension.h>
#include <atomic>
#include <chrono>
#include <thread>
double round_trip_ns(int64_t iters) {
  alignas(64) static std::atomic<int64_t> flag{0};
  flag.store(0);
  std::thread other([&] {
    for (int64_t i = 0; i < iters; ++i) {
      while (flag.load(std::memory_order_acquire) != 2 * i + 1) {}
      flag.store(2 * i + 2, std::memory_order_release);
    }
  });
  const auto t0 = std::chrono::steady_clock::now();
  for (int64_t i = 0; i < iters; ++i) {
    flag.store(2 * i + 1, std::memory_order_release);
    while (flag.load(std::memory_order_acquire) != 2 * i + 2) {}
  }
  const auto t1 = std::chrono::steady_clock::now();
  other.join();
  return std::chrono::duration<double, std::nano>(t1 - t0).count() / iters;
}
TORCH_LIBRARY(sgbench, m) {
  m.def("round_trip_ns(int iters) -> float");
  m.impl("round_trip_ns", torch::dispatch(c10::DispatchKey::CatchAll, &round_trip_ns));
}
"""
_built: bool | None = None


def core_to_core_ns(iters: int = 20000, repeats: int = 5) -> float | None:
    """Median over ``repeats`` of the mean round trip over ``iters`` ping-pongs; None without a compiler."""
    global _built
    if _built is None:
        try:
            from torch.utils.cpp_extension import load_inline

            load_inline(name="sgbench_cores_v1", cpp_sources=[_SRC], extra_cflags=["-O2"], is_python_module=False)
            _built = True
        except Exception:  # no compiler / headers: the rows simply go without the figure
            _built = False
    if not _built:
        return None
    return statistics.median(torch.ops.sgbench.round_trip_ns(iters) for _ in range(repeats))
