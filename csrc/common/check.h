// Errors of the compiled modules, turned into Python exceptions by pybind11:
//   std::invalid_argument -> ValueError    (a bad argument: the text names it and its value)
//   std::runtime_error    -> RuntimeError  (a failed CUDA call: the text names the call, the
//                                           CUDA error and its description)
#pragma once

#include <cuda_runtime.h>

#include <sstream>
#include <stdexcept>
#include <string>

namespace csrc {

// Throw std::invalid_argument with the concatenation of `parts`.
template <class... Parts>
[[noreturn]] void argument_error(const Parts&... parts) {
  std::ostringstream text;
  (text << ... << parts);
  throw std::invalid_argument(text.str());
}

// Throw std::runtime_error naming `where` (the Python-visible function), the CUDA call and
// the error. The error is cleared first so the next call of this runtime starts clean.
[[noreturn]] inline void cuda_error(cudaError_t err, const char* call, const char* where) {
  cudaGetLastError();
  throw std::runtime_error(std::string(where) + ": " + call + " failed: " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

inline void check_cuda(cudaError_t err, const char* call, const char* where) {
  if (err != cudaSuccess) cuda_error(err, call, where);
}

}  // namespace csrc

// CSRC_CHECK_CUDA("moeblaze._C.fill_routing_plan", cudaSetDevice(device));
#define CSRC_CHECK_CUDA(where, call) ::csrc::check_cuda((call), #call, (where))
