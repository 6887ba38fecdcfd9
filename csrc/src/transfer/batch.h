// A submitted batch: shared by the engine (its table), the links moving its parts and the
// caller polling it. The first error wins; parts finishing after a failure only count down.
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "llumnix_kv/status.h"
#include "llumnix_kv/transfer/types.h"

namespace llumnix_kv {

using Clock = std::chrono::steady_clock;

class Batch {
 public:
  Batch(uint64_t id, TransferOp op, std::vector<Segment> segs, SubmitOptions opts)
      : id(id), op(op), segs(std::move(segs)), opts(std::move(opts)) {
    for (const Segment& s : this->segs) bytes += s.len;
    if (this->opts.timeout_s > 0) {
      deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                    std::chrono::duration<double>(this->opts.timeout_s));
    }
  }

  const uint64_t id;
  const TransferOp op;
  const std::vector<Segment> segs;
  const SubmitOptions opts;
  uint64_t bytes = 0;
  Clock::time_point deadline = Clock::time_point::max();
  std::string transport;
  bool device = false;       // some segment is in CUDA device memory
  bool device_only = false;  // every segment is device memory on both sides
  int32_t cuda_device = -1;  // the device of the first device-memory segment
  bool staged = false;       // SubmitOptions::mode resolved: gather, one message, scatter
  std::atomic<bool> cancelled{false};
  // False once the peer is known to be gone (its control connection closed); checked while
  // the batch is pending, so a batch to a dead peer fails even if its transport would hang.
  std::function<bool()> peer_alive;
  // Runs once, outside the lock, when the last part finished and the batch succeeded so far;
  // returns the final status (e.g. an error if the notification could not be sent).
  std::function<Status(Batch&)> on_success;

  void SetParts(int n) {
    std::lock_guard<std::mutex> lock(mu_);
    parts_left_ = n;
    if (n == 0) FinishLocked(Status::Ok());
  }

  void PartDone(const Status& st, uint64_t part_bytes) {
    bool last = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (st.ok()) {
        done_bytes_ += part_bytes;
      } else if (status_.ok()) {
        status_ = st;
      }
      last = --parts_left_ == 0;
      if (last && !status_.ok()) {
        FinishLocked(status_);
        return;
      }
    }
    if (!last) return;
    Status final_status = on_success ? on_success(*this) : Status::Ok();
    std::lock_guard<std::mutex> lock(mu_);
    FinishLocked(final_status);
  }

  // Fails the batch now (timeout, cancel); parts still in flight keep counting down.
  void Fail(const Status& st) {
    std::lock_guard<std::mutex> lock(mu_);
    if (state_ != BatchState::kPending) return;
    status_ = st;
    state_ = BatchState::kFailed;
    cv_.notify_all();
  }

  // Current state; applies the deadline.
  BatchStatus Snapshot(Status* st) {
    std::lock_guard<std::mutex> lock(mu_);
    CheckDeadlineLocked();
    *st = state_ == BatchState::kFailed ? status_ : Status::Ok();
    return {state_, bytes, done_bytes_, transport, staged};
  }

  // Waits until the batch leaves kPending or `until`; applies the deadline and notices a
  // lost peer within kLivenessCheck.
  BatchStatus WaitUntil(Clock::time_point until, Status* st) {
    std::unique_lock<std::mutex> lock(mu_);
    while (state_ == BatchState::kPending) {
      CheckDeadlineLocked();
      if (state_ != BatchState::kPending || Clock::now() >= until) break;
      cv_.wait_until(lock, std::min({until, deadline, Clock::now() + kLivenessCheck}));
    }
    *st = state_ == BatchState::kFailed ? status_ : Status::Ok();
    return {state_, bytes, done_bytes_, transport, staged};
  }

  // True once no link touches the batch's memory any more.
  bool Quiescent() {
    std::lock_guard<std::mutex> lock(mu_);
    return parts_left_ <= 0;
  }

 private:
  void FinishLocked(const Status& st) {
    if (state_ == BatchState::kPending) {
      status_ = st;
      state_ = st.ok() ? BatchState::kDone : BatchState::kFailed;
    }
    cv_.notify_all();
  }
  static constexpr std::chrono::milliseconds kLivenessCheck{50};

  void CheckDeadlineLocked() {
    if (state_ == BatchState::kPending && peer_alive && !peer_alive()) {
      status_ = Status(Status::Code::kPeerLost,
                       "peer went away while batch " + std::to_string(id) + " was in flight");
      state_ = BatchState::kFailed;
      cancelled = true;
      cv_.notify_all();
      return;
    }
    if (state_ == BatchState::kPending && Clock::now() >= deadline) {
      status_ =
          Status(Status::Code::kTimeout, "batch " + std::to_string(id) + " did not finish within " +
                                             std::to_string(opts.timeout_s) + " s");
      state_ = BatchState::kFailed;
      cancelled = true;
      cv_.notify_all();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int parts_left_ = 1;
  uint64_t done_bytes_ = 0;
  BatchState state_ = BatchState::kPending;
  Status status_;
};

}  // namespace llumnix_kv
