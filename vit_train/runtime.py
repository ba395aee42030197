"""What every layer above needs to run somewhere: the device, the numeric precision and autocast, the process
group under torchrun, and seeding. Nothing here knows about models, data or configs."""
import contextlib
import functools
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from vit_train.errors import UserError

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name, local_rank=0):
    """'auto' is this process's GPU if there is one, else the CPU; a bare 'cuda' is cuda:<local rank>."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise UserError(f"--device {name}, but no CUDA GPU is visible; use --device cpu")
    device = torch.device("cuda", local_rank if device.index is None else device.index)
    if device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}, but only {torch.cuda.device_count()} GPUs are visible")
    return device


def device_memory(device: torch.device) -> int:
    """Bytes of memory a process on `device` can have at most: the GPU's, or the machine's (or its cgroup's limit,
    when lower)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        with contextlib.suppress(OSError, ValueError):
            limits.append(int(open(path).read()))
    return min(limits)


def resolve_precision(precision, device):
    """'auto' is bf16 autocast on GPUs that support it, else fp16 with loss scaling; on a CPU, bf16 autocast where
    it multiplies bf16 in hardware (AVX512-BF16, AMX: a training step of the CPU recipes about 2.4x faster than in
    fp32), else fp32 (elsewhere bf16 is emulated, many times slower: see slow_precision_warning)."""
    if precision != "auto":
        return precision
    if device.type != "cuda":
        return "bf16" if fast_bf16(device) else "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# The x86 instructions that make bf16 / fp16 autocast fast on a CPU. Without them oneDNN emulates the
# reduced-precision kernels, many times slower than fp32 (docs/training.md, "Precision and --compile").
FAST_CPU_INSTRUCTIONS = {"bf16": ("avx512_bf16", "amx_bf16"), "fp16": ("avx512_fp16", "amx_fp16")}


def cpuinfo(field):
    """The value of the first `field` line of /proc/cpuinfo (Linux), or None where there is none."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.partition(":")[2].strip() for line in f if line.startswith(field)), None)
    except OSError:
        return None


def cpu_flags():
    """The processor's feature flags (x86 Linux), or None where there are none."""
    flags = cpuinfo("flags")
    return None if flags is None else set(flags.split())


def native_on_cpu(precision, flags=None) -> bool:
    """Whether this CPU runs `precision` ('bf16' or 'fp16') matrix products in hardware rather than emulating them.

    flags: the processor's feature flags, read from /proc/cpuinfo when not given. A real check also asks torch
    whether oneDNN may use such kernels, which ONEDNN_MAX_CPU_ISA can hold back to an older instruction set; where
    there are no flags (not x86 Linux), that answer decides alone."""
    if flags is not None:
        return any(instruction in flags for instruction in FAST_CPU_INSTRUCTIONS[precision])
    flags = cpu_flags()
    onednn = getattr(torch.ops.mkldnn, f"_is_mkldnn_{precision}_supported")()
    return onednn and (flags is None or native_on_cpu(precision, flags))


def slow_precision_warning(precision, device, flags=None):
    """One line warning that `precision` (resolved) will run far slower than fp32 on this CPU, or None.
    flags: as native_on_cpu's."""
    if device.type != "cpu" or precision not in FAST_CPU_INSTRUCTIONS or native_on_cpu(precision, flags):
        return None
    instructions = FAST_CPU_INSTRUCTIONS[precision]
    return (f"this CPU has no {precision} instructions ({' or '.join(instructions)}): --precision {precision} "
            "runs about 9-20x slower than fp32 here (measured on ViT training steps); use --precision fp32")


def fast_bf16(device) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: GPUs from Ampere on, CPUs with AVX512-BF16 or AMX.
    Elsewhere bf16 is emulated, and slower than fp32 (about 40-80x on AVX2 CPUs)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return native_on_cpu("bf16")


def check_compiler(device) -> None:
    """torch.compile builds a CPU model's kernels as C++ with the system's compiler; without one the first step
    fails deep inside it. Say so before anything runs."""
    if device.type != "cpu":
        return
    from torch._inductor import cpp_builder, exc
    try:
        cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        raise UserError("--compile on the CPU needs a C++ compiler (torch.compile builds its kernels with one) and "
                        "none was found; install g++ or clang++ (or point CXX at one), or drop --compile") from None


def describe_device(device) -> str:
    """The device as every figure should name it: 'cuda:0 NVIDIA H200', or 'cpu AVX512 (bf16), 2 threads, <model
    name>': the kernels' instruction set, whether bf16 is native, the threads, and the processor."""
    if device.type == "cuda":
        return f"{device} {torch.cuda.get_device_name(device)}"
    model = cpuinfo("model name")
    native = ", ".join(p for p in FAST_CPU_INSTRUCTIONS if native_on_cpu(p))
    return (f"cpu {torch.backends.cpu.get_cpu_capability()}{f' ({native})' if native else ''}, "
            f"{torch.get_num_threads()} threads{f', {model}' if model else ''}")


def autocast(device, precision):
    return torch.autocast(device.type, dtype=AUTOCAST_DTYPES.get(precision), enabled=precision in AUTOCAST_DTYPES)


@contextlib.contextmanager
def distributed(device_name):
    """Yields (rank, world size, device). Under torchrun, this process joins the process group for the block:
    NCCL between GPUs, gloo between CPU processes."""
    if "RANK" not in os.environ:
        yield 0, 1, resolve_device(device_name)
        return
    device = resolve_device(device_name, local_rank=int(os.environ["LOCAL_RANK"]))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield dist.get_rank(), dist.get_world_size(), device
    finally:
        dist.destroy_process_group()


@contextlib.contextmanager
def local_leader_first(world_size):
    """Run the block on each machine's first process (LOCAL_RANK 0) before the machine's other processes."""
    leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if world_size > 1 and not leader:
        dist.barrier()
    yield
    if world_size > 1 and leader:
        dist.barrier()


def all_ranks(value, world_size):
    """[rank 0's value, rank 1's value, ...] on every rank."""
    if world_size == 1:
        return [value]
    gathered = [None] * world_size
    dist.all_gather_object(gathered, value)
    return gathered


def seed_everything(seed):
    torch.manual_seed(seed)  # and every GPU's generator
    np.random.seed(seed)
    random.seed(seed)


@functools.lru_cache(maxsize=None)
def device_constant(values: tuple, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A small constant tensor made once per device and dtype. Built from Python data at every step instead, it
    would be a copy from pageable host memory, for which the host waits on the GPU's queue. Never change it."""
    return torch.tensor(values, device=device, dtype=dtype)


def to_device(array, device: torch.device) -> torch.Tensor:
    """A numpy array on `device` without making the host wait: on a GPU through pinned memory, non-blocking (the
    pinned buffer is kept until the copy is done by torch's caching host allocator)."""
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def out_of_memory(error: BaseException) -> bool:
    """Whether `error` is an allocation that failed: on a GPU, in torch's CPU allocator, or in Python's."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "DefaultCPUAllocator" in str(error))


@contextlib.contextmanager
def out_of_memory_says(device, message):
    """Memory exhausted, on the GPU or the CPU, ends in one line saying what to change rather than a traceback:
    `message(memory, error)` writes it, `memory` naming what ran out ("memory on the CPU")."""
    try:
        yield
    except (RuntimeError, MemoryError) as error:  # torch's out-of-memory errors are RuntimeErrors
        if not out_of_memory(error):
            raise
        memory = f"GPU memory on {device}" if device.type == "cuda" else "memory on the CPU"
        raise UserError(message(memory, error)) from None
