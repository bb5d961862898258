"""The sigmoid loss as a custom op: torch.library.opcheck of calrft::sigmoid_pairs (schema, fake
kernel, autograd registration, AOT dispatch), torch.compile(fullgraph=True) against eager, and
the work it does, counted with FlopCounterMode (3 products with gradients, 1 without, one more
for the teacher)."""
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from _op_util import pair_operands
from calrft_kernels import sigmoid_loss, testing
from calrft_kernels.sigmoid import sigmoid_pairs  # noqa: F401  (registers the op)

BACKENDS = ["cpu", "chunked", "reference"]


def _args(backend, teacher, labels, with_grads, dtype=torch.float32, requires_grad=True):
    x = pair_operands(teacher, dtype, requires_grad)
    qlab = klab = None
    if labels:
        qlab = torch.randint(0, 3, (x.q.shape[0],), generator=x.gen)
        klab = torch.randint(0, 3, (x.k.shape[0],), generator=x.gen)
    return (x.q, x.k, x.scale, x.bias, qlab, klab, 1, x.tq, x.tk, x.tscale, x.tbias,
            0.8 if teacher else 0.0, with_grads, backend, 3)


@pytest.mark.parametrize("with_grads", [True, False])
@pytest.mark.parametrize("labels", [False, True])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_sigmoid_pairs(backend, teacher, labels, with_grads):
    torch.library.opcheck(torch.ops.calrft.sigmoid_pairs.default,
                          _args(backend, teacher, labels, with_grads,
                                requires_grad=with_grads))


def test_opcheck_float64():
    for backend in BACKENDS:
        torch.library.opcheck(torch.ops.calrft.sigmoid_pairs.default,
                              _args(backend, True, True, True, dtype=torch.float64))


def _inputs(b=40, d=8, teacher=True, seed=1):
    gen = torch.Generator().manual_seed(seed)
    def unit():
        return torch.nn.functional.normalize(torch.randn(b, d, generator=gen), dim=1)
    inputs = {"image_features": unit(), "text_features": unit(),
              "logit_scale": torch.tensor(10.0), "logit_bias": torch.tensor(-10.0)}
    kwargs = {"labels": torch.randint(0, 5, (b,), generator=gen)}
    if teacher:
        kwargs.update(teacher_image_features=unit(), teacher_text_features=unit(),
                      teacher_logit_scale=torch.tensor(9.0), teacher_logit_bias=-8.0,
                      distill_weight=1.5)
    return inputs, kwargs


@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_fullgraph_matches_eager(backend, teacher):
    torch._dynamo.reset()
    inputs, kwargs = _inputs(teacher=teacher)

    def run(fn):
        leaves = [v.clone().requires_grad_() for v in inputs.values()]
        loss = fn(*leaves)
        loss.backward()
        return loss.detach(), [x.grad for x in leaves]

    def loss_fn(img, txt, scale, bias):
        return sigmoid_loss(img, txt, scale, bias, **kwargs, backend=backend)
    eager = run(loss_fn)
    compiled = run(torch.compile(loss_fn, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(compiled[1], eager[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    with torch.no_grad():  # the no-gradient trace: forward product only
        torch.testing.assert_close(torch.compile(loss_fn, fullgraph=True)(*inputs.values()),
                                   eager[0], rtol=1e-6, atol=1e-6)


# ---- work: 3 products with gradients (4 with a teacher), 1 without (2) ----------------------
@pytest.mark.parametrize("b,d", [(37, 8), (130, 3)])
@pytest.mark.parametrize("teacher", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
def test_work_is_three_units_with_gradients_and_one_without(backend, teacher, b, d):
    """Counted over the public op (the C++ kernel's tile products run on the calling thread at
    these sizes, where FlopCounterMode sees them). unit = one B x B x d product."""
    testing.count_flops_through_custom_ops()
    inputs, kwargs = _inputs(b, d, teacher=teacher)
    unit = 2 * b * b * d
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    with FlopCounterMode(display=False) as counter:
        sigmoid_loss(**leaves, **kwargs, backend=backend).backward()
    assert counter.get_total_flops() == (4 if teacher else 3) * unit, counter.get_flop_counts()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        sigmoid_loss(**leaves, **kwargs, backend=backend)
    assert counter.get_total_flops() == (2 if teacher else 1) * unit, counter.get_flop_counts()
    with FlopCounterMode(display=False) as counter:  # grad mode on, but nothing requires grad
        sigmoid_loss(**inputs, **kwargs, backend=backend)
    assert counter.get_total_flops() == (2 if teacher else 1) * unit, counter.get_flop_counts()


# ---- memory: the backward allocates the two gradients and nothing of their size besides -----
class _AllocatedBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Sums the bytes of every tensor an aten op returns (an upper bound of what it allocates)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and func._schema.name not in (
                    "aten::detach", "aten::view", "aten::alias", "aten::_unsafe_view",
                    "aten::t", "aten::reshape", "aten::expand", "aten::as_strided"):
                self.total += t.numel() * t.element_size()
        return out


@pytest.mark.parametrize("teacher", [False, True])
def test_backward_allocates_only_the_two_gradients(teacher):
    """The backward scales the gradients formed in the forward: its allocations are the two
    [B, d] gradients (plus scalars). Materialising the zero gradients of the op's unused
    outputs (dq_u, dk_u) would add two more [B, d] buffers (the 1 GiB goal at B = 65536)."""
    inputs, kwargs = _inputs(512, 64, teacher=teacher)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    loss = sigmoid_loss(**leaves, **kwargs, backend="cpu")
    with _AllocatedBytes() as counted:
        loss.backward()
    two_gradients = 2 * 512 * 64 * 4
    assert two_gradients <= counted.total < two_gradients + 1024, counted.total
