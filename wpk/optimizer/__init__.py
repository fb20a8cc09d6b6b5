"""wpk.optimizer: tune each slice of a plan for the hardware of its tier (the WPK method).

Parts, each swappable (like TVM meta-schedule): graph passes (`passes`), configuration spaces
(`space`, `session`, `ops.schedule_space`), search strategies (`search`: random, GA, RL),
measurement (`measure`), the tuning log (`database`), the kernel DSL (`dsl`, `ops`) with its
C/OpenMP and CUDA lowerings (`codegen_c`, `codegen_cuda`) and builder (`build`), per-operator
selection (`selection`), the accuracy guard (`accuracy`) and the executor (`executor`).

`load(DIR)` opens an optimized slice as a session with ONNX Runtime's `run` signature.
"""
from wpk.optimizer.executor import OptimizedSession, load

__all__ = ["load", "OptimizedSession"]
