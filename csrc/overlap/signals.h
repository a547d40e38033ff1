// Host entry points of overlap._C (bound in module.cpp): 32-bit chunk flags set and waited on
// from a stream. `flag` and `status` are device addresses of int32 elements from Python.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "../common/device.h"

namespace overlap {

// (true, "") when the driver provides cuStreamWriteValue32 / cuStreamWaitValue32, else
// (false, why not). Looked up once per process.
std::pair<bool, std::string> stream_memops();

// *flag = value after the stream's earlier work. Returns true when a stream memory operation
// did it, false when the one-thread kernel did (no driver support).
bool write_flag(csrc::Handle flag, int value, csrc::Handle stream, int device);

// The one-thread kernel of write_flag (its fallback), callable directly for tests.
void write_flag_with_kernel(csrc::Handle flag, int value, csrc::Handle stream, int device);

// The stream's later work waits until (int32_t)(*flag - value) >= 0 (no SM).
void wait_flag(csrc::Handle flag, int value, csrc::Handle stream, int device);

// A one-thread kernel waits for the same condition, at most timeout_ns nanoseconds of real
// time; on a timeout status[0:2] = (code, observed flag) unless status[0] was already set.
void wait_flag_bounded(csrc::Handle flag, int value, csrc::Handle status, int64_t timeout_ns,
                       int code, csrc::Handle stream, int device);

// A kernel of this module, for kernel_info()'s check that the device can load the module.
const void* signal_kernel_for_probe();

}  // namespace overlap
