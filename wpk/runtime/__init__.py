"""wpk.runtime: gRPC tier servers (Open Inference Protocol) chained into a pipeline.

Where things are:
- one tier, transport-free: tier_core.TierCore (slice, placement, batching, deadlines, the
  forward, metrics, health); every request's deadline is enforced there.
- adapters over it: kserve_servicer (KServe v2 gRPC, with shared_memory_rpcs: Triton's
  shared-memory extension) and link_handler (the tensor link); server assembles a tier.
- the next tier: next_tier.NextTier, one implementation per transport: TcpLink (the tensor
  link: tensor_link, link_server, link_frames, lane) and GrpcLink (KServe ModelInfer calls:
  TLS tiers, and next tiers without a tensor link).
  A new transport is a NextTier for the sender and an adapter over TierCore for the receiver.
- clients: client.InferenceClient (KServe gRPC, or `tensor_link=True`); failures are
  status.TierError everywhere, a gRPC status only at the gRPC edge.
"""
