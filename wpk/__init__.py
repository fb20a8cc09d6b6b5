"""wpk (Woodpecker): run one ONNX model across device, edge and cloud tiers.

The shared core lives here: the graph view of a model (`Graph`), tier and link specs
(`TierSpec`, `LinkSpec`, `Tiers`), the plan format (`Plan`) and user-facing errors
(`WpkError`). Subpackages (`wpk.partitioner`, `wpk.optimizer`, `wpk.runtime`,
`wpk.deploy`) build on it; nothing here imports them.
"""
from wpk.errors import WpkError

__version__ = "0.1.0"

__all__ = ["WpkError", "__version__"]
