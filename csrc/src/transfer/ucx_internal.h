// Internal to the ucx transport (ucx_transport.cc, ucx_staged.cc): constants, wire structs,
// per-link and per-operation state, and the UcxTransport and UcxLink classes.
#pragma once

// Staged mode (Batch::staged, host memory only) moves a batch as a few active messages instead
// of one put/get per segment. The batch is cut into parts of at most kStagedPartBytes payload and
// kStagedPartSegments segments (a longer segment is cut into pieces); each part is one request
// and one reply, and the table travels in the AM header, so both sides move the payload with
// UCP_DATATYPE_IOV straight from and into registered memory (no staging copy):
//   kStagedWriteAm  header StagedHeader + table {remote addr, len}, data = local segments
//                   gathered -> kStagedReplyAm {status}, sent once the data has landed
//   kStagedReadAm   header StagedHeader + table, no data
//                   -> kStagedReplyAm {status}, data = the peer's segments gathered
// The receiver checks every table entry with EngineServices::CheckLocal (registered host
// memory) before touching memory, and scatters eager data by memcpy in the AM callback or
// rendezvous data by ucp_am_recv_data_nbx over an IOV of the destinations. Requests carry
// UCP_AM_SEND_FLAG_REPLY, so the receiver answers on param->reply_ep: it needs no link of its
// own to the initiator. Replies find their part by the token of the request (staged_).
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "crc32c.h"
#include "transport.h"

namespace llumnix_kv::ucx {

constexpr unsigned kNotifyAm = 17;       // active message id of notifications
constexpr unsigned kStagedWriteAm = 18;  // staged WRITE: table in the header, payload as data
constexpr unsigned kStagedReadAm = 19;   // staged READ request: table in the header
constexpr unsigned kStagedReplyAm = 20;  // reply to either: ReplyHeader (+ READ payload)
// A staged part carries at most this much payload (bytes) and this many table entries; the
// table (16 bytes an entry) must fit the AM header, which UCX 1.13 sends in one fragment of the
// rendezvous RTS or the first eager fragment (8 KiB on tcp and shared memory).
constexpr uint64_t kStagedPartBytes = 64ull << 20;
constexpr uint32_t kStagedPartSegments = 256;
constexpr uint32_t kStagedFlagCrc = 1;  // StagedHeader::flags: the header carries a CRC32C
constexpr int kIdleWaitMs = 100;        // epoll timeout with nothing in flight
constexpr int kBusyWaitMs = 1;          // epoll timeout while requests are outstanding
// With requests outstanding the thread polls without sleeping until the worker has been quiet
// this long: some transports (tcp sends into a full socket) make progress only when polled.
constexpr auto kSpin = std::chrono::milliseconds(20);
constexpr double kSyncTimeoutS = 30;  // bound on a call handed to the progress thread
constexpr double kCloseFlushS = 1;    // Close lets posted work land for this long
constexpr double kEpCloseS = 2;       // bound on a forced endpoint close

inline Status UcsError(Status::Code code, const std::string& what, ucs_status_t st) {
  return Status(code, what + ": " + ucs_status_string(st));
}

inline bool IsPeerLoss(ucs_status_t st) {
  return st == UCS_ERR_CONNECTION_RESET || st == UCS_ERR_ENDPOINT_TIMEOUT ||
         st == UCS_ERR_UNREACHABLE || st == UCS_ERR_NOT_CONNECTED || st == UCS_ERR_REJECTED ||
         st == UCS_ERR_CANCELED || st == UCS_ERR_IO_ERROR || st == UCS_ERR_TIMED_OUT;
}

// Wire headers of the staged messages, copied with memcpy (AM headers are not aligned).
struct StagedHeader {
  uint64_t token;  // the initiator's key for the reply
  uint64_t batch;  // for messages only
  uint32_t count;  // table entries that follow
  uint32_t flags;  // kStagedFlagCrc
  uint32_t crc;    // CRC32C of the WRITE payload
  uint32_t pad;
};
struct TableEntry {
  uint64_t addr;
  uint64_t len;
};
struct ReplyHeader {
  uint64_t token;
  int32_t code;      // Status::Code
  uint32_t crc;      // CRC32C of the READ payload, when the request asked for it
  uint32_t msg_len;  // bytes of the status message after the header
  uint32_t pad;
};

class UcxTransport;
struct OpCtx;

// A connection to one peer. Fields without atomics belong to the progress thread.
struct LinkState {
  UcxTransport* transport = nullptr;
  PeerDescriptor desc;
  ucp_ep_h ep = nullptr;
  std::map<uint64_t, ucp_rkey_h> rkeys;  // peer region addr -> unpacked rkey
  std::set<OpCtx*> inflight;
  std::string failure;  // why the endpoint failed
  std::atomic<bool> failed{false};
  std::atomic<bool> closed{false};

  // Progress thread only (reads `failure`).
  Status Lost(const std::string& what) const {
    const std::string why = !failure.empty() ? ": " + failure : closed ? ": closed" : "";
    return Status(Status::Code::kPeerLost, what + " (ucx link to " + desc.name + why + ")");
  }
  // Any thread.
  Status Gone(const std::string& what) const {
    return Status(Status::Code::kPeerLost,
                  what + ": the ucx link to " + desc.name + " is closed or failed");
  }
};

// One part of a batch in flight: alive until UCX completed every request issued for it and,
// for a staged part, until its reply arrived or was given up.
struct OpCtx {
  std::shared_ptr<Batch> batch;
  std::shared_ptr<LinkState> link;
  int pending = 1;  // requests not yet completed (+1 while issuing, +1 awaiting a reply)
  bool reported = false;
  Status status;
  uint64_t bytes = 0;  // payload of the part, reported when it succeeds
  // Staged parts only.
  uint64_t token = 0;               // key in UcxTransport::staged_ while awaiting_reply
  bool awaiting_reply = false;      // the reply counts as one of `pending`
  bool crc = false;                 // the reply carries a CRC32C of the READ payload
  std::string header;               // StagedHeader + table, alive until the send completed
  std::vector<ucp_dt_iov_t> local;  // the part's local memory: gathered (WRITE), filled (READ)
};

// The payload of a staged part: pieces of the batch's segments.
struct StagedPart {
  std::vector<Segment> segs;
  uint64_t bytes = 0;
};
using StagedPlan = std::vector<StagedPart>;

// The receiving side of a staged message: a rendezvous payload being fetched into `iov`, or a
// reply being sent from `iov` (header alive until the send completed).
struct StagedIo {
  UcxTransport* transport;
  ucp_ep_h reply_ep;
  uint64_t token;
  uint32_t crc;    // the CRC32C the initiator computed over a WRITE payload
  bool check_crc;  // the request asked for CRC32C (checked for a WRITE, sent for a READ)
  std::vector<ucp_dt_iov_t> iov;
  std::string header;
};

// A notification being sent (buffers live until the send completes) or received by
// rendezvous. `name` is the sender's agent name.
struct AmMsg {
  UcxTransport* transport;
  std::string name;
  std::string body;
};

class UcxTransport : public Transport {
 public:
  explicit UcxTransport(EngineServices* engine) : engine_(engine) {}
  ~UcxTransport() override { Shutdown(); }

  // Starts the progress thread, which initialises UCX; fails if UCX cannot be initialised.
  Status Start() {
    wake_fd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (wake_fd_ < 0) return Status::Internal("eventfd failed");
    std::promise<Status> ready;
    std::future<Status> started = ready.get_future();
    thread_ = std::thread([this, &ready] { Run(&ready); });
    const Status st = started.get();  // ucp_init and ucp_worker_create do not block
    if (!st.ok()) {
      thread_.join();
      close(wake_fd_);
      wake_fd_ = -1;
    }
    return st;
  }

  std::string Name() const override { return "ucx"; }
  std::string Endpoint() const override { return address_; }
  bool Reaches(const PeerDescriptor& peer) const override {
    auto it = peer.endpoints.find("ucx");
    return it != peer.endpoints.end() && !it->second.empty();
  }
  // True when this UCX build moves CUDA memory (cuda_copy / cuda_ipc / GPUDirect).
  bool SupportsDevice() const override { return cuda_; }

  Status RegisterRegion(const LocalRegion& region, std::string* key) override {
    auto out = std::make_shared<std::string>();
    LLUMNIX_KV_RETURN_IF_ERROR(
        RunSync([this, region, out] { return MapRegion(region, out.get()); }));
    *key = *out;
    return Status::Ok();
  }

  void DeregisterRegion(const LocalRegion& region) override {
    (void)RunSync([this, region] {
      UnmapRegion(region.handle);
      return Status::Ok();
    });
  }

  Status Connect(const PeerDescriptor& peer, std::unique_ptr<Link>* link) override;

  void Shutdown() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_ || !thread_.joinable()) return;
      stop_ = true;
    }
    Wake();
    thread_.join();
    close(wake_fd_);
    wake_fd_ = -1;
  }

  // Runs `fn` on the progress thread and waits for it (inline when already there). `fn` must
  // capture by value: after a timeout it may still run.
  Status RunSync(std::function<Status()> fn) {
    if (std::this_thread::get_id() == thread_id_) return fn();
    struct Done {
      std::mutex mu;
      std::condition_variable cv;
      bool ready = false;
      Status st;
    };
    auto done = std::make_shared<Done>();
    const bool queued = Enqueue([fn = std::move(fn), done] {
      Status st = fn();
      std::lock_guard<std::mutex> lock(done->mu);
      done->st = std::move(st);
      done->ready = true;
      done->cv.notify_all();
    });
    if (!queued) return Status(Status::Code::kPeerLost, "the ucx transport is shut down");
    std::unique_lock<std::mutex> lock(done->mu);
    const auto limit = std::chrono::duration<double>(kSyncTimeoutS);
    if (!done->cv.wait_for(lock, limit, [&] { return done->ready; })) {
      return Status(Status::Code::kTimeout, "the ucx progress thread did not answer within " +
                                                std::to_string(kSyncTimeoutS) + " s");
    }
    return done->st;
  }

  // Queues `fn` for the progress thread; false once the transport is shut down.
  bool Enqueue(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (stop_) return false;
      queue_.push_back(std::move(fn));
    }
    Wake();
    return true;
  }

  bool OnProgressThread() const { return std::this_thread::get_id() == thread_id_; }
  const std::string& host_id() const { return engine_->host_id(); }

  // Progress thread only.
  void Issue(const std::shared_ptr<LinkState>& link, const std::shared_ptr<Batch>& batch);
  void IssueStaged(const std::shared_ptr<LinkState>& link, const std::shared_ptr<Batch>& batch,
                   const std::shared_ptr<const StagedPlan>& plan);
  Status SendNotify(const std::shared_ptr<LinkState>& link, const std::string& msg);
  Status CloseLink(const std::shared_ptr<LinkState>& link);

 private:
  void Wake() {
    const uint64_t one = 1;
    (void)!write(wake_fd_, &one, sizeof(one));
  }

  void Run(std::promise<Status>* ready);
  Status Init();
  void Loop();
  void Cleanup();
  Status ConnectOnThread(const std::shared_ptr<LinkState>& link);
  Status MapRegion(const LocalRegion& region, std::string* key);
  void UnmapRegion(uint64_t handle);
  ucp_mem_h LocalMemh(uint64_t addr, uint64_t len) const;
  bool Track(OpCtx* ctx, ucs_status_ptr_t req, const char* what);
  Status WaitRequest(ucs_status_ptr_t req, double timeout_s);
  void DestroyRkeys(LinkState* link);

  static void OnOpDone(void* request, ucs_status_t st, void* user_data);
  static void Release(OpCtx* ctx);
  static void DropReply(OpCtx* ctx);
  static void FailAwaiting(LinkState* link, const Status& st);

  // Staged mode.
  void SendStagedPart(const std::shared_ptr<LinkState>& link, const std::shared_ptr<Batch>& batch,
                      const StagedPart& part);
  Status CheckTable(const void* header, size_t header_len, StagedHeader* h,
                    std::vector<ucp_dt_iov_t>* iov) const;
  void CompleteRead(OpCtx* ctx, const ReplyHeader& h, void* data, size_t len, bool rndv);
  void FinishWrite(StagedIo* in, ucs_status_t s);
  void QueueReply(StagedIo* out, const Status& st);
  void SendReply(StagedIo* out, const Status& st);
  static void OnStagedSent(void* request, ucs_status_t st, void* user_data);
  static void OnStagedWriteData(void* request, ucs_status_t st, size_t length, void* user_data);
  static void OnStagedReadData(void* request, ucs_status_t st, size_t length, void* user_data);
  static ucs_status_t OnStagedWriteAm(void* arg, const void* header, size_t header_len, void* data,
                                      size_t len, const ucp_am_recv_param_t* param);
  static ucs_status_t OnStagedReadAm(void* arg, const void* header, size_t header_len, void* data,
                                     size_t len, const ucp_am_recv_param_t* param);
  static ucs_status_t OnStagedReplyAm(void* arg, const void* header, size_t header_len, void* data,
                                      size_t len, const ucp_am_recv_param_t* param);
  static void OnAmSent(void* request, ucs_status_t st, void* user_data);
  static void OnAmData(void* request, ucs_status_t st, size_t length, void* user_data);
  static ucs_status_t OnNotifyAm(void* arg, const void* header, size_t header_len, void* data,
                                 size_t len, const ucp_am_recv_param_t* param);
  static void OnEpError(void* arg, ucp_ep_h ep, ucs_status_t st);

  EngineServices* engine_;
  std::thread thread_;
  std::thread::id thread_id_;
  int wake_fd_ = -1;
  std::mutex mu_;
  bool stop_ = false;
  std::deque<std::function<void()>> queue_;

  // Owned by the progress thread (address_ is written before Start returns).
  ucp_context_h context_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  int epoll_fd_ = -1;
  std::string address_;
  bool cuda_ = false;                   // UCX knows CUDA memory (written before Start returns)
  std::map<uint64_t, ucp_mem_h> memh_;  // region handle -> memh
  std::map<uint64_t, std::pair<uint64_t, ucp_mem_h>> local_;  // addr -> (len, memh)
  std::vector<std::shared_ptr<LinkState>> links_;             // open endpoints
  int64_t outstanding_ = 0;                                   // requests in flight
  std::map<uint64_t, OpCtx*> staged_;  // token -> staged part awaiting its reply
  uint64_t next_token_ = 0;
  int64_t received_writes_ = 0;  // staged WRITE parts landed (EngineConfig::debug_corrupt_every)
};

// Cuts a staged batch into parts of at most kStagedPartBytes and kStagedPartSegments; empty
// segments are left out.
StagedPlan PlanStaged(const Batch& batch);

class UcxLink : public Link {
 public:
  UcxLink(UcxTransport* transport, std::shared_ptr<LinkState> state)
      : transport_(transport), state_(std::move(state)) {}
  ~UcxLink() override { Close(); }

  // Staged batches of host memory go as staged parts; an empty one goes direct (one flush), so
  // that its notification still follows the link's earlier batches.
  Status Post(const std::shared_ptr<Batch>& batch) override {
    if (!Alive()) return state_->Gone("cannot post batch " + std::to_string(batch->id));
    auto state = state_;
    auto t = transport_;
    std::function<void()> issue = [t, state, batch] { t->Issue(state, batch); };
    // On one host, "auto" stages host-memory batches of any segment size. UCX (1.22; see
    // UCX_PROTO_INFO=y) puts or gets each segment with one cma call (process_vm_writev) made
    // by this process alone, but moves an IOV active-message payload through its sysv
    // shared-memory FIFO in 8 KiB fragments, the sender copying in while the receiver copies
    // out: two cores at work. Measured on the 2-core CI machine (32 MiB batches), staged vs
    // direct: 16 KiB blocks 6.0-6.3 vs 2.4-2.6 GB/s, 1 MiB 7.7-9.2 vs 4.3-5.0. The FIFO's rate
    // swings for seconds at a time (2.3-8 GB/s, both copying threads on their own cores; the
    // cause is not known). Another host keeps direct put/get for large segments (RDMA).
    if (batch->opts.mode == "auto" && !batch->device &&
        state_->desc.host_id == transport_->host_id()) {
      batch->staged = true;
    }
    if (batch->staged && !batch->device && batch->bytes > 0) {
      auto plan = std::make_shared<const StagedPlan>(PlanStaged(*batch));
      batch->SetParts(static_cast<int>(plan->size()));
      issue = [t, state, batch, plan] { t->IssueStaged(state, batch, plan); };
    } else {
      batch->SetParts(1);
    }
    if (!transport_->Enqueue(std::move(issue))) {
      return Status(Status::Code::kPeerLost, "the ucx transport is shut down");
    }
    return Status::Ok();
  }

  // Ordered after every batch this link completed: the engine calls it once a batch's flush
  // finished, and the progress thread sends in queue order.
  Status Notify(const std::string& msg) override {
    if (!Alive()) return state_->Gone("cannot send a notification");
    if (transport_->OnProgressThread()) return transport_->SendNotify(state_, msg);
    auto state = state_;
    auto t = transport_;
    if (!transport_->Enqueue([t, state, msg] { (void)t->SendNotify(state, msg); })) {
      return Status(Status::Code::kPeerLost, "the ucx transport is shut down");
    }
    return Status::Ok();
  }

  bool Alive() const override { return !state_->failed && !state_->closed; }

  void Close() override {
    if (closing_.exchange(true)) return;
    auto state = state_;
    auto t = transport_;
    (void)transport_->RunSync([t, state] { return t->CloseLink(state); });
    state_->closed = true;
  }

 private:
  UcxTransport* transport_;
  std::shared_ptr<LinkState> state_;
  std::atomic<bool> closing_{false};
};

}  // namespace llumnix_kv::ucx
