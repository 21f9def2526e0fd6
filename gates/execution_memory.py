"""A hard cap on the memory ONNX Runtime may allocate while it runs an untrusted model.

Admission refuses graphs whose allocation the file declares or the input chooses (`admission`);
what static analysis misses still meets this cap. Every session of the process allocates its
tensors from one shared CPU arena (ONNX Runtime's environment allocator, `session.use_env_allocators`)
whose `max_mem` is the cap: a kernel that asks for more fails with ONNX Runtime's arena error, which
the oracle names (`ModelMemoryError`), instead of the process being killed for its memory. On CUDA the
provider's `gpu_mem_limit` is the same cap. The first oracle of a process registers the arena; its
limit (`AdmissionLimits.max_memory_bytes`, default 4 GiB) holds for the whole process.
"""
from __future__ import annotations

import threading

import onnxruntime as ort

_lock = threading.Lock()
_cap: int | None = None


def capped_session_options(so: ort.SessionOptions, max_bytes: int) -> int:
    """Make `so` allocate from the process's capped arena (registered on first use); returns the cap in force."""
    global _cap
    with _lock:
        if _cap is None:
            memory = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
            ort.create_and_register_allocator(memory, ort.OrtArenaCfg({"max_mem": int(max_bytes),
                                                                       "arena_extend_strategy": 1}))
            _cap = int(max_bytes)
    so.add_session_config_entry("session.use_env_allocators", "1")
    return _cap


def capped_providers(providers: list[str], max_bytes: int) -> list:
    """`providers` with the CUDA provider's device memory capped at `max_bytes`."""
    return [(p, {"gpu_mem_limit": str(int(max_bytes)), "arena_extend_strategy": "kSameAsRequested"})
            if p == "CUDAExecutionProvider" else p for p in providers]


def is_allocation_failure(error: Exception) -> bool:
    """True for ONNX Runtime's refusal to allocate past the arena's cap (or the system's)."""
    text = str(error)
    return "BFCArena" in text or "Available memory of" in text or "bad_alloc" in text or "Failed to allocate" in text
