"""The realize-on-reuse cost model, and the torch-2.11-only patch that installs it.

`make test` runs this file on torch 2.13 and on torch 2.11. On 2.11 the patch goes into the real
StorageBox and changes what Inductor writes; on 2.12+ install() must patch nothing. Installing,
idempotence and revert are also exercised on any torch by simulating 2.11 (the version check) on
stand-in classes, and the patched decision on stand-in Inductor data objects."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch._inductor import ir
from torch._inductor.virtualized import V

from fxsp.patches import inductor_reuse
from fxsp.patches.inductor_reuse import install, is_installed, should_realize, uninstall

METHOD = "should_realize_on_reuse"


@pytest.fixture(autouse=True)
def nothing_left_installed(monkeypatch):
    monkeypatch.delenv(inductor_reuse.ENV_VAR, raising=False)
    uninstall()
    yield
    uninstall()


# ---- the cost model -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "total_read_bytes, output_bytes, users, reads, expected",
    [
        # inline costs reads*users, realize costs reads + out*(1+users):
        # realize when inline >= realize
        (3000, 1000, 2, 1, True),  # 3000*1 == 1000*3: equality realizes
        (2999, 1000, 2, 9, False),  # just below; with sizes known the read count is unused
        (2000, 1000, 3, 1, True),  # 2000*2 == 1000*4
        (1999, 1000, 3, 1, False),
        (1000, 1000, 100, 1, False),  # one same-size input: recomputing is never worse
        (1100, 1000, 21, 1, True),  # 1100*20 == 1000*22
        (10**9, 1, 1, 99, False),  # a single user never gains from a buffer
        (10**9, 1, 0, 99, False),
        (0, 1000, 2, 5, True),  # read size unknown: 2.11's rule, reads > threshold
        (0, 1000, 2, 4, False),  # ... strictly greater
        (3000, 0, 2, 5, True),  # output size unknown: same fallback
        (3000, 0, 2, 4, False),
        (0, 0, 1, 50, False),  # the fallback also needs more than one user
    ],
)
def test_cost_model(total_read_bytes, output_bytes, users, reads, expected):
    decision = should_realize(total_read_bytes, output_bytes, users, reads, reads_threshold=4)
    assert decision is expected


# ---- on the torch this runs on: the real patch on 2.11, nothing on 2.12+ --------------------

TORCH_2_11 = inductor_reuse._torch_needs_patch(torch.__version__)
only_on_2_11 = pytest.mark.skipif(
    not TORCH_2_11,
    reason=f"torch {torch.__version__} is not 2.11: "
    "no patch to install (`make test` also runs torch 2.11)",
)
only_after_2_11 = pytest.mark.skipif(TORCH_2_11, reason="torch 2.11 is patched: see the 2.11 tests")


@only_on_2_11
def test_install_on_torch_2_11_patches_the_real_storage_box_and_changes_what_is_written():
    assert inductor_reuse._unexpected_shape(ir.StorageBox) is None
    original = ir.StorageBox.__dict__.get(METHOD)
    inputs = [torch.randn(64, 64) for _ in range(3)]
    unpatched = _lowered_buffers(_residual_block, inputs)

    assert install() is True and is_installed()
    patched_method = ir.StorageBox.__dict__[METHOD]
    assert patched_method is not original
    assert install() is True and ir.StorageBox.__dict__[METHOD] is patched_method  # once
    # x = a + b + c: 2.11's read count (3 <= 4) inlines it into both users, traffic realizes it
    assert len(_lowered_buffers(_residual_block, inputs)) == len(unpatched) + 1

    assert uninstall() is True
    assert ir.StorageBox.__dict__.get(METHOD) is original and not is_installed()
    assert _lowered_buffers(_residual_block, inputs) == unpatched


@only_on_2_11
def test_compiled_code_with_the_real_patch_equals_eager():
    inputs = [torch.randn(32, 48) for _ in range(3)]
    assert install() is True
    torch._dynamo.reset()
    got = torch.compile(_residual_block, backend="inductor", fullgraph=True)(*inputs)
    for g, want in zip(got, _residual_block(*inputs), strict=True):
        torch.testing.assert_close(g, want)


@only_after_2_11
def test_install_on_torch_2_12_and_later_is_a_noop_that_touches_nothing():
    before = {
        name: ir.StorageBox.__dict__.get(name)
        for name in (METHOD, "mark_reuse", "num_reads", "realize_hint")
    }
    assert install() is False
    assert install(enabled=True) is False
    after = {name: ir.StorageBox.__dict__.get(name) for name in before}
    assert all(after[name] is before[name] for name in before)
    assert not getattr(ir.StorageBox.should_realize_on_reuse, inductor_reuse._PATCH_MARK, False)
    assert is_installed() is False
    assert uninstall() is False


@pytest.mark.parametrize(
    "version, needed",
    [
        ("2.11.0", True),
        ("2.11.1", True),
        ("2.11.0+cu128", True),
        ("2.11.0a0+git70d99e9", True),
        ("2.12.0", False),
        ("2.13.0+cpu", False),
        ("2.10.0", False),
        ("2.1.0", False),
        ("3.11.0", False),
        ("unknown", False),
    ],
)
def test_only_torch_2_11_needs_the_patch(version, needed):
    assert inductor_reuse._torch_needs_patch(version) is needed


# ---- install / uninstall, with torch 2.11 simulated -----------------------------------------


def _original_decision(self, users):
    return "original"


class FakeStorageBox:
    """Shaped like 2.11's StorageBox: the method takes (self, users) only."""

    should_realize_on_reuse = _original_decision


class FakeBase:
    should_realize_on_reuse = _original_decision


class FakeInheritingBox(FakeBase):
    pass


@pytest.fixture
def torch_2_11(monkeypatch):
    """Pretend to be torch 2.11; yields a function that picks the class install() patches."""
    monkeypatch.setattr(inductor_reuse, "_torch_needs_patch", lambda version: True)

    def target(cls):
        monkeypatch.setattr(inductor_reuse, "_storage_box_class", lambda: cls)

    return target


def test_install_patches_once_and_uninstall_restores_exactly(torch_2_11):
    torch_2_11(FakeStorageBox)
    original = FakeStorageBox.__dict__[METHOD]

    assert install() is True
    patched = FakeStorageBox.__dict__[METHOD]
    assert patched is not original and is_installed()
    assert install() is True
    assert FakeStorageBox.__dict__[METHOD] is patched  # not wrapped a second time

    assert uninstall() is True
    assert FakeStorageBox.__dict__[METHOD] is original
    assert not is_installed()
    assert uninstall() is False
    assert FakeStorageBox.__dict__[METHOD] is original


def test_uninstall_restores_an_inherited_method_by_removing_the_override(torch_2_11):
    torch_2_11(FakeInheritingBox)
    assert METHOD not in FakeInheritingBox.__dict__
    assert install() is True
    assert METHOD in FakeInheritingBox.__dict__
    assert uninstall() is True
    assert METHOD not in FakeInheritingBox.__dict__
    assert FakeInheritingBox.should_realize_on_reuse is FakeBase.should_realize_on_reuse


def test_install_again_after_uninstall_works(torch_2_11):
    torch_2_11(FakeStorageBox)
    original = FakeStorageBox.__dict__[METHOD]
    assert install() and uninstall() and install()
    assert getattr(FakeStorageBox.__dict__[METHOD], inductor_reuse._PATCH_MARK)
    assert uninstall()
    assert FakeStorageBox.__dict__[METHOD] is original


@pytest.mark.parametrize("value", ["0", "false", "off", "no"])
def test_environment_variable_disables(torch_2_11, monkeypatch, value):
    torch_2_11(FakeStorageBox)
    monkeypatch.setenv(inductor_reuse.ENV_VAR, value)
    assert install() is False
    assert FakeStorageBox.__dict__[METHOD] is _original_decision
    # An explicit option is stronger than the environment.
    assert install(enabled=True) is True
    assert uninstall()


def test_option_disables(torch_2_11):
    torch_2_11(FakeStorageBox)
    assert install(enabled=False) is False
    assert FakeStorageBox.__dict__[METHOD] is _original_decision


class FakeLaterStorageBox:
    """Shaped like 2.12+'s StorageBox, whose callers pass `graph_reuse=` as well."""

    def should_realize_on_reuse(self, users, *, graph_reuse=True):
        return "original"


def test_refuses_a_method_of_another_shape(torch_2_11):
    # A 2.11-shaped replacement would break the callers of a 2.12+-shaped method, so even a
    # (mis)detected 2.11 leaves it alone.
    torch_2_11(FakeLaterStorageBox)
    original = FakeLaterStorageBox.__dict__[METHOD]
    assert install() is False
    assert FakeLaterStorageBox.__dict__[METHOD] is original
    assert not is_installed()


@only_after_2_11
def test_refuses_the_real_storage_box_of_torch_2_12_and_later(torch_2_11):
    torch_2_11(ir.StorageBox)
    original = ir.StorageBox.__dict__[METHOD]
    assert install() is False
    assert ir.StorageBox.__dict__[METHOD] is original


# ---- the patched decision, on stand-in Inductor objects -------------------------------------


class FakeDep:
    def __init__(self, nbytes: int):
        self.nbytes = nbytes


def fake_pointwise(
    read_bytes,
    numel,
    *,
    num_reads=None,
    dtype=torch.bfloat16,
    device="cuda",
    large=False,
    used_ops=(),
    broken=False,
):
    """A real `ir.Pointwise` subclass (so isinstance checks pass) answering from arguments."""

    class FakePointwise(ir.Pointwise):
        def get_reads(self):
            if broken:
                raise RuntimeError("internals changed")
            return [FakeDep(n) for n in read_bytes]

        def num_reads(self):
            return len(read_bytes) if num_reads is None else num_reads

        def has_large_inner_fn(self, threshold=None):
            return large

        def get_numel(self):
            return numel

        def get_dtype(self):
            return dtype

        def get_device(self):
            return torch.device(device)

        def inner_fn_opcount(self):
            return SimpleNamespace(used_ops=set(used_ops))

    return object.__new__(FakePointwise)


class BareBox:
    """Only `.data`, unlike StorageBox: the decision must ask the data, never the box."""

    def __init__(self, data):
        self.data = data


@pytest.fixture
def patched():
    """The patched method around an original that records its calls, under a stand-in graph."""
    calls = []

    def original(box, users):
        calls.append((box, users))
        return "original"

    graph = SimpleNamespace(
        get_dep_size_hint=lambda dep: dep.nbytes,
        sizevars=SimpleNamespace(optimization_hint=lambda expr, fallback=None: expr),
    )
    with V.set_graph_handler(graph):
        yield SimpleNamespace(decide=inductor_reuse._make_patched_method(original), calls=calls)


def test_patched_decision_uses_bytes_not_the_read_count(patched):
    # One large input read by 2 users: 2.11 (1 read <= 4) inlines; traffic says realize.
    # 4000 * (2 - 1) >= 1000 bytes (500 bf16) * 3
    assert patched.decide(BareBox(fake_pointwise([4000], 500)), 2) is True
    # Five tiny inputs: 2.11 (5 reads > 4) realizes; traffic says inline. 500 * 1 < 1000 * 3
    assert patched.decide(BareBox(fake_pointwise([100] * 5, 500)), 2) is False
    assert patched.calls == []


def test_patched_decision_boundary(patched):
    assert patched.decide(BareBox(fake_pointwise([3000], 500)), 2) is True
    assert patched.decide(BareBox(fake_pointwise([2998], 500)), 2) is False


def test_patched_decision_falls_back_to_the_read_count_without_sizes(patched):
    assert patched.decide(BareBox(fake_pointwise([0, 0], 500, num_reads=5)), 2) is True
    assert patched.decide(BareBox(fake_pointwise([0, 0], 500, num_reads=4)), 2) is False


def test_patched_decision_keeps_the_2_11_shortcuts(patched):
    assert patched.decide(BareBox(fake_pointwise([1], 500, large=True)), 2) is True
    assert patched.decide(BareBox(fake_pointwise([1], 500, device="cpu", used_ops=["exp"])), 2)
    assert not patched.decide(BareBox(fake_pointwise([1], 500, device="cpu", used_ops=["add"])), 2)
    assert patched.decide(BareBox(fake_pointwise([10**6], 1)), 1) is False
    assert patched.decide(BareBox(object()), 3) is False  # neither Pointwise nor Reduction


def test_patched_decision_falls_back_to_inductor_if_internals_break(patched):
    box = BareBox(fake_pointwise([4000], 500, broken=True))
    assert patched.decide(box, 2) == "original"
    assert patched.calls == [(box, 2)]


# ---- the decision against real Inductor objects ---------------------------------------------


def _lowered_buffers(fn, inputs) -> list[str]:
    """Lower `fn` with Inductor (no code generation) and name the buffers it decided to write."""
    from torch._inductor.graph import GraphLowering
    from torch.fx.experimental.proxy_tensor import make_fx

    graph = GraphLowering(make_fx(fn)(*inputs))
    with V.set_graph_handler(graph):
        graph.run(*inputs)
    return [buffer.get_name() for buffer in graph.buffers]


def _residual_block(a, b, c):
    # x reads 3 inputs of its own size and has 2 users. Torch's read-count rule (3 reads <= 4)
    # inlines it; traffic 3 * (2 - 1) >= 1 * (1 + 2) realizes it (the equality case).
    x = a + b + c
    return (x * 2).sum(1), (x - 1).amax(1)


def test_decision_runs_on_real_inductor_objects(monkeypatch):
    """Lower a graph with the decision spliced into the real StorageBox (through a shim for
    2.13's extra `graph_reuse=` keyword): every attribute it reads must exist on live
    Pointwise/Reduction data and on V.graph, and its answer must change what is written."""
    original = ir.StorageBox.should_realize_on_reuse
    inputs = [torch.randn(64, 64) for _ in range(3)]
    unpatched = _lowered_buffers(_residual_block, inputs)
    decisions = []

    def spliced(self, users, *, graph_reuse=True):
        if not graph_reuse:  # a 2.13-only case (broadcast reuse); not what the patch is about
            return original(self, users, graph_reuse=graph_reuse)
        decision = inductor_reuse._decide(self, users)  # no fallback here: errors must surface
        decisions.append((type(self.data).__name__, users, decision))
        return decision

    monkeypatch.setattr(ir.StorageBox, METHOD, spliced)
    patched = _lowered_buffers(_residual_block, inputs)
    assert ("Pointwise", 2, True) in decisions, decisions
    assert len(patched) == len(unpatched) + 1  # x is now written once and read by both users
