// kvc/cuda/pinned_host.cuh — cuda::PinnedHost: a compute backend whose pages live in
// page-locked (pinned) host memory.
//
// Why: pinned pages can be copied to and from the GPU asynchronously at full PCIe/NVLink
// bandwidth (cudaMemcpyAsync on pageable memory silently stages through a bounce buffer),
// which is what a GPU engine needs to swap kvc pages in and out. The CPU kernels read the
// pages as ordinary host memory, so KvCache works unchanged on top of it.
//
// Built only with KVC_ENABLE_CUDA (target kvc::cuda). Needs the CUDA runtime and, at run
// time, a CUDA driver: without one allocate() throws kvc::UnsupportedError naming the
// CUDA error, so hosts can fall back to backend::Cpu.
#pragma once

#include <kvc/core/error.hpp>

#include <cuda_runtime.h>

#include <cstddef>
#include <string_view>

namespace kvc::cuda {

struct PinnedHost {
  static constexpr bool host_accessible = true;
  static constexpr std::string_view name() noexcept { return "cuda_pinned_host"; }

  std::byte* allocate(std::size_t bytes) const {
    void* pointer = nullptr;
    const cudaError_t status = cudaMallocHost(&pointer, bytes);
    if (status != cudaSuccess) {
      detail::fail<UnsupportedError>("cuda::PinnedHost: cudaMallocHost({} bytes) failed: {}", bytes,
                                     cudaGetErrorString(status));
    }
    return static_cast<std::byte*>(pointer);
  }

  void deallocate(std::byte* pointer, std::size_t) const noexcept { cudaFreeHost(pointer); }
};

}  // namespace kvc::cuda
