"""gate_pool and gram_accumulate against the float64 references, on every device built."""
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import chip_ext
from chip_ext.reference import gate_pool_reference, gram_accumulate_reference
from conftest import devices

FLOAT_TYPES = [torch.float32, torch.float16, torch.bfloat16]
GATE_TYPES = [torch.bool, torch.uint8, torch.float32, torch.float64, torch.float16, torch.bfloat16]


# ----------------------------------------------------------------------------------- inputs


def make_A(B, K, H, W, dtype=torch.float32, layout="contiguous", device="cpu"):
    """Random activations, never zero: N(0.5, 1) with |x| >= 0.05."""
    def rnd(*shape):
        x = torch.randn(*shape) + 0.5
        return torch.where(x.abs() < 0.05, torch.full_like(x, 0.3), x)

    if layout == "contiguous":
        A = rnd(B, K, H, W)
    elif layout == "channels_last":
        A = rnd(B, K, H, W).contiguous(memory_format=torch.channels_last)
    elif layout == "strided":  # neither NCHW- nor NHWC-dense: every other channel, cropped width
        A = rnd(B, 2 * K, H, W + 3)[:, ::2, :, 1:W + 1]
    else:
        raise ValueError(layout)
    A = A.to(device=device, dtype=dtype)
    if layout == "channels_last":
        A = A.contiguous(memory_format=torch.channels_last)
    return A


def make_gates(B, N, K, dtype=torch.bool, device="cpu", binary=True):
    if binary:
        d = torch.rand(B, N, K) < 0.6
        d[:, 0] = True  # the unperturbed network, as distillation uses it
        return d.to(device=device, dtype=dtype)
    return (torch.rand(B, N, K) * 0.9 + 0.1).to(device=device, dtype=dtype)


def check_gate_pool(A, gates, binary=True):
    gated, z = chip_ext.gate_pool(A, gates)
    ref_gated, ref_z = gate_pool_reference(A.cpu(), gates.cpu())
    B, K, H, W = A.shape
    N = gates.shape[1]
    assert gated.shape == (B * N, K, H, W) and gated.dtype == A.dtype and gated.device == A.device
    assert z.shape == (B, N, K) and z.dtype == torch.float32 and z.device == A.device
    if not A.is_contiguous() and A.is_contiguous(memory_format=torch.channels_last):
        assert gated.is_contiguous(memory_format=torch.channels_last)
    else:
        assert gated.is_contiguous()
    assert not torch.isnan(gated).any(), "an element of gated was never written"
    assert not torch.isnan(z).any(), "an element of z was never written"
    if binary:
        assert torch.equal(gated.cpu(), ref_gated)
    else:  # product rounded to float32, then to A's dtype: at most one ulp of A's dtype apart
        tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[A.dtype]
        torch.testing.assert_close(gated.cpu().float(), ref_gated.float(), rtol=tol, atol=tol)
    rtol = 1e-6 if A.device.type == "cpu" else 1e-5
    atol = 1e-6 * float(A.abs().max())
    torch.testing.assert_close(z.cpu(), ref_z, rtol=rtol, atol=atol)


def make_gram_inputs(B, N, K, C, gate_dtype=torch.bool, device="cpu"):
    a = torch.rand(B, K) * 2 + 0.05
    gates = make_gates(B, N, K, gate_dtype)
    h = torch.rand(B, N) * 0.9 + 0.1
    f = torch.softmax(torch.randn(B, C), dim=1)
    g = torch.softmax(torch.randn(B, N, C), dim=2)
    return [t.to(device) for t in (a, gates, h, f, g)]


def random_accumulators(C, K, device="cpu"):
    """Non-zero starting sums: the op must add, not overwrite."""
    acc = chip_ext.new_accumulators(C, K, device)
    for t in acc:
        t.copy_(torch.rand(t.shape, dtype=torch.float64) + 1.0)
    return acc


def check_gram(a, gates, h, f, g, rtol=None):
    """Runs the kernel on non-zero accumulators and compares what it added with the reference's."""
    device = a.device
    C, K = f.shape[1], a.shape[1]
    acc = random_accumulators(C, K, device)
    start = [t.detach().cpu().clone() for t in acc]
    ref = [t.clone() for t in start]
    chip_ext.gram_accumulate(*acc, a, gates, h, f, g)
    gram_accumulate_reference(*ref, a.cpu(), gates.cpu(), h.cpu(), f.cpu(), g.cpu())
    if rtol is None:
        rtol = 1e-11 if device.type == "cpu" else 2e-6
    for name, got, want, s0 in zip(chip_ext.Accumulators._fields, acc, ref, start):
        assert got.dtype == torch.float64 and got.device == device
        assert not torch.isnan(got).any(), f"{name} has NaN"
        inc_got, inc_want = got.cpu() - s0, want - s0
        assert inc_want.abs().max() > 0, f"{name}: the reference added nothing; the test is void"
        torch.testing.assert_close(inc_got, inc_want, rtol=rtol, atol=rtol * float(inc_want.abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")
    return acc


# ----------------------------------------------------------------------------------- gate_pool


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1, 1),      # B, N, K, H, W: all ones
    (1, 5, 3, 7, 5),      # odd H and W
    (3, 1, 16, 4, 4),     # N = 1
    (2, 7, 1, 9, 3),      # K = 1
    (4, 12, 64, 14, 14),  # conv5_3-like spatial size
    (2, 3, 1024, 7, 7),   # large K, 7x7 (ResNet layer4)
    (2, 4, 5, 1, 1),      # 1x1 spatial
    (1, 3, 6, 33, 17),    # tiles that end mid-plane
])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
def test_gate_pool_shapes_layouts(device, shape, layout):
    B, N, K, H, W = shape
    check_gate_pool(make_A(B, K, H, W, layout=layout, device=device), make_gates(B, N, K, device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("gate_dtype", GATE_TYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gate_pool_dtypes(device, dtype, gate_dtype, layout):
    check_gate_pool(make_A(3, 20, 6, 5, dtype, layout, device), make_gates(3, 4, 20, gate_dtype, device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
@pytest.mark.parametrize("gate_dtype", [torch.float32, torch.float64])
def test_gate_pool_fractional_gates(device, dtype, gate_dtype):
    A = make_A(2, 9, 5, 6, dtype, device=device)
    check_gate_pool(A, make_gates(2, 3, 9, gate_dtype, device, binary=False), binary=False)


@pytest.mark.parametrize("device", devices())
def test_gate_pool_noncontiguous_gates(device):
    A = make_A(2, 8, 4, 4, device=device)
    gates = make_gates(2, 8, 5, device=device).transpose(1, 2)  # [2, 5, 8], strided
    assert not gates.is_contiguous()
    check_gate_pool(A, gates)


@pytest.mark.parametrize("device", devices())
def test_gate_pool_semantics_by_hand(device):
    """A tiny case written out: the rows are image-major, the gates multiply whole channels."""
    A = torch.tensor([[[[1.0, 3.0]], [[2.0, 6.0]]]], device=device)  # B=1, K=2, H=1, W=2
    gates = torch.tensor([[[1, 0], [0, 1], [1, 1]]], dtype=torch.bool, device=device)  # N=3
    gated, z = chip_ext.gate_pool(A, gates)
    want = torch.tensor([[[[1.0, 3.0]], [[0.0, 0.0]]],
                         [[[0.0, 0.0]], [[2.0, 6.0]]],
                         [[[1.0, 3.0]], [[2.0, 6.0]]]])
    assert torch.equal(gated.cpu(), want)
    assert torch.equal(z.cpu(), torch.tensor([[[2.0, 0.0], [0.0, 4.0], [2.0, 4.0]]]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 3), N=st.integers(1, 6), K=st.integers(1, 40), H=st.integers(1, 12),
       W=st.integers(1, 12), dtype=st.sampled_from(FLOAT_TYPES), gate_dtype=st.sampled_from(GATE_TYPES),
       layout=st.sampled_from(["contiguous", "channels_last", "strided"]))
def test_gate_pool_fuzz(B, N, K, H, W, dtype, gate_dtype, layout):
    check_gate_pool(make_A(B, K, H, W, dtype, layout), make_gates(B, N, K, gate_dtype))


# ----------------------------------------------------------------------------------- gram_accumulate


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("shape", [
    (1, 1, 1, 1),       # B, N, K, C
    (1, 5, 3, 2),
    (3, 1, 8, 4),       # N = 1
    (2, 6, 1, 3),       # K = 1
    (4, 10, 33, 7),     # K not a multiple of the 32-wide CUDA tile
    (2, 4, 1024, 3),    # large K: 524,800 packed entries
    (5, 3, 16, 200),    # many classes
])
def test_gram_shapes(device, shape):
    B, N, K, C = shape
    check_gram(*make_gram_inputs(B, N, K, C, device=device))


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("gate_dtype", GATE_TYPES)
def test_gram_gate_dtypes(device, gate_dtype):
    check_gram(*make_gram_inputs(3, 5, 12, 4, gate_dtype, device))


@pytest.mark.parametrize("device", devices())
def test_gram_noncontiguous_inputs(device):
    a, gates, h, f, g = make_gram_inputs(3, 4, 10, 6, device=device)
    a_nc = a.t().contiguous().t()                       # column-major [B, K]
    g_nc = g.permute(2, 0, 1).contiguous().permute(1, 2, 0)
    f_nc = torch.stack([f, f], dim=2)[:, :, 0]           # strided view
    assert not a_nc.is_contiguous() and not g_nc.is_contiguous() and not f_nc.is_contiguous()
    check_gram(a_nc, gates, h, f_nc, g_nc)


@pytest.mark.parametrize("device", devices())
def test_gram_accumulates_over_calls(device):
    """Two half-batches added one after the other equal the whole batch at once."""
    a, gates, h, f, g = make_gram_inputs(6, 5, 9, 4, device=device)
    whole = chip_ext.new_accumulators(4, 9, device)
    chip_ext.gram_accumulate(*whole, a, gates, h, f, g)
    halves = chip_ext.new_accumulators(4, 9, device)
    for sl in (slice(0, 3), slice(3, 6)):
        chip_ext.gram_accumulate(*halves, a[sl], gates[sl], h[sl], f[sl], g[sl])
    for x, y in zip(whole, halves):
        torch.testing.assert_close(x, y, rtol=1e-12 if device == "cpu" else 1e-6, atol=0)


@pytest.mark.parametrize("device", devices())
def test_gram_by_hand(device):
    """One image, two perturbations, K=2, C=1, written out."""
    a = torch.tensor([[2.0, 3.0]], device=device)
    gates = torch.tensor([[[1, 1], [1, 0]]], dtype=torch.bool, device=device)
    h = torch.tensor([[1.0, 0.5]], device=device)
    f = torch.tensor([[0.5]], device=device)
    g = torch.tensor([[[0.8], [0.4]]], device=device)
    G, b, y, n, zs, gs = chip_ext.new_accumulators(1, 2, device)
    chip_ext.gram_accumulate(G, b, y, n, zs, gs, a, gates, h, f, g)
    # z1 = (2, 3), w1 = f*h = 0.5;  z2 = (2, 0), w2 = 0.25
    # G = 0.5 * [[4, 6], [6, 9]] + 0.25 * [[4, 0], [0, 0]] -> packed (00, 01, 11) = (3, 3, 4.5)
    assert torch.allclose(G.cpu(), torch.tensor([[3.0, 3.0, 4.5]], dtype=torch.float64))
    # b = 0.5*0.8*(2,3) + 0.25*0.4*(2,0) = (1.0, 1.2)
    assert torch.allclose(b.cpu(), torch.tensor([[1.0, 1.2]], dtype=torch.float64))
    # y = 0.5*0.64 + 0.25*0.16 = 0.36;  n = 0.75
    assert torch.allclose(y.cpu(), torch.tensor([0.36], dtype=torch.float64))
    assert torch.allclose(n.cpu(), torch.tensor([0.75], dtype=torch.float64))
    # zs = 0.5*(2,3) + 0.25*(2,0) = (1.5, 1.5);  gs = 0.5*0.8 + 0.25*0.4 = 0.5
    assert torch.allclose(zs.cpu(), torch.tensor([[1.5, 1.5]], dtype=torch.float64))
    assert torch.allclose(gs.cpu(), torch.tensor([0.5], dtype=torch.float64))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(B=st.integers(1, 4), N=st.integers(1, 8), K=st.integers(1, 70), C=st.integers(1, 12),
       gate_dtype=st.sampled_from(GATE_TYPES))
def test_gram_fuzz(B, N, K, C, gate_dtype):
    check_gram(*make_gram_inputs(B, N, K, C, gate_dtype))


# ----------------------------------------------------------------------------------- opcheck


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_opcheck_gate_pool(device, layout):
    A = make_A(2, 6, 5, 4, layout=layout, device=device)
    gates = make_gates(2, 3, 6, torch.float32, device)
    torch.library.opcheck(torch.ops.chip_ext.gate_pool.default, (A, gates))


@pytest.mark.parametrize("device", devices())
def test_opcheck_gram_accumulate(device):
    a, gates, h, f, g = make_gram_inputs(2, 3, 5, 4, torch.float32, device)
    acc = random_accumulators(4, 5, device)
    torch.library.opcheck(torch.ops.chip_ext.gram_accumulate.default, (*acc, a, gates, h, f, g))


def test_torch_compile_gate_pool():
    """The op inside a compiled function (fake kernel for tracing, real kernel at run time)."""
    @torch.compile(backend="aot_eager", fullgraph=True)
    def pooled_sum(A, gates):
        gated, z = torch.ops.chip_ext.gate_pool(A, gates)
        return gated.sum(dim=(2, 3)), z

    A, gates = make_A(2, 6, 3, 3), make_gates(2, 4, 6)
    s, z = pooled_sum(A, gates)
    ref_gated, ref_z = gate_pool_reference(A, gates)
    torch.testing.assert_close(s, ref_gated.sum(dim=(2, 3)))
    torch.testing.assert_close(z, ref_z)


# ----------------------------------------------------------------------------------- CUDA-only


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("dtype", FLOAT_TYPES)
def test_gate_pool_cuda_misaligned_falls_back(dtype):
    """A view starting one element into its storage cannot take 16-byte loads; results still exact."""
    base = make_A(1, 2 * 8 * 16 * 16 + 1, 1, 1, dtype, device="cuda").flatten()
    A = base[1:].view(2, 8, 16, 16)
    assert A.data_ptr() % 16 != 0
    check_gate_pool(A, make_gates(2, 5, 8, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
@pytest.mark.parametrize("B, N", [(1, 100), (2, 9), (48, 8)])  # copy groups on 132 SMs: 25, 3, one (blocks enough)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_gate_pool_cuda_copy_groups(B, N, layout):
    """Few images x tiles: the N copies are split over a third grid dimension (group 0 also sums the
    tile); every copy and z still exact, bf16 (16-byte streaming stores) and float32."""
    for dtype in (torch.bfloat16, torch.float32):
        check_gate_pool(make_A(B, 512, 14, 14, dtype, layout, device="cuda"), make_gates(B, N, 512, device="cuda"))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_gram_cuda_ignores_global_tf32():
    """TF32 would cost ~1e-3 relative error; the GEMMs run in float64, so the process-wide TF32 switch
    neither matters nor is touched (another thread may be relying on it)."""
    import threading

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    seen, stop = set(), threading.Event()

    def watch():  # another thread, looking at the switch all along
        while not stop.is_set():
            seen.add(torch.backends.cuda.matmul.allow_tf32)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for _ in range(3):
            check_gram(*make_gram_inputs(16, 20, 256, 50, device="cuda"), rtol=2e-6)
    finally:
        stop.set()
        watcher.join()
        torch.backends.cuda.matmul.allow_tf32 = previous
    assert seen == {True}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible")
def test_cuda_matches_cpu_realistic():
    """conv5_3-sized gate_pool and a C=100, K=512 Gram: CUDA equals the CPU kernels."""
    A = make_A(4, 512, 14, 14, device="cuda")
    gates = make_gates(4, 20, 512, device="cuda")
    gated, z = chip_ext.gate_pool(A, gates)
    gated_cpu, z_cpu = chip_ext.gate_pool(A.cpu(), gates.cpu())
    assert torch.equal(gated.cpu(), gated_cpu)
    torch.testing.assert_close(z.cpu(), z_cpu, rtol=1e-5, atol=1e-6)
    check_gram(*make_gram_inputs(8, 20, 512, 100, device="cuda"))
