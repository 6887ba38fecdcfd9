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
// message (eager or rendezvous, any size). Staged mode: see ucx_internal.h.
#include <pthread.h>

#include <cstdlib>

#include "ucx_internal.h"

namespace llumnix_kv {
namespace ucx {

// ---------------------------------------------------------------------------------------------
// Progress thread: setup, loop, teardown.

void UcxTransport::Run(std::promise<Status>* ready) {
  pthread_setname_np(pthread_self(), "lkv-ucx");
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
  // UCX 1.22 leaves cuda_ipc's get zero-copy off ("auto") on platforms where it expects it to be
  // slower, and then emulates a get into device memory through host shared memory: 0.8 GB/s on
  // one H100, where a put over cuda_ipc moved 300 GB/s. Turn it on unless the user has chosen.
  if (std::getenv("UCX_CUDA_IPC_ENABLE_GET_ZCOPY") == nullptr) {
    (void)ucp_config_modify(config, "CUDA_IPC_ENABLE_GET_ZCOPY", "on");  // kept for UCT
  }
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

}  // namespace ucx

std::unique_ptr<Transport> MakeUcxTransport(EngineServices* engine, Status* st) {
  auto t = std::make_unique<ucx::UcxTransport>(engine);
  *st = t->Start();
  if (!st->ok()) return nullptr;
  return t;
}

}  // namespace llumnix_kv
