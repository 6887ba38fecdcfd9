// ucx: one-sided RMA through UCP (put/get with packed rkeys), notifications by active message.
//
// UCX chooses the wire itself (verbs RDMA, tcp, shared memory, cma, and cuda_copy/cuda_ipc when
// it was built with CUDA). Every UCX call of a transport runs on its one progress thread, which
// owns the context and the worker (UCS_THREAD_MODE_SINGLE); other threads hand it closures
// through a mutex-protected queue and wake it through an eventfd. The thread sleeps in
// epoll_wait on that eventfd and the worker's event fd (ucp_worker_arm) when idle.
//   Endpoint()   the worker address (ucp_worker_get_address), binary
//   region key   ucp_rkey_pack of the region's memh
// Direct mode: a batch is one part: a put (WRITE) or get (READ) per segment, then an endpoint
// flush; the part is done when every request and the flush completed, i.e. the data is remotely
// complete.
// A notification is active message kNotifyAm: header = the sender's agent name, data = the
// message (eager or rendezvous, any size).
//
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

namespace llumnix_kv {
namespace {

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

Status UcsError(Status::Code code, const std::string& what, ucs_status_t st) {
  return Status(code, what + ": " + ucs_status_string(st));
}

bool IsPeerLoss(ucs_status_t st) {
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

// Cuts a staged batch into parts (see kStagedPartBytes); empty segments are left out.
StagedPlan PlanStaged(const Batch& batch) {
  StagedPlan plan;
  for (const Segment& s : batch.segs) {
    for (uint64_t off = 0; off < s.len;) {
      if (plan.empty() || plan.back().segs.size() >= kStagedPartSegments ||
          plan.back().bytes >= kStagedPartBytes) {
        plan.emplace_back();
      }
      StagedPart& part = plan.back();
      const uint64_t n = std::min(s.len - off, kStagedPartBytes - part.bytes);
      part.segs.push_back({s.local + off, s.remote + off, n});
      part.bytes += n;
      off += n;
    }
  }
  return plan;
}

uint32_t CrcOf(const std::vector<ucp_dt_iov_t>& iov) {
  uint32_t crc = 0;
  for (const ucp_dt_iov_t& v : iov) crc = Crc32c(crc, v.buffer, v.length);
  return crc;
}

// Copies `len` bytes from `data` into the buffers of `iov`, which hold exactly `len` bytes.
void Scatter(const std::vector<ucp_dt_iov_t>& iov, const void* data) {
  const char* p = static_cast<const char*>(data);
  for (const ucp_dt_iov_t& v : iov) {
    memcpy(v.buffer, p, v.length);
    p += v.length;
  }
}

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

// ---------------------------------------------------------------------------------------------
// Progress thread: setup, loop, teardown.

void UcxTransport::Run(std::promise<Status>* ready) {
  thread_id_ = std::this_thread::get_id();
  const Status st = Init();
  if (!st.ok()) {
    Cleanup();
    ready->set_value(st);
    return;
  }
  ready->set_value(Status::Ok());
  Loop();
  Cleanup();
}

Status UcxTransport::Init() {
  ucp_config_t* config = nullptr;
  ucs_status_t s = ucp_config_read(nullptr, nullptr, &config);
  if (s != UCS_OK) return UcsError(Status::Code::kUnsupported, "ucp_config_read failed", s);
  ucp_params_t params{};
  params.field_mask = UCP_PARAM_FIELD_FEATURES;
  params.features = UCP_FEATURE_RMA | UCP_FEATURE_AM | UCP_FEATURE_WAKEUP;
  s = ucp_init(&params, config, &context_);
  ucp_config_release(config);
  if (s != UCS_OK) return UcsError(Status::Code::kUnsupported, "ucp_init failed", s);

  ucp_context_attr_t attr{};
  attr.field_mask = UCP_ATTR_FIELD_MEMORY_TYPES;
  if (ucp_context_query(context_, &attr) == UCS_OK) {
    cuda_ = attr.memory_types & UCS_BIT(UCS_MEMORY_TYPE_CUDA);
  }

  ucp_worker_params_t wp{};
  wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
  wp.thread_mode = UCS_THREAD_MODE_SINGLE;
  s = ucp_worker_create(context_, &wp, &worker_);
  if (s != UCS_OK) return UcsError(Status::Code::kUnsupported, "ucp_worker_create failed", s);

  ucp_address_t* addr = nullptr;
  size_t addr_len = 0;
  s = ucp_worker_get_address(worker_, &addr, &addr_len);
  if (s != UCS_OK) return UcsError(Status::Code::kInternal, "ucp_worker_get_address failed", s);
  address_.assign(reinterpret_cast<const char*>(addr), addr_len);
  ucp_worker_release_address(worker_, addr);

  int efd = -1;
  s = ucp_worker_get_efd(worker_, &efd);
  if (s != UCS_OK) return UcsError(Status::Code::kInternal, "ucp_worker_get_efd failed", s);
  epoll_fd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epoll_fd_ < 0) return Status::Internal("epoll_create1 failed");
  for (int fd : {efd, wake_fd_}) {
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = fd;
    if (epoll_ctl(epoll_fd_, EPOLL_CTL_ADD, fd, &ev) != 0) return Status::Internal("epoll_ctl");
  }

  const std::pair<unsigned, ucp_am_recv_callback_t> handlers[] = {
      {kNotifyAm, &UcxTransport::OnNotifyAm},
      {kStagedWriteAm, &UcxTransport::OnStagedWriteAm},
      {kStagedReadAm, &UcxTransport::OnStagedReadAm},
      {kStagedReplyAm, &UcxTransport::OnStagedReplyAm},
  };
  for (const auto& [id, cb] : handlers) {
    ucp_am_handler_param_t am{};
    am.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_FLAGS |
                    UCP_AM_HANDLER_PARAM_FIELD_CB | UCP_AM_HANDLER_PARAM_FIELD_ARG;
    am.id = id;
    am.flags = UCP_AM_FLAG_WHOLE_MSG;
    am.cb = cb;
    am.arg = this;
    s = ucp_worker_set_am_recv_handler(worker_, &am);
    if (s != UCS_OK) {
      return UcsError(Status::Code::kInternal, "ucp_worker_set_am_recv_handler failed", s);
    }
  }
  return Status::Ok();
}

void UcxTransport::Loop() {
  Clock::time_point last_active = Clock::now();
  while (true) {
    std::deque<std::function<void()>> tasks;
    bool stop = false;
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks.swap(queue_);
      stop = stop_;
    }
    for (auto& task : tasks) task();
    if (stop) return;  // what was queued before Shutdown has run
    bool active = !tasks.empty();
    while (ucp_worker_progress(worker_) != 0) active = true;
    const Clock::time_point now = Clock::now();
    if (active) last_active = now;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!queue_.empty() || stop_) continue;
    }
    if (outstanding_ > 0 && now - last_active < kSpin) {
      std::this_thread::yield();
      continue;
    }
    if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) continue;  // events arrived meanwhile
    epoll_event events[2];
    const int n = epoll_wait(epoll_fd_, events, 2, outstanding_ > 0 ? kBusyWaitMs : kIdleWaitMs);
    for (int i = 0; i < n; ++i) {
      if (events[i].data.fd == wake_fd_) {
        uint64_t count = 0;
        (void)!read(wake_fd_, &count, sizeof(count));
      }
    }
  }
}

void UcxTransport::Cleanup() {
  if (worker_ != nullptr) {
    std::vector<std::shared_ptr<LinkState>> links = links_;
    for (auto& link : links) (void)CloseLink(link);
    for (auto& [handle, memh] : memh_) ucp_mem_unmap(context_, memh);
    memh_.clear();
    local_.clear();
    ucp_worker_destroy(worker_);
    worker_ = nullptr;
  }
  if (context_ != nullptr) {
    ucp_cleanup(context_);
    context_ = nullptr;
  }
  if (epoll_fd_ >= 0) close(epoll_fd_);
  epoll_fd_ = -1;
}

// Polls `req` to completion, progressing the worker, for at most `timeout_s`; frees it.
Status UcxTransport::WaitRequest(ucs_status_ptr_t req, double timeout_s) {
  if (req == nullptr) return Status::Ok();
  if (UCS_PTR_IS_ERR(req)) return UcsError(Status::Code::kInternal, "ucx", UCS_PTR_STATUS(req));
  const auto until = Clock::now() + std::chrono::duration_cast<Clock::duration>(
                                        std::chrono::duration<double>(timeout_s));
  ucs_status_t st = UCS_INPROGRESS;
  while ((st = ucp_request_check_status(req)) == UCS_INPROGRESS && Clock::now() < until) {
    if (ucp_worker_progress(worker_) == 0)
      std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  ucp_request_free(req);  // an unfinished request is released by UCX when it completes
  if (st == UCS_INPROGRESS) return Status(Status::Code::kTimeout, "ucx request timed out");
  return st == UCS_OK ? Status::Ok() : UcsError(Status::Code::kInternal, "ucx", st);
}

// ---------------------------------------------------------------------------------------------
// Memory registration.

Status UcxTransport::MapRegion(const LocalRegion& region, std::string* key) {
  if (region.device >= 0 && !cuda_) {
    key->clear();  // not reachable by ucx; SupportsDevice() keeps such batches off this link
    return Status::Ok();
  }
  ucp_mem_map_params_t p{};
  p.field_mask = UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH |
                 UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE;
  p.address = reinterpret_cast<void*>(region.addr);
  p.length = region.len;
  p.memory_type = UCS_MEMORY_TYPE_UNKNOWN;  // UCX detects host or CUDA memory
  ucp_mem_h memh = nullptr;
  ucs_status_t s = ucp_mem_map(context_, &p, &memh);
  const std::string what = "[" + std::to_string(region.addr) + ", +" + std::to_string(region.len) +
                           ")" +
                           (region.device >= 0 ? " on cuda:" + std::to_string(region.device) : "");
  if (s != UCS_OK) {
    return UcsError(region.device >= 0 ? Status::Code::kUnsupported : Status::Code::kInternal,
                    "ucp_mem_map of " + what + " failed", s);
  }
  void* buf = nullptr;
  size_t size = 0;
  s = ucp_rkey_pack(context_, memh, &buf, &size);
  if (s != UCS_OK) {
    ucp_mem_unmap(context_, memh);
    return UcsError(Status::Code::kInternal, "ucp_rkey_pack of " + what + " failed", s);
  }
  key->assign(static_cast<const char*>(buf), size);
  ucp_rkey_buffer_release(buf);
  memh_[region.handle] = memh;
  local_[region.addr] = {region.len, memh};
  return Status::Ok();
}

void UcxTransport::UnmapRegion(uint64_t handle) {
  auto it = memh_.find(handle);
  if (it == memh_.end()) return;
  for (auto l = local_.begin(); l != local_.end(); ++l) {
    if (l->second.second == it->second) {
      local_.erase(l);
      break;
    }
  }
  ucp_mem_unmap(context_, it->second);
  memh_.erase(it);
}

ucp_mem_h UcxTransport::LocalMemh(uint64_t addr, uint64_t len) const {
  auto it = local_.upper_bound(addr);
  if (it == local_.begin()) return nullptr;
  --it;
  return addr + len <= it->first + it->second.first ? it->second.second : nullptr;
}

// ---------------------------------------------------------------------------------------------
// Endpoints.

void UcxTransport::OnEpError(void* arg, ucp_ep_h, ucs_status_t st) {
  // UCX then completes the endpoint's outstanding requests with errors.
  auto* link = static_cast<LinkState*>(arg);
  link->failure = std::string("endpoint failed: ") + ucs_status_string(st);
  link->failed = true;
  // Staged parts wait for a reply that will not come.
  FailAwaiting(link, link->Lost("staged transfer cut off"));
}

Status UcxTransport::Connect(const PeerDescriptor& peer, std::unique_ptr<Link>* link) {
  auto state = std::make_shared<LinkState>();
  state->transport = this;
  state->desc = peer;
  LLUMNIX_KV_RETURN_IF_ERROR(RunSync([this, state] { return ConnectOnThread(state); }));
  *link = std::make_unique<UcxLink>(this, state);
  return Status::Ok();
}

Status UcxTransport::ConnectOnThread(const std::shared_ptr<LinkState>& link) {
  const std::string& address = link->desc.endpoints.at("ucx");
  ucp_ep_params_t p{};
  p.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE |
                 UCP_EP_PARAM_FIELD_ERR_HANDLER;
  p.address = reinterpret_cast<const ucp_address_t*>(address.data());
  // Peer failure handling disables UCX 1.13's shared-memory transports (sm, cma), leaving
  // emulated RMA over tcp on one host. Same-host peers are watched by the engine's tcp control
  // link instead (a dead process closes its sockets at once), so they go without it.
  const bool same_host = link->desc.host_id == engine_->host_id();
  p.err_mode = same_host ? UCP_ERR_HANDLING_MODE_NONE : UCP_ERR_HANDLING_MODE_PEER;
  p.err_handler.cb = &UcxTransport::OnEpError;
  p.err_handler.arg = link.get();
  ucs_status_t s = ucp_ep_create(worker_, &p, &link->ep);
  if (s != UCS_OK) {
    link->ep = nullptr;
    return UcsError(Status::Code::kPeerLost, "ucp_ep_create to peer " + link->desc.name + " failed",
                    s);
  }
  links_.push_back(link);
  for (const RemoteRegion& r : link->desc.regions) {
    auto key = r.keys.find("ucx");
    if (key == r.keys.end() || key->second.empty()) continue;  // not reachable by ucx
    ucp_rkey_h rkey = nullptr;
    s = ucp_ep_rkey_unpack(link->ep, key->second.data(), &rkey);
    if (s != UCS_OK) {
      (void)CloseLink(link);
      return UcsError(Status::Code::kBadDescriptor,
                      "ucp_ep_rkey_unpack of a region of peer " + link->desc.name + " failed", s);
    }
    link->rkeys[r.addr] = rkey;
  }
  return Status::Ok();
}

void UcxTransport::DestroyRkeys(LinkState* link) {
  for (auto& [addr, rkey] : link->rkeys) ucp_rkey_destroy(rkey);
  link->rkeys.clear();
}

// Lets posted work land (bounded), fails whatever is still in flight with PeerLost, then closes
// the endpoint with FORCE, which cancels any request left; waits for that, bounded.
Status UcxTransport::CloseLink(const std::shared_ptr<LinkState>& link) {
  link->closed = true;
  if (link->ep == nullptr) return Status::Ok();
  if (!link->failed) {
    ucp_request_param_t p{};
    (void)WaitRequest(ucp_ep_flush_nbx(link->ep, &p), kCloseFlushS);
  }
  FailAwaiting(link.get(), link->Lost("staged transfer cut off"));
  const std::vector<OpCtx*> left(link->inflight.begin(), link->inflight.end());
  for (OpCtx* ctx : left) {
    if (!ctx->reported) {
      ctx->reported = true;
      ctx->batch->PartDone(link->Lost("batch " + std::to_string(ctx->batch->id) + " cut off"), 0);
    }
  }
  // rkeys go before the endpoint, unless a request may still use one.
  if (link->inflight.empty()) DestroyRkeys(link.get());
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
  p.flags = UCP_EP_CLOSE_FLAG_FORCE;
  const Status st = WaitRequest(ucp_ep_close_nbx(link->ep, &p), kEpCloseS);
  link->ep = nullptr;
  DestroyRkeys(link.get());
  for (auto it = links_.begin(); it != links_.end(); ++it) {
    if (it->get() == link.get()) {
      links_.erase(it);
      break;
    }
  }
  return st;
}

// ---------------------------------------------------------------------------------------------
// Transfers.

void UcxTransport::OnOpDone(void* request, ucs_status_t st, void* user_data) {
  auto* ctx = static_cast<OpCtx*>(user_data);
  if (st != UCS_OK && ctx->status.ok()) {
    const bool lost = IsPeerLoss(st) || ctx->link->failed || ctx->link->closed;
    ctx->status =
        lost ? ctx->link->Lost(std::string("ucx transfer failed: ") + ucs_status_string(st))
             : UcsError(Status::Code::kInternal, "ucx transfer failed", st);
  }
  if (request != nullptr) ucp_request_free(request);
  if (st != UCS_OK) DropReply(ctx);  // a request that failed gets no reply; pending stays >= 1
  Release(ctx);
}

void UcxTransport::Release(OpCtx* ctx) {
  if (--ctx->pending > 0) return;
  ctx->link->inflight.erase(ctx);
  --ctx->link->transport->outstanding_;
  if (!ctx->reported) {
    ctx->reported = true;
    const uint64_t bytes = ctx->status.ok() ? ctx->bytes : 0;
    ctx->batch->PartDone(ctx->status, bytes);  // may send the notification, inline
  }
  delete ctx;
}

// Stops waiting for the reply of a staged part; may delete `ctx`.
void UcxTransport::DropReply(OpCtx* ctx) {
  if (!ctx->awaiting_reply) return;
  ctx->awaiting_reply = false;
  ctx->link->transport->staged_.erase(ctx->token);
  Release(ctx);
}

// Fails the staged parts of `link` that await a reply with `st`.
void UcxTransport::FailAwaiting(LinkState* link, const Status& st) {
  const std::vector<OpCtx*> left(link->inflight.begin(), link->inflight.end());
  for (OpCtx* ctx : left) {
    if (!ctx->awaiting_reply) continue;
    if (!ctx->reported) {
      ctx->reported = true;
      ctx->batch->PartDone(st, 0);
    }
    DropReply(ctx);
  }
}

// True if the request completed or is in flight; records an immediate error otherwise.
bool UcxTransport::Track(OpCtx* ctx, ucs_status_ptr_t req, const char* what) {
  if (req == nullptr) return true;
  if (UCS_PTR_IS_ERR(req)) {
    const ucs_status_t st = UCS_PTR_STATUS(req);
    if (ctx->status.ok()) {
      ctx->status = IsPeerLoss(st) || ctx->link->failed
                        ? ctx->link->Lost(std::string(what) + " failed: " + ucs_status_string(st))
                        : UcsError(Status::Code::kInternal, std::string(what) + " failed", st);
    }
    return false;
  }
  ++ctx->pending;
  return true;
}

void UcxTransport::Issue(const std::shared_ptr<LinkState>& link,
                         const std::shared_ptr<Batch>& batch) {
  if (link->closed || link->failed || link->ep == nullptr) {
    batch->PartDone(link->Lost("batch " + std::to_string(batch->id) + " not sent"), 0);
    return;
  }
  if (batch->cancelled) {
    batch->PartDone(Status(Status::Code::kCancelled, "batch cancelled"), 0);
    return;
  }
  // Resolve every rkey first: a batch is issued whole or not at all.
  std::vector<ucp_rkey_h> keys(batch->segs.size());
  for (size_t i = 0; i < batch->segs.size(); ++i) {
    const Segment& s = batch->segs[i];
    const RemoteRegion* r = link->desc.Find(s.remote, s.len);
    auto it = r ? link->rkeys.find(r->addr) : link->rkeys.end();
    if (it == link->rkeys.end()) {
      batch->PartDone(Status(Status::Code::kUnregisteredMemory,
                             "remote segment at " + std::to_string(s.remote) +
                                 " has no ucx key from peer " + link->desc.name),
                      0);
      return;
    }
    keys[i] = it->second;
  }
  auto* ctx = new OpCtx;
  ctx->batch = batch;
  ctx->link = link;
  ctx->bytes = batch->bytes;
  link->inflight.insert(ctx);
  ++outstanding_;
  const bool write = batch->op == TransferOp::kWrite;
  for (size_t i = 0; i < batch->segs.size(); ++i) {
    const Segment& s = batch->segs[i];
    if (s.len == 0) continue;
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &UcxTransport::OnOpDone;
    p.user_data = ctx;
    if (ucp_mem_h memh = LocalMemh(s.local, s.len)) {
      p.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH;
      p.memh = memh;
    }
    void* local = reinterpret_cast<void*>(s.local);
    ucs_status_ptr_t req = write ? ucp_put_nbx(link->ep, local, s.len, s.remote, keys[i], &p)
                                 : ucp_get_nbx(link->ep, local, s.len, s.remote, keys[i], &p);
    if (!Track(ctx, req, write ? "ucp_put_nbx" : "ucp_get_nbx")) break;
  }
  if (ctx->status.ok()) {
    ucp_request_param_t p{};
    p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
    p.cb.send = &UcxTransport::OnOpDone;
    p.user_data = ctx;
    Track(ctx, ucp_ep_flush_nbx(link->ep, &p), "ucp_ep_flush_nbx");
  }
  Release(ctx);
}

// ---------------------------------------------------------------------------------------------
// Staged mode: initiator.

void UcxTransport::IssueStaged(const std::shared_ptr<LinkState>& link,
                               const std::shared_ptr<Batch>& batch,
                               const std::shared_ptr<const StagedPlan>& plan) {
  for (const StagedPart& part : *plan) {
    if (link->closed || link->failed || link->ep == nullptr) {
      batch->PartDone(link->Lost("batch " + std::to_string(batch->id) + " not sent"), 0);
    } else if (batch->cancelled) {
      batch->PartDone(Status(Status::Code::kCancelled, "batch cancelled"), 0);
    } else {
      SendStagedPart(link, batch, part);
    }
  }
}

// One request AM for `part`; the part completes when the send completed and the reply arrived
// (for a READ: and its payload landed).
void UcxTransport::SendStagedPart(const std::shared_ptr<LinkState>& link,
                                  const std::shared_ptr<Batch>& batch, const StagedPart& part) {
  const bool write = batch->op == TransferOp::kWrite;
  auto* ctx = new OpCtx;
  ctx->batch = batch;
  ctx->link = link;
  ctx->bytes = part.bytes;
  ctx->token = ++next_token_;
  ctx->crc = batch->opts.crc || engine_->config().crc;
  StagedHeader h{};
  h.token = ctx->token;
  h.batch = batch->id;
  h.count = static_cast<uint32_t>(part.segs.size());
  h.flags = ctx->crc ? kStagedFlagCrc : 0;
  std::vector<TableEntry> table;
  table.reserve(part.segs.size());
  ctx->local.reserve(part.segs.size());
  for (const Segment& s : part.segs) {
    table.push_back({s.remote, s.len});
    ctx->local.push_back({reinterpret_cast<void*>(s.local), s.len});
  }
  if (write && ctx->crc) h.crc = CrcOf(ctx->local);
  ctx->header.resize(sizeof(h) + table.size() * sizeof(TableEntry));
  memcpy(ctx->header.data(), &h, sizeof(h));
  memcpy(ctx->header.data() + sizeof(h), table.data(), table.size() * sizeof(TableEntry));

  link->inflight.insert(ctx);
  ++outstanding_;
  ctx->awaiting_reply = true;
  ++ctx->pending;
  staged_[ctx->token] = ctx;
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_FLAGS;
  p.cb.send = &UcxTransport::OnOpDone;
  p.user_data = ctx;
  p.flags = UCP_AM_SEND_FLAG_REPLY;
  if (write) {
    p.op_attr_mask |= UCP_OP_ATTR_FIELD_DATATYPE;
    p.datatype = ucp_dt_make_iov();
  }
  ucs_status_ptr_t req = ucp_am_send_nbx(
      link->ep, write ? kStagedWriteAm : kStagedReadAm, ctx->header.data(), ctx->header.size(),
      write ? ctx->local.data() : nullptr, write ? ctx->local.size() : 0, &p);
  if (!Track(ctx, req, "ucp_am_send_nbx")) DropReply(ctx);  // pending stays >= 1
  Release(ctx);
}

// The reply of a staged part: its status, and for a READ the payload.
ucs_status_t UcxTransport::OnStagedReplyAm(void* arg, const void* header, size_t header_len,
                                           void* data, size_t len,
                                           const ucp_am_recv_param_t* param) {
  auto* t = static_cast<UcxTransport*>(arg);
  ReplyHeader h{};
  if (header_len < sizeof(h)) return UCS_OK;
  memcpy(&h, header, sizeof(h));
  auto it = t->staged_.find(h.token);
  if (it == t->staged_.end()) return UCS_OK;  // given up (link closed); a payload is dropped
  OpCtx* ctx = it->second;
  t->staged_.erase(it);
  ctx->awaiting_reply = false;  // its pending count passes to what completes the part
  if (h.code != 0 && ctx->status.ok()) {
    const size_t n = std::min<size_t>(h.msg_len, header_len - sizeof(h));
    const bool known = h.code > 0 && h.code < Status::kNumCodes;
    ctx->status = Status(known ? static_cast<Status::Code>(h.code) : Status::Code::kInternal,
                         std::string(static_cast<const char*>(header) + sizeof(h), n));
  }
  if (h.code != 0 || ctx->batch->op == TransferOp::kWrite) {
    Release(ctx);
    return UCS_OK;
  }
  t->CompleteRead(ctx, h, data, len, param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV);
  return UCS_OK;
}

// Lands a READ payload in the part's local segments and releases the reply's pending count.
void UcxTransport::CompleteRead(OpCtx* ctx, const ReplyHeader& h, void* data, size_t len,
                                bool rndv) {
  if (len != ctx->bytes) {
    if (ctx->status.ok()) {
      ctx->status = Status::Internal(
          "staged READ reply of batch " + std::to_string(ctx->batch->id) + " has " +
          std::to_string(len) + " bytes, not " + std::to_string(ctx->bytes));
    }
    Release(ctx);
    return;
  }
  ctx->header.resize(sizeof(h));  // the request is sent; keep the reply for the CRC check
  memcpy(ctx->header.data(), &h, sizeof(h));
  if (!rndv) {
    Scatter(ctx->local, data);
    OnStagedReadData(nullptr, UCS_OK, len, ctx);
    return;
  }
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  p.cb.recv_am = &UcxTransport::OnStagedReadData;
  p.user_data = ctx;
  p.datatype = ucp_dt_make_iov();
  ucs_status_ptr_t req =
      ucp_am_recv_data_nbx(worker_, data, ctx->local.data(), ctx->local.size(), &p);
  if (req == nullptr) {
    OnStagedReadData(nullptr, UCS_OK, len, ctx);
  } else if (UCS_PTR_IS_ERR(req)) {
    OnStagedReadData(nullptr, UCS_PTR_STATUS(req), 0, ctx);
  }
}

void UcxTransport::OnStagedReadData(void* request, ucs_status_t st, size_t, void* user_data) {
  auto* ctx = static_cast<OpCtx*>(user_data);
  if (request != nullptr) ucp_request_free(request);
  if (st != UCS_OK && ctx->status.ok()) {
    ctx->status =
        ctx->link->Lost(std::string("staged READ payload lost: ") + ucs_status_string(st));
  }
  ReplyHeader h{};
  memcpy(&h, ctx->header.data(), sizeof(h));
  if (st == UCS_OK && ctx->crc && ctx->status.ok() && h.crc != CrcOf(ctx->local)) {
    ctx->status = Status(Status::Code::kCorruption,
                         "CRC mismatch in staged READ of batch " + std::to_string(ctx->batch->id));
  }
  Release(ctx);
}

// ---------------------------------------------------------------------------------------------
// Staged mode: receiver.

// Parses a request header and checks every table entry against registered host memory; fills
// `iov` with the local buffers in table order.
Status UcxTransport::CheckTable(const void* header, size_t header_len, StagedHeader* h,
                                std::vector<ucp_dt_iov_t>* iov) const {
  memcpy(h, header, sizeof(*h));
  if (header_len != sizeof(*h) + uint64_t{h->count} * sizeof(TableEntry)) {
    return Status::InvalidArgument("malformed staged request");
  }
  iov->resize(h->count);
  const char* p = static_cast<const char*>(header) + sizeof(*h);
  for (uint32_t i = 0; i < h->count; ++i) {
    TableEntry e;
    memcpy(&e, p + i * sizeof(e), sizeof(e));
    int32_t device = -1;
    LLUMNIX_KV_RETURN_IF_ERROR(engine_->CheckLocal(e.addr, e.len, &device));
    if (device >= 0) return Status::Unsupported("staged ucx transfers move host memory only");
    (*iov)[i] = {reinterpret_cast<void*>(e.addr), e.len};
  }
  return Status::Ok();
}

ucs_status_t UcxTransport::OnStagedWriteAm(void* arg, const void* header, size_t header_len,
                                           void* data, size_t len,
                                           const ucp_am_recv_param_t* param) {
  auto* t = static_cast<UcxTransport*>(arg);
  if (header_len < sizeof(StagedHeader) || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) {
    return UCS_OK;  // not from this transport: nobody to answer
  }
  StagedHeader h{};
  auto* in = new StagedIo{t, param->reply_ep, 0, 0, false, {}, {}};
  Status st = t->CheckTable(header, header_len, &h, &in->iov);
  in->token = h.token;
  in->crc = h.crc;
  in->check_crc = h.flags & kStagedFlagCrc;
  uint64_t total = 0;
  for (const ucp_dt_iov_t& v : in->iov) total += v.length;
  if (st.ok() && total != len) st = Status::InvalidArgument("staged WRITE payload size mismatch");
  if (!st.ok()) {
    in->iov.clear();
    t->QueueReply(in, st);  // nothing written; an unused rendezvous payload is released by UCX
    return UCS_OK;
  }
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    Scatter(in->iov, data);
    t->FinishWrite(in, UCS_OK);
    return UCS_OK;
  }
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  p.cb.recv_am = &UcxTransport::OnStagedWriteData;
  p.user_data = in;
  p.datatype = ucp_dt_make_iov();
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(t->worker_, data, in->iov.data(), in->iov.size(), &p);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    t->FinishWrite(in, UCS_PTR_STATUS(req));
  } else {
    ++t->outstanding_;
  }
  return UCS_OK;
}

void UcxTransport::OnStagedWriteData(void* request, ucs_status_t st, size_t, void* user_data) {
  auto* in = static_cast<StagedIo*>(user_data);
  --in->transport->outstanding_;
  ucp_request_free(request);
  in->transport->FinishWrite(in, st);
}

// Answers a staged WRITE whose payload landed in `in->iov`. A payload that failed to arrive
// gets no answer: the initiator's endpoint failed too, and its link reports the loss.
void UcxTransport::FinishWrite(StagedIo* in, ucs_status_t s) {
  if (s != UCS_OK) {
    delete in;
    return;
  }
  Status st;
  const int64_t every = engine_->config().debug_corrupt_every;
  if (every > 0 && ++received_writes_ % every == 0) {
    for (const ucp_dt_iov_t& v : in->iov) {
      if (v.length > 0) {
        *static_cast<unsigned char*>(v.buffer) ^= 0x5A;
        break;
      }
    }
  }
  if (in->check_crc && CrcOf(in->iov) != in->crc) {
    st = Status(Status::Code::kCorruption, "CRC mismatch in a staged ucx WRITE");
  }
  in->iov.clear();
  QueueReply(in, st);
}

ucs_status_t UcxTransport::OnStagedReadAm(void* arg, const void* header, size_t header_len, void*,
                                          size_t, const ucp_am_recv_param_t* param) {
  auto* t = static_cast<UcxTransport*>(arg);
  if (header_len < sizeof(StagedHeader) || !(param->recv_attr & UCP_AM_RECV_ATTR_FIELD_REPLY_EP)) {
    return UCS_OK;
  }
  StagedHeader h{};
  auto* out = new StagedIo{t, param->reply_ep, 0, 0, false, {}, {}};
  const Status st = t->CheckTable(header, header_len, &h, &out->iov);
  out->token = h.token;
  out->check_crc = h.flags & kStagedFlagCrc;
  if (!st.ok()) out->iov.clear();
  t->QueueReply(out, st);
  return UCS_OK;
}

// Replies are sent from the progress loop, outside UCX callbacks.
void UcxTransport::QueueReply(StagedIo* out, const Status& st) {
  if (!Enqueue([this, out, st] { SendReply(out, st); })) delete out;
}

// Sends the reply for request `out->token`: `st`, and the payload gathered from `out->iov`.
void UcxTransport::SendReply(StagedIo* out, const Status& st) {
  ReplyHeader h{out->token, static_cast<int32_t>(st.code()), 0,
                static_cast<uint32_t>(std::min<size_t>(st.message().size(), 1024)), 0};
  if (out->check_crc && !out->iov.empty()) h.crc = CrcOf(out->iov);
  out->header.assign(reinterpret_cast<const char*>(&h), sizeof(h));
  out->header.append(st.message(), 0, h.msg_len);
  ucp_request_param_t p{};
  p.op_attr_mask =
      UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA | UCP_OP_ATTR_FIELD_DATATYPE;
  p.cb.send = &UcxTransport::OnStagedSent;
  p.user_data = out;
  p.datatype = ucp_dt_make_iov();
  ucs_status_ptr_t req = ucp_am_send_nbx(out->reply_ep, kStagedReplyAm, out->header.data(),
                                         out->header.size(), out->iov.data(), out->iov.size(), &p);
  if (req == nullptr || UCS_PTR_IS_ERR(req)) {
    delete out;  // a lost reply: the initiator's link fails or times out
  } else {
    ++outstanding_;
  }
}

void UcxTransport::OnStagedSent(void* request, ucs_status_t, void* user_data) {
  auto* out = static_cast<StagedIo*>(user_data);
  --out->transport->outstanding_;
  ucp_request_free(request);
  delete out;
}

// ---------------------------------------------------------------------------------------------
// Notifications.

void UcxTransport::OnAmSent(void* request, ucs_status_t, void* user_data) {
  auto* out = static_cast<AmMsg*>(user_data);
  --out->transport->outstanding_;
  ucp_request_free(request);
  delete out;
}

Status UcxTransport::SendNotify(const std::shared_ptr<LinkState>& link, const std::string& msg) {
  if (link->closed || link->failed || link->ep == nullptr) {
    return link->Lost("cannot send a notification");
  }
  auto* out = new AmMsg{this, engine_->name(), msg};
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.send = &UcxTransport::OnAmSent;
  p.user_data = out;
  ucs_status_ptr_t req = ucp_am_send_nbx(link->ep, kNotifyAm, out->name.data(), out->name.size(),
                                         out->body.data(), out->body.size(), &p);
  if (req == nullptr) {
    delete out;
    return Status::Ok();
  }
  if (UCS_PTR_IS_ERR(req)) {
    delete out;
    const ucs_status_t st = UCS_PTR_STATUS(req);
    return IsPeerLoss(st)
               ? link->Lost(std::string("ucp_am_send_nbx failed: ") + ucs_status_string(st))
               : UcsError(Status::Code::kInternal, "ucp_am_send_nbx failed", st);
  }
  ++outstanding_;
  return Status::Ok();
}

void UcxTransport::OnAmData(void* request, ucs_status_t st, size_t length, void* user_data) {
  auto* in = static_cast<AmMsg*>(user_data);
  if (st == UCS_OK) {
    in->body.resize(length);
    in->transport->engine_->Deliver({std::move(in->name), std::move(in->body)});
  }
  --in->transport->outstanding_;
  ucp_request_free(request);
  delete in;
}

ucs_status_t UcxTransport::OnNotifyAm(void* arg, const void* header, size_t header_len, void* data,
                                      size_t len, const ucp_am_recv_param_t* param) {
  auto* t = static_cast<UcxTransport*>(arg);
  std::string from(static_cast<const char*>(header), header_len);
  if (!(param->recv_attr & UCP_AM_RECV_ATTR_FLAG_RNDV)) {
    t->engine_->Deliver({std::move(from), std::string(static_cast<const char*>(data), len)});
    return UCS_OK;
  }
  // Rendezvous: `data` is a descriptor; fetch the message into our buffer.
  auto* in = new AmMsg{t, std::move(from), std::string(len, '\0')};
  ucp_request_param_t p{};
  p.op_attr_mask = UCP_OP_ATTR_FIELD_CALLBACK | UCP_OP_ATTR_FIELD_USER_DATA;
  p.cb.recv_am = &UcxTransport::OnAmData;
  p.user_data = in;
  ucs_status_ptr_t req = ucp_am_recv_data_nbx(t->worker_, data, in->body.data(), len, &p);
  if (req == nullptr) {
    t->engine_->Deliver({std::move(in->name), std::move(in->body)});
    delete in;
  } else if (UCS_PTR_IS_ERR(req)) {
    delete in;  // the message is lost; the sender's request fails
  } else {
    ++t->outstanding_;
  }
  return UCS_OK;
}

}  // namespace

std::unique_ptr<Transport> MakeUcxTransport(EngineServices* engine, Status* st) {
  auto t = std::make_unique<UcxTransport>(engine);
  *st = t->Start();
  if (!st->ok()) return nullptr;
  return t;
}

}  // namespace llumnix_kv
