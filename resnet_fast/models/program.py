"""The fused eval forward as a program of prepared plans, and where a module keeps it.

A :class:`Program` is the stem's plan (or none) and, per block, its plans before the last, its
last plan (which takes the residual) and its shortcut. A whole ResNet runs one program (stem,
then its maxpool, then every block); a block called on its own runs the same kind of program
over its own pairs; a ResNet whose blocks cannot all fuse runs the program of its stem alone
and calls the blocks as modules. There is no other fused forward.

:class:`Kept` is the keeping: a module's program with the key it was built for. The key (see
``_fused.py``'s docstring for why it is complete): each group's backend, each BN's eps and
each conv's geometry (:func:`~._fused.add_pair`), the block classes and downsample modules a
program calls, the autocast dtype, and (version, data pointer, dtype, device, sizes, strides)
of every tensor the folds read, in one C++ call (``tensor_states``). It is recomputed on every
forward; a program whose key differs is rebuilt. ``_apply``, ``train()``/``eval()`` and
``set_backend`` drop it; :func:`refresh` drops every program of a model.
"""

import warnings
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Optional, Sequence

import torch
from torch import Tensor, nn

from .._extension import has_kernel, tensor_states
from ..backends import requested_backend
from ..kernels.layout import dense_in
from ..ops.conv_bias_act import onednn_dtypes
from ..ops.max_pool_act import Args, pool_args
from ._fused import (
    _PLAIN_TENSORS,
    ConvPlan,
    add_pair,
    autocast_dtype,
    exact_relu,
    faking,
    group_plans,
    in_functorch,
    no_global_hooks,
    no_hooks,
)

# The geometry of a linear layer as a 1x1 conv (what ConvPlan reads of its conv).
_FC_AS_CONV = SimpleNamespace(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)

# Pools whose output is a new tensor no one else sees (without hooks), or their input.
_OWN_POOLS = (nn.MaxPool2d, nn.Identity)
_POOL_OP = has_kernel("max_pool_act", "CPU")


def _our_pool(pool: nn.Module, x: Tensor) -> Optional[Args]:
    """``pool``'s arguments where the program runs it as ``max_pool_act`` instead: a hook-free
    ``nn.MaxPool2d`` that op computes exactly (``pool_args``), on CPU, gradients off (the
    grad-enabled forward calls the module, whose backward torch has)."""
    if not _POOL_OP or x.device.type != "cpu" or torch.is_grad_enabled() or not no_hooks(pool):
        return None
    return pool_args(pool)


# A block's shortcut: None is the identity, a ConvPlan the fused downsample pair, anything else
# the block's downsample module (e.g. CIFAR's PadShortcut), called as it is.
Shortcut = Optional[Callable[[Tensor], Tensor]]


class Block(NamedTuple):
    """One block's fused forward: relu(last(head(x)) + shortcut(x))."""
    head: tuple[ConvPlan, ...]
    last: ConvPlan
    shortcut: Shortcut

    def __call__(self, x: Tensor, owned: bool = False) -> Tensor:
        """``owned``: the caller owns x and reads it no more (a program's block after its
        stem), so with an identity shortcut the last conv may write over x; over a fused
        downsample's output it always may (nothing else sees that tensor)."""
        identity = x if self.shortcut is None else self.shortcut(x)
        out = x
        for plan in self.head:
            out = plan(out)
        mine = owned if self.shortcut is None else isinstance(self.shortcut, ConvPlan)
        return self.last(out, identity, mine)

    def plans(self) -> list[ConvPlan]:
        """Every plan the block runs, the downsample's last."""
        shortcut = [self.shortcut] if isinstance(self.shortcut, ConvPlan) else []
        return [*self.head, self.last, *shortcut]


class Program(NamedTuple):
    """The stem's plan (or None), then the blocks, channels_last inside."""
    stem: Optional[ConvPlan]
    blocks: tuple[Block, ...]

    def __call__(self, x: Tensor, pool: Optional[nn.Module] = None) -> Tensor:
        """The program on x; ``pool`` (the model's maxpool, looked up by the caller on every
        forward) runs after the stem. The program owns every activation after the stem's (a
        block writes over its input where its kernel can, :meth:`Block.__call__`), except
        where a pool that is not exactly a hook-free ``nn.MaxPool2d`` or ``nn.Identity`` may
        have handed its output elsewhere; never the caller's x."""
        owned = self.stem is not None
        if owned:
            x = x if self.stem.pads else dense_in(x, torch.channels_last)
            args = None if pool is None else _our_pool(pool, x)
            x = self.stem(x, pool=args)  # with the pool in our op where it can be
            pool = None if args is not None else pool
        if pool is not None:
            x = pool(x)
            owned = owned and type(pool) in _OWN_POOLS and no_hooks(pool)
        for block in self.blocks:
            x = block(x, owned)
            owned = True
        return x

    def plans(self) -> list[ConvPlan]:
        """Every plan, in the order the program runs them."""
        stem = [] if self.stem is None else [self.stem]
        return stem + [p for block in self.blocks for p in block.plans()]


# A block group: (backend, winograd, (conv, bn, relu) pairs, how many are the block's own, the
# shortcut module when it is not a fused pair); the stem group is (backend, winograd, pairs, 1,
# None). winograd: the module's setting (``_fused.own_kernels``).
Group = tuple[Optional[str], Optional[bool], list, int, Shortcut]


def pairs_of(module: nn.Module) -> Optional[list[tuple[nn.Module, nn.Module, bool]]]:
    """(conv, bn, relu) of every pair of a block or stem (its ``_fold_spec``, then a
    ``downsample`` Sequential(conv, bn) as a pair without ReLU); None where the module its
    fused forward skips (``relu``) is not exactly ``nn.ReLU`` or a downsample has hooks."""
    mods = module._modules
    pairs = [(mods[c], mods[b], relu) for c, b, relu in module._fold_spec]
    ds = mods.get("downsample")
    if type(ds) is nn.Sequential:
        if len(ds) != 2 or not no_hooks(ds):
            return None
        pairs.append((ds._modules["0"], ds._modules["1"], False))
    return pairs if exact_relu(mods.get("relu")) else None


def fusable_mode(module: nn.Module) -> bool:
    """In eval mode, or in training without an active regularizer (DropBlock, DropPath): a
    module in training fuses only pairs that compute the same in both modes, a conv ->
    FrozenBatchNorm2d (:func:`~._fused.add_pair` refuses a BatchNorm in training)."""
    return not module.training or (getattr(module, "drop_block", None) is None
                                   and getattr(module, "drop_path", None) is None)


def may_fuse(module: nn.Module) -> bool:
    """Not inside a torch.func transform, no global module hooks, and :func:`fusable_mode`."""
    return not in_functorch() and no_global_hooks() and fusable_mode(module)


class Kept:
    """A module's program, the key it was built for, and aliases of the tensors it was built
    from (they keep the recorded storages, and so addresses, alive: no other tensor can be
    allocated where a key says a source was). Stored in one ``__dict__`` slot of the module,
    replaced in one assignment: a concurrent reader sees the old entry or the new one, each
    valid for its key."""

    __slots__ = ("key", "program", "aliases")
    SLOT = "_kept_program"
    HEAD = "_kept_head"  # a backbone's fc plan (head_for)

    def __init__(self, key: list, program: Program, aliases: list[Tensor]) -> None:
        self.key, self.program, self.aliases = key, program, aliases

    @staticmethod
    def program_for(holder: nn.Module, stem: Optional[Group],
                    blocks: Sequence[Group]) -> Optional[Program]:
        """The program of ``stem`` and ``blocks``, kept in ``holder`` with its key; None if a
        pair is not foldable (:meth:`kept`)."""
        groups = ([] if stem is None else [stem]) + list(blocks)

        def build(differentiable: bool, cast: Optional[torch.dtype]) -> Program:
            plans = [group_plans(backend, pairs, own, differentiable, cast, winograd)
                     for backend, winograd, pairs, own, _ in groups]
            head = None if stem is None else plans.pop(0)[0]
            return Program(head, tuple(
                Block(tuple(p[:own - 1]), p[own - 1], p[own] if len(p) > own else shortcut)
                for p, (*_, own, shortcut) in zip(plans, blocks)))

        return Kept.kept(holder, [stem is None], groups, build)

    @staticmethod
    def plans_for(holder: nn.Module, backend: Optional[str], winograd: Optional[bool],
                  pairs: list) -> Optional[tuple[ConvPlan, ...]]:
        """One plan per (conv, BN or None, relu) of ``pairs``, run one by one (an FPN's
        convs), kept in ``holder`` as a program is; None if a pair is not foldable."""
        def build(differentiable: bool, cast: Optional[torch.dtype]) -> tuple[ConvPlan, ...]:
            return tuple(group_plans(backend, pairs, len(pairs), differentiable, cast,
                                     winograd))

        return Kept.kept(holder, [], [(backend, winograd, pairs, len(pairs), None)], build)

    @staticmethod
    def kept(holder: nn.Module, key: list, groups: Sequence[Group],
             build: Callable[[bool, Optional[torch.dtype]], Any]) -> Any:
        """``build(differentiable, autocast dtype)`` for ``groups``, kept in ``holder`` with
        its key (``key`` and the groups' own); None if a pair is not foldable. Nothing is kept
        under torch.compile (the fold goes into the graph), under a FakeTensorMode (fake plans
        would poison later real forwards), under autocast while gradients flow into a source
        (differentiable plans), or for inference tensors (no version counter to watch). One
        pass with dicts read directly: this runs on every forward."""
        sources: list[Tensor] = []
        for backend, winograd, pairs, own, shortcut in groups:
            key += (backend, winograd, own, shortcut)
            for conv, bn, _ in pairs:
                if not add_pair(conv, bn, key, sources):
                    return None
        cast = autocast_dtype(sources[0])
        key.append(cast)
        if torch.compiler.is_compiling() or faking() or (
                cast is not None and torch.is_grad_enabled()
                and any(t.requires_grad for t in sources)):
            return build(True, cast)
        try:
            key.append(tensor_states(sources))
        except RuntimeError:  # inference tensors have no version counter: nothing to watch
            warnings.warn(
                f"{type(holder).__name__}: its parameters or buffers are inference tensors "
                "(made under torch.inference_mode), which have no version counter to watch, "
                "so its fused plans are folded and packed again on every forward (ResNet-50, "
                "bf16, batch 1: 111 instead of 25 ms); make or load the model outside "
                "inference_mode", RuntimeWarning, stacklevel=3)
            return build(False, cast)
        kept = holder.__dict__.get(Kept.SLOT)
        if kept is not None and kept.key == key:
            return kept.program
        program = build(False, cast)
        holder.__dict__[Kept.SLOT] = Kept(key, program, [t.detach() for t in sources])
        return program

    @staticmethod
    def head_for(holder: nn.Module, fc: nn.Module, x: Tensor) -> Optional[ConvPlan]:
        """The plan of ``fc`` as a 1x1 conv over (N, C, 1, 1) features (our 1x1 GEMM or
        oneDNN's conv, whichever its first call measures faster), kept in ``holder`` under
        the key (backend, tensor states of fc's weight and bias); None where the module runs
        instead: not exactly a hook-free ``nn.Linear`` with a plain tensor weight and bias
        (a tensor subclass may override F.linear) of x's width, global module hooks,
        gradients on, autocast, torch.compile, a torch.func transform, a fake mode, x not on
        CPU, a dtype the CPU's oneDNN path does not take, or inference tensors (nothing to
        watch)."""
        if (type(fc) is not nn.Linear or not no_hooks(fc) or not no_global_hooks()
                or torch.is_grad_enabled() or x.device.type != "cpu"
                or torch.is_autocast_enabled("cpu") or torch.compiler.is_compiling()
                or in_functorch() or faking()):
            return None
        weight, bias = fc._parameters.get("weight"), fc._parameters.get("bias")
        if (type(weight) not in _PLAIN_TENSORS or type(bias) not in _PLAIN_TENSORS
                or x.shape[1] != weight.shape[1] or x.dtype != weight.dtype
                or weight.dtype not in onednn_dtypes() or not torch.backends.mkldnn.enabled):
            return None
        try:
            key = [holder.backend, tensor_states([weight, bias])]
        except RuntimeError:  # inference tensors
            return None
        kept = holder.__dict__.get(Kept.HEAD)
        if kept is not None and kept.key == key:
            return kept.program
        k, c = weight.shape
        with torch.inference_mode(False), torch.no_grad():
            plan = ConvPlan(_FC_AS_CONV, weight.detach().view(k, c, 1, 1), bias.detach(), False,
                            holder.backend, differentiable=False)
        holder.__dict__[Kept.HEAD] = Kept(key, plan, [weight.detach(), bias.detach()])
        return plan

    @staticmethod
    def of(module: nn.Module) -> Optional[Program]:
        """What ``module`` keeps now, if any: a :class:`Program`, or the plans of
        :meth:`plans_for` (an FPN's convs; a block's stride-1 3x3s in training)."""
        kept = module.__dict__.get(Kept.SLOT)
        return None if kept is None else kept.program

    @staticmethod
    def drop(module: nn.Module) -> None:
        module.__dict__.pop(Kept.SLOT, None)
        module.__dict__.pop(Kept.HEAD, None)


class FusedEvalMixin:
    """What a block, a backbone or an FPN (``detection.py``) needs to keep a program (a plain
    attribute, not a parameter or buffer: state_dicts are unchanged; dropped when pickled or
    deep-copied, and whenever ``_apply``, ``train()``/``eval()`` run), and to set its backend
    and Winograd use (on it and every such module inside it).

    A subclass lists its pairs as ``_fold_spec`` ((conv name, bn name, relu), ...); its
    ``relu`` module is what the fused forward skips besides them, and a ``downsample``
    Sequential(conv, bn) is a further pair without ReLU.
    """

    backend: Optional[str] = None
    winograd: Optional[bool] = None
    _fold_spec: tuple[tuple[str, str, bool], ...]

    def _drop_plans(self) -> None:
        Kept.drop(self)

    def set_backend(self, backend: Optional[str]) -> "FusedEvalMixin":
        """Use ``backend`` for the fused eval path from now on (None: env, else auto)."""
        if backend is not None:
            requested_backend(backend)  # an unknown name fails here, not at the first forward
        for m in self.modules():
            if isinstance(m, FusedEvalMixin):
                m.backend = backend
                m._drop_plans()
        return self

    def set_winograd(self, winograd: Optional[bool]) -> "FusedEvalMixin":
        """Winograd for the fused eval path's stride-1 3x3 convs on CPU (AVX2 or AVX-512;
        float32 arithmetic in float32 and bfloat16 models), each layer measured against oneDNN
        at its first call: None (the default) lets F(2x2,3x3) in where it is faster (it errs
        no more than oneDNN's direct conv), and in bfloat16 F(4x4,3x3) too (its error there is
        the output's bf16 rounding, as oneDNN's); True also F(4x4,3x3) in float32, faster
        still and 5-11x the error (docs/design.md gives the measured bound); False keeps
        Winograd out (the 3x3s run oneDNN; the 1x1 convs still weigh our GEMM against oneDNN:
        its arithmetic is a direct conv's)."""
        if not (winograd is None or isinstance(winograd, bool)):
            raise TypeError(f"set_winograd: expected None, True or False, got {winograd!r}")
        for m in self.modules():
            if isinstance(m, FusedEvalMixin):
                m.winograd = winograd
                m._drop_plans()
        return self

    def _apply(self, fn, *args, **kwargs):
        self._drop_plans()
        return super()._apply(fn, *args, **kwargs)

    def train(self, mode: bool = True):
        self._drop_plans()
        return super().train(mode)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop(Kept.SLOT, None)  # packed oneDNN weights do not pickle; rebuilt on use
        state.pop(Kept.HEAD, None)
        return state


def refresh(model: nn.Module) -> nn.Module:
    """Drop every prepared program of ``model``; the next forward rebuilds them from the
    current weights. Needed only after writes that bypass version counters
    (``p.data.copy_(...)``, ``.numpy()`` views, DLPack, raw-pointer kernels); every other
    change is seen on its own."""
    for m in model.modules():
        if isinstance(m, FusedEvalMixin):
            m._drop_plans()
    return model
