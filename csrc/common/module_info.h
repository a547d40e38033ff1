// kernel_info(): what a compiled module was built for and whether this process can run it.
#pragma once

#include <cuda_runtime.h>
#include <pybind11/pybind11.h>

#include <string>

#ifndef CSRC_CUDA_ARCHITECTURES
#error \
    "CMakeLists.txt defines CSRC_CUDA_ARCHITECTURES (the architectures the kernels are built for)"
#endif

namespace csrc {
namespace module_info_detail {

inline std::string version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

inline std::string error_text(cudaError_t err) {
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// Fills `info` and returns "" when the current device can run the module, else the reason.
inline std::string probe(pybind11::dict& info, const void* probe_kernel) {
  int driver = 0;
  cudaDriverGetVersion(&driver);
  info["driver"] = driver ? version_text(driver) : "none";
  if (driver == 0) return "no CUDA driver (libcuda.so was not found)";
  if (driver / 1000 < CUDART_VERSION / 1000) {
    return "the CUDA driver supports CUDA " + version_text(driver) +
           ", older than the CUDA runtime " + version_text(CUDART_VERSION) +
           " these kernels were built with: update the driver or rebuild with an older toolkit";
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  info["device_count"] = count;
  if (err != cudaSuccess)
    return "no usable CUDA device: cudaGetDeviceCount failed: " + error_text(err);
  if (count == 0) return "no CUDA device";
  int device = 0, major = 0, minor = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  const std::string arch = std::to_string(major) + "." + std::to_string(minor);
  info["device"] = "cuda:" + std::to_string(device) + ", compute capability " + arch;
  cudaFuncAttributes attributes;
  err = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (err != cudaSuccess) {
    return "the kernels cannot load on cuda:" + std::to_string(device) + " (compute capability " +
           arch + "; built for " + CSRC_CUDA_ARCHITECTURES + "): " + error_text(err);
  }
  return "";
}

}  // namespace module_info_detail

// Adds `kernel_info() -> dict` to `module`. `probe_kernel` is one of the module's kernels: the
// module is usable when the current device can load it (an image for its architecture exists).
inline void add_kernel_info(pybind11::module_& module, const char* module_name,
                            const void* probe_kernel) {
  const std::string name = module_name;
  module.def(
      "kernel_info",
      [name, probe_kernel]() {
        pybind11::dict info;
        info["module"] = name;
        info["cuda_runtime"] = module_info_detail::version_text(CUDART_VERSION) + " (static)";
        info["architectures"] = CSRC_CUDA_ARCHITECTURES;
        info["driver"] = "none";
        info["device_count"] = 0;
        info["device"] = "";
        const std::string reason = module_info_detail::probe(info, probe_kernel);
        info["usable"] = reason.empty();
        info["reason"] = reason;
        return info;
      },
      "What this module was built for (CUDA runtime, architectures) and whether the current "
      "device can run it: a dict with `usable` (bool) and `reason` (empty when usable).\n\n"
      "Initialises the CUDA driver like torch.cuda.is_available(); checking that a kernel image "
      "loads creates the device's primary context (the one PyTorch uses) if none exists yet.");
}

}  // namespace csrc
