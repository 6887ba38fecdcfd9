// ucx staged mode: a batch of small segments travels as active messages (the table in the
// header, the payload gathered by UCX from the local segments) and the receiver scatters it
// after checking every address against its registered memory, then replies with a status.
#include <cstring>

#include "ucx_internal.h"

namespace llumnix_kv::ucx {
namespace {

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

}  // namespace

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

}  // namespace llumnix_kv::ucx
