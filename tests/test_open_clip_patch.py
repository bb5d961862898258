"""calrft_kernels.integrations.open_clip.patch(): what it replaces, that undoing it restores
open_clip exactly, bad use, and the console command's wrapper (in-process; the end-to-end
open_clip_train runs are in test_open_clip_train.py)."""
import argparse
import contextlib
import sys

import open_clip
import open_clip.factory
import open_clip.loss
import pytest
import torch

from calrft_kernels import losses
from calrft_kernels.integrations import open_clip as integration
from calrft_kernels.integrations import open_clip_train as console

NAMES = ("ClipLoss", "SigLipLoss", "DistillClipLoss")
MODULES = (open_clip.factory, open_clip.loss, open_clip)
FUSED = {"ClipLoss": losses.ClipLoss, "SigLipLoss": losses.SigLipLoss,
         "DistillClipLoss": losses.DistillClipLoss}


def snapshot():
    return {(m.__name__, n): getattr(m, n, None)
            for m in MODULES for n in NAMES + ("CoCaLoss", "create_loss")}


@pytest.fixture(autouse=True)
def restores_open_clip():
    """Every test leaves open_clip as it found it (a failing test's patch is undone first)."""
    before = snapshot()
    yield
    if integration.active_patch() is not None:
        integration.unpatch()
    assert snapshot() == before


def train_args(**kw):
    """The fields of open_clip_train's parsed arguments that create_loss reads."""
    base = dict(distill=False, model="ViT-B-32", siglip=False, local_loss=False,
                gather_with_grad=False, rank=0, world_size=1, horovod=False,
                loss_dist_impl=None, coca_caption_loss_weight=2.0,
                coca_contrastive_loss_weight=1.0)
    return argparse.Namespace(**{**base, **kw})


def test_patch_replaces_every_name_and_unpatch_restores_exactly():
    before = snapshot()
    handle = integration.patch()
    assert handle.active and integration.active_patch() is handle
    expected = [f"{m.__name__}.{n}" for m in MODULES for n in NAMES if (m.__name__, n) in before
                and before[m.__name__, n] is not None]
    assert sorted(handle.replaced) == sorted(expected)
    assert "open_clip.factory.SigLipLoss" in handle.replaced  # what create_loss looks up
    for qualified, original in handle.replaced.items():
        module_name, name = qualified.rsplit(".", 1)
        assert original is before[module_name, name]
        assert getattr(sys.modules[module_name], name) is FUSED[name]
    assert open_clip.loss.CoCaLoss is before["open_clip.loss", "CoCaLoss"]
    assert list(handle.kept) == ["CoCaLoss"]
    handle.unpatch()
    assert not handle.active and integration.active_patch() is None
    assert snapshot() == before


def test_context_manager_restores_even_when_the_body_raises():
    before = snapshot()
    with pytest.raises(KeyError):
        with integration.patch() as handle:
            assert open_clip.ClipLoss is losses.ClipLoss
            raise KeyError("inside")
    assert not handle.active and snapshot() == before


@pytest.mark.parametrize("kw,name,attrs", [
    ({}, "ClipLoss", {"local_loss": False, "gather_with_grad": False, "cache_labels": True}),
    ({"local_loss": True, "gather_with_grad": True, "rank": 1, "world_size": 4}, "ClipLoss",
     {"local_loss": True, "gather_with_grad": True, "rank": 1, "world_size": 4}),
    ({"siglip": True, "loss_dist_impl": "shift", "rank": 2, "world_size": 3}, "SigLipLoss",
     {"dist_impl": "shift", "rank": 2, "world_size": 3}),
    ({"siglip": True}, "SigLipLoss", {"dist_impl": "bidir"}),
    ({"distill": True, "local_loss": True}, "DistillClipLoss", {"local_loss": True}),
])
def test_create_loss_builds_the_fused_loss_with_the_same_arguments(kw, name, attrs):
    args = train_args(**kw)
    unpatched = open_clip.create_loss(args)
    with integration.patch():
        loss = open_clip.create_loss(args)
    assert type(loss) is FUSED[name] and type(unpatched).__name__ == name
    for attr, value in attrs.items():
        assert getattr(loss, attr) == getattr(unpatched, attr, value) == value


def test_coca_stays_open_clips():
    with integration.patch():
        loss = open_clip.create_loss(train_args(model="coca_ViT-B-32"))
    assert type(loss) is open_clip.loss.CoCaLoss


def test_open_clip_train_builds_its_loss_through_the_patched_names():
    train_main = pytest.importorskip("open_clip_train.main")
    with integration.patch():
        assert type(train_main.create_loss(train_args(siglip=True))) is losses.SigLipLoss
    assert type(train_main.create_loss(train_args(siglip=True))) is open_clip.loss.SigLipLoss


def _features(*shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(*shape, generator=gen,
                                                     dtype=torch.float64), dim=1)


@pytest.mark.parametrize("kw", [{}, {"siglip": True}, {"distill": True}])
def test_patched_loss_gives_open_clips_numbers(kw):
    """Value and gradients, float64, awkward sizes (13 pairs, width 7; a teacher of width 5)."""
    image, text = _features(13, 7, seed=1), _features(13, 7, seed=2)
    extra = {}
    if kw.get("siglip"):
        extra["logit_bias"] = torch.tensor(-3.0, dtype=torch.float64)
    if kw.get("distill"):
        extra.update(dist_image_features=_features(13, 5, seed=3),
                     dist_text_features=_features(13, 5, seed=4),
                     dist_logit_scale=torch.tensor(9.0, dtype=torch.float64))
    results = []
    for patched in (False, True):
        leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(),
                  torch.tensor(6.0, dtype=torch.float64, requires_grad=True)]
        with integration.patch() if patched else contextlib.nullcontext():
            loss_fn = open_clip.create_loss(train_args(**kw))
        out = loss_fn(*leaves, **extra, output_dict=True)
        grads = torch.autograd.grad(sum(out.values()), leaves)
        results.append(([out[k] for k in sorted(out)], grads))
    (ours, our_grads), (theirs, their_grads) = results[1], results[0]
    for a, b in zip(ours + list(our_grads), theirs + list(their_grads)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


# ---- bad use -------------------------------------------------------------------------------

def test_patching_twice_is_refused_and_the_first_patch_stays():
    handle = integration.patch()
    with pytest.raises(RuntimeError, match="already patched"):
        integration.patch()
    assert handle.active and open_clip.factory.ClipLoss is losses.ClipLoss
    handle.unpatch()


def test_unpatching_when_not_patched_is_refused():
    with pytest.raises(RuntimeError, match="not patched"):
        integration.unpatch()
    handle = integration.patch()
    handle.unpatch()
    with pytest.raises(RuntimeError, match="not active"):
        handle.unpatch()


def test_a_missing_name_refuses_the_patch_and_changes_nothing(monkeypatch):
    monkeypatch.delattr(open_clip.factory, "SigLipLoss")
    before = snapshot()
    with pytest.raises(RuntimeError, match=r"open_clip.factory.SigLipLoss is missing"):
        integration.patch()
    assert snapshot() == before and integration.active_patch() is None


def test_a_create_loss_that_does_not_use_the_names_is_refused(monkeypatch):
    monkeypatch.setattr(open_clip.factory, "create_loss", lambda args: None)
    with pytest.raises(RuntimeError, match="create_loss does not build ClipLoss, SigLipLoss, "
                                           "DistillClipLoss"):
        integration.patch()
    assert integration.active_patch() is None


def test_an_argument_the_drop_in_lacks_is_refused(monkeypatch):
    class NewerClipLoss(open_clip.loss.ClipLoss):
        def __init__(self, *args, temperature_schedule=None, **kwargs):
            super().__init__(*args, **kwargs)
    monkeypatch.setattr(open_clip.factory, "ClipLoss", NewerClipLoss)
    with pytest.raises(RuntimeError, match="temperature_schedule"):
        integration.patch()
    assert open_clip.factory.ClipLoss is NewerClipLoss


def test_a_name_changed_by_someone_else_is_restored_with_a_warning():
    original = open_clip.factory.ClipLoss
    handle = integration.patch()
    open_clip.factory.ClipLoss = object  # another library's patch on top of ours
    with pytest.warns(RuntimeWarning, match="open_clip.factory.ClipLoss was changed"):
        handle.unpatch()
    assert open_clip.factory.ClipLoss is original


def test_summary_names_what_was_replaced_and_kept():
    with integration.patch() as handle:
        line = handle.summary()
    assert line == ("calrft_kernels: open_clip ClipLoss, DistillClipLoss, SigLipLoss -> fused "
                    "(calrft_kernels.losses); kept open_clip's own: CoCaLoss")
    assert "undone" in repr(handle)


# ---- the console command's wrapper ---------------------------------------------------------

def test_console_main_runs_open_clip_train_patched_and_restores_after(monkeypatch, capsys):
    train_main = pytest.importorskip("open_clip_train.main")
    seen = []

    def fake_main(argv):
        seen.append((list(argv), type(train_main.create_loss(train_args())),
                     integration.active_patch() is not None))
        raise SystemExit(3)  # open_clip_train exiting: the patch is undone all the same
    monkeypatch.setattr(train_main, "main", fake_main)
    with pytest.raises(SystemExit) as exit_info:
        console.main(["--model", "RN50"])
    assert exit_info.value.code == 3
    assert seen == [(["--model", "RN50"], losses.ClipLoss, True)]
    assert integration.active_patch() is None
    assert "open_clip ClipLoss, DistillClipLoss, SigLipLoss -> fused" in capsys.readouterr().err


def test_console_main_says_how_to_install_open_clip_train_dependencies(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip_train.main", None)  # import fails
    with pytest.raises(SystemExit, match=r"pip install 'calrft-kernels\[open-clip-train\]'"):
        console.main(["--model", "RN50"])
    assert integration.active_patch() is None


# ---- the memory benchmark's plumbing (benchmarks/bench_open_clip_patch.py) -----------------

@pytest.mark.parametrize("method", ["ClipLoss", "SigLipLoss+patch", "DistillClipLoss+patch"])
def test_benchmark_builds_the_loss_it_names_and_leaves_open_clip_unpatched(method):
    from benchmarks import bench_open_clip_patch as bench
    step, clear = bench._make_step(method, 16, 8)   # asserts the class it built
    step()
    clear()
    assert integration.active_patch() is None
    table = bench.table([dict(method=m, B=16, d=8, runs=1, seconds=1.0, extra_mib=1.0)
                         for m in bench.METHODS], [16])
    assert table.count("| 16 | 8 |") == len(bench.LOSSES)
