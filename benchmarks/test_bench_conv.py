"""Every conv layer of ResNet-50 (224px, channels_last): the fused conv per backend vs eager
conv -> BN(eval) -> ReLU (-> add -> ReLU for a block's last conv; no ReLU for a downsample
conv), layer by layer in rotated warm blocks, plus the sum over the network. On GPU also vs
torch.cudnn_convolution_relu / cudnn_convolution_add_relu.

Two variants of ours, separate benchmark ids in one group: ``plain``, the op
``conv_bias_act`` (on CPU it reorders the weight into oneDNN's layout on every call), and, on
CPU where oneDNN runs the dtype, ``packed``: the weight packed once (``prepack_conv_weight``)
and ``conv_bias_act_packed`` per call, which is what the models run (``ConvPlan._onednn``)."""

import os
import statistics

import pytest
import torch
import torch.nn.functional as F
from conftest import devices_and_backends, timed

import resnet_fast
from resnet_fast.bench.timing import flat, round_ratio, synchronized
from resnet_fast.ops import conv_bias_act, fold_bn
from resnet_fast.ops.conv_bias_act import onednn_dtypes

BATCHES = {"cpu": [1, 16], "cuda": [1, 32, 256]}


def _batches(device: str) -> list[int]:
    env = os.environ.get("RESNET_FAST_BENCH_BATCHES")
    return [int(b) for b in env.split(",")] if env else BATCHES[device]


def resnet50_layers():
    """(name, conv, bn, role, input shape) for every conv of ResNet-50 in forward order;
    role: 'relu' (conv-BN-ReLU), 'add_relu' (block tail) or 'bn' (downsample)."""
    # Train mode: the eval path fuses convs into conv_bias_act calls, which hooks do not see.
    model = resnet_fast.resnet50().train()
    shapes = {}

    def remember(name):
        def hook(mod, inputs, output):
            shapes[name] = tuple(inputs[0].shape)  # returns None: the output is left alone
        return hook

    hooks = [m.register_forward_hook(remember(n)) for n, m in model.named_modules()
             if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.randn(2, 3, 224, 224))
    for h in hooks:
        h.remove()
    assert len(shapes) == 53, f"expected ResNet-50's 53 convs, saw {len(shapes)}"
    model.eval()  # the eager baseline is conv -> BN(eval) -> ...
    modules = dict(model.named_modules())
    layers = []
    for name, shape in shapes.items():
        if name == "conv1":
            bn, role = model.bn1, "relu"
        elif name.endswith("downsample.0"):
            bn, role = modules[name[:-1] + "1"], "bn"
        else:
            block, conv_name = name.rsplit(".", 1)
            bn = getattr(modules[block], "bn" + conv_name[-1])
            role = "add_relu" if conv_name == "conv3" else "relu"
        layers.append((name, modules[name], bn, role, shape[1:]))
    return layers


def _cases():
    for device, backend in devices_and_backends():
        dtypes = [torch.float32] if device == "cpu" else [torch.bfloat16, torch.float16]
        for dtype in dtypes:
            packed = device == "cpu" and dtype in onednn_dtypes()
            for batch in _batches(device):
                for variant in ("plain", "packed") if packed else ("plain",):
                    yield pytest.param(
                        device, backend, dtype, batch, variant,
                        id=f"{device}-{backend}-{str(dtype)[6:]}-b{batch}-{variant}")


def _packed_conv(x, w, b, geo, r, relu):
    """The models' CPU inference call: the weight packed once for x's size, outside the timing."""
    stride, padding, dilation = (list(g) for g in geo[:3])  # the op's schema takes int[]
    groups = geo[3]
    packed = torch.ops.resnet_fast.prepack_conv_weight.default(w, stride, padding, dilation,
                                                                 groups, list(x.shape))
    op = torch.ops.resnet_fast.conv_bias_act_packed.default
    return lambda: op(x, packed, b, stride, padding, dilation, groups, r, relu)


@pytest.mark.parametrize("device, backend, dtype, batch, variant", list(_cases()))
def test_resnet50_conv_layers(benchmark, record, device, backend, dtype, batch, variant):
    benchmark.group = f"resnet50 convs {device}-{backend}-{str(dtype)[6:]}-b{batch}"
    dev = torch.device(device)
    torch.backends.cudnn.benchmark = True
    rows, ours_all = [], []
    g = torch.Generator().manual_seed(0)
    for name, conv, bn, role, chw in resnet50_layers():
        conv, bn = conv.to(dev, dtype), bn.to(dev, dtype)
        with torch.no_grad():
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
        w, b = (t.detach() for t in fold_bn(conv, bn))
        x = torch.randn(batch, *chw, generator=g).to(dev, dtype).contiguous(memory_format=torch.channels_last)
        geo = (conv.stride, conv.padding, conv.dilation, conv.groups)
        out_shape = F.conv2d(x[:1], conv.weight, None, *geo).shape[1:]
        r = (torch.randn(batch, *out_shape, generator=g).to(dev, dtype)
             .contiguous(memory_format=torch.channels_last) if role == "add_relu" else None)
        relu = role != "bn"

        def eager(x=x, r=r, conv=conv, bn=bn, role=role):
            y = bn(conv(x))
            if role == "add_relu":
                return torch.relu(y + r)
            return torch.relu(y) if role == "relu" else y

        if variant == "packed":
            ours = _packed_conv(x, w, b, geo, r, relu)
        else:
            def ours(x=x, w=w, b=b, geo=geo, r=r, relu=relu):
                return conv_bias_act(x, w, b, *geo, r, relu, backend=backend)

        candidates = {"ours": ours, "eager": eager}
        if device == "cuda" and relu:
            def cudnn_fused(x=x, w=w, b=b, geo=geo, r=r):
                if r is not None:
                    return torch.cudnn_convolution_add_relu(x, w, r, 1.0, b, *geo)
                return torch.cudnn_convolution_relu(x, w, b, *geo)

            candidates["cudnn_fused"] = cudnn_fused
        with torch.inference_mode():
            times = timed(benchmark, candidates, dev, repeats=5 if batch >= 16 else 15)
        flops = 2 * batch * out_shape.numel() * conv.weight[0].numel()
        med = {k: statistics.median(flat(v)) for k, v in times.items()}
        rows.append(dict(layer=name, role=role, input=list(chw), flops=flops,
                         **{f"{k}_ms": 1e3 * v for k, v in med.items()},
                         ours_tflops=flops / med["ours"] / 1e12,
                         ratio_vs_eager=round_ratio(times["eager"], times["ours"])))
        ours_all.append(ours)

    def network():
        for fn in ours_all:
            fn()

    with torch.inference_mode():
        benchmark.pedantic(synchronized(network, dev), rounds=3, warmup_rounds=1)
    total = {k: sum(r[f"{k}_ms"] for r in rows) for k in ("ours", "eager")}
    op = "conv_bias_act_packed" if variant == "packed" else "conv_bias_act"
    summary = dict(op=f"{op} (ResNet-50 sum)", variant=variant, device=device, backend=backend,
                   dtype=str(dtype)[6:], shape=[batch, 3, 224, 224],
                   ours_ms=total["ours"], eager_ms=total["eager"],
                   ratio=total["eager"] / total["ours"], layers=rows)
    if device == "cuda" and all("cudnn_fused_ms" in r for r in rows if r["role"] != "bn"):
        summary["cudnn_fused_ms_relu_layers"] = sum(r.get("cudnn_fused_ms", 0) for r in rows)
    benchmark.extra_info.update(summary)
    record(summary)
