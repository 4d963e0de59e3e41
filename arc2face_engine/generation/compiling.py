"""torch.compile for the engine's modules: compiled once, at warm-up, and watched.

Each module (every UNet view, the ControlNet, the VAE decoder) gets its own compiled
callable with static shapes; the engine's batch buckets bound the shapes it meets, and the
engine's warm-up (`Arc2FaceEngine.warm_up`) runs each (module, call signature, bucket) once
before any shard. What can still go wrong is silent in torch: when a code object has been
compiled `recompile_limit` times (8 by default) dynamo runs it eagerly from then on, and a
graph break splits a forward into several graphs with eager Python between them. diffusers'
UNet and ControlNet forwards share one wrapper code object, and every module compiled with
`nn.Module.compile` shares `Module._call_impl`'s, so a job with poses and 7 buckets needs
more than 8 entries on one code object. So:

- `raise_recompile_limit` lifts dynamo's limits to what the engine will compile;
- `CompileWatch` wraps the backend of each module: it counts the graphs compiled per
  module and call signature, and whether they were compiled during warm-up; and it listens
  to dynamo's own reports (the recompile-limit warning, the graph-break counters), so a
  fallback becomes a one-line warning (`CompileWatch.problems`) that the job logs and puts
  in the shard's result.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# The logger dynamo's "hit config.recompile_limit" warning goes to.
_DYNAMO_LOGGER = "torch._dynamo.convert_frame"
_LIMIT_MESSAGE = "torch._dynamo hit config."


def raise_recompile_limit(entries: int) -> None:
    """Let one code object hold `entries` compiled graphs before dynamo gives up on it
    (never lowered: another engine in the process may need more)."""
    config = torch._dynamo.config
    config.recompile_limit = max(config.recompile_limit, entries)
    config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 2 * entries)


def _graph_breaks() -> int:
    return sum(torch._dynamo.utils.counters["graph_break"].values())


@dataclass(frozen=True)
class CompiledGraph:
    """One graph handed to the backend: which module, how many inputs (a UNet called with
    ControlNet residuals takes more), and the bucket being warmed up when it was compiled
    (None: compiled outside the warm-up, by a real batch)."""

    module: str
    inputs: int
    bucket: int | None


class _LimitListener(logging.Handler):
    def __init__(self, watch: CompileWatch) -> None:
        super().__init__(level=logging.WARNING)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(_LIMIT_MESSAGE):
            self.watch.fallbacks.append(message.splitlines()[0])


@dataclass
class CompileWatch:
    """The compiled graphs of one engine and dynamo's reports of fallbacks."""

    backend: str | Callable = "inductor"
    graphs: list[CompiledGraph] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    warming_up: int | None = None  # the bucket the engine is warming up
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _breaks_at_start: int = 0

    def __post_init__(self) -> None:
        self._breaks_at_start = _graph_breaks()
        logging.getLogger(_DYNAMO_LOGGER).addHandler(_LimitListener(self))

    def compile(self, module: torch.nn.Module, label: str) -> None:
        """Compile `module` in place (its own compiled callable), static shapes."""
        module.compile(backend=self._counting(label), dynamic=False)

    def _counting(self, label: str) -> Callable:
        inner = self.backend

        def backend(graph: torch.fx.GraphModule, example_inputs: list[Any]):
            with self._lock:
                self.graphs.append(CompiledGraph(label, len(example_inputs), self.warming_up))
            if isinstance(inner, str):
                return torch._dynamo.lookup_backend(inner)(graph, example_inputs)
            return inner(graph, example_inputs)

        return backend

    def counts(self) -> Counter[tuple[str, int, int | None]]:
        """Graphs compiled per (module, inputs, bucket)."""
        return Counter((g.module, g.inputs, g.bucket) for g in self.graphs)

    def problems(self) -> list[str]:
        """One line per kind of problem: a fallback to eager, a graph break, a compile
        outside the warm-up (a shape the warm-up did not cover)."""
        lines = [f"torch.compile fell back to eager: {line}" for line in dict.fromkeys(self.fallbacks)]
        breaks = _graph_breaks() - self._breaks_at_start
        if breaks:
            lines.append(f"torch.compile: {breaks} graph breaks (forwards split into several graphs)")
        late = sorted({g.module for g in self.graphs if g.bucket is None})
        if late:
            lines.append(f"torch.compile compiled graphs after warm-up ({', '.join(late)})")
        return lines
