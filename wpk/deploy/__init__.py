"""wpk.deploy: start a plan's tiers locally, or write bundles and Kubernetes manifests, secure
the links with mutual TLS, and emulate the network between tiers.

local (wpk-deploy --local) · bundle (--bundle) · k8s (--k8s) · tls (certificates) ·
emulate (wpk-emulate) built on netns (namespaces, veths, tbf), delay_relay (RTT in user
space), cpulimit (slow device) and emulate_client; probe (plain-socket link measurements).
"""
