"""wpk.runtime: gRPC tier servers (Open Inference Protocol) chained into a pipeline."""
