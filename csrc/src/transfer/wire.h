// Little-endian, bounds-checked encoding of descriptors and messages. A reader never reads past
// its buffer: every short or malformed input becomes a BadDescriptor status.
#pragma once

#include <cstdint>
#include <cstring>
#include <string>
#include <string_view>

#include "llumnix_kv/status.h"

namespace llumnix_kv::wire {

class Writer {
 public:
  template <typename T>
  void Put(T v) {
    static_assert(std::is_trivially_copyable_v<T>);
    out_.append(reinterpret_cast<const char*>(&v), sizeof(T));
  }
  void PutString(std::string_view s) {
    Put<uint32_t>(static_cast<uint32_t>(s.size()));
    out_.append(s.data(), s.size());
  }
  std::string& str() { return out_; }

 private:
  std::string out_;
};

class Reader {
 public:
  Reader(const void* data, size_t size) : p_(static_cast<const char*>(data)), left_(size) {}
  explicit Reader(std::string_view s) : Reader(s.data(), s.size()) {}

  template <typename T>
  Status Get(T* v) {
    if (left_ < sizeof(T)) return Truncated();
    std::memcpy(v, p_, sizeof(T));
    p_ += sizeof(T);
    left_ -= sizeof(T);
    return Status::Ok();
  }
  Status GetString(std::string* s, uint32_t max_len = 1 << 20) {
    uint32_t n = 0;
    LLUMNIX_KV_RETURN_IF_ERROR(Get(&n));
    if (n > max_len) return Status(Status::Code::kBadDescriptor, "string length out of range");
    if (left_ < n) return Truncated();
    s->assign(p_, n);
    p_ += n;
    left_ -= n;
    return Status::Ok();
  }
  size_t left() const { return left_; }

 private:
  static Status Truncated() {
    return Status(Status::Code::kBadDescriptor, "truncated or malformed input");
  }
  const char* p_;
  size_t left_;
};

}  // namespace llumnix_kv::wire
