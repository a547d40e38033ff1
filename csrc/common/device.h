// Host helpers shared by the compiled modules: raw pointers and stream handles passed from
// Python as integers (`tensor.data_ptr()`, the current stream's `cuda_stream`), the device a
// launch runs on, and cached per-device attributes.
//
// The modules link the CUDA runtime statically and never include PyTorch headers: a stream
// handle is the driver's CUstream, which every runtime instance in the process accepts, and a
// device is made current through its primary context, the one PyTorch uses too.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

#include "check.h"

namespace csrc {

using Handle = std::uintptr_t;  // a device pointer or a stream, as a Python int

template <class T>
T* as_ptr(Handle address) {
  return reinterpret_cast<T*>(address);
}

inline cudaStream_t as_stream(Handle stream) {
  return reinterpret_cast<cudaStream_t>(stream);
}

// Address of the driver function `symbol` (its CUDA 12.0 version) in *function; looked up at
// run time, so nothing links against libcuda. Returns the runtime's error (no driver: an error).
inline cudaError_t driver_entry_point(const char* symbol, void** function,
                                      cudaDriverEntryPointQueryResult* found) {
#if CUDART_VERSION >= 12050
  return cudaGetDriverEntryPointByVersion(symbol, function, 12000, cudaEnableDefault, found);
#else
  return cudaGetDriverEntryPoint(symbol, function, cudaEnableDefault, found);
#endif
}

// True when `device`'s primary context is active, so making the device current creates no
// context (cuDevicePrimaryCtxGetState, looked up at run time; true if the lookup fails).
inline bool primary_context_active(int device) {
  using GetState = CUresult (*)(CUdevice, unsigned*, int*);
  static const GetState get_state = [] {
    void* address = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (driver_entry_point("cuDevicePrimaryCtxGetState", &address, &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<GetState>(nullptr);
    }
    return reinterpret_cast<GetState>(address);
  }();
  unsigned flags = 0;
  int active = 1;
  if (get_state != nullptr && get_state(device, &flags, &active) != CUDA_SUCCESS) active = 1;
  return active != 0;
}

// Makes `device` current for the lifetime of the guard (only if it is not already current),
// then makes the previous device current again, unless that would create its primary context
// (a thread that had no context yet; PyTorch's device guard avoids that the same way).
class DeviceGuard {
 public:
  DeviceGuard(int device, const char* where) : device_(device) {
    CSRC_CHECK_CUDA(where, cudaGetDevice(&previous_));
    if (previous_ != device_) CSRC_CHECK_CUDA(where, cudaSetDevice(device_));
  }
  ~DeviceGuard() {
    if (previous_ != device_ && primary_context_active(previous_)) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int device_;
  int previous_ = 0;
};

// Devices the per-device caches of the modules hold (indexed by device index).
constexpr int kMaxDevices = 64;

// An argument error unless 0 <= device < kMaxDevices.
inline void check_device_index(int device, const char* where) {
  if (device < 0 || device >= kMaxDevices) {
    argument_error(where, ": device index ", device, " is out of range");
  }
}

// Number of SMs of `device`, queried once per device.
inline int sm_count(int device, const char* where) {
  static std::atomic<int> cached[kMaxDevices] = {};  // 0: not queried yet
  check_device_index(device, where);
  int count = cached[device].load(std::memory_order_relaxed);
  if (count == 0) {
    CSRC_CHECK_CUDA(where, cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    cached[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

}  // namespace csrc
