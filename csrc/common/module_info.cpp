#include "module_info.h"

#include <cuda_runtime.h>

#include <string>

#ifndef CSRC_CUDA_ARCHITECTURES
#error "CMakeLists.txt defines CSRC_CUDA_ARCHITECTURES (the architectures the kernels are built for)"
#endif

namespace py = pybind11;

namespace csrc {
namespace {

std::string version_text(int version) {
  return std::to_string(version / 1000) + "." + std::to_string(version % 1000 / 10);
}

std::string error_text(cudaError_t err) {
  cudaGetLastError();
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// Fills `info` and returns "" when the current device can run the module, else the reason.
std::string probe(py::dict& info, const void* probe_kernel) {
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
  if (err != cudaSuccess) return "no usable CUDA device: cudaGetDeviceCount failed: " + error_text(err);
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

}  // namespace

void add_kernel_info(py::module_& module, const char* module_name, const void* probe_kernel) {
  const std::string name = module_name;
  module.def(
      "kernel_info",
      [name, probe_kernel]() {
        py::dict info;
        info["module"] = name;
        info["cuda_runtime"] = version_text(CUDART_VERSION) + " (static)";
        info["architectures"] = CSRC_CUDA_ARCHITECTURES;
        info["driver"] = "none";
        info["device_count"] = 0;
        info["device"] = "";
        const std::string reason = probe(info, probe_kernel);
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
