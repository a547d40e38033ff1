// Chunk signals of the overlap protocol: set and wait on 32-bit flags from a stream.
//
// write_flag: the driver's cuStreamWriteValue32 (a stream memory operation: no SM, ordered
//   after the stream's earlier work with a memory barrier), or, where the driver lacks it, a
//   one-thread kernel that fences at system scope and stores with release semantics.
// wait_flag: the driver's cuStreamWaitValue32 with CU_STREAM_WAIT_VALUE_GEQ: the stream's later
//   work starts once (int32_t)(*flag - value) >= 0; no SM spins. No kernel fallback: an
//   unbounded spin on an SM is what the protocol avoids; wait_flag_bounded is the kernel wait.
// wait_flag_bounded: a one-thread kernel polling the flag with acquire loads at system scope
//   until the same condition holds or `timeout_ns` of real time (%globaltimer) have passed; on
//   a timeout it records (code, observed value) in a status word, first timeout wins.
//
// Every entry point loads both kernels on its device first (once per device). Since CUDA 12.2 the
// runtime loads a kernel lazily, at its first launch, and that load may wait for the whole
// context to be idle: a producer's first write_flag_kernel launched while a consumer's stream
// waits (wait_flag) or its kernel spins (wait_flag_bounded) would wait for that consumer, which
// waits for the flag (the "concurrent execution" hazard of the CUDA guide's lazy loading
// chapter).
//
// The driver entry points are looked up at run time (csrc::driver_entry_point), so the module
// links no libcuda and imports on a machine without a driver.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <atomic>
#include <string>

#include "../common/device_code.cuh"
#include "signals.h"

namespace overlap {
namespace {

// (int32_t)(observed - value) >= 0, the driver's CU_STREAM_WAIT_VALUE_GEQ (a cyclic compare:
// the same as observed >= value while both lie in [0, 2**31)).
__device__ __forceinline__ bool reached(int observed, int value) {
  return static_cast<int>(static_cast<unsigned>(observed) - static_cast<unsigned>(value)) >= 0;
}

// flag [1] int32: set to `value` after everything this stream did before (fallback of
// write_flag when the driver has no stream memory operations). One thread.
__global__ void write_flag_kernel(int* flag, int value) {
  __threadfence_system();
  csrc::store_release_sys(flag, value);
}

// flag [1] int32 (read), status [2] int32 (written on a timeout). One thread: poll the flag
// until reached(flag, value); after timeout_ns of real time, if status[0] is still 0, write
// status = (code, last observed flag) and return. Returns at once, writing nothing, when
// status[0] is already non-zero (an earlier wait timed out: the protocol is already broken).
__global__ void wait_flag_bounded_kernel(const int* flag, int value, int* status,
                                         uint64_t timeout_ns, int code) {
  const uint64_t start = csrc::global_timer_ns();
  unsigned sleep_ns = 32;
  while (true) {
    const int observed = csrc::load_acquire_sys(flag);
    if (reached(observed, value)) return;
    if (csrc::load_acquire_sys(status) != 0) return;
    if (csrc::global_timer_ns() - start > timeout_ns) {
      if (atomicCAS_system(status, 0, code) == 0) atomicExch_system(status + 1, observed);
      return;
    }
    __nanosleep(sleep_ns);
    sleep_ns = sleep_ns < 1024 ? 2 * sleep_ns : sleep_ns;
  }
}

struct DriverOps {
  PFN_cuStreamWriteValue32_v11070 write = nullptr;
  PFN_cuStreamWaitValue32_v11070 wait = nullptr;
  PFN_cuGetErrorName_v6000 error_name = nullptr;
  std::string missing;  // why `write` / `wait` are null
};

template <class Fn>
std::string find_entry_point(const char* symbol, Fn* fn) {
  void* address = nullptr;
  cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
  const cudaError_t err = csrc::driver_entry_point(symbol, &address, &found);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return std::string(symbol) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
           ")";
  }
  if (found != cudaDriverEntryPointSuccess || address == nullptr) {
    return std::string(symbol) + " is not provided by this driver";
  }
  *fn = reinterpret_cast<Fn>(address);
  return "";
}

const DriverOps& driver_ops() {
  static const DriverOps ops = [] {
    DriverOps found;
    std::string missing = find_entry_point("cuStreamWriteValue32", &found.write);
    if (missing.empty()) missing = find_entry_point("cuStreamWaitValue32", &found.wait);
    find_entry_point("cuGetErrorName", &found.error_name);
    if (!missing.empty()) {
      found.write = nullptr;
      found.wait = nullptr;
      found.missing = missing;
    }
    return found;
  }();
  return ops;
}

[[noreturn]] void driver_error(CUresult result, const char* call, const char* where) {
  const char* name = nullptr;
  if (driver_ops().error_name != nullptr) driver_ops().error_name(result, &name);
  throw std::runtime_error(std::string(where) + ": " + call + " failed: " +
                           (name != nullptr ? name : "CUresult " + std::to_string(result)));
}

// Loads this module's kernels on the current device `device`, once per device, so that no launch
// of them loads one while another waits (see the top of this file).
void load_kernels(int device, const char* where) {
  static std::atomic<bool> loaded[csrc::kMaxDevices] = {};
  csrc::check_device_index(device, where);
  if (loaded[device].load(std::memory_order_acquire)) return;
  cudaFuncAttributes attributes;
  CSRC_CHECK_CUDA(where, cudaFuncGetAttributes(&attributes, write_flag_kernel));
  CSRC_CHECK_CUDA(where, cudaFuncGetAttributes(&attributes, wait_flag_bounded_kernel));
  loaded[device].store(true, std::memory_order_release);
}

}  // namespace

std::pair<bool, std::string> stream_memops() {
  const DriverOps& ops = driver_ops();
  return {ops.write != nullptr, ops.missing};
}

bool write_flag(csrc::Handle flag, int value, csrc::Handle stream, int device) {
  const char* where = "overlap._C.write_flag";
  csrc::DeviceGuard guard(device, where);
  load_kernels(device, where);
  const DriverOps& ops = driver_ops();
  if (ops.write != nullptr) {
    const CUresult result =
        ops.write(reinterpret_cast<CUstream>(stream), CUdeviceptr{flag},
                  static_cast<cuuint32_t>(value), CU_STREAM_WRITE_VALUE_DEFAULT);
    if (result == CUDA_SUCCESS) return true;
    if (result != CUDA_ERROR_NOT_SUPPORTED) driver_error(result, "cuStreamWriteValue32", where);
  }
  write_flag_with_kernel(flag, value, stream, device);
  return false;
}

void write_flag_with_kernel(csrc::Handle flag, int value, csrc::Handle stream, int device) {
  const char* where = "overlap._C.write_flag_with_kernel";
  csrc::DeviceGuard guard(device, where);
  load_kernels(device, where);
  write_flag_kernel<<<1, 1, 0, csrc::as_stream(stream)>>>(csrc::as_ptr<int>(flag), value);
  CSRC_CHECK_CUDA(where, cudaGetLastError());
}

void wait_flag(csrc::Handle flag, int value, csrc::Handle stream, int device) {
  const char* where = "overlap._C.wait_flag";
  csrc::DeviceGuard guard(device, where);
  load_kernels(device, where);
  const DriverOps& ops = driver_ops();
  if (ops.wait == nullptr) {
    throw std::runtime_error(std::string(where) +
                             ": the CUDA driver has no stream memory operations (" + ops.missing +
                             "); use wait_flag_bounded, which waits in a one-thread kernel");
  }
  const CUresult result = ops.wait(reinterpret_cast<CUstream>(stream), CUdeviceptr{flag},
                                   static_cast<cuuint32_t>(value), CU_STREAM_WAIT_VALUE_GEQ);
  if (result != CUDA_SUCCESS) driver_error(result, "cuStreamWaitValue32", where);
}

void wait_flag_bounded(csrc::Handle flag, int value, csrc::Handle status, int64_t timeout_ns,
                       int code, csrc::Handle stream, int device) {
  const char* where = "overlap._C.wait_flag_bounded";
  if (timeout_ns <= 0) csrc::argument_error(where, ": timeout_ns=", timeout_ns, " must be > 0");
  if (code == 0) csrc::argument_error(where, ": code=0 is reserved for 'no timeout'");
  csrc::DeviceGuard guard(device, where);
  load_kernels(device, where);
  wait_flag_bounded_kernel<<<1, 1, 0, csrc::as_stream(stream)>>>(
      csrc::as_ptr<const int>(flag), value, csrc::as_ptr<int>(status),
      static_cast<uint64_t>(timeout_ns), code);
  CSRC_CHECK_CUDA(where, cudaGetLastError());
}

const void* signal_kernel_for_probe() {
  return reinterpret_cast<const void*>(write_flag_kernel);
}

}  // namespace overlap
