"""Name the machine a benchmark ran on, and measure a phase's peak memory."""

import os
import platform

import torch


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(mem, 1),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }



def proc_status(*keys: str) -> dict[str, int]:
    """Byte counts of `keys` (VmRSS, VmHWM, RssAnon, ...) from this process's /proc/self/status (Linux)."""
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.split(":")[0] in keys}


# Source of `peak_rss_bytes()` for the fresh processes that benchmarks time phases in. `ru_maxrss` is not it: Linux
# carries the spawning process's peak across exec (a parent that had built a 0.5B pair made every phase read 2.46 GB);
# VmHWM is the high-water mark of the phase's own address space.
PEAK_RSS = r"""
def peak_rss_bytes():
    try:
        with open("/proc/self/status") as f:
            return int(next(line.split()[1] for line in f if line.startswith("VmHWM:"))) * 1024
    except (OSError, StopIteration):  # not Linux: the rusage peak (may include the spawning process's)
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
"""
