// Status: the one error type of the llumnix_kv C++ core (RocksDB style).
// Every fallible function returns a Status (or fills an out-parameter and returns one);
// the Python binding maps each Code to one exception class of llumnix_kv.errors.
#pragma once

#include <string>
#include <utility>

namespace llumnix_kv {

class Status {
 public:
  // Keep in sync with llumnix_kv/errors.py (the binding checks the count at import).
  enum class Code : int {
    kOk = 0,
    kInvalidArgument = 1,  // a parameter is malformed (negative size, wrong count, ...)
    kInvalidLayout = 2,    // a KV layout description is self-inconsistent
    kLayoutMismatch = 3,   // two layouts cannot be copied between (different models)
    kOutOfRange = 4,       // an index (block id, token, head, region) is outside its bounds
    kUnsupported = 5,      // a valid request this build or device cannot serve
    kDeviceError = 6,      // the CUDA runtime reported an error
    kTimeout = 7,
    kCancelled = 8,
    kPeerLost = 9,
    kBadDescriptor = 10,
    kUnregisteredMemory = 11,
    kCorruption = 12,
    kInternal = 13,
  };
  static constexpr int kNumCodes = 14;

  Status() = default;
  Status(Code code, std::string msg) : code_(code), msg_(std::move(msg)) {}

  static Status Ok() { return {}; }
  static Status InvalidArgument(std::string m) { return {Code::kInvalidArgument, std::move(m)}; }
  static Status InvalidLayout(std::string m) { return {Code::kInvalidLayout, std::move(m)}; }
  static Status LayoutMismatch(std::string m) { return {Code::kLayoutMismatch, std::move(m)}; }
  static Status OutOfRange(std::string m) { return {Code::kOutOfRange, std::move(m)}; }
  static Status Unsupported(std::string m) { return {Code::kUnsupported, std::move(m)}; }
  static Status DeviceError(std::string m) { return {Code::kDeviceError, std::move(m)}; }
  static Status Internal(std::string m) { return {Code::kInternal, std::move(m)}; }

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  const std::string& message() const { return msg_; }

 private:
  Code code_ = Code::kOk;
  std::string msg_;
};

}  // namespace llumnix_kv

#define LLUMNIX_KV_RETURN_IF_ERROR(expr) \
  do {                                   \
    ::llumnix_kv::Status _st = (expr);   \
    if (!_st.ok()) return _st;           \
  } while (0)
