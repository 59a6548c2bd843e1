"""Progressive model generator and splitter (docs/DESIGN.md, offline parts 1 and 2).

``make_progressive`` traces a CNN with torch.fx, counts the FLOPs of every graph node,
lists the candidate split points (ReLU outputs where exactly one tensor crosses the
cut: paper section 4.1, sparse activations compress well and a single crossing tensor
is what one INFER message carries; where such a ReLU feeds only a pooling layer, the
pooled output instead: still non-negative, and smaller), places early exits where the backbone's cumulative
FLOPs reach the requested fractions (paper section 3.1: 15, 30, ..., 90%) snapped to the
nearest candidate, and cuts the graph into stages, one per pair of consecutive
candidates. Every split s then means: device runs stages [0, s), server runs [s, S).
"""

from __future__ import annotations

import linecache
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils.flop_counter import FlopCounterMode

__all__ = [
    "DEFAULT_EXIT_FRACTIONS",
    "DevicePart",
    "ExitHead",
    "InputSpec",
    "ProgressiveModel",
    "ProgressiveModelError",
    "ServerPart",
    "make_progressive",
]

#: Paper section 3.1: exits where the backbone's cumulative FLOPs reach these shares.
DEFAULT_EXIT_FRACTIONS: tuple[float, ...] = (0.15, 0.30, 0.45, 0.60, 0.75, 0.90)


class ProgressiveModelError(ValueError):
    """A backbone or a setting that cannot be turned into a progressive model."""


@dataclass(frozen=True)
class InputSpec:
    """What the model expects: a C x H x W image, normalised per channel."""

    channels: int
    """Colour channels of the model input (1 for grey, 3 for RGB)."""
    height: int
    """Input height in pixels."""
    width: int
    """Input width in pixels."""
    mean: tuple[float, ...]
    """Per-channel mean subtracted from pixels scaled to [0, 1]."""
    std: tuple[float, ...]
    """Per-channel standard deviation the centred pixels are divided by."""

    def __post_init__(self) -> None:
        if min(self.channels, self.height, self.width) < 1:
            raise ValueError(f"input spec needs positive channels/height/width, got {self.shape}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"input spec has {self.channels} channels but mean has {len(self.mean)} "
                f"and std has {len(self.std)} values; give one per channel"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"input spec std must be positive, got {self.std}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.channels, self.height, self.width)

    def preprocess(self, images: Tensor) -> Tensor:
        """uint8 images (N, C, H, W) or (C, H, W) in [0, 255] -> normalised float32 input."""
        if images.shape[-3:] != self.shape:
            raise ValueError(f"images of shape {tuple(images.shape)} do not match {self.shape}")
        # Contiguous: a channels-last batch would give channels-last activations, and a
        # backbone that flattens with .view cannot read those.
        x = images.contiguous().to(torch.float32) / 255.0
        mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)
        return (x - mean) / std

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InputSpec:
        try:
            return cls(
                channels=int(data["channels"]),
                height=int(data["height"]),
                width=int(data["width"]),
                mean=tuple(float(v) for v in data["mean"]),
                std=tuple(float(v) for v in data["std"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed input spec {data!r}: {exc}") from exc


class ExitHead(nn.Module):
    """The one exit-head structure used at every early exit.

    Shallow-Deep Networks style (paper section 3.1): a 1x1 convolution to ``hidden``
    channels, batch norm and ReLU, average pooling to ``pool`` x ``pool``, one linear
    layer. With hidden=32 it costs about 1% of a ResNet-20 per exit. A flat (N, F)
    activation (after a backbone's own pooling) gets the linear layer only.
    """

    def __init__(
        self, in_shape: Sequence[int], num_classes: int, *, hidden: int = 32, pool: int = 4
    ) -> None:
        super().__init__()
        self.body: nn.Module
        if len(in_shape) == 3:
            # Pooling a small map up to pool x pool would only copy values.
            pool = min(pool, int(in_shape[1]), int(in_shape[2]))
            self.body = nn.Sequential(
                nn.Conv2d(in_shape[0], hidden, 1, bias=False),
                nn.BatchNorm2d(hidden),
                nn.ReLU(),
                nn.AdaptiveAvgPool2d(pool),
                nn.Flatten(),
                nn.Linear(hidden * pool * pool, num_classes),
            )
        elif len(in_shape) == 1:
            self.body = nn.Linear(in_shape[0], num_classes)
        else:
            raise ProgressiveModelError(
                f"cannot place an exit on an activation of shape {tuple(in_shape)}; "
                "exits need (C, H, W) or (F,) activations"
            )

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.body(x)
        return out


class ProgressiveModel(nn.Module):
    """A backbone cut into stages at its candidate split points, with early exits.

    Contract in docs/ARCHITECTURE.md ("Progressive model"): ``stages[k]`` maps the
    activation at split k to the one at split k+1; the last stage outputs the final
    logits, which are the last exit.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        exit_stages: Sequence[int],
        exit_heads: Sequence[nn.Module],
        *,
        input_spec: InputSpec,
        num_classes: int,
        split_shapes: Sequence[tuple[int, ...]],
        split_names: Sequence[str],
        stage_flops: Sequence[float],
        exit_flops: Sequence[float],
    ) -> None:
        super().__init__()
        num_stages = len(stages)
        if list(exit_stages) != sorted(set(exit_stages)) or exit_stages[-1] != num_stages - 1:
            raise ProgressiveModelError(
                f"exit stages {list(exit_stages)} must be ascending and end at {num_stages - 1}"
            )
        if len(exit_heads) != len(exit_stages) - 1:
            raise ProgressiveModelError("need one exit head per early exit")
        self.stages = nn.ModuleList(stages)
        self.exit_heads = nn.ModuleList(exit_heads)
        self.input_spec = input_spec
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.exit_stages = list(exit_stages)
        self.split_shapes = [tuple(s) for s in split_shapes]
        self.split_names = list(split_names)
        self.stage_flops = [float(f) for f in stage_flops]
        self.exit_flops = [float(f) for f in exit_flops]
        self._exit_at_stage = {k: e for e, k in enumerate(self.exit_stages)}

    @property
    def num_exits(self) -> int:
        return len(self.exit_stages)

    def exit_at_stage(self, k: int) -> int | None:
        """Index of the exit read after stage k, or None."""
        return self._exit_at_stage.get(k)

    def _check_stage(self, k: int) -> None:
        if not 0 <= k < self.num_stages:
            raise IndexError(f"stage {k} out of range 0..{self.num_stages - 1}")

    def _check_split(self, split: int) -> None:
        if not 0 <= split <= self.num_stages:
            raise IndexError(f"split {split} out of range 0..{self.num_stages}")

    def run_stage(self, k: int, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Activation after stage k and the logits of the exit read there (None if no exit)."""
        self._check_stage(k)
        act: Tensor = self.stages[k](x)
        e = self._exit_at_stage.get(k)
        if e is None:
            return act, None
        if e == self.num_exits - 1:
            return act, act
        logits: Tensor = self.exit_heads[e](act)
        return act, logits

    def run_trunk(self, k: int, x: Tensor) -> Tensor:
        """Activation after stage k without evaluating its exit head."""
        self._check_stage(k)
        act: Tensor = self.stages[k](x)
        return act

    def run_exit(self, e: int, act: Tensor) -> Tensor:
        """Logits of exit e given the activation after stage ``exit_stages[e]``."""
        if not 0 <= e < self.num_exits:
            raise IndexError(f"exit {e} out of range 0..{self.num_exits - 1}")
        if e == self.num_exits - 1:
            return act
        out: Tensor = self.exit_heads[e](act)
        return out

    def forward(self, x: Tensor) -> list[Tensor]:
        """Logits of every exit, in order."""
        outs: list[Tensor] = []
        for k in range(self.num_stages):
            x, logits = self.run_stage(k, x)
            if logits is not None:
                outs.append(logits)
        return outs

    def device_part(self, split: int) -> DevicePart:
        self._check_split(split)
        return DevicePart(self, split)

    def server_part(self, split: int) -> ServerPart:
        self._check_split(split)
        return ServerPart(self, split)

    def split_shape(self, split: int) -> tuple[int, ...]:
        """Activation shape at split (batch excluded); split S is the final logits."""
        self._check_split(split)
        return self.split_shapes[split]

    def exits_before(self, split: int) -> list[int]:
        """Exits computed by the device part of ``split`` (those read after stage < split)."""
        return [e for e, k in enumerate(self.exit_stages) if k < split]


class DevicePart(nn.Module):
    """Stages [0, split): x -> (activation at split, [logits of the exits on the way])."""

    def __init__(self, model: ProgressiveModel, split: int) -> None:
        super().__init__()
        self.model = model
        self.split = split

    def forward(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        outs: list[Tensor] = []
        for k in range(self.split):
            x, logits = self.model.run_stage(k, x)
            if logits is not None:
                outs.append(logits)
        return x, outs


class ServerPart(nn.Module):
    """Stages [split, S): activation at split -> [logits of the exits after split]."""

    def __init__(self, model: ProgressiveModel, split: int) -> None:
        super().__init__()
        self.model = model
        self.split = split

    def forward(self, x: Tensor) -> list[Tensor]:
        outs: list[Tensor] = []
        for k in range(self.split, self.model.num_stages):
            x, logits = self.model.run_stage(k, x)
            if logits is not None:
                outs.append(logits)
        return outs


# --- the generator ------------------------------------------------------------------

_RELU_MODULES = (nn.ReLU, nn.ReLU6)
_RELU_FUNCTIONS = (F.relu, torch.relu, F.relu6)
_POOL_MODULES = (
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_POOL_FUNCTIONS = (
    F.max_pool2d,
    F.avg_pool2d,
    F.adaptive_avg_pool2d,
    F.adaptive_max_pool2d,
    torch.max_pool2d,
)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _RELU_MODULES)
    if node.op == "call_function":
        return node.target in _RELU_FUNCTIONS
    if node.op == "call_method":
        return node.target in ("relu", "relu6")
    return False


def _is_pool(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(str(node.target)), _POOL_MODULES)
    if node.op == "call_function":
        return node.target in _POOL_FUNCTIONS
    return False


class _FlopInterpreter(fx.Interpreter):
    """Runs the graph once and records FLOPs per node.

    torch.utils.flop_counter counts convolutions and matrix products exactly; pooling
    is not counted there, so one FLOP per input element is added for pooling nodes.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.flops: dict[str, float] = {}
        self._modules_by_name = dict(gm.named_modules())

    def run_node(self, n: fx.Node) -> Any:
        counter = FlopCounterMode(display=False)
        with counter:
            result = super().run_node(n)
        flops = float(counter.get_total_flops())
        if _is_pool(n, self._modules_by_name):
            arg = n.args[0] if n.args else None
            if isinstance(arg, fx.Node) and isinstance(self.env.get(arg), Tensor):
                flops += float(self.env[arg].numel())
        self.flops[n.name] = flops
        return result


def _module_flops(module: nn.Module, x: Tensor) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        module(x)
    return float(counter.get_total_flops())


def _tracer_of(backbone: nn.Module) -> fx.Tracer:
    """The backbone's own ``fx_tracer`` (a torch.fx.Tracer subclass or instance), else
    torch.fx's default tracer. A custom tracer's ``is_leaf_module`` keeps a submodule
    whose forward cannot be traced (control flow on tensor values) as one call."""
    custom = getattr(backbone, "fx_tracer", None)
    if custom is None:
        return fx.Tracer()
    if isinstance(custom, type) and issubclass(custom, fx.Tracer):
        return custom()
    if isinstance(custom, fx.Tracer):
        return custom
    raise ProgressiveModelError(
        f"{type(backbone).__name__}.fx_tracer must be a torch.fx.Tracer subclass or "
        f"instance, got {type(custom).__name__}"
    )


def _failure_site(backbone: nn.Module, exc: BaseException) -> str:
    """Where in the user's code tracing failed: the innermost frame outside torch."""
    torch_dir = os.path.dirname(torch.__file__)
    names = {id(m): name for name, m in backbone.named_modules()}
    site = ""
    tb = exc.__traceback__
    while tb is not None:
        frame, line = tb.tb_frame, tb.tb_lineno
        filename = frame.f_code.co_filename
        if not filename.startswith(torch_dir) and filename != __file__:
            owner = frame.f_locals.get("self")
            where = f"{os.path.basename(filename)} line {line}"
            text = linecache.getline(filename, line).strip()
            if text:
                where += f": `{text}`"
            if isinstance(owner, nn.Module):
                name = names.get(id(owner))
                module = f" (module {name!r})" if name else ""
                where = f"{type(owner).__name__}.{frame.f_code.co_name}{module}, {where}"
            site = where
        tb = tb.tb_next
    return site


def _trace(backbone: nn.Module) -> fx.GraphModule:
    tracer = _tracer_of(backbone)
    try:
        graph = tracer.trace(backbone)
    except Exception as exc:  # torch.fx raises many types (TraceError, TypeError, ...)
        site = _failure_site(backbone, exc)
        raise ProgressiveModelError(
            f"torch.fx cannot trace {type(backbone).__name__}: {exc}"
            + (f" (in {site})" if site else "")
            + ". Make control flow independent of tensor values, or keep that code out "
            "of the trace: for a submodule, set fx_tracer on the model to a "
            "torch.fx.Tracer subclass whose is_leaf_module returns True for it; for a free "
            "function, torch.fx.wrap (it does not apply to methods)"
        ) from exc
    return fx.GraphModule(tracer.root, graph, type(backbone).__name__)


def _shape_of(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    if meta is None or not hasattr(meta, "shape"):
        return None
    return tuple(int(d) for d in meta.shape)


def _build_stage(
    gm: fx.GraphModule, nodes: list[fx.Node], start: fx.Node, end: fx.Node, name: str
) -> fx.GraphModule:
    """Copy the nodes strictly after ``start`` up to ``end`` into a one-input graph."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {start: graph.placeholder("x")}

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            # Parameters and buffers read through get_attr are copied into every
            # stage that uses them; they never cross a split.
            if n.op != "get_attr":
                raise ProgressiveModelError(
                    f"node {n.name} crosses a split that was not a candidate"
                )
            env[n] = graph.get_attr(str(n.target))
        return env[n]

    i0 = nodes.index(start) + 1
    i1 = nodes.index(end) + 1
    for n in nodes[i0:i1]:
        if n.op in ("get_attr", "output", "placeholder"):
            continue
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[end])
    return fx.GraphModule(gm, graph, class_name=name)


def make_progressive(
    backbone: nn.Module,
    input_spec: InputSpec,
    *,
    exit_fractions: Sequence[float] = DEFAULT_EXIT_FRACTIONS,
    head_hidden: int = 32,
    head_pool: int = 4,
) -> ProgressiveModel:
    """Turn a traceable CNN into a :class:`ProgressiveModel` (docs/DESIGN.md parts 1-2).

    ``exit_fractions`` are shares of the backbone's FLOPs in (0, 1); each is snapped to
    the candidate split point whose cumulative FLOPs are nearest, and duplicates merge.
    An empty list gives a single-exit model that can still be split.
    """
    fractions = [float(f) for f in exit_fractions]
    bad = [f for f in fractions if not (0.0 < f < 1.0) or math.isnan(f)]
    if bad:
        raise ProgressiveModelError(
            f"exit fractions must lie strictly between 0 and 1 (shares of the backbone's "
            f"FLOPs), got {bad}"
        )
    fractions = sorted(set(fractions))
    backbone = backbone.eval()
    gm = _trace(backbone)
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise ProgressiveModelError(
            f"the model's forward takes {len(placeholders)} inputs; a CNN backbone takes one image tensor"
        )
    dummy = torch.zeros(2, *input_spec.shape)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(dummy)
            flop_run = _FlopInterpreter(gm)
            out = flop_run.run(dummy)
    except Exception as exc:
        raise ProgressiveModelError(
            f"the model does not accept the input spec's shape {input_spec.shape} "
            f"(batch of 2): {exc}. Set --channels/--size (or the input spec) to what the model expects"
        ) from exc
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 2:
        shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ProgressiveModelError(
            f"the model must return logits of shape (batch, classes); it returned {shape}"
        )
    num_classes = int(out.shape[1])

    modules = dict(gm.named_modules())
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}
    flops = [flop_run.flops.get(n.name, 0.0) for n in nodes]
    total_flops = sum(flops)
    if total_flops <= 0:
        raise ProgressiveModelError("the model has no convolution or linear layer to count")

    output_node = nodes[-1]
    final = output_node.args[0]
    assert isinstance(final, fx.Node)
    candidates: list[fx.Node] = []
    open_nodes: set[fx.Node] = set()
    for i, n in enumerate(nodes):
        if n.op in ("get_attr", "output"):
            continue
        open_nodes.add(n)
        open_nodes = {m for m in open_nodes if last_use[m] > i}
        # Exactly one tensor crosses a cut after n: n itself (paper section 4.1).
        if n is final or open_nodes != {n} or _shape_of(n) is None:
            continue
        if _is_relu(n, modules):
            candidates.append(n)
        elif (
            candidates
            and _is_pool(n, modules)
            and n.args
            and n.args[0] is candidates[-1]
            and len(candidates[-1].users) == 1
        ):
            # Pooling a ReLU output keeps it non-negative and (max-pool) sparse, and
            # shrinks it: cut after the pooling instead, so that split sends fewer values.
            candidates[-1] = n
    if not candidates:
        raise ProgressiveModelError(
            "the model has no candidate split point: no ReLU output where exactly one tensor "
            "crosses the cut. Add a ReLU between blocks (outside residual branches)"
        )

    cum = 0.0
    cum_at: dict[fx.Node, float] = {}
    for n, f in zip(nodes, flops, strict=True):
        cum += f
        cum_at[n] = cum / total_flops
    exit_candidates: list[int] = []
    for f in fractions:
        j = min(range(len(candidates)), key=lambda c: (abs(cum_at[candidates[c]] - f), c))
        if j not in exit_candidates:
            exit_candidates.append(j)
    exit_candidates.sort()

    boundaries = [placeholders[0], *candidates, final]
    stages = [
        _build_stage(gm, nodes, boundaries[k], boundaries[k + 1], f"Stage{k}")
        for k in range(len(boundaries) - 1)
    ]
    split_shapes: list[tuple[int, ...]] = [input_spec.shape]
    for n in boundaries[1:]:
        act_shape = _shape_of(n)
        assert act_shape is not None
        split_shapes.append(act_shape[1:])
    stage_flops = []
    for k in range(len(stages)):
        lo, hi = index[boundaries[k]], index[boundaries[k + 1]]
        stage_flops.append(sum(flops[lo + 1 : hi + 1]))

    heads: list[nn.Module] = []
    head_flops: list[float] = []
    for j in exit_candidates:
        shape = split_shapes[j + 1]
        head = ExitHead(shape, num_classes, hidden=head_hidden, pool=head_pool)
        head_flops.append(_module_flops(head.eval(), torch.zeros(1, *shape)))
        heads.append(head)
    exit_stages = [*exit_candidates, len(stages) - 1]
    # The final exit is the backbone's own classifier: no extra FLOPs.
    exit_flops = [*head_flops, 0.0]
    return ProgressiveModel(
        stages,
        exit_stages,
        heads,
        input_spec=input_spec,
        num_classes=num_classes,
        split_shapes=split_shapes,
        split_names=["input", *(n.name for n in candidates), "logits"],
        # The counting pass ran a batch of 2: report per-sample FLOPs.
        stage_flops=[f / 2.0 for f in stage_flops],
        exit_flops=exit_flops,
    )
