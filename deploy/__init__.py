"""wpk.deploy: start a plan's tiers locally, or write bundles and Kubernetes manifests."""
